"""Deployment: the exported files load in the runtimes people deploy with, as they are.

MediaPipe Tasks' own ``ImageClassifier`` and ``ImageEmbedder`` (the real ``mediapipe`` package, in a
subprocess that imports nothing of featcache) load every TFLite export and agree with ``featcache predict``;
``model.onnx`` runs in ONNX Runtime through ``predict``; a backbone tf2onnx cannot convert is one line and the
other formats still come out; docs/deploy.md's Python snippets run as written.

Shares the real cache of ``test_finetune.py`` (two classes of real photo crops, 64 px, Lite0 weights).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli, small_config, write_photo_folder
from test_finetune import stage3_setup

pytest.importorskip("mediapipe")
pytest.importorskip("onnxruntime")

TFLITE = ("tflite", "tflite-dynamic", "tflite-int8")
#: MediaPipe vs featcache predict on the same S×S pixels: the TFLite parity (float); the quantized files run
#: other int8 kernels in MediaPipe's TFLite build than in LiteRT's, measured ≤ 2e-3 here.
SAME_PIXELS_TOL = {"tflite": 1e-4, "tflite-dynamic": 1e-2, "tflite-int8": 1e-2}

CLASSIFY = """
import json, sys
import numpy as np
import mediapipe as mp
from mediapipe.tasks.python import BaseOptions, vision

model, files, pixels = sys.argv[1], json.loads(sys.argv[2]), np.load(sys.argv[3])
opts = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model), max_results=5)
out = {"file": [], "pixels": []}
with vision.ImageClassifier.create_from_options(opts) as clf:
    for f in files:
        cats = clf.classify(mp.Image.create_from_file(f)).classifications[0].categories
        out["file"].append([(c.category_name, c.score) for c in cats])
    for x in pixels:
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(x))
        cats = clf.classify(image).classifications[0].categories
        out["pixels"].append([(c.category_name, c.score) for c in cats])
print(json.dumps(out))
"""

EMBED = """
import json, sys
import numpy as np
import mediapipe as mp
from mediapipe.tasks.python import BaseOptions, vision

model, files, pixels = sys.argv[1], json.loads(sys.argv[2]), np.load(sys.argv[3])
opts = vision.ImageEmbedderOptions(base_options=BaseOptions(model_asset_path=model), l2_normalize=False)
out = {"file": [], "pixels": []}
with vision.ImageEmbedder.create_from_options(opts) as emb:
    for f in files:
        out["file"].append(emb.embed(mp.Image.create_from_file(f)).embeddings[0].embedding.tolist())
    for x in pixels:
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(x))
        out["pixels"].append(emb.embed(image).embeddings[0].embedding.tolist())
print(json.dumps(out))
"""


def mediapipe_run(script: str, model: Path, files: list[Path], pixels: np.ndarray, tmp: Path) -> dict:
    """Run ``script`` (MediaPipe only, no featcache import) in a fresh interpreter of this environment."""
    npy = tmp / "pixels.npy"
    np.save(npy, pixels.astype(np.uint8))
    r = subprocess.run(
        [sys.executable, "-c", script, str(model), json.dumps([str(f) for f in files]), str(npy)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> dict:
    """A stage-2 run exported to every deployable format, and new photos (assorted sizes) it never saw."""
    from pipeline.stages.export import export

    setup = stage3_setup(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("deploy") / "export"
    report = export(setup["run"], "savedmodel,tflite,tflite-dynamic,tflite-int8,onnx,embedder", out)
    photos = tmp_path_factory.mktemp("deploy-photos")
    write_photo_folder(photos, per_class=3, seed=7, start=700)
    return {**setup, "out": out, "report": report, "photos": sorted(photos.rglob("*.*"))}


def _predict(model: Path, images: list[Path]) -> dict[str, list[tuple[str, float]]]:
    r = run_cli("predict", "--model", str(model), *map(str, images), "--json", "--top-k", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    return {
        x["image"]: [(p["class"], p["probability"]) for p in x["predictions"]] for x in json.loads(r.stdout)
    }


def _pixels(report: dict, images: list[Path]) -> np.ndarray:
    """The S×S pixels featcache gives the model (its decode policy and antialiased resize), as uint8."""
    from pipeline.data.images import load_images

    x = load_images([str(p) for p in images], report["image_size"], report["resize"], report["decode"])
    return np.clip(np.rint(np.asarray(x)), 0, 255).astype(np.uint8)


def test_every_deploy_format_passes_its_check_and_carries_metadata(deployed):
    r = deployed["report"]
    assert r["ok"], json.dumps(r["formats"], indent=1)
    for fmt in (*TFLITE, "embedder"):
        md = r["formats"][fmt]["metadata"]
        assert md["normalization"] == {"mean": [0.0], "std": [1.0]}  # raw pixels: the graph preprocesses
        assert md["min_parser_version"] == "1.0.0"
    for fmt in TFLITE:
        md = r["formats"][fmt]["metadata"]
        assert md["task"] == "ImageClassifier" and md["label_file"] == "labels.txt" and md["labels"] == 2
        assert md["scores"].startswith("Softmax probabilities")
    assert r["formats"]["embedder"]["metadata"]["task"] == "ImageEmbedder"
    e = r["formats"]["embedder"]
    assert e["min_cosine"] >= 0.999 and e["min_cosine_cache"] >= 0.999 and e["output"].startswith("N×1280")
    assert r["formats"]["onnx"]["max_abs_diff"] <= 1e-4 and r["formats"]["onnx"]["accuracy_delta"] == 0


@pytest.mark.parametrize("fmt", TFLITE)
def test_mediapipe_image_classifier_agrees_with_featcache_predict(deployed, fmt, tmp_path):
    """The exported file as it is, in MediaPipe's ImageClassifier: the same top-k classes as ``featcache
    predict`` on the same photos (MediaPipe decoding and resizing them itself), and on the S×S pixels featcache
    reads (rounded to the uint8 MediaPipe takes) the scores LiteRT gives, within the TFLite parity."""
    from pipeline.features.tflite import TFLiteRunner

    path = Path(deployed["report"]["formats"][fmt]["path"])
    images = deployed["photos"]
    want = _predict(path, images)
    pixels = _pixels(deployed["report"], images)
    got = mediapipe_run(CLASSIFY, path, images, pixels, tmp_path)
    names = deployed["report"]["class_names"]
    same_input = TFLiteRunner(path)(pixels.astype(np.float32))  # the uint8 pixels MediaPipe was given
    for i, (img, from_file, from_pixels) in enumerate(zip(images, got["file"], got["pixels"], strict=True)):
        w = want[str(img)]
        assert [c for c, _ in from_file] == [c for c, _ in w], (img, from_file, w)
        assert [c for c, _ in from_pixels] == [c for c, _ in w], (img, from_pixels, w)
        diff = max(abs(score - same_input[i, names.index(c)]) for c, score in from_pixels)
        assert diff <= SAME_PIXELS_TOL[fmt], (img, diff)


def test_mediapipe_image_embedder_gives_the_cached_features(deployed, tmp_path):
    """embedder.tflite in MediaPipe's ImageEmbedder, on photos already S×S (no resize on either side, MediaPipe
    decodes the PNGs itself): cosine ≥ 0.999 to the features ``featcache extract`` caches for them with the
    run's backbone settings. (Larger photos: MediaPipe's resize differs; docs/deploy.md has the measure.)"""
    from PIL import Image

    from pipeline.cache.store import FeatureCache
    from pipeline.model.deploy import min_cosine
    from pipeline.stages.extract import extract
    from pipeline.utils.config import load_config

    r = deployed["report"]
    S = r["image_size"]
    folder = tmp_path / "photos"
    for p in deployed["photos"]:
        (folder / p.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(p).convert("RGB").resize((S, S), Image.BILINEAR).save(
            folder / p.parent.name / f"{p.stem}.png"
        )
    cache = extract(load_config(None, small_config(tmp_path / "cache", folder))).path
    with FeatureCache(cache) as c:
        keys, cached = list(c.keys), c.features(None, np.arange(len(c.keys)))
    files = [folder / k for k in keys]
    got = mediapipe_run(EMBED, Path(r["formats"]["embedder"]["path"]), files, _pixels(r, files), tmp_path)
    assert len(keys) == len(deployed["photos"])
    assert min_cosine(np.asarray(got["file"]), cached) >= 0.999
    assert min_cosine(np.asarray(got["pixels"]), cached) >= 0.999


def test_predict_runs_the_onnx_file_in_onnx_runtime(deployed):
    out = deployed["out"]
    images = deployed["photos"]
    onnx, lite = _predict(out / "model.onnx", images), _predict(out / "model.tflite", images)
    for img in images:
        assert [c for c, _ in onnx[str(img)]] == [c for c, _ in lite[str(img)]]
        assert max(abs(a[1] - b[1]) for a, b in zip(onnx[str(img)], lite[str(img)], strict=True)) <= 2e-4
    assert onnx[str(images[0])][0][0] == images[0].parent.name  # real photo crops: the head knows them


def test_missing_onnx_runtime_is_one_line_naming_the_extra(deployed, tmp_path):
    """Without ONNX Runtime (an import that fails, as on an install without the extra): one line, exit 2."""
    shadow = tmp_path / "no-onnxruntime"
    (shadow / "onnxruntime").mkdir(parents=True)
    (shadow / "onnxruntime" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": f"{shadow}:{REPO}"}
    r = run_cli(
        "predict", "--model", str(deployed["out"] / "model.onnx"), str(deployed["photos"][0]), env=env
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"featcache: error: --model {deployed['out'] / 'model.onnx'} needs ONNX Runtime: onnxruntime not "
        "installed: pip install 'featcache[onnx]'"
    )
    r = run_cli("export", "--run", str(deployed["run"]), "--format", "tflite,onnx", env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "featcache: error: --format onnx needs ONNX Runtime and tf2onnx: onnxruntime not installed: "
        "pip install 'featcache[onnx]'"
    )


def test_a_backbone_tf2onnx_cannot_convert_is_named_and_the_rest_exports(tmp_path):
    """A KerasHub ViT (exact GELU: TensorFlow's Erfc, which tf2onnx cannot express): ``onnx`` is one line with
    the converter's reason, the TFLite file of the same call still comes out and passes."""
    pytest.importorskip("keras_hub")
    from PIL import Image
    from test_keras_hub import S, save_preset

    from pipeline.stages.extract import extract
    from pipeline.stages.train import train
    from pipeline.utils.config import load_config

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(8):
            base = rng.integers(0, 256, (S, S, 3)) if c == "a" else np.full((S, S, 3), 40 + 20 * i)
            pixels = np.clip(base + rng.normal(0, 20, (S, S, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / c / f"{c}{i}.png")
    overrides = {
        "data.source": str(tmp_path / "images"),
        "backbone.name": str(save_preset(tmp_path / "tiny_vit", "vit")),
        "extract.cache_dir": str(tmp_path / "cache"),
        "extract.progress": False,
        "data.val_fraction": "0.25",
        "data.test_fraction": "0.25",
    }
    extract(load_config(None, overrides))
    run = train(load_config(None, overrides)).run_dir
    r = run_cli("export", "--run", str(run), "--format", "onnx,tflite", "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("onnx"))
    assert re.fullmatch(
        r"onnx +not exported: tf2onnx has no ONNX equivalent of the TensorFlow op\(s\) Erfc", line
    )
    saved = json.loads((tmp_path / "out" / "export.json").read_text())
    assert saved["formats"]["onnx"]["ok"] is False and not (tmp_path / "out" / "model.onnx").exists()
    assert saved["formats"]["tflite"]["ok"] and (tmp_path / "out" / "model.tflite").is_file()


def _snippets() -> list[str]:
    text = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_deploy_page_python_snippets_run_as_written(deployed, tmp_path):
    """Each Python block of docs/deploy.md, run in a folder holding ``export/`` (this export) and
    ``photo.jpg`` (a china crop): it runs and names the right class (the embedder: a vector)."""
    snippets = _snippets()
    assert len(snippets) >= 5
    (tmp_path / "export").symlink_to(deployed["out"], target_is_directory=True)
    photo = next(p for p in deployed["photos"] if p.parent.name == "china" and p.suffix == ".jpg")
    (tmp_path / "photo.jpg").write_bytes(photo.read_bytes())
    for code in snippets:
        r = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, (code, r.stderr[-2000:])
        assert "china" in r.stdout or "embedding" in r.stdout, (code, r.stdout)
