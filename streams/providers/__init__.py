"""Speech and language providers behind small interfaces, one module per provider."""
