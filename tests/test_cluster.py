"""Extraction and search on a real Dask LocalCluster (worker processes): the same cache and the same search
as one process, a worker SIGKILLed mid-run, the driver SIGKILLed and resumed, a bad image on a worker, and a
scheduler that does not answer."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.store import FeatureCache, partial_dir
from pipeline.utils.cluster import parse_address, start_local_cluster
from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheError

pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


def make_images(root: Path, per_class: int = 48, bad: bool = True) -> Path:
    rng = np.random.default_rng(13)
    for c in ("cat", "dog"):
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    if bad:
        (root / "cat" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def cfg_for(data: Path, cache_dir: Path, cluster: str = "", **extra):
    overrides = {
        "data.source": str(data),
        "extract.cache_dir": str(cache_dir),
        "backbone.image_size": "64",
        "extract.engine": "tensorflow",
        "extract.threads": "1",  # a worker has one thread: the same kernels, the same features
        "extract.batch_size": "16",
        "extract.progress": "false",
        "cluster.address": cluster,
    }
    overrides.update(extra)
    return load_config(None, overrides)


def assert_same_cache(a: Path, b: Path, atol: float = 1e-6) -> None:
    with FeatureCache(a) as x, FeatureCache(b) as y:
        assert x.keys == y.keys and x.ids == y.ids
        assert np.array_equal(x.labels, y.labels) and np.array_equal(x.split, y.split)
        assert x.class_names == y.class_names and x.layers == y.layers
        for layer in x.layers:
            rows = np.arange(len(x.keys))
            np.testing.assert_allclose(y.features(layer, rows), x.features(layer, rows), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("cluster") / "images")


def cli_extract(images: Path, out: Path, *extra: str) -> Path:
    """A cache made by a fresh ``featcache extract`` process: TensorFlow's thread pools are fixed when it
    starts, and in this pytest process earlier tests have started it with all cores."""
    cmd = [sys.executable, "-m", "pipeline", "extract", "--data", str(images), "--cache-dir", str(out)]
    cmd += ["--image-size", "64", "--batch-size", "16", "--quiet", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (path,) = out.glob("*.h5")
    return path


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The one-process cache with the settings the cluster tests pass (TensorFlow, one thread)."""
    threads = ["--set", "extract.engine=tensorflow", "--set", "extract.threads=1"]
    return cli_extract(images, tmp_path_factory.mktemp("one"), *threads)


@pytest.mark.slow
def test_local_cluster_with_default_settings_equals_one_process_exactly(images, tmp_path):
    """No engine or thread settings (a small job: ``auto`` runs TensorFlow). TensorFlow's CPU kernels round
    by thread count, so a ``local:2`` cluster's workers use the count one process uses: the same features."""
    one = cli_extract(images, tmp_path / "one")
    two = cli_extract(images, tmp_path / "two", "--cluster", "local:2")
    assert_same_cache(one, two, atol=0.0)


def test_addresses_parse_and_a_bad_one_is_one_line():
    assert parse_address("").kind == ""
    assert parse_address("local").workers == (os.cpu_count() or 1)
    assert parse_address("local:3").workers == 3
    assert parse_address("tcp://10.0.0.1:8786").address == "tcp://10.0.0.1:8786"
    for bad in ("local:0", "local:x", "nonsense"):
        with pytest.raises(FeatcacheError, match="cluster"):
            parse_address(bad)


def test_unreachable_scheduler_is_one_line_and_exit_2(images, tmp_path):
    # a port nobody listens on: bind one, keep it closed
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "extract", "--data", str(images), "--cache-dir", str(tmp_path)]
        + ["--image-size", "64", "--quiet", "--cluster", f"tcp://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("featcache: error: cluster: no Dask scheduler answers at"), err
    assert "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 60


@pytest.fixture(scope="module")
def cluster():
    """One real LocalCluster (2 single-threaded worker processes, with nannies) for the extraction tests:
    its workers build the model once and keep it from one test to the next."""
    import distributed

    with start_local_cluster(distributed, 2) as lc:
        yield lc


def _housekeeping(dask_worker) -> tuple[bool, float]:
    """Run by ``client.run`` in each worker process, which passes the worker as ``dask_worker``."""
    callbacks = dask_worker.periodic_callbacks
    return "profile" in callbacks, callbacks["tick"].callback_time


def test_local_cluster_workers_skip_the_profiler_and_tick_slowly(cluster):
    """``local:N``'s workers start with LOCAL_CLUSTER_CONFIG: no 10 ms statistical profiler, a 200 ms tick
    (measured: 1.2 → 0.17 CPU s of housekeeping per worker on a 1,024-photo job)."""
    import distributed

    with distributed.Client(cluster) as client:
        got = client.run(_housekeeping)
    assert len(got) == 2
    assert set(got.values()) == {(False, 200.0)}


def test_int8_on_the_cluster_runs_the_drivers_model_and_equals_one_process(images, cluster, tmp_path):
    """``tflite-int8``: the driver calibrates and converts once (here: reuses the one-process run's model) and
    sends it to the workers, which convert nothing; the cache equals one process's, bit for bit."""
    from pipeline.features import engines
    from pipeline.stages.extract import extract

    int8 = {"extract.engine": "tflite-int8"}
    one = extract(cfg_for(images, tmp_path, **int8))
    with FeatureCache(one.path) as c:
        want = c.features()
    before = engines.conversions
    two = extract(cfg_for(images, tmp_path, cluster.scheduler_address, **int8), rebuild=True)
    assert (one.engine, two.engine) == ("tflite-int8", "tflite-int8") and two.extracted == 96
    assert engines.conversions == before and len(list((tmp_path / "engines").glob("*-int8.tflite"))) == 1
    import distributed

    with distributed.Client(cluster) as client:  # the workers ran the model they were sent
        assert set(client.run(lambda: engines.conversions).values()) == {0}
    with FeatureCache(two.path) as c:
        assert c.meta["engine"] == "tflite-int8"
        np.testing.assert_array_equal(c.features(), want)


@pytest.mark.slow
def test_cluster_extract_equals_one_process_and_survives_a_worker_sigkill(
    images, reference, cluster, tmp_path
):
    """One worker is SIGKILLed while it runs a shard. Dask reruns its task on the other (or the restarted)
    worker; the cache is the one-process cache, nothing lost or duplicated; the bad image is quarantined."""
    import distributed

    from pipeline.stages.extract import extract

    killed: list[int] = []

    def kill_one_when_busy():
        with distributed.Client(cluster.scheduler_address, set_as_default=False) as c:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                busy = [w for w, tasks in c.processing().items() if tasks]
                if busy:
                    pid = c.run(os.getpid, workers=[busy[0]])[busy[0]]
                    time.sleep(0.5)  # inside the task (building the model or extracting)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                time.sleep(0.05)

    t = threading.Thread(target=kill_one_when_busy, daemon=True)
    t.start()
    result = extract(cfg_for(images, tmp_path, cluster.scheduler_address))
    t.join(5)
    assert killed, "no worker was killed"
    assert result.extracted == 96 and result.skipped == 1
    assert [k for k, _ in result.problems] == ["cat/truncated.png"]
    assert not partial_dir(result.path).exists()
    assert_same_cache(reference, result.path)


@pytest.mark.slow
def test_driver_sigkill_resumes_from_parts_without_recomputing_finished_shards(
    images, reference, cluster, tmp_path
):
    """The driver (a real ``featcache extract`` process) is SIGKILLed once a shard's parts are on disk; the
    rerun serves those rows from the parts and extracts only the rest."""
    cmd = [sys.executable, "-m", "pipeline", "extract", "--data", str(images), "--cache-dir", str(tmp_path)]
    cmd += ["--image-size", "64", "--batch-size", "4", "--quiet", "--cluster", cluster.scheduler_address]
    cmd += ["--set", "extract.engine=tensorflow", "--set", "extract.threads=1"]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and p.poll() is None:
            if list(tmp_path.glob("*.partial/part-*.npz")):
                break
            time.sleep(0.02)
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        p.send_signal(signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.communicate()
    assert list(tmp_path.glob("*.partial/part-*.npz")) and not list(tmp_path.glob("*.h5"))

    from pipeline.stages.extract import extract

    result = extract(cfg_for(images, tmp_path, cluster.scheduler_address, **{"extract.batch_size": "4"}))
    assert result.reused >= 4 and result.extracted == 96 - result.reused  # finished shards not recomputed
    assert result.skipped == 1
    # the resumed rows ran in other batches than the reference's: TensorFlow's batch-dependent rounding,
    # as after a local resume (tests/test_extract.py)
    assert_same_cache(reference, result.path, atol=1e-5)


@pytest.mark.slow
def test_search_on_the_cluster_gives_the_same_trials_and_best(digits_cache, tmp_path):
    from pipeline.stages.search import search

    space = tmp_path / "space.toml"
    space.write_text(
        'transforms = [["standardize"]]\n[[heads]]\nname = "logistic"\nparams = { C = [0.01, 0.1, 1.0] }\n'
        '[[heads]]\nname = "ridge"\nparams = { alpha = [1.0, 100.0] }\n'
    )

    def run(runs: str, cluster: str):
        overrides = {
            "train.cache": str(digits_cache),
            "train.runs_dir": str(tmp_path / runs),
            "extract.progress": "false",
            "search.space": str(space),
            "cluster.address": cluster,
        }
        return search(load_config(None, overrides))

    local, remote = run("one", ""), run("cluster", "local:2")

    def trials(run):
        return [(r["head"], r["params"], r["score"]) for r in run.leaderboard]

    assert trials(local) == trials(remote) and len(trials(local)) == 5
    assert (local.best["head"], local.best["params"]) == (remote.best["head"], remote.best["params"])
    again = run("cluster", "local:2")  # resumable as today: nothing runs twice
    assert again.n_run == 0 and again.n_reused == 5


@pytest.mark.parametrize("n", [1, 31, 32, 33, 96, 1024, 10_000])
@pytest.mark.parametrize("workers", [1, 2, 8])
def test_shard_plan_is_whole_batches_in_order_shrinking_to_one(n, workers):
    """Every shard starts on a batch boundary (same batch-mates as one process), big shards come first and the
    last ones are one batch, so no worker idles through another's last big shard."""
    from pipeline.features.distributed import MAX_BATCHES_PER_SHARD, plan_shards

    pending = list(range(n))
    shards = plan_shards(pending, 32, workers)
    assert [x for s in shards for x in s] == pending
    batches = [-(-len(s) // 32) for s in shards]
    assert all(len(s) % 32 == 0 for s in shards[:-1])
    assert batches == sorted(batches, reverse=True) and max(batches) <= MAX_BATCHES_PER_SHARD
    assert batches[-1] == 1
    assert plan_shards(pending, 32, workers) == shards  # reproducible
