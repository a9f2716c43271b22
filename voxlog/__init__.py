"""voxlog: the composition root (settings, CLI, wiring of backends)."""

__version__ = "0.1.0"
