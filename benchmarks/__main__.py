"""``make bench``: run every benchmark, write JSON to benchmarks/out/ and the tables to benchmarks/RESULTS.md.

Each figure is a ratio or a comparison measured in the same run, so it holds on a noisy machine.
``python -m benchmarks --quick`` is a smoke run with small sizes; ``--only cache,engines`` picks sections.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {
    "engines": (
        "benchmarks.bench_engines",
        "Extraction vs the backbone's limit, per engine (items 1 and issue 7)",
    ),
    "int8": (
        "benchmarks.bench_int8",
        "Full-integer int8 against float32: speed, features, accuracy (issue 28)",
    ),
    "dynamic": (
        "benchmarks.bench_dynamic",
        "Dynamic-range int8 against float32 TFLite for KerasHub ViT-S/14 and ViT-B/16 (issue 38)",
    ),
    "hub": (
        "benchmarks.bench_hub",
        "KerasHub ViT-S/14 and ViT-B/16: extraction vs the bare pass of the same engine (issue 27)",
    ),
    "training": (
        "benchmarks.bench_training",
        "Cached training vs the notebook way, and search vs one pass (items 2-4)",
    ),
    "stage2": (
        "benchmarks.bench_stage2",
        "Stage 2 near its limit: the logistic head's float32 L-BFGS vs its gradient's BLAS limit, 100k-1M rows (issue 40)",
    ),
    "search": (
        "benchmarks.bench_search",
        "A 100-trial random search over five head families vs one extraction pass (issue 16)",
    ),
    "compare": (
        "benchmarks.bench_compare",
        "featcache compare: its cost over the plain extractions, and a Fashion-MNIST leaderboard (issue 29)",
    ),
    "cache": ("benchmarks.bench_cache", "Cache behaviour, extraction memory and start-up (items 4-6)"),
    "shards": ("benchmarks.bench_shards", "Data at scale: folder vs tar shards vs Parquet (issue 14)"),
    "audit": (
        "benchmarks.bench_audit",
        "Audit from the cache: planted label errors and near-duplicates (issue 18)",
    ),
    "index": (
        "benchmarks.bench_index",
        "The similarity index: FAISS recall@10 against exact search, build, size, latency, the audit's pass (issue 37)",
    ),
    "novelty": (
        "benchmarks.bench_novelty",
        "Novelty at predict: in-distribution vs another domain flagged by a Fashion-MNIST run (issue 37)",
    ),
    "multilabel": (
        "benchmarks.bench_multilabel",
        "Multi-label mosaics of Fashion-MNIST: mAP of train and search, rebuilt model, cost per image (issue 30)",
    ),
    "decode": (
        "benchmarks.bench_decode",
        "Phone photos: the decode policy (DCT scaling) against exact decoding (issue 15)",
    ),
    "cluster": ("benchmarks.bench_cluster", "Extraction on a local Dask cluster vs one process (issue 13)"),
    "zeroshot": (
        "benchmarks.bench_zeroshot",
        "Words as heads: prompt cost, zero-shot train time, the k-shot curve on a small CLIP (issue 36)",
    ),
    "scale": (
        "benchmarks.bench_scale",
        "A million rows: extract, no-op, +1 %, train, search, audit, report at 100k-1M rows; 10M synthetic (issue 40)",
    ),
}

#: Sections a plain ``make bench`` leaves out: they take hours or tens of GB (``--only`` runs them).
ON_REQUEST = {"scale"}


def machine() -> str:
    import numpy as np

    try:
        import tensorflow as tf

        tf_version = tf.__version__
    except ImportError:  # pragma: no cover
        tf_version = "?"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, TensorFlow {tf_version}, NumPy {np.__version__}"


#: Hand-written notes per section (run history, per-repetition numbers, what was tried): appended to the
#: section in RESULTS.md every time it is written, so regenerating a section never drops them.
NOTES = REPO / "benchmarks" / "notes"


def _notes(name: str) -> str:
    path = NOTES / f"{name}.md"
    return path.read_text().strip() if path.is_file() else ""


def _seed_sections(sections: Path) -> None:
    """Sections measured elsewhere (a fresh checkout has no ``out/``) are kept from RESULTS.md as they are,
    so refreshing one section never drops the others."""
    results = REPO / "benchmarks" / "RESULTS.md"
    if not results.is_file():
        return
    text = results.read_text()
    for name, (_, title) in SECTIONS.items():
        target = sections / f"{name}.md"
        start = text.find(f"## {title}\n")
        if target.is_file() or start < 0:
            continue
        end = text.find("\n## ", start + 1)
        section = text[start : end if end >= 0 else len(text)].strip()
        notes = _notes(name)
        target.write_text(section.removesuffix(notes).strip() if notes else section)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    scale = ap.add_argument_group("scale section (benchmarks/bench_scale.py)")
    scale.add_argument("--work", help="its work folder: images, caches, results.json per size")
    scale.add_argument("--scale-sizes", help="rows, comma-separated (default 100000,300000,1000000)")
    scale.add_argument("--scale-images", help="the scale_data folder to link from (default <work>/images)")
    scale.add_argument("--scale-fresh", action="store_true", help="rebuild the caches it would reuse")
    scale.add_argument(
        "--scale-skip",
        help="steps left out: extract,noop,grow,empty,train,search,audit,report,"
        "synthetic (or info,ls,runs of it)",
    )
    scale.add_argument("--scale-timeout", type=float, help="seconds before a step is stopped (default 3600)")
    scale.add_argument(
        "--scale-synthetic", type=int, help="rows of the synthetic cache (default 10M; 0: none)"
    )
    scale.add_argument("--scale-dim", type=int, help="its feature width (default 64)")
    args = ap.parse_args(argv)
    out_dir = REPO / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    everything = [s for s in SECTIONS if s not in ON_REQUEST]
    chosen = [s for s in (args.only.split(",") if args.only else everything) if s]
    sections = out_dir / "sections"
    sections.mkdir(exist_ok=True)
    _seed_sections(sections)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results, tables = {}, []
    for name in chosen:
        module_name, title = SECTIONS[name]
        print(f"== {name}: {title}", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(module_name)
        takes_args = "args" in inspect.signature(module.run).parameters  # sections with options of their own
        results[name] = module.run(out_dir, args.quick, **({"args": args} if takes_args else {}))
        table = module.markdown(results[name])
        print(table, flush=True)
        text = f"## {title}\n\nMeasured {stamp}.\n\n{table}\n\n_{time.perf_counter() - t0:.0f} s_"
        tables.append(text)
        if not args.quick:  # a full run of one section refreshes that section of RESULTS.md
            (sections / f"{name}.md").write_text(text)
    (out_dir / "results.json").write_text(
        json.dumps({"machine": machine(), "when": stamp, "quick": args.quick, **results}, indent=2)
    )
    if args.quick:
        partial = _header() + "(quick run)\n\n" + "\n\n".join(tables) + "\n"
        (out_dir / "RESULTS.partial.md").write_text(partial)
    else:
        write_results(sections)
    return 0


def _header() -> str:
    return (
        f"# Benchmark results\n\nMachine: {machine()}.\n"
        "Regenerate with `make bench` (full, every section) or `make bench ARGS='--only engines'` (one).\n"
    )


def write_results(sections: Path) -> None:
    """RESULTS.md from the latest full run of every section, each followed by its notes."""
    texts = [
        "\n\n".join(filter(None, [(sections / f"{n}.md").read_text().strip(), _notes(n)]))
        for n in SECTIONS
        if (sections / f"{n}.md").is_file()
    ]
    (REPO / "benchmarks" / "RESULTS.md").write_text(_header() + "\n" + "\n\n".join(texts) + "\n")


if __name__ == "__main__":
    sys.exit(main())
