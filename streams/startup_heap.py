"""A long-lived process's start, out of the cycle collector's way.

What a process holds once it has started (its modules, the schemas and their compiled codecs, the PII
recognisers, the VAD's model, pandas) lives as long as the process, yet each of the collector's full passes
walks all of it: about 190,000 objects in a gateway, 180 to 350 ms a pass on a slow 2-core machine, about
once a minute at 50 calls, each one holding the event loop, so every call's audio, for that long
(`docs/performance.md`, "Calls spread over gateway processes"). Frozen (`gc.freeze`), it is left out of
every pass for good; what the process allocates afterwards is collected as before."""

from __future__ import annotations

import functools
import gc


@functools.cache
def freeze_startup_heap() -> None:
    """Once per process, when it has started (later calls do nothing): what it holds now is never walked by
    the collector again. Cyclic garbage already there is frozen with it (kept, not freed), once."""
    gc.freeze()
