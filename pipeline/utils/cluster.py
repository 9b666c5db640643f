"""Dask clusters: parse ``[cluster] address``, start a local one or connect to a scheduler, say where it is.

``""`` is today's single process (no Dask at all); ``local`` starts a ``LocalCluster`` with one
single-threaded worker process per core, ``local:N`` with N; ``env`` connects to the scheduler named by
``DASK_SCHEDULER_ADDRESS``; anything else (``tcp://host:8786``, ``tls://...``) is a scheduler address.
Dask is imported only here and only when a cluster is asked for, so ``featcache --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.utils.errors import FeatcacheError

CONNECT_TIMEOUT_S = 5  # a scheduler that does not answer within this fails the run, saying so
INSTALL_HINT = "install it with: pip install 'featcache[cluster]' (or pip install 'dask[distributed]')"

#: Dask settings for the local cluster featcache starts (an existing cluster keeps its own). Each worker
#: runs one long task at a time; its housekeeping — the statistical profiler sampling every 10 ms, the
#: 20 ms event-loop tick, the 0.5 s system monitor — cost 1.2 CPU s per worker on a 1,024-photo job on
#: 2 cores (0.17 s with these), CPU the backbone needs. The dashboard still works; its profile tab is empty.
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "200ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


@dataclass(frozen=True)
class ClusterSpec:
    kind: str  # "" (single process) | "local" | "remote"
    workers: int = 0  # local: worker processes
    address: str = ""  # remote: the scheduler's address


def parse_address(address: str) -> ClusterSpec:
    """``[cluster] address`` → what to start or reach; a malformed value fails with one line."""
    a = (address or "").strip()
    if not a:
        return ClusterSpec("")
    if a == "local" or a.startswith("local:"):
        n_text = a.partition(":")[2]
        if not n_text:
            return ClusterSpec("local", os.cpu_count() or 1)
        if not n_text.isdigit() or int(n_text) < 1:
            raise FeatcacheError(f"cluster: expected local:N with N >= 1 workers, got {a!r}")
        return ClusterSpec("local", int(n_text))
    if a == "env":
        env = os.environ.get("DASK_SCHEDULER_ADDRESS", "").strip()
        if not env:
            raise FeatcacheError("cluster: address 'env' needs DASK_SCHEDULER_ADDRESS to be set")
        return ClusterSpec("remote", address=env)
    if "://" not in a and ":" not in a:
        raise FeatcacheError(
            f"cluster: address must be '', local, local:N, env or a scheduler address like tcp://host:8786, got {a!r}"
        )
    return ClusterSpec("remote", address=a)


def distributed_module():
    try:
        import distributed
    except ImportError:
        raise FeatcacheError(
            f"--cluster needs Dask distributed, which is not installed; {INSTALL_HINT}"
        ) from None
    return distributed


def start_local_cluster(distributed, n: int):
    """``local:N``'s layout: N single-threaded worker processes on this machine, with
    :data:`LOCAL_CLUSTER_CONFIG`."""
    import logging

    import dask

    with dask.config.set(LOCAL_CLUSTER_CONFIG):  # read when the scheduler and each worker start
        return distributed.LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # any free port: two runs on one machine never collide
            silence_logs=logging.ERROR,
        )


def _local_client(distributed, n: int):
    cluster = start_local_cluster(distributed, n)
    return distributed.Client(cluster, set_as_default=True), cluster


def _remote_client(distributed, address: str):
    try:
        return distributed.Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=True)
    except (OSError, TimeoutError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FeatcacheError(
            f"cluster: no Dask scheduler answers at {address} within {CONNECT_TIMEOUT_S} s ({why})"
        ) from None


@contextlib.contextmanager
def cluster_client(address: str, *, quiet: bool = False) -> Iterator[Any]:
    """A connected ``distributed.Client`` for ``address`` (None for ""), closed (and a local cluster
    stopped) on exit. The dashboard link goes to stderr unless ``quiet``."""
    spec = parse_address(address)
    if not spec.kind:
        yield None
        return
    distributed = distributed_module()
    cluster = None
    if spec.kind == "local":
        client, cluster = _local_client(distributed, spec.workers)
    else:
        client = _remote_client(distributed, spec.address)
    try:
        if not quiet:
            workers = len(client.scheduler_info().get("workers", {}))
            where = f"a local cluster of {workers} workers" if cluster is not None else spec.address
            print(f"cluster: {where} · dashboard {client.dashboard_link}", file=sys.stderr, flush=True)
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()


def worker_threads(default: int = 1) -> int:
    """Threads of the Dask worker running the calling task (``default`` outside a worker)."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return default


class ClusterPool:
    """The search's worker pool (``utils.workers.Pool``'s ``map``) on a Dask cluster.

    The shared state (the features) is scattered to every worker once; each worker builds its trial
    state from it once and keeps it for later tasks. Dask cannot stop a running function, so the
    per-trial time budget is not enforced here: a runaway trial finishes on its worker.
    """

    def __init__(self, client, init: Callable[[Any], Any], state: Any, run: Callable, threads: int):
        self.client, self.init, self.run, self.threads = client, init, run, threads
        self.token = uuid.uuid4().hex
        self.state = client.scatter(state, broadcast=True)

    def map(self, tasks, on_item, budget=None, on_stop=None, on_error=None, before_send=lambda t: t) -> None:
        from distributed import as_completed

        futures = {
            self.client.submit(
                _run_on_worker,
                self.token,
                self.init,
                self.state,
                self.run,
                before_send(t),
                self.threads,
                pure=False,
            ): t
            for t in tasks
        }
        for future in as_completed(futures):
            task = futures[future]
            try:
                items = future.result()
            except Exception as e:  # noqa: BLE001 - a failed task fails its trials, not the search
                on_error(task, [], f"{type(e).__name__}: {e}")
                continue
            for item in items:
                on_item(task, item)

    def close(self) -> None:
        self.state = None


_WORKER_STATE: dict[str, Any] = {}  # per worker process: token → the state ``init`` built


def _run_on_worker(token: str, init, state, run, task, threads: int) -> list[Any]:
    """One task on a Dask worker, with as many BLAS threads as a local search worker would use, so that
    iterative solvers take the same steps and score the same as on this machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        if token not in _WORKER_STATE:
            _WORKER_STATE.clear()  # one search at a time per worker: drop an earlier search's features
            _WORKER_STATE[token] = init(state)
        items: list[Any] = []
        run(_WORKER_STATE[token], task, items.append)
    return items
