"""Issue 40: every stage at 100k, 300k and 1M rows, and a 10M-row synthetic cache for memory.

Images: benchmarks/scale_data.py (N unique 32 px PNGs in class folders, hard links of one big folder).
Backbone: efficientnet_lite0 (the default) at ``--image-size 32``. For each N, in ``<work>/n<N>/``, real
``featcache`` subprocesses (wall time; peak RSS as the child's own VmHWM, benchmarks/peak_rss.py, and the
peak of its process group's summed PSS, polled every 0.5 s: a search's trial workers are other processes):

- ``extract``: the first extraction of N images into an empty cache folder. The only slow step, so it is
  *reused*: a later run keeps the cache it built (and its time) unless ``--scale-fresh`` (needed when the
  cache format changed);
- ``noop``: the same extract again, nothing new (median of 3);
- ``grow``: N/100 more images (the next ones of the big folder, linked into the same data folder) into a
  copy of the cache (synced to disk before the step); the links and the copy are removed afterwards, so
  the cache stays at N rows;
- ``empty``: those N/100 images alone (a folder of only them) into an empty cache folder (the base's
  converted engines copied in, so neither side pays a conversion); before each of the two steps the new
  images are read once, so both find them in the page cache (the first would otherwise pay their cold reads);
- ``train`` (default head, its test accuracy), ``search`` (100 random trials, ``--no-refit --fresh``),
  ``audit``, ``report``; beside ``train``, one gradient pass of the default head (two float32 matrix products
  over the train rows, measured in this process): the BLAS limit the solver is compared with.

``synthetic``: a cache of ``--scale-synthetic`` rows (default 10M) of ``--scale-dim``-d features (default
64: 2.6 GB of float32) written by the cache writer from generated features (:func:`write_synthetic_cache`),
then ``cache info``, ``cache ls``, ``runs ls`` and ``train`` on it: their peak RSS against the float32
features' size.

Each step has a time limit (``--scale-timeout``; a step stopped there shows ``> T s``); ``--scale-skip``
leaves steps out (their earlier figures, measured at another commit, are marked ‡).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
STEPS = ("extract", "noop", "grow", "empty", "train", "search", "audit", "report")
SYNTH_STEPS = ("build", "info", "ls", "runs", "train")
NOOP_REPS = 3
DIM = 1280  # Lite0's features


def commit() -> str:
    """The code measured: the last commit that changed pipeline/, ``+`` when it has uncommitted changes."""
    git = ["git", "-C", str(REPO)]
    last = [*git, "log", "-1", "--format=%h", "--", "pipeline"]
    head = subprocess.run(last, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "pipeline"], capture_output=True, text=True).stdout
    return head + ("+" if dirty.strip() else "")


def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _group_pss_kib(pgid: int) -> int:
    """Proportional set size of every process in group ``pgid`` together (a search's trial workers
    included; pages they share, such as the features in shared memory, counted once)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ProcessLookupError):
            continue
    return total


def child(args: list[str], timeout: float) -> dict[str, Any]:
    """Wall time, peak RSS and output of ``python ARGS``, stopped (its whole group) after ``timeout`` s.

    Peak RSS: the file benchmarks/peak_rss.py writes at exit, else (killed, or not a featcache run) the
    highest VmHWM polled every 0.5 s."""
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as f:
        env = {**os.environ, "FEATCACHE_PEAK_FILE": f.name, "TF_CPP_MIN_LOG_LEVEL": "2"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        polled, group, timed_out = 0, 0, False
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    polled = max(polled, _vm_hwm_kib(proc.pid))
                    group = max(group, _group_pss_kib(proc.pid))
                    if time.perf_counter() - t0 > timeout:
                        os.killpg(proc.pid, signal.SIGKILL)
                        out, err = proc.communicate()
                        timed_out = True
                        break
        finally:  # the bench stopped (Ctrl-C, an error): its own session would outlive it
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        secs = time.perf_counter() - t0
        written = Path(f.name).read_text().strip()
    status = "timeout" if timed_out else "failed" if proc.returncode else "ok"
    r = {
        "s": round(secs, 2),
        "rss_mib": round((int(written) if written else polled) / 1024),
        "group_pss_mib": round(group / 1024),  # polled every 0.5 s: the process and its workers
        "status": status,
    }
    if status == "failed":
        r["error"] = (err.strip().splitlines() or ["?"])[-1][:300]
    r["load"], r["limit_s"] = round(os.getloadavg()[0], 1), timeout
    return {**r, "stdout": out}


def featcache(args: list[str], timeout: float) -> dict[str, Any]:
    return child(["-m", "benchmarks.peak_rss", *args], timeout)


def _record(r: dict[str, Any], rev: str, **extra: Any) -> dict[str, Any]:
    """What a step keeps in results.json: no stdout, the commit and time it was measured at, and an
    extract's counts (``samples: ... · 12 extracted · 988 reused ...``)."""
    import re

    kept = {k: v for k, v in r.items() if k != "stdout"}
    for word in ("extracted", "reused"):
        found = re.search(rf"(\d+) {word}", r.get("stdout") or "")
        if found and (r.get("stdout") or "").startswith("cache:"):
            kept[word] = int(found.group(1))
    return {**kept, **extra, "commit": rev, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def ensure_images(big: Path, need: int) -> Path:
    """The big folder, generated (resuming) when it lacks image ``need - 1``."""
    from benchmarks.scale_data import make_scale_folder

    if not any(big.glob(f"*/{need - 1:07d}.png")):
        print(f"generating {need} images in {big} ...", flush=True)
        make_scale_folder(big, need)
    return big


def _copy_cache(src: Path, dst: Path) -> None:
    """A cache folder without its runs and stage outputs (what the next extract reads), on disk before the
    timed step starts: the copy's dirty pages (5 GB at 1M rows) are not written back during it."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("runs", "*.html", "*.csv", "*.lock"))
    os.sync()


def _newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _run_line(stdout: str) -> Path | None:
    line = next((x for x in stdout.splitlines() if x.startswith("run: ")), "")
    return Path(line[5:].strip()) if line else None


def step_extract(d: Path, sel: list[str], rev: str, opts) -> dict[str, Any]:
    shutil.rmtree(d / "cache", ignore_errors=True)
    r = featcache(["extract", *sel, "--quiet"], opts.extract_timeout)
    return _record(r, rev)


def step_noop(d: Path, sel: list[str], rev: str, opts) -> dict[str, Any]:
    reps = [featcache(["extract", *sel, "--quiet"], opts.timeout) for _ in range(NOOP_REPS)]
    best = sorted(reps, key=lambda r: r["s"])[len(reps) // 2]
    return _record(best, rev, reps=[r["s"] for r in reps])


def step_grow(d: Path, n: int, big: Path, rev: str, opts) -> dict[str, Any]:
    """N/100 new images into a copy of the N-row cache; the data folder and the cache are put back after."""
    from benchmarks.scale_data import link_subset, read_subset, trim_subset

    extra, images, grown = max(1, n // 100), d / "images", d / "grow-cache"
    _copy_cache(d / "cache", grown)
    link_subset(big, images, n + extra, start=n)
    read_subset(images, n)  # warm, as they are for the empty-cache step
    try:
        r = featcache(
            [
                "extract",
                "--data",
                str(images),
                "--cache-dir",
                str(grown),
                "--image-size",
                str(IMAGE_SIZE),
                "--quiet",
            ],
            opts.timeout,
        )
    finally:
        trim_subset(images, n)
        shutil.rmtree(grown, ignore_errors=True)
    return _record(r, rev, added=extra)


def step_empty(d: Path, n: int, big: Path, rev: str, opts) -> dict[str, Any]:
    from benchmarks.scale_data import link_subset, read_subset

    extra, alone, cache = max(1, n // 100), d / "extra", d / "empty-cache"
    link_subset(big, alone, n + extra, start=n)
    read_subset(alone, n)  # warm, as they are for the growth
    for cls in alone.iterdir():  # a class none of the few images belong to is no class folder
        if not any(cls.iterdir()):
            cls.rmdir()
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    if (d / "cache" / "engines").is_dir():
        shutil.copytree(d / "cache" / "engines", cache / "engines")
    args = ["extract", "--data", str(alone), "--cache-dir", str(cache), "--image-size", str(IMAGE_SIZE)]
    r = featcache([*args, "--quiet"], opts.timeout)
    shutil.rmtree(cache, ignore_errors=True)
    return _record(r, rev, images=extra)


def gradient_pass(n_rows: int, dim: int = DIM, classes: int = 10, sample: int = 100_000) -> float:
    """Seconds of one gradient of a multinomial logistic head over ``n_rows``: X @ W then Xᵀ @ G in float32,
    best of 3 on ``sample`` rows, scaled linearly (both products are linear in the rows)."""
    import numpy as np

    rng = np.random.default_rng(0)
    m = min(n_rows, sample)
    X = rng.standard_normal((m, dim), dtype=np.float32)
    W = rng.standard_normal((dim, classes), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        G = X @ W
        _ = X.T @ G
        best = min(best, time.perf_counter() - t0)
    return best * n_rows / m


def step_train(d: Path, sel: list[str], rev: str, opts) -> dict[str, Any]:
    r = featcache(["train", *sel, "--quiet"], opts.timeout)
    n = int(d.name[1:])  # n<N>; the train split is about 80 % (content-hashed), its metrics say exactly
    extra: dict[str, Any] = {
        "train_rows": round(0.8 * n),
        "gradient_pass_s": round(gradient_pass(round(0.8 * n)), 4),
    }
    run = _run_line(r["stdout"]) if r["status"] == "ok" else None
    if run is not None and (run / "metrics.json").is_file():
        m = json.loads((run / "metrics.json").read_text())
        rows = m["cache"]["rows"]
        extra = {
            "test_acc": m["test"].get("accuracy"),
            "fit_s": m["fit"].get("seconds"),
            "n_iter": m["fit"].get("n_iter"),
            "streamed": m.get("streamed"),
            "train_rows": rows.get("train"),
            "features": m.get("n_features"),
        }
        extra["gradient_pass_s"] = round(gradient_pass(rows["train"], m["n_features"]), 4)
    return _record(r, rev, **extra)


def step_search(d: Path, sel: list[str], rev: str, opts) -> dict[str, Any]:
    args = ["search", *sel, "--n-trials", str(opts.trials), "--no-refit", "--fresh", "--quiet"]
    r = featcache(args, opts.timeout)
    extra: dict[str, Any] = {"trials": opts.trials}
    folder = _newest(d / "cache" / "runs", "search-*")
    if r["status"] == "ok" and folder is not None and (folder / "search.json").is_file():
        best = json.loads((folder / "search.json").read_text()).get("best") or {}
        extra |= {"best_val": best.get("score"), "best_head": best.get("head")}
    return _record(r, rev, **extra)


def step_audit(d: Path, sel: list[str], rev: str, opts) -> dict[str, Any]:
    return _record(featcache(["audit", *sel, "--quiet"], opts.timeout), rev)


def step_report(d: Path, sel: list[str], rev: str, opts) -> dict[str, Any]:
    out = d / "report.html"
    r = featcache(["report", *sel, "--out", str(out), "--quiet"], opts.timeout)
    return _record(r, rev, html_mb=round(out.stat().st_size / 1e6, 1) if out.is_file() else None)


def _load_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def bench_size(big: Path, work: Path, n: int, opts) -> dict[str, Any]:
    """Every step at N rows; results.json keeps each step's latest figure (and the commit it was taken at)."""
    from benchmarks.scale_data import link_subset, trim_subset

    d, rev = work / f"n{n}", commit()
    d.mkdir(parents=True, exist_ok=True)
    state_file = d / "results.json"
    state = _load_state(state_file)
    images = d / "images"
    if images.is_dir():
        trim_subset(images, n)  # a growth interrupted before it put the folder back
    link_subset(big, images, n)
    sel = ["--data", str(images), "--cache-dir", str(d / "cache"), "--image-size", str(IMAGE_SIZE)]
    built = state.get("extract", {}).get("status") == "ok" and (d / "cache").is_dir()
    for name in STEPS:
        if name in opts.skip or (name == "extract" and built and not opts.fresh):
            continue
        if name != "extract" and state.get("extract", {}).get("status") != "ok":
            break  # no cache to work on
        print(f"   n={n}: {name} ...", flush=True)
        if name in ("grow", "empty"):
            state[name] = globals()[f"step_{name}"](d, n, big, rev, opts)
        else:
            state[name] = globals()[f"step_{name}"](d, sel, rev, opts)
        print(f"   n={n}: {name}: {_cell(state[name])}, {state[name]['rss_mib']} MiB", flush=True)
        state_file.write_text(json.dumps(state, indent=2))
    return {"rows": n, **state}


def write_synthetic_cache(
    cache_dir: Path,
    rows: int,
    dim: int,
    template: Path,
    part_rows: int = 200_000,
    piece_rows: int = 1_000_000,
) -> Path:
    """A complete cache of ``rows`` generated rows (10 classes, class-centred Gaussian features, so a head
    has something to learn) with the attributes of ``template`` (a real cache), written by the cache's own
    writer as a grown cache is: a base of ``piece_rows`` rows, then segments of ``piece_rows`` rows each
    (``pipeline.cache.segments``), each from whole ``.npz`` parts (PartWriter) by ``write_cache``; so the
    builder holds one piece's rows in memory, never all of them."""
    import uuid

    import h5py
    import numpy as np

    from pipeline.cache.segments import segment_dir, segment_name
    from pipeline.cache.write import PartWriter, Row, clear_partial, scan_parts, write_cache

    with h5py.File(template, "r") as f:
        attrs = {
            k: v for k, v in f.attrs.items() if k not in ("format", "n_rows", "complete", "attrs_sha256")
        }
        class_names = [x.decode() if isinstance(x, bytes) else str(x) for x in f["class_names"][()]]
        layer = next(iter(f["features"]))
    attrs = {k: json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v for k, v in attrs.items()}
    attrs["generation"] = uuid.uuid4().hex
    final = cache_dir / template.name
    cache_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((len(class_names), dim), dtype=np.float32)
    k, split = len(class_names), (0, 0, 0, 0, 0, 0, 0, 0, 1, 2)  # 80 % train, 10 % val, 10 % test
    for piece, lo in enumerate(range(0, rows, piece_rows)):
        hi = min(rows, lo + piece_rows)
        writer = PartWriter(final, {"fingerprint": attrs.get("fingerprint")})
        for start in range(lo, hi, part_rows):
            idx = np.arange(start, min(hi, start + part_rows))
            x = centres[idx % k] + 2.0 * rng.standard_normal((len(idx), dim), dtype=np.float32)
            writer.write([f"{i:032x}" for i in idx], {layer: x})
        parts = scan_parts(final, attrs.get("fingerprint"))
        table = [
            Row(f"{class_names[i % k]}/{i:08d}.png", f"{i:032x}", i % k, split[i // k % 10], 1, 0)
            for i in range(lo, hi)
        ]
        target, extra = final, {}
        if piece:
            target = segment_dir(final) / segment_name(piece, piece)
            target.parent.mkdir(exist_ok=True)
            extra = {"segment_of": attrs["generation"], "segment_first": piece, "segment_last": piece}
        write_cache(target, table, class_names, {layer: dim}, {**attrs, **extra}, None, parts)
        clear_partial(final)
    return final


def bench_synthetic(work: Path, rows: int, dim: int, template: Path, opts) -> dict[str, Any]:
    """The synthetic cache, built once (reused unless ``--scale-fresh``), then the stages that open it."""
    d, rev = work / f"synthetic-{rows}x{dim}", commit()
    state_file = d / "results.json"
    state = _load_state(state_file) if d.is_dir() else {}
    cache = d / "cache" / template.name
    built = state.get("build", {}).get("status") == "ok" and cache.is_file()
    if not built or opts.fresh:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        print(f"   synthetic {rows}x{dim}: build ...", flush=True)
        args = [
            "-m",
            "benchmarks.bench_scale",
            "build-synthetic",
            str(d / "cache"),
            str(rows),
            str(dim),
            str(template),
        ]
        state["build"] = _record(child(args, opts.extract_timeout), rev)
        state_file.write_text(json.dumps(state, indent=2))
        if state["build"]["status"] != "ok":
            return {"rows": rows, "dim": dim, **state}
    files = [
        p
        for p in (d / "cache").rglob("*")
        if p.is_file() and "runs" not in p.parts and ".index" not in str(p)
    ]
    state["file_gb"] = round(sum(p.stat().st_size for p in files) / 1e9, 2)  # the cache, not runs or indexes
    state["features_mib"] = round(rows * dim * 4 / 2**20, 1)
    commands = {
        "info": ["cache", "info", str(cache)],
        "ls": ["cache", "ls", "--cache-dir", str(d / "cache")],
        "runs": ["runs", "ls", "--cache", str(cache), "--cache-dir", str(d / "cache")],
        "train": ["train", "--cache", str(cache), "--cache-dir", str(d / "cache"), "--quiet"],
    }
    for name, args in commands.items():
        if name in opts.skip:
            continue
        print(f"   synthetic {rows}x{dim}: {name} ...", flush=True)
        r = featcache(args, opts.timeout)
        run = _run_line(r["stdout"]) if name == "train" and r["status"] == "ok" else None
        acc = json.loads((run / "metrics.json").read_text())["test"].get("accuracy") if run else None
        state[name] = _record(r, rev, **({"test_acc": acc} if name == "train" else {}))
        print(f"   synthetic: {name}: {_cell(state[name])}, {state[name]['rss_mib']} MiB", flush=True)
        state_file.write_text(json.dumps(state, indent=2))
    return {"rows": rows, "dim": dim, **state}


class Options:
    """The section's settings: ``python -m benchmarks --only scale --scale-sizes ... --work ...``."""

    def __init__(self, args: Any, quick: bool):
        get = lambda name, default: getattr(args, name, None) or default  # noqa: E731
        self.work = Path(get("work", REPO / "benchmarks" / "out" / "work" / "scale")).expanduser().resolve()
        sizes = get("scale_sizes", "1000" if quick else "100000,300000,1000000")
        self.sizes = [int(x) for x in str(sizes).split(",") if x]
        self.images = Path(get("scale_images", self.work / "images")).expanduser().resolve()
        self.fresh = bool(get("scale_fresh", False))
        self.skip = {x for x in str(get("scale_skip", "")).split(",") if x}
        self.timeout = float(get("scale_timeout", 3600))
        self.extract_timeout = 24 * 3600.0
        self.trials = 10 if quick else 100
        synthetic = getattr(args, "scale_synthetic", None)
        self.synthetic = (20_000 if quick else 10_000_000) if synthetic is None else int(synthetic)
        self.dim = int(get("scale_dim", 64))


def run(out_dir: Path, quick: bool, args: Any = None) -> dict[str, Any]:
    from benchmarks.bench_dynamic import instruction_sets

    opts = Options(args, quick)
    opts.work.mkdir(parents=True, exist_ok=True)
    big = ensure_images(opts.images, max(opts.sizes) + max(1, max(opts.sizes) // 100))
    sizes = [bench_size(big, opts.work, n, opts) for n in opts.sizes]
    synthetic = None
    template = next(iter(sorted((opts.work / f"n{min(opts.sizes)}" / "cache").glob("*.h5"))), None)
    if opts.synthetic and "synthetic" not in opts.skip and template is not None:
        synthetic = bench_synthetic(opts.work, opts.synthetic, opts.dim, template, opts)
    result = {
        "benchmark": "scale",
        "commit": commit(),
        "instruction_sets": instruction_sets(),
        "cores": os.cpu_count(),
        "image_size": IMAGE_SIZE,
        "work": str(opts.work),
        "timeout_s": opts.timeout,
        "sizes": sizes,
        "synthetic": synthetic,
    }
    (Path(out_dir) / "scale.json").write_text(json.dumps(result, indent=2))
    return result


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s >= 100 else f"{s:.1f} s" if s >= 10 else f"{s:.2f} s"


def _cell(step: dict[str, Any] | None, rev: str | None = None) -> str:
    """A step's wall time: ``> T s`` when stopped at its limit, ‡ when measured at another commit."""
    if not step:
        return "–"
    mark = " ‡" if rev and step.get("commit") != rev else ""
    if step["status"] == "timeout":
        return f"> {_secs(step['s'])} (stopped){mark}"
    if step["status"] == "failed":
        return f"failed{mark}"
    return _secs(step["s"]) + mark


def _gb(step: dict[str, Any] | None) -> str:
    if not step or not step.get("rss_mib"):
        return "–"
    return f"{step['rss_mib'] / 1024:.1f} GB" if step["rss_mib"] >= 1024 else f"{step['rss_mib']} MiB"


def _goals(s: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) at one size; ``None``: not measured (or stopped)."""
    ok = lambda *names: all(s.get(x, {}).get("status") == "ok" for x in names)  # noqa: E731
    n, out = s["rows"], []
    if ok("grow", "empty"):
        out.append(
            (
                "+1 % ≤ same 1 % into empty + 2 s",
                f"{s['grow']['s']:.1f} s ({s['grow'].get('extracted', '?')} extracted) vs "
                f"{s['empty']['s']:.1f} s + 2 s",
                s["grow"]["s"] <= s["empty"]["s"] + 2
                and s["grow"].get("extracted") == s["grow"].get("added"),
            )
        )
    if ok("noop"):
        out.append(("no-op ≤ 2 s (at 1M)", _secs(s["noop"]["s"]), s["noop"]["s"] <= 2))
    if ok("train"):
        out.append(("train ≤ 90 s (at 1M)", _secs(s["train"]["s"]), s["train"]["s"] <= 90))
        feats = n * DIM * 4 / 2**20
        out.append(
            (
                "train peak RSS ≤ 2× float32 features",
                f"{s['train']['rss_mib'] / feats:.1f}×",
                s["train"]["rss_mib"] <= 2 * feats,
            )
        )
    if ok("search") and s["search"].get("group_pss_mib"):
        read = n * 0.9 * DIM * 4 / 2**20  # a search reads its train and val rows
        pss = s["search"]["group_pss_mib"]
        out.append(
            (
                "search peak memory (its workers too) ≤ 2× float32 features read",
                f"{pss / read:.1f}×",
                pss <= 2 * read,
            )
        )
    if s.get("search") and ok("extract"):
        met = s["search"]["status"] == "ok" and s["search"]["s"] <= s["extract"]["s"]
        out.append(
            ("search 100 ≤ first extract (at 1M)", f"{_cell(s['search'])} vs {_secs(s['extract']['s'])}", met)
        )
    return out


def markdown(r: dict[str, Any]) -> str:
    isa = ", ".join(r["instruction_sets"]) or "none of AVX2 / VNNI / AMX"
    rev = r["commit"]
    lines = [
        f"CPU instruction sets: **{isa}**; {r['cores']} cores. Commit {rev}. Unique {r['image_size']} px PNGs "
        f"(benchmarks/scale_data.py), efficientnet_lite0 at `--image-size {r['image_size']}`, 1280-d; real "
        "`featcache` subprocesses; a step stopped at its time limit (`--scale-timeout`) shows `> T s`. Commit: "
        "the last one that changed pipeline/; ‡: measured at another (step skipped in this run; results.json "
        "names it).",
        "",
        "| rows | first extract | no-op | +1 % | same 1 % into empty | train | peak RSS train | search 100 | audit | report |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r["sizes"]:
        cells = [_cell(s.get(x), rev) for x in ("extract", "noop", "grow", "empty", "train")]
        cells.insert(5, _gb(s.get("train")))
        cells += [_cell(s.get(x), rev) for x in ("search", "audit", "report")]
        lines.append(f"| {s['rows']:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| rows | peak RSS extract / no-op / +1 % / empty / search / audit / report | train: test acc, iterations, "
        "one gradient pass (float32 BLAS), train ÷ pass | load avg (train) |",
        "|---:|---|---|---:|",
    ]
    for s in r["sizes"]:
        rss = " / ".join(
            _gb(s.get(x)) for x in ("extract", "noop", "grow", "empty", "search", "audit", "report")
        )
        t = s.get("train") or {}
        detail = "–"
        if t.get("gradient_pass_s"):
            acc = f"{t['test_acc']:.4f}" if t.get("test_acc") is not None else "–"
            more = "> " if t["status"] == "timeout" else ""
            detail = (
                f"{acc}, {t.get('n_iter', '–')} it, {t['gradient_pass_s']:.3f} s, "
                f"{more}{t['s'] / t['gradient_pass_s']:.0f}×"
            )
        lines.append(f"| {s['rows']:,} | {rss} | {detail} | {t.get('load', '–')} |")
    lines += ["", "| rows | goal | measured | met |", "|---:|---|---|---|"]
    for s in r["sizes"]:
        for goal, measured, met in _goals(s):
            lines.append(f"| {s['rows']:,} | {goal} | {measured} | {'yes' if met else 'no'} |")
    if r.get("synthetic"):
        lines += ["", *_synthetic_lines(r["synthetic"], rev)]
    return "\n".join(lines)


def _synthetic_lines(y: dict[str, Any], rev: str) -> list[str]:
    cell = lambda x: f"{_cell(y.get(x), rev)}, {_gb(y.get(x))}" if y.get(x) else "–"  # noqa: E731
    t, feats = y.get("train") or {}, y.get("features_mib") or y["rows"] * y["dim"] * 4 / 2**20
    ratio = f"{t['rss_mib'] / feats:.1f}×" if t.get("rss_mib") else "–"
    acc = f"{t['test_acc']:.4f}" if t.get("test_acc") is not None else "–"
    return [
        f"Synthetic cache: {y['rows']:,} rows × {y['dim']}-d float32 features ({feats / 1024:.2f} GB; class-centred "
        f"Gaussian, 80/10/10 splits), written by the cache writer (`write_synthetic_cache`); file(s) "
        f"{y.get('file_gb', '?')} GB. Wall time, peak RSS:",
        "",
        "| build | `cache info` | `cache ls` | `runs ls` | `train` | train peak RSS ÷ float32 features | train test acc |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {cell('build')} | {cell('info')} | {cell('ls')} | {cell('runs')} | {cell('train')} | {ratio} | {acc} |",
    ]


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["build-synthetic"]:
        cache_dir, rows, dim, template = sys.argv[2:6]
        print(write_synthetic_cache(Path(cache_dir), int(rows), int(dim), Path(template)))
    else:
        res = run(REPO / "benchmarks" / "out", quick="--quick" in sys.argv)
        print(markdown(res))
