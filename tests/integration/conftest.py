"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from voxlog.settings import Settings
from voxlog.sim.sip_caller import free_sip_port
from voxlog.sim.stack import LocalStack, local_stack


@pytest.fixture
async def sip_stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    """The stack with its SIP endpoint on a free loopback port, the demo tenant's settings otherwise."""
    settings = Settings(home=tmp_path / "home", sip_bind=f"127.0.0.1:{free_sip_port()}")
    async with local_stack(settings) as running:
        yield running
