"""voxlog: the composition root (settings, CLI, wiring of backends)."""
