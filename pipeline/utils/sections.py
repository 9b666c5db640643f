"""The sections of the one configuration: each key declared once, as a field with
:func:`~pipeline.utils.schema.opt` (type, default, choices or range, flag, help), and the named choices the
keys take. :mod:`pipeline.utils.config` assembles them into :class:`~pipeline.utils.config.Config` and reads,
checks and resolves it; import from there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipeline.utils.schema import opt

SPLITS = ("train", "val", "test")
MULTILABEL = (
    "multilabel"  # the task of a multi-label cache and run (``task`` attribute / key; absent = single)
)
POOLINGS = ("avg", "max", "flatten", "none", "cls", "mean", "cls+mean", "pooled")
RESIZE_POLICIES = ("stretch", "crop", "pad")
ON_ERROR = ("skip", "fail")
DECODE_POLICIES = ("dct", "exact")
DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "gzip", "lzf")
ENGINES = ("auto", "tensorflow", "tflite", "tflite-int8", "tflite-dynamic")
PRECISIONS = ("float32", "mixed_float16")
STREAMING = ("auto", "memory", "stream")
STRATEGIES = ("grid", "random", "halving")


#: the one list of head names: :data:`pipeline.heads.registry.HEADS` is checked against it when imported,
#: so a bad ``train.head`` fails here, before any import
HEAD_NAMES = (
    "logistic", "linear_svm", "ridge", "knn", "mlp", "hgb", "keras_linear", "keras_mlp", "zeroshot", "fewshot"
)  # fmt: skip

#: heads that read the class names through a text tower (:mod:`pipeline.heads.zeroshot`)
TEXT_HEADS = ("zeroshot", "fewshot")

#: the built-in prompt templates ``zeroshot.templates`` may name (:mod:`pipeline.heads.zeroshot`)
TEMPLATE_SETS = ("imagenet", "photo")


#: confident learning's filters (:mod:`pipeline.heads.label_noise`), the choices of ``audit.filter_by``
LABEL_FILTERS = ("low_self_confidence", "prune_by_noise_rate")


def _valid_regex(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as e:
        return f"is not a valid regex: {e}"
    return None


def _jobs(n: int) -> str | None:
    return "must not be 0 (use -1 for all cores)" if n == 0 else None


def _folds_or_split(cv: int) -> str | None:
    return f"must be 0 (validation split) or >= 2 folds, got {cv}" if cv == 1 or cv < 0 else None


def _address(address: str) -> None:
    from pipeline.utils.cluster import parse_address

    parse_address(address)  # a malformed address fails now, before any work, with its own message


@dataclass
class DataConfig:
    """Where the images come from and how they are split."""

    source: str = opt(
        "fashion_mnist",
        flag="--data",
        metavar="PATH|URL",
        nonempty=True,  # "" would silently mean the current folder
        help="folder (one sub-folder per class), .csv of path,label, .npz, WebDataset .tar shards"
        " (shards/train-{0000..0099}.tar or a glob), Parquet (Hugging Face layout: file, glob or folder),"
        " or fashion_mnist; folders, CSVs and shards may be fsspec URLs (s3://, gs://, az://, https://)",
    )
    name: str = opt("", help="dataset name used in the cache file name; derived from the source when empty")
    val_fraction: float = opt(0.1, min=0, below=1, help="share of the val split, by a hash of each image")
    test_fraction: float = opt(0.1, min=0, below=1, help="share of the test split, the same way")
    group_pattern: str = opt(
        "",
        check=_valid_regex,
        help="regex on the relative path; its first group keeps related images in one split",
    )
    limit: int = opt(0, flag="--limit", metavar="N", min=0, help="use a stable subset of N samples (0 = all)")
    on_error: str = opt(
        "skip", flag="--on-error", choices=ON_ERROR, help="unreadable images: skip (quarantine) or fail"
    )
    storage_options: dict[str, Any] = opt(factory=dict, help="fsspec options for URL sources")
    decode: str = opt(
        "dct",
        choices=DECODE_POLICIES,
        help="dct: JPEGs decoded at the smallest 1/2-1/4-1/8 DCT scale >= 2x the input; exact: full size",
    )


@dataclass
class BackboneConfig:
    """Everything that changes a feature: all of it goes into the cache fingerprint."""

    name: str = opt(
        "efficientnet_lite0",
        flag="--backbone",
        metavar="NAME",
        nonempty=True,
        help="efficientnet_lite0 (default), vgg16, resnet50, mobilenet_v2, ...; KerasHub (DINOv2/v3, SigLIP 2,"
        " CLIP, ViT): hub:<preset>, kaggle://..., hf://... or a preset folder",
    )
    weights: str = opt(
        "imagenet", flag="--weights", metavar="imagenet|none|PATH", help="imagenet, none or a weights file"
    )
    layers: list[str] = opt(
        factory=list,
        flag="--layer",
        metavar="NAME",
        repeat=True,
        help="cut at this layer (repeatable: several layers in one pass); later stages: use it",
    )
    pooling: str = opt("avg", flag="--pooling", choices=POOLINGS, help="how a feature map becomes a vector")
    image_size: int = opt(
        0,
        flag="--image-size",
        metavar="N",
        min=16,
        max=2048,
        zero="default",
        help="input size in pixels (0: extract uses the backbone's default; later stages follow the newest cache of"
        " the data)",
    )
    resize: str = opt(
        "stretch", flag="--resize", choices=RESIZE_POLICIES, help="stretch, crop (center) or pad (letterbox)"
    )


@dataclass
class ExtractConfig:
    cache_dir: str = opt(
        "cache",
        flag="--cache-dir",
        metavar="DIR",
        nonempty=True,  # "" would silently mean the current folder
        help="the cache folder (caches, runs/, engines/, shards/)",
    )
    batch_size: int = opt(32, flag="--batch-size", metavar="N", min=1, help="images per backbone batch")
    dtype: str = opt("float32", flag="--dtype", choices=DTYPES, help="float16 halves the disk")
    compression: str = opt("none", flag="--compression", choices=COMPRESSIONS, help="HDF5 compression")
    engine: str = opt(
        "auto",
        choices=ENGINES,
        help="auto converts to TFLite once when that is faster (or runs TensorFlow on a visible GPU); "
        "tensorflow | tflite force one; tflite-int8: full-integer int8, calibrated on the train images; "
        "tflite-dynamic: dynamic-range int8 for KerasHub transformers, checked on the train images",
    )
    calibration: int = opt(
        32,
        min=1,
        help="tflite-int8: train images its quantization is calibrated on; tflite-dynamic: checked on",
    )
    precision: str = opt(
        "float32", choices=PRECISIONS, help="float32 | mixed_float16 (TensorFlow, meant for a GPU)"
    )
    threads: int = opt(
        0, flag="--threads", metavar="N", min=0, help="CPU threads for the backbone (0 = all cores)"
    )
    lock_timeout: float = opt(-1, help="seconds to wait for another run on the same cache; -1 = wait forever")
    progress: bool = opt(True, flag="--quiet", help="no progress bars")
    augment_views: int = opt(
        0, help="K > 0: also cache K augmented views (finetune.augment) of every train image"
    )


@dataclass
class TrainConfig:
    cache: str = opt(
        "",
        flag="--cache",
        metavar="FILE",
        help="cache file (default: the newest cache matching the flags above)",
    )
    layer: str = opt("", help="which cached layer to train on; empty = the first")
    head: str = opt(
        "logistic",
        flag="--head",
        metavar="NAME",
        choices=HEAD_NAMES,
        unknown="unknown head {value!r} (known: {known})",
        help="classifier head: " + ", ".join(HEAD_NAMES),
    )
    params: dict[str, Any] = opt(factory=dict, help="head hyperparameters (--param KEY=VALUE)")
    transforms: list[str] = opt(
        factory=lambda: ["standardize"], help="applied before the head: standardize | l2 | pca:N"
    )
    runs_dir: str = opt("", help="where runs are written; empty = runs/ beside the cache")
    seed: int = opt(0, help="the random seed of the heads, the search, the audit, fine-tuning and export")
    streaming: str = opt(
        "auto", choices=STREAMING, help="memory | stream (HDF5 in chunks); auto streams what does not fit"
    )


@dataclass
class SearchConfig:
    space: str = opt(
        "",
        flag="--space",
        metavar="FILE",
        help="search space TOML (default: the built-in pipeline/configs/search_space.toml;"
        " search_space_multilabel.toml on a multi-label cache)",
    )
    strategy: str = opt("random", flag="--strategy", choices=STRATEGIES, help="how candidates are drawn")
    n_trials: int = opt(100, flag="--n-trials", metavar="N", min=1, help="candidates for random and halving")
    n_jobs: int = opt(1, flag="--n-jobs", metavar="N", check=_jobs, help="parallel trials (-1 = all cores)")
    halving_rows: int = opt(
        100_000,
        flag="--halving-rows",
        metavar="N",
        min=0,
        help="from N fit rows on, random and grid searches halve over rows: every candidate on a subset of"
        " at least N/20 rows, the best third on 3x more at each rung, up to all (0 = never)",
    )
    cv: int = opt(
        0,
        flag="--cv",
        metavar="K",
        check=_folds_or_split,
        help="K-fold CV on train+val (default 0: the val split)",
    )
    convertible: bool = opt(
        False, flag="--convertible", help="only heads finetune/export can convert (no knn, hgb)"
    )
    refit: bool = opt(
        True,
        flag="--no-refit",
        help="train the best configuration as a run at the end (--no-refit: only write best.toml)",
    )


@dataclass
class FinetuneConfig:
    run: str = opt("", flag="--run", metavar="RUN", help="stage-2 run folder or id (default: the latest)")
    unfreeze: str = opt(
        "top:20",
        flag="--unfreeze",
        metavar="none|all|top:N",
        help="backbone layers to train (BatchNorm stays frozen)",
    )
    learning_rate: float = opt(1e-5, flag="--learning-rate", metavar="LR", above=0, help="Adam learning rate")
    epochs: int = opt(5, flag="--epochs", metavar="N", min=1, help="epochs at most")
    batch_size: int = opt(32, flag="--batch-size", metavar="N", min=1, help="images per training batch")
    patience: int = opt(2, flag="--patience", metavar="N", min=0, help="early stopping on val loss (0 = off)")
    augment: list[str] = opt(
        factory=lambda: ["flip", "rotation", "zoom", "translation", "contrast"],
        flag="--augment",
        metavar="LIST",
        help="comma-separated: flip,rotation,zoom,translation,contrast or none",
    )
    tensorboard: bool = opt(
        False,
        flag="--tensorboard",
        help="write TensorBoard logs to <run>/tensorboard (keras.callbacks.TensorBoard)",
    )
    keep_worse: bool = opt(
        False, help="keep the best epoch even when it does not beat the model before fine-tuning"
    )


@dataclass
class AuditConfig:
    """Label errors and near-duplicates; the defaults are calibrated in :mod:`pipeline.stages.audit`."""

    folds: int = opt(5, flag="--folds", metavar="K", min=2, help="k-fold over train+val")
    threshold: float = opt(
        0.85,
        flag="--threshold",
        metavar="COS",
        min=-1,
        max=1,
        help="near-duplicates: mutual nearest neighbours at or above this cosine",
    )
    margin: float = opt(
        0.02,
        flag="--margin",
        metavar="COS",
        min=0,
        max=2,
        help="...that beat either one's next neighbour by this much",
    )
    exact: float = opt(
        0.98,
        flag="--exact",
        metavar="COS",
        min=-1,
        max=1,
        help="near-duplicates: any pair at or above this cosine",
    )
    filter_by: str = opt(
        "low_self_confidence",
        flag="--filter-by",
        choices=LABEL_FILTERS,
        help="confident learning's filter for label issues",
    )
    n_jobs: int = opt(1, check=_jobs, help="folds fitted in parallel (-1 = all cores)")
    fit_rows: int = opt(
        50_000,
        min=0,
        help="label errors: the fold models fit a random per-class sample of this many train+val rows"
        " (0 = all); every row is still scored",
    )
    write_csv: bool = opt(True, help="write <cache>.label_issues.csv and .near_duplicates.csv")


def _splits(splits: list[str]) -> str | None:
    bad = [s for s in splits if s not in SPLITS]
    return f"unknown split {bad[0]!r} (one of {', '.join(SPLITS)})" if bad else None


@dataclass
class IndexConfig:
    """The similarity index over a cache's features (:mod:`pipeline.index`): ``find``, ``audit``'s
    near-duplicates and ``predict``'s novelty."""

    exact_below: int = opt(
        100_000,
        min=0,
        help="caches with fewer rows are searched exactly; from this many on, by a FAISS index",
    )
    memory_gb: float = opt(
        8.0, above=0, help="the FAISS index's memory budget: its type is chosen to fit (docs/stages.md)"
    )
    novelty_percentile: float = opt(
        95.0, min=50, max=100, help="a run's novelty threshold: this percentile of its val rows' novelty"
    )
    audit_neighbours: int = opt(
        16, min=2, help="neighbours per row the audit reads from a FAISS index (pairs among them)"
    )


@dataclass
class FindConfig:
    top_k: int = opt(10, flag="--top-k", metavar="K", min=1, help="neighbours shown per query")
    split: list[str] = opt(
        factory=list, flag="--split", metavar="LIST", check=_splits, help="only rows of these splits"
    )
    classes: list[str] = opt(
        factory=list, flag="--class", metavar="LIST", help="only rows of these classes (any of them)"
    )


@dataclass
class PredictConfig:
    top_k: int = opt(5, flag="--top-k", metavar="K", min=1, help="classes shown per image")
    batch_size: int = opt(32, flag="--batch-size", metavar="N", min=1, help="images per batch")


@dataclass
class ExportConfig:
    run: str = opt(
        "", flag="--run", metavar="RUN", help="fine-tuned or stage-2 run folder (default: the newest)"
    )
    formats: list[str] = opt(
        factory=lambda: ["all"],
        flag="--format",
        metavar="LIST",
        help="keras,savedmodel,tflite,tflite-dynamic,tflite-int8 or all",
    )
    out: str = opt("", flag="--out", metavar="DIR", help="output folder (default: <run>/export)")
    calibration: int = opt(
        100, flag="--calibration", metavar="N", min=1, help="training images for int8 calibration"
    )


@dataclass
class ReportConfig:
    out: str = opt(
        "",
        flag="--out",
        metavar="FILE",
        help="where to write it (default: <cache>.report.html beside the cache)",
    )
    run: str = opt(
        "", flag="--run", metavar="RUN", help="also show this run in detail (id, id prefix or folder)"
    )
    thumbnails: int = opt(12, min=0, help="misclassified test images shown per detailed run")
    map_rows: int = opt(2000, min=0, help="rows in the PCA feature map: a random sample, only those read")
    tsne_rows: int = opt(500, min=0, help="rows of those in the t-SNE map")
    compare: str = opt(
        "",
        flag="--compare",
        metavar="DIR",
        help="the `featcache compare` folder to show (default: the newest compare-* beside the cache)",
    )


def _shots(shots: list[int]) -> str | None:
    return "must be >= 1 images per class" if any(k < 1 for k in shots) else None


@dataclass
class CompareConfig:
    """The candidates ``featcache compare`` extracts and scores with its one linear-probe protocol."""

    backbones: list[str] = opt(
        factory=list,
        flag="--backbones",
        metavar="LIST",
        help="comma-separated backbones, one candidate each (the [backbone] settings otherwise)",
    )
    candidates: str = opt(
        "",
        flag="--candidates",
        metavar="FILE",
        help="TOML file of [[candidate]] tables: any [backbone] keys plus an optional label",
    )
    shots: list[int] = opt(
        factory=list,
        flag="--shots",
        metavar="LIST",
        check=_shots,
        help="also score k-shot probes, e.g. 1,5,10 train images per class (mean ± std over --seeds)",
    )
    seeds: int = opt(3, flag="--seeds", metavar="N", min=1, help="k-shot draws per k")
    probe_images: int = opt(
        16, min=0, help="images timed before each extraction for its time estimate (0 = no estimate)"
    )


@dataclass
class ClusterConfig:
    """Where extraction, search and predict run: this process, a local Dask cluster, or a scheduler."""

    address: str = opt(
        "",
        flag="--cluster",
        metavar="ADDRESS",
        check=_address,
        help="run on Dask: local (a worker per core), local:N, env (DASK_SCHEDULER_ADDRESS) "
        "or a scheduler address like tcp://host:8786; '' = this process",
    )


def _templates(templates: list[str]) -> str | None:
    if not templates:
        return f"must name at least one template (or a built-in set: {', '.join(TEMPLATE_SETS)})"
    for t in templates:
        if t not in TEMPLATE_SETS and t.count("{}") != 1:
            return f"template {t!r} must hold exactly one {{}} (where the class name goes)"
    return None


def _prompts(prompts: dict[str, Any]) -> str | None:
    for name, words in prompts.items():
        if not isinstance(words, str) or not words.strip():
            return f"class {name!r}: the words to put in the templates must be a non-empty string"
    return None


@dataclass
class ZeroshotConfig:
    """How class names become prompts for the text tower of a CLIP or SigLIP backbone."""

    templates: list[str] = opt(
        factory=lambda: ["imagenet"],
        check=_templates,
        help="prompt templates, each with one {} for the class words, averaged per class; or a built-in set:"
        " imagenet (CLIP's 80 ImageNet templates), photo ('a photo of a {}.')",
    )
    prompts: dict[str, Any] = opt(
        factory=dict,
        check=_prompts,
        help="class name → the words put in the templates (default: the class name, _ and - as spaces)",
    )


@dataclass
class SecurityConfig:
    """What featcache may load from files someone else wrote."""

    trust_pickle: bool = opt(
        False,
        flag="--trust-pickle",
        help="load a featcache 0.1 run's pickle files, which can run any code: only if you trust "
        "whoever wrote the run",
    )
