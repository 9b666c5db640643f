"""Concurrency: real ``featcache`` processes on the same files at the same time.

Two ``extract`` runs on one cache take turns through the lock (the loser says it is waiting, or with
``extract.lock_timeout=0`` exits 2 with one line); ``train`` reads one cache while ``extract`` writes
another beside it (or replaces the very cache it reads). Nothing corrupts. To make the overlap certain
rather than likely, the fault shim freezes the writer (SIGSTOP) at an exact point of its writes — holding
the lock, half-way through a new HDF5 file — and the test resumes it (SIGCONT) once the other side is done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from faultkit import (
    cache_content,
    digits_npz,
    extract_args,
    fault_env,
    leftovers,
    one_line_error,
    resume,
    rng,
    run,
    start,
    the_cache,
    wait_stopped,
)

from pipeline.cache.store import partial_dir
from pipeline.data.sources import digest_bytes


def wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def assert_sound_cache(path: Path, npz: Path) -> None:
    """The cache holds exactly the source's samples, once each, in order, with their own digests."""
    with np.load(npz) as z:
        images, labels = z["images"], z["labels"]
    c = cache_content(path)
    width = len(str(len(images)))
    assert c["keys"] == [f"{i:0{width}d}" for i in range(len(images))]
    assert c["ids"] == [digest_bytes(a.tobytes() + repr(a.shape).encode()) for a in images]
    np.testing.assert_array_equal(c["labels"], labels)
    for layer in c["layers"]:
        f = c["features"][layer]
        assert f.shape[0] == len(images) and np.isfinite(f).all() and (np.abs(f).sum(axis=1) > 0).all()
    assert not partial_dir(path).exists() and leftovers(path.parent) == []


def test_two_extracts_on_one_cache_take_turns_and_an_impatient_third_is_told(tmp_path):
    """A holds the lock (frozen by the shim as it writes its first part); B waits and says so; C, told
    not to wait, exits 2 with one line. A resumes and finishes; B then finds everything done."""
    npz = digits_npz(tmp_path / "digits.npz", 800)
    d = tmp_path / "cache"
    a = start(
        *extract_args(npz, d, "--quiet", name="digits", batch_size=32),
        env=fault_env(d, action="stop", match="part-", after_bytes=1),
    )
    wait_stopped(a)
    b_err = tmp_path / "b.stderr"
    with open(b_err, "w") as err_file:
        b = start(
            *extract_args(npz, d, name="digits", batch_size=32), stderr=err_file
        )  # not --quiet: it says it waits
        wait_for(
            lambda: "waiting for another featcache run" in b_err.read_text(), what="B to wait for the lock"
        )
        c = run(
            *extract_args(npz, d, "--quiet", "--set", "extract.lock_timeout=0", name="digits", batch_size=32)
        )
        one_line_error(c, "another featcache run is extracting into this cache")
        assert b.poll() is None, "B went ahead while A held the lock"
        resume(a)
        a_out, a_err = a.communicate(timeout=300)
        b_out, _ = b.communicate(timeout=300)
    assert a.returncode == 0 and " 800 extracted" in a_out, a_err
    assert b.returncode == 0 and " 0 extracted" in b_out and "800 reused" in b_out, b_err.read_text()
    assert "Traceback" not in a_err + b_err.read_text()
    assert_sound_cache(the_cache(d), npz)


def _train(cache: Path, runs: Path):
    return run("train", "--cache", str(cache), "--quiet", "--set", f"train.runs_dir={runs}")


def _check_run(runs: Path) -> None:
    (run_dir,) = runs.iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())  # a complete run folder


def test_train_reads_one_cache_while_extract_writes_another(tmp_path):
    """extract is frozen half-way through writing its new HDF5 file beside the cache train reads."""
    d = tmp_path / "cache"
    small = digits_npz(tmp_path / "small" / "digits.npz", 300)
    res = run(*extract_args(small, d, "--quiet", name="small", batch_size=32))
    assert res.returncode == 0, res.stderr
    trained_on = the_cache(d)
    before = cache_content(trained_on)
    big = digits_npz(tmp_path / "big" / "digits.npz", 600)
    writer = start(
        *extract_args(big, d, "--quiet", name="big", batch_size=32),
        env=fault_env(d, action="stop", match=".h5.tmp-", after_bytes=1_000_000),
    )
    wait_stopped(writer)
    assert list(d.glob("big-*.h5.tmp-*")) and list(d.glob("big-*.partial/part-*.npz"))
    t = _train(trained_on, tmp_path / "runs")
    assert t.returncode == 0, t.stderr
    listing = run("cache", "ls", "--cache-dir", d)
    assert listing.returncode == 0 and "complete" in listing.stdout, listing.stderr
    resume(writer)
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    _check_run(tmp_path / "runs")
    (big_cache,) = d.glob("big-*.h5")
    assert_sound_cache(big_cache, big)
    after = cache_content(trained_on)
    assert before["ids"] == after["ids"]
    np.testing.assert_array_equal(before["features"]["top_activation"], after["features"]["top_activation"])


@pytest.mark.reliability_long
def test_train_reads_a_cache_while_extract_replaces_it(tmp_path):
    """The reader keeps the complete file it opened; the writer, frozen at random points of its writes,
    then renames a new complete file over it. Alternately grows and shrinks the same cache."""
    d = tmp_path / "cache"
    src = digits_npz(tmp_path / "src" / "digits.npz", 300)  # one source, growing and shrinking
    res = run(*extract_args(src, d, "--quiet", name="digits", batch_size=32))
    assert res.returncode == 0, res.stderr
    path = the_cache(d)
    r = rng("replace")
    for i in range(6):
        digits_npz(src, 600 if i % 2 == 0 else 300)  # growth writes a segment, shrinking rewrites the file
        writer = start(
            *extract_args(src, d, "--quiet", name="digits", batch_size=32),
            env=fault_env(d, action="stop", match=".h5.tmp-", after_bytes=r.randrange(1, 1_000_000)),
        )
        wait_stopped(writer)
        t = _train(path, tmp_path / f"runs-{i}")
        assert t.returncode == 0, t.stderr
        resume(writer)
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
        _check_run(tmp_path / f"runs-{i}")
        assert_sound_cache(path, src)
