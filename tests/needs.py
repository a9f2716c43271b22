"""What some tests need from the machine (a Kafka broker, espeak-ng, Chromium): where it is missing
the test skips, except under CI=true, where `bash .ci/run` installs and starts all of it, and its
absence fails the test so that no test silently vanishes from CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(what: str, how: str) -> NoReturn:
    """Skip (or, under CI, fail) the calling test: `what` is absent, `how` says how to get it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing: CI must run this test ({how})")
    pytest.skip(f"{what} is missing ({how})")
