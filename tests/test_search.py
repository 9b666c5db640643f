"""Search on a real cache: grid/random/halving, k-fold CV, a real SIGKILL mid-search and a resume that
re-runs nothing finished, best.toml feeding ``featcache train``, the refit run equal to that train, and the
test split kept out."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """This machine is shared: OpenBLAS threads spin-waiting on a busy core make small fits 20× slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def search_cfg(cache: Path, runs: Path, space: Path | None, **search):
    overrides = {"train.cache": str(cache), "train.runs_dir": str(runs), "extract.progress": "false"}
    overrides.update({f"search.{k}": str(v) for k, v in search.items()})
    if space is not None:
        overrides["search.space"] = str(space)
    return load_config(None, overrides)


def write_space(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def lines(path: Path) -> list[dict]:
    """Whole journal records; a line torn by the kill is skipped, as the search itself does."""
    out = []
    for x in path.read_text().splitlines():
        try:
            out.append(json.loads(x))
        except ValueError:
            continue
    return out


# 13 real candidates, including a Keras one (it runs in a joblib worker on resume).
RESUME_SPACE = """
transforms = [["standardize", "pca:64"]]
[[heads]]
name = "logistic"
params = { C = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0] }
[[heads]]
name = "ridge"
params = { alpha = [100.0, 1000.0] }
[[heads]]
name = "keras_linear"
params = { epochs = 5, learning_rate = 0.01, batch_size = 128 }
"""
TOTAL = 13


def test_search_resumes_after_sigkill_without_rerunning_finished_trials(digits_cache, tmp_path):
    space = write_space(tmp_path / "space.toml", RESUME_SPACE)
    runs = tmp_path / "runs"
    args = [
        "search",
        "--cache",
        str(digits_cache),
        "--space",
        str(space),
        "--set",
        f"train.runs_dir={runs}",
        "--quiet",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OPENBLAS_NUM_THREADS": "1"}
    script = Path(sys.executable).with_name("featcache")  # the installed console script
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline"]
    proc = subprocess.Popen(
        [*command, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    journal = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(runs.glob("search-*/trials.jsonl"))
            if found and len(found[0].read_text().splitlines()) >= 3:
                journal = found[0]
                break
            time.sleep(0.01)
        assert journal is not None, (
            f"no trials appeared: {proc.poll()} {proc.stderr.read().decode() if proc.poll() is not None else ''}"
        )
        proc.send_signal(signal.SIGKILL)  # a real kill: no cleanup, no flush, no finally
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = lines(journal)
    assert 3 <= len(before) < TOTAL, "the kill must land mid-search"
    first_pids = {r["pid"] for r in before}

    from pipeline.cli import main

    assert main([*args[:-1], "--n-jobs", "2", "--quiet"]) == 0  # resume, in parallel this time
    after = lines(journal)
    assert len(after) == TOTAL and len({r["key"] for r in after}) == TOTAL, "no trial ran twice"
    assert after[: len(before)] == before
    summary = json.loads((journal.parent / "search.json").read_text())
    assert summary["n_reused"] == len(before) and summary["n_run"] == TOTAL - len(before)
    assert not first_pids & {r["pid"] for r in after[len(before) :]}
    board = list(csv.DictReader(open(journal.parent / "leaderboard.csv")))
    assert len(board) == TOTAL and all(r["status"] == "ok" for r in board)
    assert {r["head"] for r in board} == {"logistic", "ridge", "keras_linear"}
    scores = [float(r["score"]) for r in board]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.85

    # a third run is a no-op; --fresh starts over
    from pipeline.stages.search import search

    again = search(search_cfg(digits_cache, runs, space))
    assert again.n_run == 0 and again.n_reused == TOTAL and again.dir == journal.parent
    assert summary["refit"]["trial"] == board[0]["key"]  # the resumed search refit its best trial
    assert again.refit.reused and str(again.refit_dir) == summary["refit"]["path"]  # and the rerun reused it


def test_best_toml_is_a_config_that_train_picks_up(digits_cache, tmp_path):
    from pipeline.stages.search import search
    from pipeline.stages.train import train

    space = write_space(
        tmp_path / "s.toml",
        """
[[heads]]
name = "knn"
transforms = [["l2"]]
params = { n_neighbors = [1, 3, 9, 27], weights = ["distance"] }
[[heads]]
name = "linear_svm"
transforms = [["l2"]]
params = { C = [10.0], class_weight = ["none"] }
""",
    )
    run = search(search_cfg(digits_cache, tmp_path, space))
    assert run.n_candidates == 5 and run.n_run == 5
    best = tomllib.loads(run.best_toml.read_text())["train"]
    assert best["head"] == run.best["head"] and best["layer"] == "top_activation"
    cfg = load_config(run.best_toml, {"train.runs_dir": str(tmp_path / "final")})
    assert cfg.train.head == best["head"] and cfg.train.params == json.loads(run.best["params"])
    final = train(cfg)
    assert final.metrics["val"]["accuracy"] == pytest.approx(run.best["score"])  # same fit, same val rows
    assert final.metrics["test"]["accuracy"] > 0.85
    out = run.summary()
    assert "best:" in out and str(run.best_toml) in out and out.count("\n") >= 8

    # the refit run is that train run: same head, settings, scores and predictions, written the same way
    refit = json.loads((run.refit_dir / "metrics.json").read_text())
    assert run.refit_dir.parent == tmp_path.resolve() and not run.refit.reused
    for key in ("head", "head_kind", "params", "layer", "transforms", "transform_chain", "class_names"):
        assert refit[key] == final.metrics[key], key
    for split in ("val", "test"):
        assert refit[split] == final.metrics[split], split
    assert refit["config"]["train"] == {**final.metrics["config"]["train"], "runs_dir": str(tmp_path)}
    origin = {
        "folder": run.dir.name,
        "trial": run.best["key"],
        "score": run.best["score"],
        "key": run.refit.key,
    }
    assert refit["search"] == origin
    assert sorted(p.name for p in run.refit_dir.iterdir()) == sorted(p.name for p in final.run_dir.iterdir())
    assert f"refit: the best config trained as run {run.refit_dir.name}" in out
    assert json.loads((run.dir / "search.json").read_text())["refit"]["run"] == run.refit_dir.name


def test_halving_random_and_cv_never_touch_the_test_split(digits_cache, tmp_path):
    from pipeline.cache.store import FeatureCache
    from pipeline.stages.search import search
    from pipeline.tuning.folds import plan_folds

    with FeatureCache(digits_cache) as c:
        test_rows = set(c.rows("test").tolist())
        for cv in (0, 3):
            plan, rows, _ = plan_folds(c, cv, 0)
            assert not test_rows & set(rows.tolist())
            for fit_rows, eval_rows, _ in plan.folds:
                assert not test_rows & (set(fit_rows.tolist()) | set(eval_rows.tolist()))
                assert not set(fit_rows.tolist()) & set(eval_rows.tolist())

    space = write_space(
        tmp_path / "h.toml",
        """
[[heads]]
name = "ridge"
params = { alpha = [0.1, 1.0, 10.0, 100.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0] }
""",
    )
    halving = search(search_cfg(digits_cache, tmp_path, space, strategy="halving"))
    rungs = sorted({r["resource"] for r in halving.leaderboard})
    assert rungs == pytest.approx([1 / 9, 1 / 3, 1.0])
    per_rung = [sum(1 for r in halving.leaderboard if r["resource"] >= f) for f in rungs]
    assert per_rung == [9, 3, 1] and halving.n_run == 9 + 3 + 1
    assert halving.leaderboard[0]["resource"] == 1.0

    ranges = write_space(
        tmp_path / "r.toml",
        """
[[heads]]
name = "logistic"
transforms = [["standardize", "pca:32"]]
params = { C = { loguniform = [0.01, 10.0] } }
""",
    )
    rnd = search(search_cfg(digits_cache, tmp_path, ranges, strategy="random", n_trials=3, cv=3))
    assert rnd.n_run == 3 and all(r["status"] == "ok" for r in rnd.leaderboard)
    recs = lines(rnd.dir / "trials.jsonl")
    assert all(r["folds"] == 3 and r["cv"] == 3 for r in recs) and len({r["params"]["C"] for r in recs}) == 3
    with pytest.raises(FeatcacheError, match="grid search needs a list"):
        search(search_cfg(digits_cache, tmp_path, ranges, strategy="grid"))


def test_bad_spaces_are_refused_before_any_trial(digits_cache, tmp_path):
    from pipeline.stages.search import search

    cases = {
        'name = "nope"': "unknown head 'nope'",
        'name = "knn"\nparams = { gamma = [1] }': "head 'knn': unknown parameter 'gamma'",
        'name = "knn"\ntransforms = [["whiten"]]': "unknown transform 'whiten'",
        'name = "knn"\nlayers = ["block9"]': "no layer 'block9'",
    }
    for i, (body, message) in enumerate(cases.items()):
        space = write_space(tmp_path / f"bad{i}.toml", f"[[heads]]\n{body}\n")
        with pytest.raises(FeatcacheError, match=message):
            search(search_cfg(digits_cache, tmp_path, space))
    assert not list(tmp_path.glob("search-*/trials.jsonl"))


def test_builtin_space_has_ranges_over_five_families_and_100_trials_by_default():
    from pipeline.tuning.space import default_space_path, load_space, random_candidates
    from pipeline.utils.config import SearchConfig

    space = load_space(None, "top_activation")
    assert Path(space.source) == default_space_path() == REPO / "pipeline" / "configs" / "search_space.toml"
    assert not space.finite and SearchConfig().n_trials == 100 and SearchConfig().strategy == "random"
    cands = random_candidates(space, 100, 0)
    assert len(set(cands)) == 100
    assert {"logistic", "linear_svm", "ridge", "knn", "mlp"} <= {c.head for c in cands}


def test_shared_work_scores_as_an_independent_fit(digits_cache):
    """Prepared chains, the ridge path, warm-started C paths and the L-BFGS squared hinge give the plain fit's score."""
    from pipeline.cache.reader import Data
    from pipeline.cache.store import FeatureCache
    from pipeline.tuning.folds import plan_folds
    from pipeline.tuning.space import Candidate
    from pipeline.tuning.trials import run_trial, shared_trial, worker_init

    with FeatureCache(digits_cache) as c:
        layer = c.layer_name("")
        plans = {cv: plan_folds(c, cv, 0) for cv in (0, 3)}
        data = {cv: Data.from_cache(c, layer, rows, False) for cv, (_, rows, _) in plans.items()}
    configs = [("ridge", {"alpha": a}, ["standardize"]) for a in (0.1, 10.0, 1000.0)]
    configs += [("logistic", {"C": v}, ["standardize", "pca:32"]) for v in (0.01, 0.3, 10.0)]
    configs += [("linear_svm", {"C": v}, ["standardize", "pca:32"]) for v in (0.01, 1.0)]  # L-BFGS
    configs += [("linear_svm", {"C": 1.0}, ["l2"]), ("knn", {"n_neighbors": 3}, ["l2", "pca:16"])]
    knn = [(7, "distance"), (60, "uniform"), (1, "uniform"), (30, "distance"), (5, "uniform")]
    configs += [("knn", {"n_neighbors": n, "weights": w}, ["l2"]) for n, w in knn]  # one path, and past it
    for cv, (plan, _, _) in plans.items():
        shared = worker_init(({layer: data[cv]}, plan, 0))
        for head, params, chain in configs:
            cand = Candidate.make(head, params, chain, layer)
            plain = run_trial(data[cv], cand, plan, 1.0, 0)
            fast = shared_trial(shared, cand, 1.0, None)
            assert plain["status"] == fast["status"] == "ok", (plain, fast)
            tol = 0.0 if head in ("ridge", "knn") else 0.02  # iterative solvers: within their tolerance
            assert abs(plain["score"] - fast["score"]) <= tol, (
                cv,
                cand.label(),
                plain["score"],
                fast["score"],
            )
            if head in ("ridge", "linear_svm"):  # margin heads: no probabilities, no log loss
                assert plain["log_loss"] is None and fast["log_loss"] is None
            else:
                assert abs(plain["log_loss"] - fast["log_loss"]) <= max(10 * tol, 1e-9), (
                    cand.label(),
                    plain["log_loss"],
                    fast["log_loss"],
                )
        assert len(shared.prepared) <= 4  # a few chains kept per worker, not every one


def test_a_runaway_trial_is_cut_and_the_result_is_readable(digits_cache, tmp_path, monkeypatch):
    from pipeline.stages import search as search_stage
    from pipeline.tuning import scheduler

    monkeypatch.setattr(scheduler, "BUDGET_FLOOR_S", 1.0)
    monkeypatch.setattr(scheduler, "TRIAL_BUDGET_FACTOR", 5)
    monkeypatch.setattr(scheduler, "BUDGET_EARLY_S", 5.0)  # knn is one path: mlp's is the second first trial
    space = write_space(
        tmp_path / "slow.toml",
        """
[[heads]]
name = "knn"
transforms = [["l2"]]
params = { n_neighbors = [1, 3, 5, 7, 9, 11] }
[[heads]]
name = "mlp"
params = { hidden = [[1024, 1024]], max_iter = 5000, tol = 0.0, early_stopping = false, n_iter_no_change = 5000 }
""",
    )
    run = search_stage.search(search_cfg(digits_cache, tmp_path, space, n_jobs=2))
    by_head = {r["head"]: r for r in run.leaderboard}
    assert by_head["mlp"]["status"] == "cut" and "budget" in by_head["mlp"]["error"]
    assert sum(r["status"] == "ok" for r in run.leaderboard) == 6 and run.best["head"] == "knn"
    journal = lines(run.dir / "trials.jsonl")
    assert [r["status"] for r in journal].count("cut") == 1  # journaled: a resume does not run it again
    assert search_stage.search(search_cfg(digits_cache, tmp_path, space)).n_run == 0
    board = json.loads((run.dir / "leaderboard.json").read_text())
    assert [r["rank"] for r in board] == list(range(1, 8)) and (run.dir / "scores.png").stat().st_size > 1000
    assert "1 cut" in run.summary() and "leaderboard.csv" in run.summary()


def test_a_torn_journal_line_is_ignored(tmp_path):
    from pipeline.utils.journal import append_trial, read_trials

    journal = tmp_path / "trials.jsonl"
    append_trial(journal, {"key": "a", "score": 1.0})
    with open(journal, "a") as f:
        f.write('{"key": "b", "sco')  # killed mid-write
    append_trial(journal, {"key": "c", "score": 0.5})
    assert set(read_trials(journal)) == {"a", "c"}


def test_convertible_search_keeps_to_heads_finetune_can_take():
    from pipeline.heads.registry import NOT_CONVERTIBLE
    from pipeline.tuning.space import convertible_space, load_space

    space = load_space(None, "top")
    heads = {e.head for e in space.entries}
    assert heads & NOT_CONVERTIBLE  # the built-in space has kNN / gradient boosting
    kept = convertible_space(space)
    assert {e.head for e in kept.entries} == heads - NOT_CONVERTIBLE
    assert kept.canonical() != space.canonical()  # a different search: its own folder and trials


def test_the_refit_run_is_reused_retrained_when_gone_and_skipped_with_no_refit(digits_cache, tmp_path):
    import numpy as np

    import pipeline
    from pipeline.cache.store import FeatureCache
    from pipeline.cli import main
    from pipeline.stages.search import search

    space = write_space(
        tmp_path / "s.toml", '[[heads]]\nname = "ridge"\nparams = { alpha = [1.0, 1000.0] }\n'
    )
    runs = tmp_path / "runs"

    def finished():
        return sorted(p for p in runs.iterdir() if (p / "manifest.json").is_file())

    first = search(search_cfg(digits_cache, runs, space))
    assert finished() == [first.refit_dir] and not first.refit.reused
    run = pipeline.Run(first)  # a search's result opens as its refit run, which loads and predicts
    assert run.path == first.refit_dir and run.kind == "train" and run.metrics.head == "ridge"
    with FeatureCache(digits_cache) as c:
        X, y = c.xy("test")
    accuracy = float(np.mean(run.model.predict(X) == y))
    assert accuracy == pytest.approx(run.metrics.test_accuracy) and accuracy > 0.85
    by_prefix = pipeline.Run(first.refit_dir.name[:-2], train__runs_dir=str(runs))
    assert by_prefix.path == run.path

    again = search(search_cfg(digits_cache, runs, space))  # finished search, same best trial: no retraining
    assert again.n_run == 0 and again.refit.reused and again.refit_dir == first.refit_dir
    assert finished() == [first.refit_dir] and "(reused: trained from the same best trial" in again.summary()

    shutil.rmtree(first.refit_dir)  # the run is gone: the rerun trains it again
    third = search(search_cfg(digits_cache, runs, space))
    assert third.n_run == 0 and not third.refit.reused and finished() == [third.refit_dir]

    args = ["search", "--cache", str(digits_cache), "--space", str(space), "--set", f"train.runs_dir={runs}"]
    assert main([*args, "--no-refit", "--quiet"]) == 0
    info = json.loads((third.dir / "search.json").read_text())
    assert info["refit"] is None and info["search_config"]["refit"] is False and info["n_run"] == 0
    off = search(search_cfg(digits_cache, runs, space, refit="false"))
    assert off.refit is None and off.refit_dir is None
    assert not [line for line in off.summary().splitlines() if line.startswith("refit")]
    assert finished() == [third.refit_dir]  # nothing trained without the refit
    with pytest.raises(FeatcacheError, match="trained no run"):
        pipeline.Run(off)


def test_a_large_grid_search_runs_its_first_rungs_on_row_subsets(digits_cache, tmp_path):
    """``search.halving_rows`` forced down to this small cache: every candidate on 1/9 of the fit rows, the
    best third on 1/3, the best ninth on all; the summary gives the rungs' sizes, and the winner is a
    full-size trial that its refit run reproduces."""
    import numpy as np

    from pipeline.stages.search import search
    from pipeline.tuning.folds import subset_rows

    space = write_space(
        tmp_path / "rows.toml",
        """
[[heads]]
name = "logistic"
transforms = [["standardize"]]
params = { C = [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0] }
""",
    )
    run = search(search_cfg(digits_cache, tmp_path, space, strategy="grid", halving_rows=500))
    board = run.leaderboard
    rungs = sorted({r["resource"] for r in board})
    assert rungs == pytest.approx([1 / 9, 1 / 3, 1.0])
    assert [sum(1 for r in board if r["resource"] >= f) for f in rungs] == [9, 3, 1] and run.n_run == 13
    recs = lines(run.dir / "trials.jsonl")
    assert sorted(r["resource"] for r in recs) == sorted([1 / 9] * 9 + [1 / 3] * 3 + [1.0])
    assert board[0]["resource"] == 1.0 and board[0]["status"] == "ok" and run.best is board[0]
    val = run.refit.metrics["val"]
    first = [r for r in recs if r["resource"] == 1 / 9]
    kept = {r["params"]["C"] for r in recs if r["resource"] == 1 / 3}
    kept_scores = [r["score"] for r in first if r["params"]["C"] in kept]
    dropped = [r["score"] for r in first if r["params"]["C"] not in kept]
    assert min(kept_scores) >= max(dropped) - 1 / val["n"]  # the best third went on (ties: by log loss)
    assert "successive halving over rows" in run.summary() and "search.halving_rows (500)" in run.summary()
    from pipeline.cache.store import FeatureCache

    with FeatureCache(digits_cache) as cache:
        n_fit = len(cache.rows("train"))
    fit = np.arange(n_fit)
    sizes = [len(subset_rows(fit, fit, f)) for f in rungs]
    assert sizes[-1] == n_fit and sizes[0] == -(-n_fit // 9) and sizes[0] >= 500 / 20
    assert f"in 3 rungs of {', '.join(f'{k:,}' for k in sizes)} rows" in run.summary()
    assert abs(val["accuracy"] - board[0]["score"]) <= 2 / val["n"]


@pytest.mark.parametrize(
    ("n_fit", "n_cands", "sizes"),
    [
        (100_000, 100, [11_112, 33_334, 100_000]),  # at the threshold: 1/9, 1/3, all
        (300_000, 100, [11_112, 33_334, 100_000, 300_000]),
        (800_000, 100, [9_877, 29_630, 88_889, 266_667, 800_000]),
        (800_000, 9, [88_889, 266_667, 800_000]),  # few candidates: no rung of one
        (10_000_000, 100, [123_457, 370_371, 1_111_112, 3_333_334, 10_000_000]),
    ],
)
def test_row_halving_starts_small_and_grows_three_times_per_rung(n_fit, n_cands, sizes):
    """The rungs over rows at the default ``search.halving_rows`` (100,000): the first holds at least
    100,000 / 20 rows, each next 3× more, one rung per factor of 3 in the candidates at most."""
    from pipeline.tuning.folds import subset_size
    from pipeline.tuning.scheduler import (
        min_rung_rows,
        row_halving,
        row_halving_note,
        rung_count,
        rung_fractions,
    )

    assert row_halving("random", n_fit, 100_000, n_cands)
    rungs = rung_count(n_cands, n_fit, min_rung_rows(10, 100_000))
    assert [subset_size(n_fit, f) for f in rung_fractions(rungs)] == sizes
    assert f"in {len(sizes)} rungs of {', '.join(f'{k:,}' for k in sizes)} rows" in row_halving_note(
        n_fit, 100_000, n_cands, 10
    )


def test_halving_rungs_score_on_a_nested_share_of_the_val_rows():
    """At 1M rows (800k fit, 100k val) the first rungs fit 1/81, 1/27, ... of the fit rows: each scores on
    the same share of the val rows, at least EVAL_FLOOR, nested like the fit rows; the last on every val
    row. Early stopping (the val rows when cv = 0) uses the same rows; ties are judged on what was scored."""
    import numpy as np

    from pipeline.tuning.folds import EVAL_FLOOR, Plan
    from pipeline.tuning.scheduler import min_rung_rows, rung_count, rung_fractions

    rng = np.random.default_rng(0)
    rows = rng.permutation(1_000_000)
    fit, val = np.sort(rows[:800_000]), np.sort(rows[800_000:900_000])
    plan = Plan([(fit, val, val)], rng.permutation(1_000_000), 10)
    fractions = rung_fractions(rung_count(100, len(fit), min_rung_rows(10, 100_000)))
    scored = [plan.scored_rows(0, f) for f in fractions]
    assert [len(e) for e, _ in scored] == [EVAL_FLOOR, EVAL_FLOOR, 11_112, 33_334, 100_000]
    assert all(es is not None and np.array_equal(e, es) for e, es in scored)
    for (small, _), (large, _) in zip(scored, scored[1:], strict=False):
        assert np.isin(small, large).all() and np.isin(small, val).all()
    assert np.array_equal(scored[-1][0], val)
    assert plan.resolution_at(fractions[0]) == 1 / EVAL_FLOOR and plan.resolution == 1 / len(val)
    few = Plan([(fit, val[:5000], None)], plan.rank, 10)  # under the floor: every row on every rung
    assert np.array_equal(few.scored_rows(0, 1 / 81)[0], val[:5000]) and few.scored_rows(0, 1 / 81)[1] is None


def test_a_paths_first_trial_is_budgeted_against_other_first_trials(tmp_path):
    from pipeline.tuning.scheduler import BUDGET_FLOOR_S, TRIAL_BUDGET_FACTOR, Task, TrialRunner
    from pipeline.tuning.space import Candidate

    runner = TrialRunner(tmp_path / "trials.jsonl", {}, None, "fp", 0, 0, 1, None)
    knn = [Candidate.make("knn", {"n_neighbors": k}, ["l2"], "top") for k in (3, 5, 7)]
    task = Task(tuple(knn), 1.0)
    runner.times = [0.05] * 9  # steps along paths: votes from neighbours found once
    runner.first_times = [30.0, 25.0, 40.0, 35.0, 20.0]  # trials that prepared a chain, started a path
    assert runner._budget(task, 0) == TRIAL_BUDGET_FACTOR * 30.0  # the neighbour search is not cut
    assert runner._budget(task, 1) == BUDGET_FLOOR_S  # a step that runs long is
    rung = Task(tuple(knn), 1 / 27)  # halving's first rung: times count per row
    assert runner._budget(rung, 0) == max(TRIAL_BUDGET_FACTOR * 30.0 / 27, BUDGET_FLOOR_S)


def test_a_large_knn_path_searches_with_faiss_and_votes_as_scikit_learn(monkeypatch):
    """Past ``FAISS_KNN_FROM`` distances a knn path's neighbours come from FAISS's exact search: the same
    votes and probabilities as a scikit-learn fit of each configuration."""
    import numpy as np
    from sklearn.neighbors import KNeighborsClassifier

    from pipeline.heads.paths import KnnPath
    from pipeline.index import neighbours

    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((3000, 16)).astype(np.float32), rng.integers(0, 4, 3000)
    X_eval = rng.standard_normal((400, 16)).astype(np.float32)
    monkeypatch.setattr(neighbours, "FAISS_KNN_FROM", 0)
    path = KnnPath(X, y, X_eval, 30)
    for n, weights in [(1, "uniform"), (7, "distance"), (30, "uniform"), (12, "distance")]:
        want = KNeighborsClassifier(n, weights=weights).fit(X, y)
        labels, proba = path.predict(n, weights)
        np.testing.assert_array_equal(labels, want.predict(X_eval))
        np.testing.assert_allclose(proba, want.predict_proba(X_eval), atol=1e-5)
