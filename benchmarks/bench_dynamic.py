"""Dynamic-range int8 (``extract.engine=tflite-dynamic``) against float32 TFLite for KerasHub ViTs (issue 38).

    python -m benchmarks --only dynamic            # ~10 minutes on 2 cores (ViT-B/16 is slow)
    python -m benchmarks --only dynamic --quick    # a smoke run of the numbers
    python -m benchmarks.bench_dynamic --cnn       # CNN families: the table behind DYNAMIC_REFUSED_CNN

Two random-weight KerasHub presets at 224 px written by ``save_to_preset`` (:mod:`benchmarks.bench_hub`'s
builders): **ViT-S/14** (DINOv2 shape: hidden 384, 12 layers, 6 heads) and **ViT-B/16** (hidden 768, 12
layers, 12 heads). Per model, each converted once by featcache (``load_or_convert``, the models the engines
run), then repetition by repetition, the order reversed every other one, so load from other processes hits
both engines alike:

* ``bare``: the engine on the same files decoded into float32 batches in memory (warmed up);
* ``extract``: :func:`pipeline.stages.extract.extract` on the files into a fresh cache (converted model and
  gate reused), its steady rate after the first batch (the marginal rate: start-up left out).

Reported: medians over repetitions and the median of per-repetition ratios (dynamic ÷ float32), the feature
cosine of dynamic to float32 TFLite on the same images (mean / min), the file sizes, and beside them the CPU's
instruction sets (``/proc/cpuinfo`` flags: AVX2, AVX512-VNNI, AVX-VNNI, AMX-INT8 decide which XNNPACK int8
kernels run) and the load average while measuring (the machine may be shared).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_engines import OUT, _median
from benchmarks.bench_hub import (
    bare,
    extract_once,
    feature_model,
    make_photos_224,
    prepared_batches,
    save_preset,
)
from benchmarks.bench_hub import models as hub_models

#: /proc/cpuinfo flags that decide XNNPACK's int8 kernels on x86, and how this section names them.
ISA_FLAGS = {"avx2": "AVX2", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}
GOAL = 2.0  # issue 38: whole extract of ViT-S/14 >= 2x float32 TFLite
ENGINES = {"float32": "tflite", "dynamic": "tflite-dynamic"}


def instruction_sets() -> list[str]:
    """The int8-relevant instruction sets this CPU reports (empty off Linux/x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return [name for flag, name in ISA_FLAGS.items() if flag in flags]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def bench_model(model: dict[str, Any], photos: Path, n: int, reps: int, threads: int, work: Path) -> dict:
    import keras

    from pipeline.features.engines import load_or_convert

    folder = save_preset(work / model["key"], model)
    root = work / f"engines-{model['key']}"
    (root / "engines").mkdir(parents=True)
    fm, pooling = feature_model(folder)
    batches = prepared_batches(photos, n, fm)
    lite, conv = {}, {}
    for name, quantize in (("float32", "none"), ("dynamic", "dynamic-int8")):
        t = time.perf_counter()
        lite[name], meta = load_or_convert(fm, threads, root, quantize=quantize, verbose=False)
        conv[name] = {"seconds": round(time.perf_counter() - t, 1), "bytes": meta["bytes"]}
        print(f"  [{model['key']}] {name} converted: {conv[name]}", file=sys.stderr, flush=True)
    x = np.concatenate(batches)
    cos = _cosines(*(lite[k](x)[fm.layers[0]] for k in ("float32", "dynamic")))
    paths = [(kind, name) for kind in ("bare", "extract") for name in ENGINES]
    runs: dict[str, list[dict]] = {f"{k} {e}": [] for k, e in paths}
    loads = []
    for rep in range(reps):
        for kind, name in paths if rep % 2 == 0 else paths[::-1]:
            if kind == "bare":
                r = bare(lite[name], batches)
            else:
                r = extract_once(photos, n, folder, ENGINES[name], threads, root / "engines")
                if r["used"] != ENGINES[name]:
                    raise RuntimeError(f"extract ran {r['used']}, not {ENGINES[name]}")
            runs[f"{kind} {name}"].append(r)
        loads.append(os.getloadavg()[0])
        print(
            f"  [{model['key']} rep {rep + 1}/{reps}] "
            + " · ".join(f"{k} {v[-1]['images_per_s']:.1f}/s" for k, v in runs.items())
            + f" · load average {loads[-1]:.2f}",
            file=sys.stderr,
            flush=True,
        )
    rows = {}
    for kind in ("bare", "extract"):
        f, d = runs[f"{kind} float32"], runs[f"{kind} dynamic"]
        ratios = [b["images_per_s"] / a["images_per_s"] for a, b in zip(f, d, strict=True)]
        rows[kind] = {
            "float32": _median([r["images_per_s"] for r in f]),
            "dynamic": _median([r["images_per_s"] for r in d]),
            "ratios": ratios,
            "ratio": _median(ratios),
            "foreign_cores": _median([r["foreign_cores"] for r in f + d]),
        }
    result = {
        "key": model["key"],
        "label": model["label"],
        "params": int(sum(np.prod(w.shape) for w in fm.base.weights)),
        "pooling": pooling,
        "dim": int(sum(fm.dims.values())),
        "conversion": conv,
        "cosine": {"mean": float(cos.mean()), "min": float(cos.min()), "images": len(cos)},
        "rows": rows,
        "load_average": loads,
        "raw": runs,
    }
    del fm, batches, lite
    keras.backend.clear_session()
    gc.collect()
    return result


def run(out_dir: Path, quick: bool) -> dict:
    from pipeline.features.engines import configure_tf_threads
    from pipeline.utils.workers import usable_cores

    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    threads = usable_cores()
    configure_tf_threads(threads)
    plan = (
        {"vit_s14": (32, 1), "vit_b16_l12": (16, 1)}
        if quick
        else {"vit_s14": (64, 3), "vit_b16_l12": (32, 3)}
    )
    work = Path(tempfile.mkdtemp(prefix="bench-dynamic-", dir=OUT))
    results = []
    try:
        for model in hub_models(12):
            n, reps = plan[model["key"]]
            photos = make_photos_224(OUT / f"photos-224-{n}", n)
            results.append(bench_model(model, photos, n, reps, threads, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "dynamic",
        "instruction_sets": instruction_sets(),
        "threads": threads,
        "quick": quick,
        "goal": f"whole extract of ViT-S/14 >= {GOAL}x float32 TFLite",
        "models": results,
        "seconds": time.perf_counter() - t0,
    }
    (Path(out_dir) / "dynamic.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def markdown(result: dict) -> str:
    isa = ", ".join(result["instruction_sets"]) or "none of AVX2 / VNNI / AMX"
    lines = [
        f"CPU instruction sets: **{isa}**; {result['threads']} threads. Random-weight KerasHub presets at 224 px "
        "(`save_to_preset` folders), 224-px JPEG/PNG crops of the sample photos, batch 16. `bare`: the converted "
        "model on the decoded batches in memory; `extract`: `extract()` into a fresh cache, its marginal rate "
        "(after the first batch). Images/s are medians over interleaved repetitions; the ratio is the median of "
        "per-repetition dynamic ÷ float32 (each repetition's ratios in brackets).",
        "",
        "| model | path | float32 TFLite images/s | dynamic int8 images/s | **dynamic ÷ float32** | "
        "feature cosine mean / min | file MB float32 / dynamic | load average |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result["models"]:
        c, conv = m["cosine"], m["conversion"]
        sizes = f"{conv['float32']['bytes'] / 1e6:.0f} / {conv['dynamic']['bytes'] / 1e6:.0f}"
        label = f"{m['label']}, {m['params'] / 1e6:.1f} M params"
        load = ", ".join(f"{x:.1f}" for x in m["load_average"])
        for kind, path in (("bare", "bare pass"), ("extract", "whole `extract`")):
            r = m["rows"][kind]
            ratios = ", ".join(f"{x:.2f}" for x in r["ratios"])
            cos = f"{c['mean']:.5f} / {c['min']:.5f}" if kind == "bare" else ""
            lines.append(
                f"| {label if kind == 'bare' else ''} | {path} | {r['float32']:.1f} | {r['dynamic']:.1f} | "
                f"**{r['ratio']:.2f}×** ({ratios}) | {cos} | {sizes if kind == 'bare' else ''} | {load} |"
            )
    s14 = next((m for m in result["models"] if m["key"] == "vit_s14"), None)
    if s14:
        met = s14["rows"]["extract"]["ratio"] >= GOAL
        lines += ["", f"Goal ({result['goal']}): **{'met' if met else 'not met'}**."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CNNs

CNN_FAMILIES = ("efficientnet_lite0", "mobilenet_v2", "resnet50", "efficientnet_b0", "convnext_tiny")


def cnn(names=CNN_FAMILIES, size: int = 160) -> list[dict[str, Any]]:
    """One backbone per CNN family, random weights at ``size`` px: dynamic-range against float32 TFLite,
    bare pass on probe photos (best of 3, interleaved): the table behind ``DYNAMIC_REFUSED_CNN``."""
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import TFLiteEngine, convert
    from pipeline.features.probes import best_rates, probe_images
    from pipeline.utils.config import BackboneConfig

    x = probe_images(size, 16)
    rows = []
    for name in names:
        fm = build_feature_model(BackboneConfig(name=name, weights="none", image_size=size))
        blob, outputs = convert(fm)
        blob_d, _ = convert(fm, "dynamic-int8")
        f32 = TFLiteEngine(blob, fm.layers, outputs, 0)
        dyn = TFLiteEngine(blob_d, fm.layers, outputs, 0, name="tflite-dynamic")
        rate_f32, rate_dyn = best_rates([f32, dyn], x, reps=3)
        rows.append(
            {
                "backbone": name,
                "size": size,
                "float32": rate_f32,
                "dynamic": rate_dyn,
                "speedup": rate_dyn / rate_f32,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images, 1 repetition")
    ap.add_argument("--cnn", action="store_true", help="CNN families (the refusal table) instead")
    args = ap.parse_args(argv)
    if args.cnn:
        rows = cnn()
        print(f"instruction sets: {', '.join(instruction_sets())}; load average {os.getloadavg()[0]:.2f}")
        for r in rows:
            print(f"| {r['backbone']} | {r['float32']:.0f} | {r['dynamic']:.0f} | {r['speedup']:.2f}× |")
        return 0
    result = run(OUT, args.quick)
    print(markdown(result))
    print(f"\n(written to {OUT}/dynamic.json in {result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
