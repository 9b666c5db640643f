"""``featcache`` — the command line, a thin layer over the Python API.

Heavy modules (TensorFlow, h5py, scikit-learn) are imported inside the commands, so ``featcache --help``
is instant. Every user error ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.utils.errors import FeatcacheError

EXIT_USAGE = 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (every key can be overridden below)")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override any config key, e.g. --set data.val_fraction=0.2",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# flag → dotted config key, per command; argparse dest names are derived from the flag

#: extract's selection flags: which dataset and which features. Every stage takes them; on the later
#: stages they pick the cache (see pipeline.cache.locate.select_cache: settings given must match, the
#: rest follows the newest cache).
SELECTION_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--data": (
        "data.source",
        {
            "metavar": "PATH|URL",
            "help": "folder (one sub-folder per class), .csv of path,label, .npz, WebDataset .tar shards"
            " (shards/train-{0000..0099}.tar or a glob), Parquet (Hugging Face layout: file, glob or folder),"
            " or fashion_mnist; folders, CSVs and shards may be fsspec URLs (s3://, gs://, az://, https://)",
        },
    ),
    "--backbone": (
        "backbone.name",
        {"metavar": "NAME", "help": "efficientnet_lite0 (default), vgg16, resnet50, mobilenet_v2, ..."},
    ),
    "--weights": ("backbone.weights", {"metavar": "imagenet|none|PATH"}),
    "--layer": (
        "backbone.layers",
        {
            "action": "append",
            "metavar": "NAME",
            "help": "cut at this layer (repeatable: several layers in one pass); later stages: use it",
        },
    ),
    "--pooling": ("backbone.pooling", {"choices": ["avg", "max", "flatten", "none"]}),
    "--image-size": ("backbone.image_size", {"type": int, "metavar": "N"}),
    "--resize": ("backbone.resize", {"choices": ["stretch", "crop", "pad"]}),
    "--cache-dir": ("extract.cache_dir", {"metavar": "DIR"}),
}

#: the later stages' way to name one cache file outright
CACHE_FLAG: dict[str, tuple[str, dict[str, Any]]] = {
    "--cache": (
        "train.cache",
        {"metavar": "FILE", "help": "cache file (default: the newest cache matching the flags above)"},
    ),
}

#: the opt-in that loads a featcache 0.1 run's pickles (docs/security.md); every command that loads a model
TRUST_FLAG: dict[str, tuple[str, dict[str, Any]]] = {
    "--trust-pickle": (
        "security.trust_pickle",
        {
            "action": "store_true",
            "help": "load a featcache 0.1 run's pickle files, which can run any code: only if you trust "
            "whoever wrote the run",
        },
    ),
}

_EXTRACT_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    **SELECTION_FLAGS,
    "--limit": ("data.limit", {"type": int, "metavar": "N", "help": "use a stable subset of N samples"}),
    "--on-error": (
        "data.on_error",
        {"choices": ["skip", "fail"], "help": "unreadable images: skip (quarantine) or fail"},
    ),
    "--batch-size": ("extract.batch_size", {"type": int, "metavar": "N"}),
    "--dtype": ("extract.dtype", {"choices": ["float32", "float16"]}),
    "--compression": ("extract.compression", {"choices": ["none", "gzip", "lzf"]}),
    "--threads": (
        "extract.threads",
        {"type": int, "metavar": "N", "help": "CPU threads for the backbone (0 = all cores)"},
    ),
    "--cluster": (
        "cluster.address",
        {
            "metavar": "ADDRESS",
            "help": "run on Dask: local (a worker per core), local:N, env (DASK_SCHEDULER_ADDRESS) "
            "or a scheduler address like tcp://host:8786; '' = this process",
        },
    ),
}


def _head_help() -> str:
    from pipeline.utils.config import HEAD_NAMES

    return "classifier head: " + ", ".join(HEAD_NAMES) + " (default logistic)"


_TRAIN_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    **SELECTION_FLAGS,
    **CACHE_FLAG,
    "--head": ("train.head", {"metavar": "NAME", "help": _head_help()}),
}


def _add_flags(p: argparse.ArgumentParser, flags: dict[str, tuple[str, dict[str, Any]]]) -> None:
    for flag, (_, kwargs) in flags.items():
        p.add_argument(flag, dest="opt_" + flag[2:].replace("-", "_"), default=None, **kwargs)


def _overrides(args: argparse.Namespace, flags: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    from pipeline.utils.config import parse_assignments

    out: dict[str, Any] = {}
    for flag, (key, _) in flags.items():
        value = getattr(args, "opt_" + flag[2:].replace("-", "_"), None)
        if value is not None:
            out[key] = value
    if out.get("backbone.layers") and "--cache" in flags:  # later stages: the layer given is the one used
        out.setdefault("train.layer", out["backbone.layers"][0])
    if args.quiet:
        out["extract.progress"] = False
    out.update(parse_assignments(args.set))  # --set overrides anything, flags included
    return out


def _load(args, flags):
    from pipeline.utils.config import load_config

    return load_config(args.config, _overrides(args, flags))


def choose_cache(cfg) -> None:
    """Pin ``cfg`` to the cache the later stages take, and say which one in one line (stderr)."""
    from pipeline.cache.locate import select_cache
    from pipeline.features.backbones.registry import get_spec

    get_spec(cfg.backbone.name)  # a bad backbone name is named, not reported as "no cache"
    choice = select_cache(cfg)
    if choice.note:
        print(choice.note, file=sys.stderr)
    cfg.train.cache = str(choice.path)


def cmd_extract(args) -> int:
    from pipeline.stages.extract import extract

    cfg = _load(args, _EXTRACT_FLAGS)
    result = extract(cfg, rebuild=args.rebuild)
    print(result.summary())
    for key, reason in result.problems[:10]:
        print(f"  skipped {key}: {reason}")
    if len(result.problems) > 10:
        print(f"  ... and {len(result.problems) - 10} more (see {result.quarantine})")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_cache_ls(args) -> int:
    from pipeline.cache.store import list_caches
    from pipeline.utils.config import load_config

    cfg = load_config(args.config, {"extract.cache_dir": args.cache_dir} if args.cache_dir else {})
    infos = list_caches(cfg.extract.cache_dir)
    if not infos:
        print(f"no caches in {cfg.extract.cache_dir}")
        return 0
    print(f"{'status':<10} {'rows':>8} {'size':>9}  {'backbone':<20} {'dataset':<16} path")
    for i in infos:
        print(
            f"{i['status']:<10} {i['rows']:>8} {_human(i['size']):>9}  {str(i.get('backbone') or '?'):<20} {str(i.get('dataset') or '?'):<16} {i['path']}"
        )
    return 0


def cmd_cache_info(args) -> int:
    from pipeline.cache.store import FeatureCache
    from pipeline.utils.config import SPLITS

    with FeatureCache(args.file) as c:
        info = {
            "path": str(c.path),
            "rows": c.n_rows,
            "layers": {layer: list(c.dataset(layer).shape) for layer in c.layers},
            "classes": c.class_names,
            "split_counts": {name: int((c.split == i).sum()) for i, name in enumerate(SPLITS)},
            **{k: v for k, v in c.meta.items() if k not in ("complete",)},
        }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            print(f"{k:>15}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
    return 0


def cmd_train(args) -> int:
    cfg = _load(args, _TRAIN_FLAGS)
    params = _parse_params(args.param)
    choose_cache(cfg)  # before the stage's imports: a missing cache or folder answers at once
    from pipeline.stages.train import train

    if params:
        cfg.train.params = {**cfg.train.params, **params}
    run = train(cfg)
    print(run.summary())
    return 0


_SEARCH_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    **SELECTION_FLAGS,
    **CACHE_FLAG,
    "--space": (
        "search.space",
        {
            "metavar": "FILE",
            "help": "search space TOML (default: the built-in pipeline/configs/search_space.toml)",
        },
    ),
    "--strategy": ("search.strategy", {"choices": ["grid", "random", "halving"]}),
    "--n-trials": (
        "search.n_trials",
        {"type": int, "metavar": "N", "help": "candidates for random and halving"},
    ),
    "--n-jobs": ("search.n_jobs", {"type": int, "metavar": "N", "help": "parallel trials (-1 = all cores)"}),
    "--cv": (
        "search.cv",
        {"type": int, "metavar": "K", "help": "K-fold CV on train+val (default 0: the val split)"},
    ),
    "--cluster": (
        "cluster.address",
        {
            "metavar": "ADDRESS",
            "help": "run on Dask: local (a worker per core), local:N, env (DASK_SCHEDULER_ADDRESS) "
            "or a scheduler address like tcp://host:8786; '' = this process",
        },
    ),
    "--convertible": (
        "search.convertible",
        {
            "action": "store_const",
            "const": "true",
            "help": "only heads finetune/export can convert (no knn, hgb)",
        },
    ),
    "--no-refit": (
        "search.refit",
        {
            "action": "store_const",
            "const": "false",
            "help": "do not train the best configuration as a run at the end (best.toml is still written)",
        },
    ),
}


def cmd_search(args) -> int:
    cfg = _load(args, _SEARCH_FLAGS)
    choose_cache(cfg)
    from pipeline.stages.search import search

    run = search(cfg, fresh=args.fresh)
    print(run.summary())
    return 0


_FINETUNE_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--run": ("finetune.run", {"metavar": "RUN", "help": "stage-2 run folder or id (default: the latest)"}),
    "--epochs": ("finetune.epochs", {"type": int, "metavar": "N"}),
    "--unfreeze": (
        "finetune.unfreeze",
        {"metavar": "none|all|top:N", "help": "backbone layers to train (BatchNorm stays frozen)"},
    ),
    "--learning-rate": (
        "finetune.learning_rate",
        {"type": float, "metavar": "LR", "help": "Adam learning rate (default 1e-5)"},
    ),
    "--batch-size": ("finetune.batch_size", {"type": int, "metavar": "N"}),
    "--patience": (
        "finetune.patience",
        {"type": int, "metavar": "N", "help": "early stopping on val loss (0 = off)"},
    ),
    "--augment": (
        "finetune.augment",
        {"metavar": "LIST", "help": "comma-separated: flip,rotation,zoom,translation,contrast or none"},
    ),
    **SELECTION_FLAGS,
    **CACHE_FLAG,
    "--tensorboard": (
        "finetune.tensorboard",
        {
            "action": "store_true",
            "help": "write TensorBoard logs to <run>/tensorboard (keras.callbacks.TensorBoard)",
        },
    ),
    **TRUST_FLAG,
}


def cmd_finetune(args) -> int:
    cfg = _load(args, _FINETUNE_FLAGS)
    if not cfg.finetune.run:
        choose_cache(cfg)
    from pipeline.stages.finetune import finetune

    print(finetune(cfg).summary())
    return 0


_SELECT_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {**SELECTION_FLAGS, **CACHE_FLAG}


def cmd_report(args) -> int:
    from pipeline.stages.report import report

    cfg = _load(args, _SELECT_FLAGS)
    choose_cache(cfg)
    print(report(cfg, out=args.out, run=args.run).summary())
    return 0


def _runs_root(args):
    from pipeline.cache.locate import resolve_cache, runs_root
    from pipeline.cache.store import FeatureCache

    cfg = _load(args, _SELECT_FLAGS)
    choose_cache(cfg)
    cache_path = resolve_cache(cfg)
    with FeatureCache(cache_path) as cache:
        return runs_root(cfg, cache_path), cache.fingerprint


def cmd_runs_ls(args) -> int:
    from pipeline.utils.runs import format_runs, list_runs

    root, fingerprint = _runs_root(args)
    rows = list_runs(root, fingerprint)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif not rows:
        print(f"no runs in {root}: run `featcache train` first")
    else:
        print(format_runs(rows))
    return 0


def cmd_runs_show(args) -> int:
    from pipeline.cache.locate import resolve_run
    from pipeline.utils.runs import describe_run, format_run

    cfg = _load(args, _SELECT_FLAGS)
    choose_cache(cfg)
    info = describe_run(resolve_run(cfg, args.run))
    print(json.dumps(info, indent=2, default=str) if args.json else format_run(info))
    return 0


def cmd_runs_upgrade(args) -> int:
    from pipeline.cache.locate import resolve_run
    from pipeline.heads.persist import upgrade_run

    cfg = _load(args, _SELECT_FLAGS)
    if not Path(args.run).expanduser().is_dir():  # a folder someone handed over needs no cache beside it
        choose_cache(cfg)
    run_dir = resolve_run(cfg, args.run)
    files = upgrade_run(run_dir, trust_pickle=args.trust_pickle)
    print(
        f"{run_dir}: rewritten as {', '.join(files)} with a fresh manifest; it loads without --trust-pickle now"
    )
    return 0


def cmd_predict(args) -> int:
    from pipeline.stages.predict import format_csv, format_json, format_table, predict
    from pipeline.utils.config import load_config

    trust = {"security.trust_pickle": True} if args.trust_pickle else {}
    cfg = load_config(args.config, {"extract.cache_dir": args.cache_dir, **trust})
    cluster = cfg.cluster.address if args.cluster is None else args.cluster
    _, results = predict(
        args.model, args.images, top_k=args.top_k, batch_size=args.batch_size, cfg=cfg, cluster=cluster
    )
    fmt = format_json if args.json else format_csv if args.csv else format_table
    text = fmt(results)
    print(text, end="" if text.endswith("\n") else "\n")
    failed = [r for r in results if r.error]
    if failed:
        print(
            f"featcache: error: {len(failed)} of {len(results)} image(s) could not be read", file=sys.stderr
        )
        return EXIT_USAGE
    return 0


def cmd_export(args) -> int:
    from pipeline.cache.locate import resolve_run
    from pipeline.stages.export import export, format_report, parse_formats

    cfg = _load(args, _EXPORT_FLAGS)
    parse_formats(args.format)  # an unknown format fails before anything is read
    if not args.run:
        choose_cache(cfg)
    run = resolve_run(cfg, args.run)
    report = export(
        run,
        args.format,
        args.out,
        calibration=args.calibration,
        progress=not args.quiet and not args.json,
        trust_pickle=cfg.security.trust_pickle,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


_EXPORT_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {**SELECTION_FLAGS, **CACHE_FLAG, **TRUST_FLAG}


_AUDIT_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {**SELECTION_FLAGS, **CACHE_FLAG}


def cmd_audit(args) -> int:
    from pipeline.stages.audit import audit

    if args.top < 0:
        raise FeatcacheError(f"--top must be >= 0, got {args.top}")
    cfg = _load(args, _AUDIT_FLAGS)
    choose_cache(cfg)
    result = audit(
        cfg,
        folds=args.folds,
        threshold=args.threshold,
        margin=args.margin,
        exact=args.exact,
        filter_by=args.filter_by,
    )
    print(json.dumps(result.to_json()) if args.json else result.table(args.top))
    return 0


def _parse_params(items: list[str]) -> dict[str, Any]:
    from pipeline.utils.config import parse_assignments

    out: dict[str, Any] = {}
    for k, v in parse_assignments(items, "--param").items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) rather than the whole usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="run the backbone over a dataset and cache the features")
    _common(p)
    _add_flags(p, _EXTRACT_FLAGS)
    p.add_argument("--rebuild", action="store_true", help="ignore and replace an existing (or damaged) cache")
    p.set_defaults(func=cmd_extract)


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="inspect caches")
    csub = p.add_subparsers(dest="cache_command", metavar="ls|info")
    q = csub.add_parser("ls", help="list caches: backbone, dataset, rows, size, complete or not")
    q.add_argument("--config", metavar="FILE")
    q.add_argument("--cache-dir", metavar="DIR")
    q.set_defaults(func=cmd_cache_ls)
    q = csub.add_parser("info", help="print one cache's metadata")
    q.add_argument("file", metavar="FILE")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_cache_info)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fit a head on cached features")
    _common(p)
    _add_flags(p, _TRAIN_FLAGS)
    p.add_argument(
        "--param",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="head hyperparameter, e.g. --param C=0.5",
    )
    p.set_defaults(func=cmd_train)


def _add_search(sub) -> None:
    p = sub.add_parser(
        "search",
        help="search heads and hyperparameters on the val split, then train the best as a run; resumable",
    )
    _common(p)
    _add_flags(p, _SEARCH_FLAGS)
    p.add_argument(
        "--fresh", action="store_true", help="forget finished trials of this search and start over"
    )

    p.set_defaults(func=cmd_search)


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="rebuild a run's head end to end and fine-tune it on the images; resumable"
    )
    _common(p)
    _add_flags(p, _FINETUNE_FLAGS)
    p.set_defaults(func=cmd_finetune)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="top-k classes of images from a run, a fine-tuned or an exported model"
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="RUN_OR_FILE",
        help="run folder or run id (stage 2 or fine-tuned), .keras, saved_model/ or .tflite",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config (where run ids are looked up)")
    p.add_argument("--cache-dir", metavar="DIR", help="cache folder whose runs/ holds run ids")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--top-k", type=int, default=5, metavar="K")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_FLAG["--trust-pickle"][1]["help"])
    p.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="a stage-2 run's missing features on Dask: local, local:N, env or tcp://host:8786",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON instead of a table")
    out.add_argument("--csv", action="store_true", help="CSV (one row per image and rank) instead of a table")
    p.set_defaults(func=cmd_predict)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="export .keras, SavedModel and TFLite (float, dynamic, int8), each checked"
    )
    _common(p)
    _add_flags(p, _EXPORT_FLAGS)
    p.add_argument("--run", metavar="RUN", help="fine-tuned or stage-2 run folder (default: the newest)")
    p.add_argument(
        "--format",
        default="all",
        metavar="LIST",
        help="keras,savedmodel,tflite,tflite-dynamic,tflite-int8 or all",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run>/export)")
    p.add_argument(
        "--calibration", type=int, default=100, metavar="N", help="training images for int8 calibration"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)


def _add_audit(sub) -> None:
    from pipeline.stages.audit import EXACT, FOLDS, MARGIN, THRESHOLD

    p = sub.add_parser(
        "audit", help="likely label errors and near-duplicates (within and across splits), from the cache"
    )
    _common(p)
    _add_flags(p, _AUDIT_FLAGS)
    p.add_argument(
        "--top", type=int, default=20, metavar="N", help="rows of each list in the table (default 20)"
    )
    p.add_argument(
        "--json", action="store_true", help='print one JSON object: {"label_issues", "near_duplicates"}'
    )
    p.add_argument(
        "--folds", type=int, default=FOLDS, metavar="K", help=f"k-fold over train+val (default {FOLDS})"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=THRESHOLD,
        metavar="COS",
        help=f"near-duplicates: mutual nearest neighbours at or above this cosine (default {THRESHOLD})",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=MARGIN,
        metavar="COS",
        help=f"...that beat either one's next neighbour by this much (default {MARGIN})",
    )
    p.add_argument(
        "--exact",
        type=float,
        default=EXACT,
        metavar="COS",
        help=f"near-duplicates: any pair at or above this cosine (default {EXACT})",
    )
    p.add_argument(
        "--filter-by",
        default="low_self_confidence",
        choices=["low_self_confidence", "prune_by_noise_rate"],
        help="confident learning's filter for label issues (default low_self_confidence)",
    )
    p.set_defaults(func=cmd_audit)


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page: the cache, a leaderboard of every run, the best run in detail",
    )
    _common(p)
    _add_flags(p, _SELECT_FLAGS)
    p.add_argument(
        "--out", metavar="FILE", help="where to write it (default: <cache>.report.html beside the cache)"
    )
    p.add_argument("--run", metavar="RUN", help="also show this run in detail (id, id prefix or folder)")
    p.set_defaults(func=cmd_report)


def _add_runs(sub) -> None:
    p = sub.add_parser("runs", help="list the runs, fine-tuned runs and searches of a cache, or show one")
    rsub = p.add_subparsers(dest="runs_command", metavar="ls|show|upgrade")
    q = rsub.add_parser("ls", help="one line a run: id, kind, head, val/test accuracy, created")
    _common(q)
    _add_flags(q, _SELECT_FLAGS)
    q.add_argument("--json", action="store_true", help="print the rows as JSON")
    q.set_defaults(func=cmd_runs_ls)
    q = rsub.add_parser("show", help="one run's settings, metrics, per-class scores and files")
    q.add_argument("run", metavar="RUN", help="run id, a unique prefix of it, or a run folder")
    _common(q)
    _add_flags(q, _SELECT_FLAGS)
    q.add_argument("--json", action="store_true", help="print everything as JSON")
    q.set_defaults(func=cmd_runs_show)
    q = rsub.add_parser("upgrade", help="rewrite a featcache 0.1 run's pickles as skops files, once")
    q.add_argument("run", metavar="RUN", help="run id, a unique prefix of it, or a run folder")
    _common(q)
    _add_flags(q, _SELECT_FLAGS)
    q.add_argument("--trust-pickle", action="store_true", help=TRUST_FLAG["--trust-pickle"][1]["help"])
    q.set_defaults(func=cmd_runs_upgrade)


COMMANDS = (
    _add_extract,
    _add_cache,
    _add_train,
    _add_search,
    _add_finetune,
    _add_predict,
    _add_export,
    _add_audit,
    _add_report,
    _add_runs,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="featcache",
        description="Run a frozen pretrained backbone once, cache its features, train heads on the cache.",
    )
    from pipeline.utils.version import VERSION

    parser.add_argument("--version", action="version", version=f"featcache {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if argv is None:  # a real process, not a call from Python code: we own its file descriptors and its exit
        from pipeline.utils.collector import skip_gc_at_exit
        from pipeline.utils.quiet import filter_native_stderr

        filter_native_stderr()
        skip_gc_at_exit()
    try:
        return args.func(args)
    except FeatcacheError as e:
        print(f"featcache: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # disk full, permission denied, read-only folder...: one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"featcache: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("featcache: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
