"""The version of voxlog that writes an event (each envelope's `producer_version`): part of the contract,
so it sits with the schemas, below everything that writes."""

__version__ = "0.1.0"
