"""Zero-shot and few-shot heads from the text tower of KerasHub CLIP and SigLIP presets.

Each preset is a small random-weight model with its tokenizer, saved by KerasHub's ``save_to_preset`` and
named by its folder (tests/text_presets.py). featcache's probabilities are checked against KerasHub's own
model on the same images and prompts; the rebuilt end-to-end model against the stage-2 head.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from pipeline.utils.config import load_config

keras_hub = pytest.importorskip("keras_hub")
sys.path.insert(0, str(Path(__file__).parent))
from text_presets import S, save_text_preset  # noqa: E402

CLASSES = ("red", "blue", "green_square")
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _sentences() -> list[str]:
    from pipeline.heads.zeroshot import IMAGENET_TEMPLATES

    names = [c.replace("_", " ") for c in CLASSES] + ["tench", "very long words"]
    return [t.replace("{}", n) for t in (*IMAGENET_TEMPLATES, "{}") for n in names]


@pytest.fixture(scope="module")
def zs(tmp_path_factory) -> dict:
    """A CLIP and a SigLIP preset, a three-class folder of 32-px PNGs, and a pooled cache of each."""
    from pipeline.stages.extract import extract

    root = tmp_path_factory.mktemp("zs")
    presets = {f: save_text_preset(root / f"tiny_{f}", f, _sentences()) for f in ("clip", "siglip")}
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200), "green_square": (30, 200, 30)}
    for c in CLASSES:
        (root / "images" / c).mkdir(parents=True)
        for i in range(6):
            px = np.clip(np.asarray(colours[c]) + rng.normal(0, 25, (S, S, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / "images" / c / f"{c}{i}.png")
    out = {"root": root, "presets": presets, "images": root / "images", "ov": {}}
    for f, folder in presets.items():
        ov = {
            "data.source": str(root / "images"),
            "backbone.name": str(folder),
            "extract.cache_dir": str(root / f"cache-{f}"),
            "extract.batch_size": 8,
            "extract.progress": False,
            "extract.engine": "tensorflow",
            "data.val_fraction": "0.3",
            "data.test_fraction": "0.3",
            "zeroshot.templates": TEMPLATES,
        }
        extract(load_config(None, ov))
        out["ov"][f] = ov
    return out


def _features(cache_path: Path) -> tuple[list[str], np.ndarray]:
    from pipeline.cache.store import FeatureCache

    with FeatureCache(cache_path) as c:
        return list(c.keys), c.features(None, np.arange(len(c.keys)))


def keras_hub_probabilities(folder: Path, images: Path, keys: list[str], prompts: list[str], family: str):
    """KerasHub's own converter, preprocessor and backbone: the model's logits for each image and prompt."""
    converter = keras_hub.layers.ImageConverter.from_preset(str(folder))
    root = keras_hub.models.Backbone.from_preset(str(folder))
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(str(folder))
    cls = keras_hub.models.CLIPPreprocessor if family == "clip" else keras_hub.models.SigLIPPreprocessor
    pre = cls(tokenizer, sequence_length=root.text_encoder.max_sequence_length)
    ids = pre({"prompts": prompts, "images": None})["token_ids"]
    x = converter(np.stack([np.asarray(Image.open(images / k), np.float32) for k in keys]))
    logits = np.asarray(root({"images": x, "token_ids": ids})["vision_logits"], np.float64)
    if family == "siglip":
        return 1 / (1 + np.exp(-logits)), root
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True), root


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_zero_shot_equals_keras_hub(zs, family):
    """One template: the probabilities are KerasHub's own (softmax / sigmoid of its logits) to 1e-5 on
    TensorFlow; two templates: the CLIP ensemble (normalised, averaged, normalised) of KerasHub's text
    embeddings."""
    from pipeline.heads.persist import load_model
    from pipeline.stages.train import train

    ov = zs["ov"][family]
    one = train(load_config(None, {**ov, "train.head": "zeroshot", "zeroshot.templates": ["photo"]}))
    keys, X = _features(Path(one.metrics["cache"]["path"]))
    names = one.metrics["class_names"]  # the cache's order (sorted folder names)
    prompts = [f"a photo of a {c.replace('_', ' ')}." for c in names]
    want, root = keras_hub_probabilities(zs["presets"][family], zs["images"], keys, prompts, family)
    got = load_model(one.run_dir).predict_proba(X)
    assert np.abs(got - want).max() <= 1e-5
    assert one.metrics["zeroshot"]["activation"] == ("softmax" if family == "clip" else "sigmoid")
    assert one.metrics["transforms"] == [] and one.metrics["test"]["n"] > 0

    two = train(load_config(None, {**ov, "train.head": "zeroshot"}))
    tpl = [[t.replace("{}", c.replace("_", " ")) for t in TEMPLATES] for c in names]
    flat = [p for per in tpl for p in per]
    tok = keras_hub.tokenizers.Tokenizer.from_preset(str(zs["presets"][family]))
    cls = keras_hub.models.CLIPPreprocessor if family == "clip" else keras_hub.models.SigLIPPreprocessor
    ids = cls(tok, sequence_length=root.text_encoder.max_sequence_length)({"prompts": flat, "images": None})
    T = np.asarray(root.get_text_embeddings(ids["token_ids"]), np.float64)
    T = (T / np.linalg.norm(T, axis=1, keepdims=True)).reshape(len(names), len(TEMPLATES), -1).mean(1)
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    head = root.clip_head if family == "clip" else root.siglip_head
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    z = np.exp(float(head.logit_scale)) * Xn @ T.T + float(getattr(head, "logit_bias", 0.0))
    p = 1 / (1 + np.exp(-z)) if family == "siglip" else np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert np.abs(load_model(two.run_dir).predict_proba(X) - p).max() <= 1e-5
    assert two.metrics["zeroshot"]["n_prompts"] == len(flat)


def test_prompts_are_embedded_once_and_the_python_call_returns_them(zs):
    import pipeline
    from pipeline.stages.train import train

    ov = zs["ov"]["clip"]
    run = train(load_config(None, {**ov, "train.head": "zeroshot"}))
    store = Path(run.metrics["zeroshot"]["text_store"])
    before = store.stat().st_mtime_ns
    again = train(load_config(None, {**ov, "train.head": "zeroshot"}))
    assert again.metrics["zeroshot"]["text_store"] == str(store) and store.stat().st_mtime_ns == before
    with np.load(store) as z:
        stored = dict(zip(z["prompts"].tolist(), z["embeddings"], strict=True))
    emb = pipeline.text_embeddings(
        ["a photo of a red.", "a drawing of a blue."], backbone=str(zs["presets"]["clip"])
    )
    assert emb.shape == (2, 16)
    assert np.abs(emb[0] - stored["a photo of a red."]).max() <= 1e-6


def test_rebuilt_zero_shot_model_equals_stage2_and_exports(zs, tmp_path):
    from pipeline.model.rebuild import equivalence, rebuild
    from pipeline.stages.export import export
    from pipeline.stages.train import train

    run = train(load_config(None, {**zs["ov"]["siglip"], "train.head": "zeroshot"}))
    eq = equivalence(rebuild(run.run_dir), "val")
    assert eq["n"] >= 3 and eq["max_abs_diff"] <= 1e-4
    r = export(run.run_dir, "keras,tflite", tmp_path)
    assert r["ok"], json.dumps(r["formats"], indent=1)


def test_few_shot_is_never_worse_on_val_than_either_half(zs):
    from pipeline.stages.train import train

    ov = zs["ov"]["clip"]
    runs = {h: train(load_config(None, {**ov, "train.head": h})) for h in ("zeroshot", "fewshot")}
    lr = train(load_config(None, {**ov, "train.head": "logistic", "train.transforms": ["l2", "standardize"]}))
    few = runs["fewshot"].metrics
    assert few["val"]["accuracy"] >= max(
        runs["zeroshot"].metrics["val"]["accuracy"], lr.metrics["val"]["accuracy"]
    )
    assert 0.0 <= few["zeroshot"]["mix"] <= 1.0 and len(few["zeroshot"]["val_accuracy_by_mix"]) == 11


def _one_line(r, message: str) -> None:
    """Exit 2 and one error line naming the problem (the stage's own "cache: ..." line may come before)."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("featcache: error")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and message in errors[0] and r.stderr.strip().endswith(errors[0]), r.stderr


def _cli_train(zs, family: str, *extra: str):
    ov = zs["ov"][family]
    return run_cli(
        "train", "--data", ov["data.source"], "--backbone", ov["backbone.name"],
        "--set", f"extract.cache_dir={ov['extract.cache_dir']}", "--head", "zeroshot", *extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('templates = ["a photo of a thing"]', "must hold exactly one {}"),
        ('prompts = { red = " " }', "non-empty string"),
        ('prompts = { purple = "purple" }', "is not a class of this cache"),
    ],
)
def test_bad_prompts_are_one_line(zs, tmp_path, section, message):
    (tmp_path / "z.toml").write_text(f"[zeroshot]\n{section}\n")
    r = _cli_train(zs, "clip", "--config", str(tmp_path / "z.toml"))
    _one_line(r, message)
    assert not list(Path(zs["ov"]["clip"]["extract.cache_dir"]).glob("runs/*zeroshot*/metrics.json.tmp*"))


def test_no_text_tower_or_not_joint_space_is_one_line(zs, tmp_path):
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(zs["presets"]["clip"], folder)
    (folder / "tokenizer.json").unlink()
    ov = {**zs["ov"]["clip"], "backbone.name": str(folder), "extract.cache_dir": str(tmp_path / "c")}
    from pipeline.stages.extract import extract

    extract(load_config(None, ov))
    r = run_cli(
        "train", "--data", ov["data.source"], "--backbone", str(folder), "--set",
        f"extract.cache_dir={tmp_path / 'c'}", "--head", "zeroshot",
    )  # fmt: skip
    _one_line(r, "has no tokenizer")
    extract(load_config(None, {**zs["ov"]["clip"], "backbone.pooling": "cls"}))
    r = _cli_train(zs, "clip", "--pooling", "cls")
    _one_line(r, "not the joint image-text space")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A small CLIP trained here (~10 s) on captioned colour squares, and a pooled cache of held-out images."""
    from text_presets import colour_images, train_small_clip, write_colour_folder

    from pipeline.stages.extract import extract

    root = tmp_path_factory.mktemp("trained")
    folder = train_small_clip(root / "small_clip")
    X, y = colour_images(12, seed=7)  # never seen in training
    write_colour_folder(root / "images", X, y)
    ov = {
        "data.source": str(root / "images"),
        "backbone.name": str(folder),
        "extract.cache_dir": str(root / "cache"),
        "extract.progress": False,
        "data.val_fraction": "0.25",
        "data.test_fraction": "0.25",
    }
    extract(load_config(None, ov))
    return {"root": root, "ov": ov, "folder": folder}


def test_a_trained_small_clip_classifies_from_the_words_alone(trained, tmp_path):
    """Chance is 0.25 (four colours); the zero-shot run, from the class names only, is far above it, and
    `predict` on new images names their colour."""
    ov = trained["ov"]
    r = run_cli(
        "train", "--data", ov["data.source"], "--backbone", ov["backbone.name"], "--set",
        f"extract.cache_dir={ov['extract.cache_dir']}", "--set", "zeroshot.templates=photo", "--head", "zeroshot",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    run_dir = Path(r.stdout.strip().splitlines()[-1].split("run: ")[-1])
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["test"]["accuracy"] >= 0.9 and m["val"]["accuracy"] >= 0.9, (m["val"], m["test"])
    from text_presets import COLOURS, colour_images

    X, y = colour_images(2, seed=11)
    paths = []
    for i, img in enumerate(X):
        paths.append(tmp_path / f"new{i}.png")  # the name says nothing of the colour
        Image.fromarray(img).save(paths[-1])
    p = run_cli("predict", "--model", str(run_dir), *map(str, paths), "--top-k", "1")
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines()[1:]]
    said = {Path(r[0]).name: r[2] for r in rows if len(r) >= 3}  # long paths may be shortened on the left
    right = sum(said[q.name] == list(COLOURS)[c] for q, c in zip(paths, y, strict=True))
    assert right >= 7, p.stdout  # of 8 images never seen, their features computed by the rebuilt model


TEXT_SPACE = """
[[heads]]
name = "zeroshot"
[[heads]]
name = "fewshot"
params = { C = [0.1, 1.0] }
[[heads]]
name = "logistic"
params = { C = [1.0] }
"""


def test_search_space_with_text_heads_ranks_and_refits(trained, tmp_path):
    """Trials build the text heads from their parameters and the class embeddings the search hands in (as
    ``train`` does): each trial scores what ``train`` of that head scores on val, and the best is refitted."""
    from threadpoolctl import threadpool_limits

    from pipeline.stages.search import search
    from pipeline.stages.train import train
    from pipeline.utils.errors import FeatcacheError

    ov = {**trained["ov"], "train.runs_dir": str(tmp_path), "zeroshot.templates": ["photo"]}
    (tmp_path / "s.toml").write_text(TEXT_SPACE)
    with threadpool_limits(1):
        run = search(
            load_config(None, {**ov, "search.space": str(tmp_path / "s.toml"), "search.n_jobs": "1"})
        )
        assert run.n_candidates == 4 and all(r["status"] == "ok" for r in run.leaderboard), run.leaderboard
        by = {(r["head"], r["params"]): r for r in run.leaderboard}
        zs_run = train(load_config(None, {**ov, "train.head": "zeroshot"}))
        few = train(load_config(None, {**ov, "train.head": "fewshot", "train.params": {"C": 0.1}}))
    assert by[("zeroshot", "{}")]["score"] == pytest.approx(zs_run.metrics["val"]["accuracy"])
    assert by[("zeroshot", "{}")]["score"] >= 0.9  # the trial had the words: far above chance (0.25)
    assert by[("fewshot", '{"C": 0.1}')]["score"] == pytest.approx(few.metrics["val"]["accuracy"])
    assert (
        by[("fewshot", '{"C": 0.1}')]["transforms"] == "none"
        and by[("logistic", '{"C": 1.0}')]["transforms"] == "standardize"
    )
    refit = json.loads((run.refit_dir / "metrics.json").read_text())
    assert refit["head"] == run.best["head"] and refit["val"]["accuracy"] == pytest.approx(run.best["score"])
    if refit["head"] in ("zeroshot", "fewshot"):
        assert refit["transforms"] == [] and refit["zeroshot"]["templates"] == ["a photo of a {}."]

    other = search(load_config(None, {**ov, "zeroshot.templates": ["imagenet"], "search.space": str(tmp_path / "s.toml"), "search.refit": "false"}))  # fmt: skip
    assert other.dir != run.dir  # other prompts: other trials, never the journal of these
    (tmp_path / "bad.toml").write_text('[[heads]]\nname = "fewshot"\ntransforms = [["standardize"]]\n')
    with pytest.raises(FeatcacheError, match="reads the embedding as cached"):
        search(load_config(None, {**ov, "search.space": str(tmp_path / "bad.toml")}))


def test_compare_adds_zero_shot_and_fewshot_rows_for_a_text_tower(trained, tmp_path):
    """A text tower's candidate gets CLIP_benchmark's zero-shot scores (those of a zero-shot run: the same
    classifier on the same rows) and the fewshot head's k-shot scores; a candidate outside the joint space
    (``pooling = "cls"``) gets none."""
    import csv

    import pipeline
    from pipeline.stages.compare import format_leaderboard
    from pipeline.stages.train import train

    ov = trained["ov"]
    (tmp_path / "c.toml").write_text(
        f'[[candidate]]\nlabel = "clip"\nname = "{trained["folder"]}"\n'
        f'[[candidate]]\nlabel = "clip-cls"\nname = "{trained["folder"]}"\npooling = "cls"\n'
    )
    result = pipeline.compare(
        data=ov["data.source"], cache_dir=ov["extract.cache_dir"], candidates=str(tmp_path / "c.toml"),
        shots=[1, 4], seeds=2, extract__progress=False, zeroshot__templates=["photo"],
        data__val_fraction=0.25, data__test_fraction=0.25,
    )  # fmt: skip
    rows = {r["label"]: r for r in result.rows}
    run = train(load_config(None, {**ov, "train.head": "zeroshot", "zeroshot.templates": ["photo"]}))
    clip = rows["clip"]
    assert (
        clip["zeroshot_test"] == pytest.approx(run.metrics["test"]["accuracy"])
        and clip["zeroshot_test"] >= 0.9
    )
    assert clip["zeroshot_val"] == pytest.approx(run.metrics["val"]["accuracy"])
    assert set(clip["fewshot_shots"]) == {"1", "4"} and all(
        0 <= s["mean"] <= 1 for s in clip["fewshot_shots"].values()
    )
    assert clip["fewshot_shots"]["4"]["mean"] >= 0.75  # starts from the words: far above chance (0.25)
    assert rows["clip-cls"]["zeroshot_test"] is None and "fewshot_shots" not in rows["clip-cls"]
    with open(result.dir / "leaderboard.csv", newline="") as f:
        header = next(csv.reader(f))
    assert {"zeroshot_test", "fewshot_4_mean", "shot_4_mean"} <= set(header)
    table = format_leaderboard(result.rows)
    assert "0-shot" in table and "4-shot fs" in table


def _two_colour_folder(root: Path, n: int, seed: int) -> Path:
    """``n`` noisy 32-px images holding one or two coloured squares (left and right half) and ``labels.csv``
    naming their colours: a multi-label set the small CLIP never saw."""
    from text_presets import COLOURS

    rng, names = np.random.default_rng(seed), list(COLOURS)
    (root / "img").mkdir(parents=True)
    lines = ["path,labels"]
    for i in range(n):
        img = rng.normal(128, 30, (S, S, 3))
        picked = rng.choice(len(names), size=int(rng.integers(1, 3)), replace=False)
        for half, c in enumerate(picked):
            side = int(rng.integers(10, 15))
            y, x = int(rng.integers(0, S - side)), half * 16 + int(rng.integers(0, 16 - side + 1))
            img[y : y + side, x : x + side] = COLOURS[names[c]]
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{';'.join(names[c] for c in picked)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_zero_shot_on_a_multilabel_cache(trained, tmp_path):
    """Each class scored alone: CLIP's scaled cosine through a sigmoid with a per-class offset fitted on
    train, thresholds from val, a multi-label run folder; its macro mAP is far above the label-frequency
    baseline, and the rebuilt model equals the stage-2 head."""
    from pipeline.model.rebuild import equivalence, rebuild
    from pipeline.stages.extract import extract
    from pipeline.stages.train import train

    csv_path = _two_colour_folder(tmp_path / "data", 48, seed=3)
    ov = {**trained["ov"], "data.source": str(csv_path), "extract.cache_dir": str(tmp_path / "cache")}
    extract(load_config(None, ov))
    run = train(load_config(None, {**ov, "train.head": "zeroshot", "zeroshot.templates": ["photo"]}))
    m = run.metrics
    assert m["task"] == "multilabel" and set(m["thresholds"]) == {"red", "green", "blue", "yellow"}
    assert m["test"]["macro_map"] >= 0.85 and m["test"]["macro_map"] > m["test"]["map_baseline"] + 0.3, m[
        "test"
    ]
    assert m["zeroshot"]["activation"] == "softmax" and m["transforms"] == []
    eq = equivalence(rebuild(run.run_dir), "val")
    assert eq["n"] >= 5 and eq["max_abs_diff"] <= 1e-4
    r = run_cli("predict", "--model", str(run.run_dir), str(tmp_path / "data" / "img" / "0.png"))
    assert r.returncode == 0, r.stderr
    few = run_cli(
        "train", "--data", str(csv_path), "--backbone", ov["backbone.name"], "--set",
        f"extract.cache_dir={tmp_path / 'cache'}", "--head", "fewshot",
    )  # fmt: skip
    assert few.returncode == 2 and "does not train on a multi-label cache" in few.stderr, few.stderr


def test_find_by_text_on_a_trained_small_clip(trained):
    """``featcache find --text``: each colour's words, through the trained CLIP's text tower, find images of
    that colour first (the JSON form scripts rely on); the prompt is embedded once and kept."""
    ov = trained["ov"]
    words = ["a photo of a red.", "a photo of a blue."]
    args = ["find", "--data", ov["data.source"], "--backbone", ov["backbone.name"]]
    args += ["--cache-dir", ov["extract.cache_dir"], "--top-k", "5", "--json"]
    r = run_cli(*args, "--text", words[0], "--text", words[1])
    assert r.returncode == 0, r.stderr
    answers = json.loads(r.stdout)
    assert [a["query"] for a in answers] == words
    for answer, colour in zip(answers, ("red", "blue"), strict=True):
        labels = [n["label"] for n in answer["neighbors"]]
        assert len(labels) == 5 and labels.count(colour) >= 4, (colour, labels)
        sims = [n["similarity"] for n in answer["neighbors"]]
        assert sims == sorted(sims, reverse=True)
    assert list((Path(ov["extract.cache_dir"]) / "text").glob("*.npz"))  # the prompts were kept
