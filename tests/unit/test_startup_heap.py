"""`freeze_startup_heap`: what a process holds when it has started leaves the collector's passes, once per
process. Run in a process of its own: freezing the test runner's heap would change every later test's."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_what_the_process_holds_at_its_start_is_frozen_once_and_what_comes_later_is_still_collected() -> None:
    script = textwrap.dedent("""
        import gc
        from streams.startup_heap import freeze_startup_heap

        held = [[index] for index in range(50_000)]  # what a started process holds
        freeze_startup_heap()
        frozen = gc.get_freeze_count()
        assert frozen >= 50_000, frozen
        later = [[index] for index in range(10_000)]
        freeze_startup_heap()  # a second gateway in the process: nothing more frozen
        assert gc.get_freeze_count() == frozen, (gc.get_freeze_count(), frozen)
        cycle = [later]
        cycle.append(cycle)
        del cycle, later
        assert gc.collect() > 0, "what came after the start is collected as before"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
