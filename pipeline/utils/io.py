"""Durable file I/O in one place: the atomic write, JSON, file digests and the inter-process lock.

Every file featcache writes (cache parts and caches, manifests, checkpoints, models, CSV and JSON) goes
through :func:`atomic_path`: written to a temporary name in the same folder, flushed and fsynced, renamed
over the target, and the folder fsynced. A reader therefore sees the old file or the new one, never half
of one, after a killed process *and* after a power cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.utils.errors import FeatcacheError


def temp_path(path: Path) -> Path:
    """``.<name>.<pid>.tmp<suffix>``: hidden, ours (by pid), and still ending in the suffix writers expect."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def fsync_path(path: Path) -> None:
    """Flush a file, or every file of a folder (a SavedModel), to the disk."""
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_path(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def remove_dead_temps(path: Path) -> None:
    """Remove what writers of ``path`` killed mid-write left (``temp_path`` names whose process is gone);
    a live writer's temporary is left alone."""
    for p in Path(path).parent.glob(f".{Path(path).name}.*.tmp{Path(path).suffix}"):
        pid = p.name[len(Path(path).name) + 2 :].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove_path(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: alive
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path, tmp: Path | None = None, *, synced: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path`` durably.

    On any error (or a ``KeyboardInterrupt``) the temporary file is removed and ``path`` is untouched.
    ``synced=True`` when the writer already fsynced the file itself.
    """
    path = Path(path)
    tmp = tmp or temp_path(path)
    try:
        yield tmp
        if not synced:
            fsync_path(tmp)
        if tmp.is_dir() and path.exists():
            remove_path(path)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def json_default(o: Any):
    """numpy scalars and arrays, paths, tuples and sets as JSON; anything else as its repr."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, tuple, set)):
        return str(o) if isinstance(o, Path) else list(o)
    return repr(o)


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Atomic and durable: a reader sees the old file or the new one, never half of it."""
    atomic_write(path, json.dumps(obj, indent=indent, default=json_default) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(
    path: str | Path,
    busy: str,
    *,
    timeout: float = 0,
    waiting: str | None = None,
    timed_out: str | None = None,
) -> Iterator[None]:
    """Hold the inter-process lock file ``path`` for the block, or raise one clear line.

    ``timeout`` 0 fails at once with ``busy`` when another process holds it; otherwise the call prints
    ``waiting`` and waits up to ``timeout`` seconds (-1 = for ever), then fails with ``timed_out``.
    The lock file is removed on release, so a clean run leaves none behind (see :func:`_acquire_flock`).
    """
    try:
        fd = _acquire_flock(Path(path), 0)
        if fd is None:
            if timeout == 0:
                raise FeatcacheError(busy)
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fd = _acquire_flock(Path(path), timeout)
            if fd is None:
                raise FeatcacheError(timed_out or busy)
    except OSError as e:  # the lock file cannot be created: read-only or forbidden folder, disk full
        raise FeatcacheError(f"cannot lock {path} ({e.strerror or e}); is the folder writable?") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a waiter holding the old file sees it is gone and retries
        os.close(fd)


def _acquire_flock(path: Path, timeout: float) -> int | None:
    """An exclusive ``flock`` on ``path`` (the same lock the ``filelock`` package takes), or None on timeout.

    The holder unlinks the file before releasing it, so a lock won on a file that is no longer the one at
    ``path`` is stale: the loop reopens and tries again. -1 waits for ever.
    """
    import fcntl

    deadline = None if timeout < 0 else time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
            continue
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
