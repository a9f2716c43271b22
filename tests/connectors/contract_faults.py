"""The faults on the wire every connector meets the same way, whatever it is: what the contract suites
of CRMs, desks and calendars each run against their implementations, with one cheap operation each."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import pytest

from streams.connectors.base import ConnectorError, FailureKind
from tests.connectors.harness import WireFaults

H = TypeVar("H", bound=WireFaults)

TIMEOUT_S = 1.0
"""What every harness builds its connector with."""
STALL_SLACK_S = 8.0
"""How much later than its timeout a stalled request may fail on a loaded machine."""


def harness_of(vendor: str) -> Iterator[Any]:
    """The vendor's harness, running, for a fixture to yield."""
    module = importlib.import_module(f"tests.connectors.harness_{vendor}")
    factory: Callable[[], AbstractContextManager[Any]] = module.harness
    with factory() as running:
        yield running


def failure(operation: Callable[[], object]) -> ConnectorError:
    with pytest.raises(ConnectorError) as caught:
        operation()
    return caught.value


def fails(kind: FailureKind, call: object) -> ConnectorError:
    """The `ConnectorError` that `call` raises, which must be of `kind`."""
    assert callable(call)
    error = failure(call)
    assert error.kind is kind, str(error)
    return error


def check_faults(harness: WireFaults, operation: Callable[[], object]) -> None:
    """Every fault in turn, on `operation`, each answered by the right kind of error."""
    for status, kind in ((403, FailureKind.SCOPE), (404, FailureKind.NOT_FOUND), (400, FailureKind.INVALID),
                         (422, FailureKind.INVALID), (500, FailureKind.UNAVAILABLE), (502, FailureKind.UNAVAILABLE),
                         (503, FailureKind.UNAVAILABLE)):
        harness.fail_next(status)
        error = failure(operation)
        assert error.kind == kind, (status, error)
        assert error.retryable == (kind == FailureKind.UNAVAILABLE)
    harness.fail_next(429, headers={"Retry-After": "7"})
    limited = failure(operation)
    assert limited.kind == FailureKind.RATE_LIMITED
    assert limited.retryable
    assert limited.retry_after_s == pytest.approx(7.0)
    harness.malformed_next()
    assert failure(operation).kind == FailureKind.BAD_RESPONSE
    operation()  # and nothing is left over: the next request goes through


def check_stall(harness: WireFaults, operation: Callable[[], object]) -> None:
    harness.stall_next(TIMEOUT_S + STALL_SLACK_S + 5.0)
    began = time.monotonic()
    error = failure(operation)
    assert error.kind == FailureKind.UNAVAILABLE
    assert error.retryable
    assert time.monotonic() - began < TIMEOUT_S + STALL_SLACK_S


def check_auth(harness: WireFaults, operation: Callable[[], object]) -> None:
    """401: an OAuth connector refreshes its token once and goes on; a second 401 (or any 401 for a
    static token) is an AUTH error that names no secret."""
    if harness.refreshes_tokens:
        harness.fail_next(401)
        operation()
    harness.fail_next(401, times=2)
    error = failure(operation)
    assert error.kind == FailureKind.AUTH
    assert not error.retryable
    for secret in harness.secret_values:
        assert secret not in str(error)
        assert secret not in repr(error.args)


def check_health(harness: WireFaults, check: Callable[[], list[Any]]) -> None:
    """`check()` passes on a healthy server, and names the problem on a refused token or scope."""
    results = check()
    assert results
    assert all(r.ok for r in results), results
    for status, word in ((401, "401"), (403, "403")):
        # Once (twice for a 401 to a connector that refreshes its token): the first thing check() tries fails.
        harness.fail_next(status, times=2 if status == 401 and harness.refreshes_tokens else 1)
        failed = [r for r in check() if not r.ok]
        assert failed, f"check() saw nothing wrong on {status}"
        assert any(word in r.detail or ("auth" if status == 401 else "scope") in r.detail.lower()
                   or "permission" in r.detail.lower() or "token" in r.detail.lower() for r in failed), failed
        for result in failed:
            for secret in harness.secret_values:
                assert secret not in result.detail
