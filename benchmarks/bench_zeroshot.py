"""Words as heads (issue 36): prompt-embedding cost, zero-shot ``train`` against the logistic head's, and the
k-shot curve of zero-shot, logistic and the few-shot head on a small CLIP trained here.

    python -m benchmarks --only zeroshot            # ~2 minutes on 2 cores
    python -m benchmarks --only zeroshot --quick

No real CLIP weights can be downloaded here, so the model is ``tests/text_presets.train_small_clip``: a
2-block, width-32 CLIP trained for :data:`STEPS` steps on captioned colour squares ("a photo of a red."),
deliberately short of convergence so that labels still have something to add. Held-out images of the same
four colours are extracted with ``--pooling pooled``; every head is scored on the test split.

* **prompt cost**: the text tower on 4 classes × 80 ImageNet templates (320 prompts) — the first ``train
  --head zeroshot`` (prompts embedded) against a second one (read from the text store) and the logistic head;
* **k-shot**: k train images per class (k = 1, 2, 4, 8, 16; :data:`SEEDS` draws each) for the logistic head
  (standardize + lbfgs, the default ``train``) and ``fewshot`` (its mix chosen on the val split); zero-shot
  uses no train image. Test accuracy, mean over draws.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

STEPS = 30
NOISE, SIDES = 110.0, (4, 9)  # the held-out images: small squares in heavy noise
SEEDS = 3
SHOTS = (1, 2, 4, 8, 16)


def _data(work: Path, n_per_class: int) -> dict[str, Any]:

    from tests.text_presets import colour_images, train_small_clip, write_colour_folder

    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    folder = train_small_clip(work / "small_clip", steps=STEPS, seed=1)
    trained = time.perf_counter() - t0
    X, y = colour_images(n_per_class, seed=21, noise=NOISE, sides=SIDES)  # harder than training's images
    write_colour_folder(work / "images", X, y)
    ov = {
        "data.source": str(work / "images"),
        "backbone.name": str(folder),
        "extract.cache_dir": str(work / "cache"),
        "extract.progress": False,
        "data.val_fraction": "0.2",
        "data.test_fraction": "0.4",
    }
    return {"ov": ov, "train_seconds": round(trained, 1)}


def _timed_train(ov: dict[str, Any], head: str) -> tuple[float, Any]:
    from pipeline.stages.train import train
    from pipeline.utils.config import load_config

    t0 = time.perf_counter()
    run = train(load_config(None, {**ov, "train.head": head}))
    return round(time.perf_counter() - t0, 2), run


def _kshot(ov: dict[str, Any], quick: bool) -> dict[str, Any]:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.cache.locate import resolve_cache
    from pipeline.cache.store import FeatureCache
    from pipeline.heads.registry import make_head
    from pipeline.heads.zeroshot import FewShotClassifier, ZeroShotClassifier, text_weights
    from pipeline.utils.config import load_config

    cfg = load_config(None, {**ov, "zeroshot.templates": ["photo"]})
    with FeatureCache(resolve_cache(cfg)) as cache:
        text, _ = text_weights(cfg, cache, "zeroshot")
        X = cache.features(None, np.arange(cache.n_rows))
        y, split = np.asarray(cache.labels), np.asarray(cache.split)
    tr, va, te = (np.flatnonzero(split == i) for i in range(3))
    acc = lambda m: float(np.mean(m.predict(X[te]) == y[te]))  # noqa: E731
    zero = acc(ZeroShotClassifier(**text).fit(X[tr]))
    curve = []
    for k in SHOTS[:3] if quick else SHOTS:
        rows = {"k": k, "logistic": [], "fewshot": [], "mix": []}
        for seed in range(SEEDS):
            rng = np.random.default_rng(seed)
            pick = np.concatenate([rng.choice(tr[y[tr] == c], k, replace=False) for c in np.unique(y)])
            lr = make_pipeline(StandardScaler(), make_head("logistic", seed=seed).estimator).fit(
                X[pick], y[pick]
            )
            few = FewShotClassifier(**text, random_state=seed).fit(X[pick], y[pick], X[va], y[va])
            rows["logistic"].append(acc(lr))
            rows["fewshot"].append(acc(few))
            rows["mix"].append(few.mix_)
        curve.append({key: (float(np.mean(v)) if isinstance(v, list) else v) for key, v in rows.items()})
    return {"zero_shot": zero, "curve": curve, "test_images": int(len(te)), "val_images": int(len(va))}


def run(out_dir: Path, quick: bool) -> dict[str, Any]:
    from pipeline.stages.extract import extract
    from pipeline.utils.config import load_config

    d = _data(out_dir / "work" / "zeroshot", 30 if quick else 100)
    ov = d["ov"]
    extract(load_config(None, ov))
    first, run1 = _timed_train(ov, "zeroshot")
    again, _ = _timed_train(ov, "zeroshot")
    logistic, lr_run = _timed_train(ov, "logistic")
    few, few_run = _timed_train(ov, "fewshot")
    return {
        "clip_train_seconds": d["train_seconds"],
        "prompts": run1.metrics["zeroshot"]["n_prompts"],
        "zeroshot_first_seconds": first,
        "zeroshot_cached_seconds": again,
        "logistic_seconds": logistic,
        "fewshot_seconds": few,
        "test_accuracy": {
            "zeroshot (80 templates)": run1.metrics["test"]["accuracy"],
            "logistic": lr_run.metrics["test"]["accuracy"],
            "fewshot": few_run.metrics["test"]["accuracy"],
        },
        **_kshot(ov, quick),
    }


def markdown(r: dict[str, Any]) -> str:
    acc = r["test_accuracy"]
    lines = [
        f"A 2-block, width-32 CLIP trained here for {STEPS} steps ({r['clip_train_seconds']} s) on captioned colour "
        f"squares; held-out images of its four colours (chance 0.25), {r['test_images']} test and "
        f"{r['val_images']} val images, `--pooling pooled`.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| `train --head zeroshot`, {r['prompts']} prompts embedded (4 classes × 80 templates) | "
        f"{r['zeroshot_first_seconds']} s |",
        f"| the same again, prompts read from the text store | {r['zeroshot_cached_seconds']} s |",
        f"| `train --head logistic` (default) | {r['logistic_seconds']} s |",
        f"| `train --head fewshot` | {r['fewshot_seconds']} s |",
        f"| test accuracy: zeroshot (80 templates) / logistic / fewshot, full train split | "
        f"{acc['zeroshot (80 templates)']:.3f} / {acc['logistic']:.3f} / {acc['fewshot']:.3f} |",
        "",
        f'k-shot test accuracy (mean of {SEEDS} draws; zero-shot with "a photo of a {{}}." uses no train image: '
        f"{r['zero_shot']:.3f}):",
        "",
        "| k per class | zero-shot | logistic | fewshot | mix chosen (mean) |",
        "|---|---|---|---|---|",
    ]
    for row in r["curve"]:
        lines.append(
            f"| {row['k']} | {r['zero_shot']:.3f} | {row['logistic']:.3f} | {row['fewshot']:.3f} | {row['mix']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - ``python -m benchmarks --only zeroshot`` is the entry point
    from benchmarks.__main__ import REPO

    print(markdown(run(REPO / "benchmarks" / "out", False)))
