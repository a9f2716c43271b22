"""Every projection voxlog runs, as the composition roots (`voxlog serve`, `voxlog projections`,
the demo, the bench) build them."""

from __future__ import annotations

from pathlib import Path

from projections.audit import AuditProjection
from projections.caller_memory import MemoryProjection
from projections.calls import CallsProjection
from projections.projection import Projection
from projections.recording_store import RecordingStore
from projections.recordings import RecordingsProjection
from streams.config.agents import AgentRouter


def default_projections(router: AgentRouter | None = None, recordings: Path | None = None,
                        recording_store: RecordingStore | None = None) -> list[Projection]:
    """Every projection; `recordings` is the folder call recordings are assembled in (none: no
    recordings), `recording_store` where they are kept (default: that folder)."""
    found: list[Projection] = [CallsProjection(router), AuditProjection(), MemoryProjection()]
    if recordings is not None:
        found.append(RecordingsProjection(recordings, recording_store))
    return found
