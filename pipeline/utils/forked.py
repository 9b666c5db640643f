"""A second core for GIL-bound work: a forked child fills a shared array while this process goes on.

Threads do not overlap a million small system calls with Python work: each call gives the GIL up and waits
to take it back (measured: a thread ``stat``-ing a million files next to a thread importing TensorFlow
finished only when the import did). A forked child has a GIL of its own. It writes its result into an
anonymous shared mapping, runs nothing but the function it was given (no imports, no output, every
inherited file descriptor closed: a lock this process holds stays this process's) and leaves with
``os._exit``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

import numpy as np


def can_fork() -> bool:
    """Linux. Other threads of this process (the stderr filter's, a BLAS pool) do not matter: the child
    runs only the function it is given — system calls and stores into numpy arrays, no lock another thread
    could hold at the fork — and ends with ``os._exit``."""
    return sys.platform == "linux"


def _close_inherited() -> None:
    for fd in [int(x) for x in os.listdir("/proc/self/fd")]:
        if fd > 2:
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def in_child(
    fill: Callable[[np.ndarray, bool], None], shape: tuple[int, ...]
) -> Iterator[Callable[[], np.ndarray]]:
    """Run ``fill(out, True)`` (``out``: a shared int64 array of ``shape``) in a forked child while the caller
    goes on; yield a function that waits for the child and returns ``out``. Where the child cannot run
    (:func:`can_fork`) or failed (whatever it raised is not carried over), ``fill(out, False)`` runs in
    this process when the result is asked for, raising what it raises. Leaving the block ends a child still running."""
    n = int(np.prod(shape))
    pid = None
    if n and can_fork():
        import mmap

        shared = mmap.mmap(-1, 8 * n)
        out = np.frombuffer(shared, np.int64).reshape(shape)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            code = 1
            try:
                _close_inherited()
                fill(out, True)
                code = 0
            finally:
                os._exit(code)
    else:
        out = np.empty(shape, np.int64)

    def result() -> np.ndarray:
        nonlocal pid
        if pid is not None:
            _, status = os.waitpid(pid, 0)
            pid = None
            if os.waitstatus_to_exitcode(status) == 0:
                return out
        fill(out, False)
        return out

    try:
        yield result
    finally:
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
