"""Work handed to a forked child that fills arrays shared with this process, while this process goes on.

A growing extract must check that every cached file is as it was (a ``stat`` each: seconds at a million
files) and must import TensorFlow and build the backbone (seconds, on one core). Threads cannot overlap the
two: both hold the GIL most of the time (measured at 1M files on 2 cores: 7.5 s together against 3.0 s and
3.9 s apart). A forked child does the first on the other core, with the parent's listing already in its
memory (nothing is sent), and writes its answer into an anonymous shared mapping. Linux only (fork with
threads running is unsafe on macOS); elsewhere the caller does the work in line.
"""

from __future__ import annotations

import mmap
import os
import sys
import warnings
from collections.abc import Callable

import numpy as np


def can_fork() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork")


class ForkedFill:
    """``fill(*arrays)`` running on a forked child; :meth:`result` waits and returns the arrays, or raises
    OSError when ``fill`` failed (its exception stays in the child: the caller's fallback says what)."""

    def __init__(self, fill: Callable[..., None], shapes: list[tuple[int, np.dtype]]):
        nbytes = [n * np.dtype(dtype).itemsize for n, dtype in shapes]
        self._buffer = mmap.mmap(-1, max(1, sum(nbytes)))  # MAP_SHARED | MAP_ANONYMOUS: the child writes here
        self.arrays, at = [], 0
        for (n, dtype), size in zip(shapes, nbytes, strict=True):
            self.arrays.append(np.frombuffer(self._buffer, dtype, n, at))
            at += size
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():  # 3.12+ warns of forking with threads: this child only fills arrays
            warnings.simplefilter("ignore", DeprecationWarning)
            self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child: its coverage is not collected
            code = 1
            try:
                fill(*self.arrays)
                code = 0
            finally:
                os._exit(code)  # no atexit handlers, no buffers flushed twice, no TensorFlow teardown

    def result(self) -> list[np.ndarray]:
        if self.pid is not None:
            _, status = os.waitpid(self.pid, 0)
            self.pid, self.code = None, os.waitstatus_to_exitcode(status)
        if self.code != 0:
            raise OSError(f"the forked child ended with exit code {self.code}")
        return self.arrays

    def __del__(self):
        if getattr(self, "pid", None):  # never waited for: reap it, so no zombie is left behind
            try:
                os.waitpid(self.pid, 0)
            except OSError:
                pass
