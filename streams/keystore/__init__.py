"""The keystore behind crypto-shredding: data keys per call and kind of data, wrapped by each tenant's
key-encryption keys (a local file here, or a KMS behind the same interface)."""
