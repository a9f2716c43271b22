"""Fixtures shared by the contract suites."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from consumers.backends import LogBackend
from producers.log_producer import LogProducer


@pytest.fixture
async def producer(backend: LogBackend) -> AsyncIterator[LogProducer]:
    async with backend.producer() as log_producer:
        yield log_producer
