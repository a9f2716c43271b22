"""Progress of long work, on standard error, so that standard output stays the command's result.

One reporter for every long command (`replay verify --all`, `projections rebuild`, the benchmarks):

    with progress("replay verify", total=len(ids), unit="calls") as advance:
        for call_id in ids:
            ...
            advance()                 # or advance(n); or advance.update(done, total) when told absolutely

On a terminal it draws rich progress bars; otherwise (piped, in CI, in a log file) it writes plain
lines, at most one every `PLAIN_EVERY_S` seconds and a last one when the block ends:

    replay verify: 1200/2550 calls (47%), 38 calls/s, 35 s left
    replay verify: 2550/2550 calls (100%) in 67 s, 38 calls/s

A total not known in advance is left out (counts and rates, no percentage), and may be given later
(`advance.update(done, total)`). Layers below `voxlog/` never import this module: they take a plain
callback (`Callable[[int], None]` to advance, or `Callable[[int, int | None], None]` for done and
total), which a `Tracker` is (`advance`, `advance.update`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

PLAIN_EVERY_S = 2.0
"""At most one plain line this often (and the last one)."""
BARS_EVERY_S = 0.2
"""How often bars are redrawn at most: from the caller's own thread, as it advances (no thread of their
own, so that a benchmark's CPU time holds no drawing it did not ask for)."""

Clock = Callable[[], float]


class Tracker:
    """The progress of one piece of work: call it to advance (`advance()`, `advance(n)`), or `update`
    it with the count done so far (and the total, once known)."""

    def __init__(self, what: str, total: int | None, unit: str, clock: Clock) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.done = 0
        self._clock = clock
        self.started = clock()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        self._changed()

    def update(self, done: int, total: int | None = None) -> None:
        """`done` so far in all; `total`, when given, the work's size (None keeps the one known)."""
        self.done = done
        if total is not None:
            self.total = total
        self._changed()

    def line(self, *, final: bool = False, failed: bool = False) -> str:
        """This progress as one plain line (see `describe`)."""
        return describe(self.what, self.done, self.total, self.unit, self._clock() - self.started,
                        final=final, failed=failed)

    def _changed(self) -> None:
        """Shows the new state, if it is time to."""

    def finish(self, *, failed: bool) -> None:
        """Shows the last state (`progress` calls it when its block ends)."""


class _Lines(Tracker):
    """Plain lines to a stream that is not a terminal."""

    def __init__(self, what: str, total: int | None, unit: str, clock: Clock, stream: TextIO, every_s: float) -> None:
        super().__init__(what, total, unit, clock)
        self._stream = stream
        self._every_s = every_s
        self._shown = self.started

    def _changed(self) -> None:
        now = self._clock()
        if now - self._shown >= self._every_s:
            self._shown = now
            self._write(self.line())

    def finish(self, *, failed: bool) -> None:
        self._write(self.line(final=True, failed=failed))

    def _write(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream must not stop the work
            self._stream.write(line + "\n")
            self._stream.flush()


class _Bar(Tracker):
    """A rich progress bar, among the others of the same display."""

    def __init__(self, what: str, total: int | None, unit: str, clock: Clock, bars: Progress) -> None:
        super().__init__(what, total, unit, clock)
        self._bars = bars
        self._task: TaskID = bars.add_task(what, total=total, unit=unit)
        self._drawn = self.started
        bars.refresh()

    def _changed(self) -> None:
        now = self._clock()
        if now - self._drawn >= BARS_EVERY_S:
            self._drawn = now
            self._draw()

    def finish(self, *, failed: bool) -> None:
        if failed:
            self._bars.update(self._task, description=f"{self.what} [red](stopped)[/]")
        elif self.total is None:
            self.total = self.done  # done: the bar full
        self._draw()

    def _draw(self) -> None:
        total = None if self.total is None else max(self.total, self.done)
        with contextlib.suppress(OSError, ValueError):
            self._bars.update(self._task, completed=self.done, total=total)
            self._bars.refresh()


class _Rate(ProgressColumn):
    """How many units a second, in the work's own unit."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{_number(speed)} {task.fields['unit']}/s", style="progress.data.speed")


_display: Progress | None = None
"""The bars on screen: work that starts while others run adds its bar to them (rich draws one display at a time)."""
_bars_open = 0


@contextlib.contextmanager
def _bars(stream: TextIO) -> Iterator[Progress]:
    global _display, _bars_open
    if _display is None:
        _display = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
            TaskProgressColumn(), _Rate(), TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(file=stream), auto_refresh=False,
            # Standard output is the command's result: never routed into the display on standard error.
            redirect_stdout=False, redirect_stderr=False)
        _display.start()
    display = _display
    _bars_open += 1
    try:
        yield display
    finally:
        _bars_open -= 1
        if _bars_open == 0:
            _display = None
            with contextlib.suppress(OSError, ValueError):
                display.stop()


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress(what: str, total: int | None = None, *, unit: str = "items", stream: TextIO | None = None,
             bars: bool | None = None, clock: Clock = time.monotonic,
             every_s: float = PLAIN_EVERY_S) -> Iterator[Tracker]:
    """Reports the progress of the block's work on `stream` (standard error): `what` it is, how many `unit`
    of `total` (None: not known) are done. Bars on a terminal, plain lines otherwise (`bars` decides
    instead when given); the last state is shown when the block ends, "stopped" if it raised."""
    out = stream if stream is not None else sys.stderr
    with contextlib.ExitStack() as stack:
        tracker: Tracker
        if bars if bars is not None else is_terminal(out):
            tracker = _Bar(what, total, unit, clock, stack.enter_context(_bars(out)))
        else:
            tracker = _Lines(what, total, unit, clock, out, every_s)
        try:
            yield tracker
        except BaseException:
            tracker.finish(failed=True)
            raise
        tracker.finish(failed=False)


def describe(what: str, done: int, total: int | None, unit: str, elapsed_s: float, *, final: bool = False,
             failed: bool = False) -> str:
    """One plain line: `replay verify: 1200/2550 calls (47%), 38 calls/s, 35 s left`; when the work is
    over, `... (100%) in 67 s, 38 calls/s`, or `stopped at ... after 31 s`; without a total, no
    percentage and no time left."""
    count = f"{done} {unit}" if total is None else f"{done}/{max(total, done)} {unit} ({_percent(done, total)}%)"
    rate = done / elapsed_s if elapsed_s > 0 else None
    speed = "" if rate is None else f"{_number(rate)} {unit}/s"
    if failed:
        return f"{what}: stopped at {count} after {_duration(elapsed_s)}"
    if final:
        return f"{what}: {count} in {_duration(elapsed_s)}" + (f", {speed}" if speed else "")
    parts = [count]
    if speed:
        parts.append(speed)
    if rate and total is not None and done < total:
        parts.append(f"{_duration((total - done) / rate)} left")
    return f"{what}: {', '.join(parts)}"


def _percent(done: int, total: int) -> int:
    return 100 if total <= 0 or done >= total else int(100 * done / total)


def _number(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
