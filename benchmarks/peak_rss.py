"""``python -m benchmarks.peak_rss ARGS``: run ``featcache ARGS`` and write its own peak RSS to $FEATCACHE_PEAK_FILE.

Why not ``wait4``'s ``ru_maxrss``: on Linux it keeps the high-water mark from before ``exec``, so a child
forked from a large parent (a benchmark that already loaded TensorFlow) reports the parent's size.
``VmHWM`` belongs to the process's current address space and starts afresh at ``exec``.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def peak_rss(args: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, str, int]:
    """(peak RSS MiB, stdout, exit code) of ``featcache ARGS`` in a fresh process."""
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".peak") as f:
        full_env = {**os.environ, **(env or {}), "FEATCACHE_PEAK_FILE": f.name, "TF_CPP_MIN_LOG_LEVEL": "2"}
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.peak_rss", *args],
            env=full_env,
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise RuntimeError(f"featcache {' '.join(args)} exited {proc.returncode}: {proc.stderr[-400:]}")
        return int(Path(f.name).read_text()) / 1024, proc.stdout, proc.returncode


if __name__ == "__main__":
    atexit.register(lambda: Path(os.environ["FEATCACHE_PEAK_FILE"]).write_text(str(_vm_hwm_kib())))
    from pipeline.cli import main

    sys.argv = ["featcache", *sys.argv[1:]]
    sys.exit(main())  # as the console script calls it: a process of its own (pipeline.cli.main)
