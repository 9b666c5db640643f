"""A small process pool whose running task can be cut: a worker over its time budget is killed and replaced.

joblib/loky cannot stop one running task (a scikit-learn fit holds the GIL in C code, so a thread cannot be
interrupted either), so a search that must cut a runaway trial needs processes it owns. Each worker is a
``spawn``-ed process (safe whatever the parent imported: TensorFlow, h5py) that receives the shared state
once (``init(state)``, e.g. the cached features), then runs tasks one after another. A task reports items
(one per finished trial) as it goes; the parent's clock for a worker restarts at each item, so the budget
applies per item. A worker killed for its budget, or one that died, is reported through ``on_stop`` with
the items it had already sent; the caller may hand back tasks for what was left undone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any


def usable_cores() -> int:
    """The cores this process may use: its affinity mask (a container's or a job's share), not the host's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def worker_count(n_jobs: int) -> int:
    """``n_jobs`` as joblib reads it: -1 = every core, -2 = all but one, ...; at least 1."""
    cores = os.cpu_count() or 1
    return max(1, n_jobs if n_jobs > 0 else cores + 1 + n_jobs)


def blas_threads(n_workers: int) -> int:
    """BLAS/OpenMP threads per worker so that workers × threads does not exceed the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, n_workers))


def current_blas_threads() -> int:
    """The threads the BLAS may use in this process now (a search worker's limit included): the fewest of
    the BLAS libraries loaded, since one loaded after the limit was set (FAISS's own) is not limited."""
    from threadpoolctl import threadpool_info

    return max(1, min([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"], default=1))


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) of process ``pid`` so far; None where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _worker_main(conn, init: Callable[[Any], Any], run: Callable, threads: int) -> None:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        ctx = init(conn.recv())  # the shared state comes first, once this process has started
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg is None:
                return
            task_id, task = msg
            try:
                run(ctx, task, lambda item, _id=task_id: conn.send(("item", _id, item)))
                conn.send(("done", task_id, None))
            except Exception as e:  # noqa: BLE001 - reported to the parent, the worker lives on
                conn.send(("error", task_id, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}"))


@dataclass
class _Worker:
    proc: Any
    conn: Any
    task_id: int | None = None
    since: float = 0.0  # start of the current item (wall clock)
    cpu_since: float | None = None  # the worker's CPU time then
    items: list[Any] = field(default_factory=list)


@dataclass
class Stop:
    """Why a task ended early: ``"budget"`` (cut by the parent) or ``"died"`` (the worker exited)."""

    task: Any
    items: list[Any]  # what it reported before stopping
    reason: str
    seconds: float  # time spent on the item it was running (wall clock)
    cpu: float | None = None  # CPU seconds spent on it, where known


class Pool:
    """``run(tasks)`` on ``n`` worker processes; ``budget(task, items_done)`` seconds or None per item."""

    def __init__(self, n: int, init: Callable[[Any], Any], state: Any, run: Callable, threads: int):
        self.n, self.init, self.state, self.run_fn, self.threads = n, init, state, run, threads
        self.ctx = mp.get_context("spawn")
        self.workers: list[_Worker] = []

    def _start(self, k: int = 1) -> list[_Worker]:
        """Start ``k`` workers, then send each the shared state. A spawned child reads its start-up
        arguments only once it runs, so megabytes of features passed there would start workers one after
        another; sent after every start, they boot at once."""
        new = []
        for _ in range(k):
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(
                target=_worker_main, args=(child, self.init, self.run_fn, self.threads), daemon=True
            )
            proc.start()
            child.close()
            new.append(_Worker(proc, parent))
        self.workers += new
        for w in new:
            w.conn.send(self.state)
        return new

    def _kill(self, w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(5)
        w.conn.close()
        self.workers.remove(w)

    def close(self) -> None:
        for w in list(self.workers):
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in list(self.workers):
            w.proc.join(2)
            self._kill(w)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def map(
        self,
        tasks: list[Any],
        on_item: Callable[[Any, Any], None],
        budget: Callable[[Any, int], float | None],
        on_stop: Callable[[Stop], list[Any]],
        on_error: Callable[[Any, list[Any], str], None],
        before_send: Callable[[Any], Any] = lambda task: task,
    ) -> None:
        """Run every task; new tasks returned by ``on_stop`` join the queue."""
        queue: deque = deque(enumerate(tasks))
        by_id: dict[int, Any] = dict(queue)
        next_id = len(tasks)
        self._start(min(self.n, len(queue)) - len(self.workers))
        while queue or any(w.task_id is not None for w in self.workers):
            idle = [w for w in self.workers if w.task_id is None]
            while queue and (idle or len(self.workers) < self.n):
                w = idle.pop() if idle else self._start()[0]
                w.task_id, task = queue.popleft()
                self._mark(w)
                w.items = []
                w.conn.send((w.task_id, before_send(task)))
            busy = [w for w in self.workers if w.task_id is not None]
            for conn in wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=0.2):
                w = next(x for x in busy if conn in (x.conn, x.proc.sentinel))
                if w.task_id is None or w not in self.workers:
                    continue
                if conn is w.proc.sentinel and not w.conn.poll():
                    more = self._stop(w, by_id, on_stop, f"worker died (exit code {w.proc.exitcode})")
                    next_id = self._requeue(more, queue, by_id, next_id)
                    continue
                while w.task_id is not None and w.conn.poll():
                    self._message(w, by_id, on_item, on_error)
            for w in [x for x in self.workers if x.task_id is not None]:
                limit = budget(by_id[w.task_id], len(w.items))
                if limit is not None and self._spent(w) > limit:
                    more = self._stop(w, by_id, on_stop, "budget")
                    next_id = self._requeue(more, queue, by_id, next_id)

    def _message(self, w: _Worker, by_id, on_item, on_error) -> None:
        kind, task_id, payload = w.conn.recv()
        task = by_id[task_id]
        if kind == "item":
            w.items.append(payload)
            self._mark(w)
            on_item(task, payload)
            return
        if kind == "error":
            on_error(task, w.items, payload)
        w.task_id = None

    @staticmethod
    def _mark(w: _Worker) -> None:
        w.since, w.cpu_since = time.monotonic(), cpu_seconds(w.proc.pid)

    @staticmethod
    def _spent(w: _Worker) -> float:
        """Seconds the current item has used: CPU time where known (fair on a busy machine), else wall."""
        now = cpu_seconds(w.proc.pid) if w.cpu_since is not None else None
        return now - w.cpu_since if now is not None else time.monotonic() - w.since

    def _stop(self, w: _Worker, by_id, on_stop, reason: str) -> list[Any]:
        task, items = by_id[w.task_id], list(w.items)
        cpu = self._spent(w) if w.cpu_since is not None else None
        seconds = time.monotonic() - w.since
        self._kill(w)
        return on_stop(Stop(task, items, reason, seconds, cpu))

    @staticmethod
    def _requeue(more: list[Any], queue: deque, by_id: dict[int, Any], next_id: int) -> int:
        for t in more:
            by_id[next_id] = t
            queue.appendleft((next_id, t))
            next_id += 1
        return next_id
