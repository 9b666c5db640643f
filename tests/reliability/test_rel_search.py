"""``featcache search`` under crashes and concurrency.

Crash points: ``kill -9`` from outside at a seeded random moment, or death at a random byte of what the
search writes (its journal ``trials.jsonl`` included, so a record can be torn in half). The rerun must
keep every trial that finished (none is fitted twice), finish the rest and rank exactly what an
uninterrupted search ranks, and end with one intact refit run (a kill during the refit trains it again; a
kill after it reuses it). Two searches into one run folder: the second gets one line and exit 2, the folder
stays sound, and a later run reuses everything, the refit run included.

(``finetune`` checkpoint resume is not covered here: ``featcache finetune`` does not exist yet.)
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from faultkit import digits_npz, fault_env, kill9_after, read_log, rng, run, start, the_cache

SPACE = """
layers = []
transforms = [["standardize"]]

[[heads]]
name = "ridge"
params = { alpha = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0] }

[[heads]]
name = "knn"
transforms = [["l2"]]
params = { n_neighbors = [1, 3, 5, 7, 9, 11], weights = ["distance"] }
"""
N_CANDIDATES = 12


class Bench:
    def __init__(self, root: Path):
        self.root = root
        npz = digits_npz(root / "src" / "digits.npz", 300)
        res = run("extract", "--data", npz, "--image-size", "32", "--quiet", "--cache-dir", root / "cache")
        assert res.returncode == 0, res.stderr
        self.cache = the_cache(root / "cache")
        self.space = root / "space.toml"
        self.space.write_text(SPACE)
        runs = root / "reference"
        log = root / "reference.log"
        t0 = time.monotonic()
        proc = start(*self.args(runs), env=fault_env(runs, log=log, after_bytes=10**15))
        self.first_trial = wait_for_journal(proc, runs) - t0
        _, err = proc.communicate(timeout=300)
        self.seconds = time.monotonic() - t0
        assert proc.returncode == 0, err
        self.bytes = read_log(log)["bytes"]
        self.reference = scores(runs)
        assert len(self.reference) == N_CANDIDATES

    def args(self, runs: Path, *extra: str) -> list[str]:
        return [
            "search",
            "--cache",
            str(self.cache),
            "--space",
            str(self.space),
            "--n-jobs",
            "1",
            "--quiet",
            "--set",
            f"train.runs_dir={runs}",
            *extra,
        ]


def wait_for_journal(proc, runs: Path) -> float:
    """When the first trial was journaled (or the process ended)."""
    while proc.poll() is None and not list(runs.glob("search-*/trials.jsonl")):
        time.sleep(0.005)
    return time.monotonic()


def journal(runs: Path) -> list[dict]:
    """The complete records of trials.jsonl (a torn last line is not one)."""
    (path,) = runs.glob("search-*/trials.jsonl")
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "key" in rec:
            out.append(rec)
    return out


def refit_run(runs: Path) -> Path:
    """The one finished run beside the search (its refit), intact and named by ``search.json``."""
    from pipeline.utils.runs import verify_run

    (info,) = runs.glob("search-*/search.json")
    record = json.loads(info.read_text())["refit"]
    finished = [p for p in runs.iterdir() if (p / "manifest.json").is_file()]
    assert finished == [Path(record["path"])], (finished, record)
    verify_run(finished[0])
    return finished[0]


def scores(runs: Path) -> dict[str, tuple]:
    (path,) = runs.glob("search-*/leaderboard.csv")
    with open(path, newline="") as f:
        return {r["key"]: (r["status"], r["score"], r["balanced_accuracy"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    return Bench(tmp_path_factory.mktemp("search"))


def crash_search(bench: Bench, index: int, kind: str) -> int:
    """Kill a search, rerun it; returns how many finished trials the kill left behind."""
    r = rng("search", index, kind)
    runs = bench.root / f"point-{index}-{kind}"
    if kind == "signal":  # at a random moment between the first journaled trial and the expected end
        proc = start(*bench.args(runs))
        wait_for_journal(proc, runs)
        if not kill9_after(proc, r.uniform(0.0, 0.9) * (bench.seconds - bench.first_trial)):
            assert proc.returncode == 0
    else:
        res = run(*bench.args(runs), env=fault_env(runs, action="kill", after_bytes=r.randrange(bench.bytes)))
        assert res.returncode == -9, res.stderr
    kept = journal(runs) if list(runs.glob("search-*/trials.jsonl")) else []
    assert len({rec["key"] for rec in kept}) == len(kept), "a trial was journaled twice"
    resumed = run(*bench.args(runs))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{N_CANDIDATES - len(kept)} trials run, {len(kept)} reused" in resumed.stdout, resumed.stdout
    after = journal(runs)
    assert len(after) == len({rec["key"] for rec in after}) == N_CANDIDATES, (
        "a finished trial was fitted again"
    )
    assert scores(runs) == bench.reference
    refit_run(runs)
    return len(kept)


@pytest.mark.parametrize("kind", ["signal", "byte"])
def test_killed_search_keeps_finished_trials_and_ends_like_an_uninterrupted_one(bench, kind):
    kept = crash_search(bench, 0, kind)
    print(f"search crash ({kind}): {kept} finished trials kept")


@pytest.mark.reliability_long
def test_search_killed_at_20_seeded_points(bench):
    kept = [crash_search(bench, 100 + i, ("signal", "byte")[i % 2]) for i in range(20)]
    print(f"20 search crash points; finished trials kept at each: {kept}")
    assert any(0 < k < N_CANDIDATES for k in kept)


def test_two_searches_into_one_run_folder(bench, tmp_path):
    """Started together: one runs, the other is told in one line; the folder stays sound."""
    runs = tmp_path / "runs"
    procs = [start(*bench.args(runs)) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(p for p in procs if p.returncode == 2)
    err = outs[procs.index(loser)][1]
    assert err.strip().count("\n") == 0 and "another featcache search is running this search" in err, err
    assert "Traceback" not in err
    assert scores(runs) == bench.reference
    refit = refit_run(runs)
    again = run(*bench.args(runs))
    assert again.returncode == 0 and f"0 trials run, {N_CANDIDATES} reused" in again.stdout, again.stdout
    assert refit_run(runs) == refit and "(reused: trained from the same best trial" in again.stdout
