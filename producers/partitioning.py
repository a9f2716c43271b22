"""Key -> partition, the same way Kafka's default partitioner does it (murmur2), on both backends.

So a call lands on the same partition number whichever backend holds it, and replay can find it.
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2

_CACHE_LIMIT = 65_536
_cache: dict[tuple[bytes, int], int] = {}


def partition_for(key: bytes, partitions: int) -> int:
    # murmur2 is pure Python (~10 us); a call's key repeats for every event, so remember it.
    found = _cache.get((key, partitions))
    if found is None:
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        found = (murmur2(key) & 0x7FFFFFFF) % partitions
        _cache[(key, partitions)] = found
    return found
