"""The progress reporter (`voxlog.progress`): plain lines when standard error is not a terminal, at most
one every two seconds and a last one; bars on a terminal. A fake clock: no test sleeps."""

from __future__ import annotations

import io

import pytest

from voxlog.progress import describe, progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_come_at_most_every_two_seconds_and_a_last_one_when_the_work_ends() -> None:
    clock, out = Clock(), io.StringIO()
    with progress("replay verify", total=2550, unit="calls", stream=out, bars=False, clock=clock) as advance:
        for _ in range(1200):  # 32 calls a second
            clock.now += 1 / 32
            advance()
        lines = out.getvalue().splitlines()
        assert lines[:2] == [
            "replay verify: 64/2550 calls (2%), 32 calls/s, 1 min 18 s left",
            "replay verify: 128/2550 calls (5%), 32 calls/s, 1 min 16 s left",
        ]
        assert len(lines) == 18  # 37.5 s: a line every 2 s, not one per call
        assert lines[-1] == "replay verify: 1152/2550 calls (45%), 32 calls/s, 44 s left"
        advance(1350)
        assert len(out.getvalue().splitlines()) == 18  # 1.5 s since the last line
    assert out.getvalue().splitlines()[-1] == "replay verify: 2550/2550 calls (100%) in 38 s, 68 calls/s"


def test_work_quicker_than_two_seconds_gives_its_last_line_alone() -> None:
    clock, out = Clock(), io.StringIO()
    with progress("projections rebuild calls", unit="events", stream=out, bars=False, clock=clock) as read:
        for done in range(0, 12_000, 2000):
            clock.now += 0.25
            read.update(done, 20_000)  # told absolutely, with the total once known
        clock.now += 0.25
        read.update(20_000)
    assert out.getvalue() == "projections rebuild calls: 20000/20000 events (100%) in 1.8 s, 11429 events/s\n"


def test_an_unknown_total_gives_counts_and_rates_without_a_percentage() -> None:
    clock, out = Clock(), io.StringIO()
    with progress("replay verify: finding calls", unit="records", stream=out, bars=False, clock=clock) as read:
        for _ in range(5):
            clock.now += 1.0
            read(1000)
    assert out.getvalue().splitlines() == [
        "replay verify: finding calls: 2000 records, 1000 records/s",
        "replay verify: finding calls: 4000 records, 1000 records/s",
        "replay verify: finding calls: 5000 records in 5.0 s, 1000 records/s",
    ]


def test_work_that_fails_says_where_it_stopped() -> None:
    clock, out = Clock(), io.StringIO()

    def consume() -> None:
        with progress("bench log: consume", total=300, unit="events", stream=out, bars=False, clock=clock) as read:
            clock.now += 1.5
            read(120)
            raise RuntimeError("the log went away")

    with pytest.raises(RuntimeError, match="the log went away"):
        consume()
    assert out.getvalue() == "bench log: consume: stopped at 120/300 events (40%) after 1.5 s\n"


def test_lines_read_plainly() -> None:
    assert describe("x", 0, 10, "calls", 0.0) == "x: 0/10 calls (0%)"  # no rate yet, no time left
    assert describe("x", 3, 10, "calls", 2.0) == "x: 3/10 calls (30%), 1.5 calls/s, 4.7 s left"
    assert describe("x", 12, 10, "calls", 2.0) == "x: 12/12 calls (100%), 6.0 calls/s"  # an estimate outgrown
    assert describe("x", 0, 0, "calls", 0.0, final=True) == "x: 0/0 calls (100%) in 0.0 s"
    assert describe("x", 7200, None, "events", 3700.0, final=True) == "x: 7200 events in 1 h 1 min, 1.9 events/s"


def test_on_a_terminal_bars_are_drawn_and_work_inside_work_shares_the_display() -> None:
    out = io.StringIO()
    with progress("bench projections: writing", total=4, unit="events", stream=out, bars=True) as outer:
        with progress("bench projections: rebuild calls", unit="events", stream=out, bars=True) as inner:
            inner(7)
        outer(4)
    drawn = out.getvalue()
    assert "bench projections: writing" in drawn
    assert "4/4" in drawn
    assert "bench projections: rebuild calls" in drawn
    assert "7/7" in drawn  # an unknown total: full once the work is over
