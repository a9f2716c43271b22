"""A benchmark's child process (the callers, a fleet gateway) hands its figures back on its standard output
as JSON: what else writes there, Python's `print` or a library's C code on file descriptor 1, must land on
its standard error instead (`voxlog.bench_calls._reports_only`), not in the middle of the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_only_the_report_reaches_standard_output_whatever_else_writes_there() -> None:
    script = textwrap.dedent("""
        import json, os
        from voxlog.bench_calls import _reports_only

        report = _reports_only()
        print("a library's line")
        os.write(1, b"a C library's line\\n")
        print(json.dumps({"figures": list(range(5))}), file=report, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == {"figures": [0, 1, 2, 3, 4]}
    assert "a library's line" in done.stderr
    assert "a C library's line" in done.stderr
