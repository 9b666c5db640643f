"""``featcache`` — the command line, a thin layer over the Python API.

Heavy modules (TensorFlow, h5py, scikit-learn) are imported inside the commands, so ``featcache --help``
is instant. Every user error ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.utils.errors import FeatcacheError

EXIT_USAGE = 2


#: the keys whose flags each command shows (the schema, :mod:`pipeline.utils.config`, declares each flag);
#: every command also takes --config, --set and --quiet
SELECTION = (
    "data.source",
    "backbone.name",
    "backbone.weights",
    "backbone.layers",
    "backbone.pooling",
    "backbone.image_size",
    "backbone.resize",
    "extract.cache_dir",
)
#: the later stages: the selection picks a cache (pipeline.cache.locate.select_cache), --cache names one
PICK = (*SELECTION, "train.cache")
FLAGS: dict[str, tuple[str, ...]] = {
    "extract": (
        *SELECTION,
        *("data.limit", "data.on_error", "extract.batch_size", "extract.dtype", "extract.compression"),
        *("extract.threads", "cluster.address"),
    ),
    "cache ls": ("extract.cache_dir",),
    "cache info": (),
    "train": (*PICK, "train.head"),
    "search": (
        *PICK,
        *("search.space", "search.strategy", "search.n_trials", "search.n_jobs", "search.cv"),
        *("cluster.address", "search.convertible", "search.refit", "search.halving_rows"),
    ),
    "finetune": (
        *("finetune.run", "finetune.epochs", "finetune.unfreeze", "finetune.learning_rate"),
        *("finetune.batch_size", "finetune.patience", "finetune.augment"),
        *PICK,
        *("finetune.tensorboard", "security.trust_pickle"),
    ),
    "predict": (*PICK, "predict.top_k", "predict.batch_size", "security.trust_pickle", "cluster.address"),
    "export": (
        *PICK,
        "security.trust_pickle",
        *("export.run", "export.formats", "export.out", "export.calibration"),
    ),
    "find": (*PICK, "find.top_k", "find.split", "find.classes", "cluster.address"),
    "audit": (*PICK, "audit.folds", "audit.threshold", "audit.margin", "audit.exact", "audit.filter_by"),
    "report": (*PICK, "report.out", "report.run", "report.compare"),
    "compare": (
        *SELECTION,
        *("compare.backbones", "compare.candidates", "compare.shots", "compare.seeds"),
        *("data.limit", "extract.threads", "cluster.address"),
    ),
    "runs ls": PICK,
    "runs show": PICK,
    "runs upgrade": (*PICK, "security.trust_pickle"),
}


def _command(sub, name: str, func, **kwargs) -> argparse.ArgumentParser:
    """The parser of command ``name``: --config, --set, and the flags of :data:`FLAGS`, generated."""
    from pipeline.utils.config import config_keys
    from pipeline.utils.schema import add_flags

    p = sub.add_parser(name.split()[-1], **kwargs)
    p.add_argument("--config", metavar="FILE", help="TOML config file (every key can be overridden below)")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override any config key, e.g. --set data.val_fraction=0.2",
    )
    add_flags(p, [config_keys()[k] for k in ("extract.progress", *FLAGS[name])])
    p.set_defaults(func=func, command_name=name)
    return p


def _load(args):
    """The command's config: the defaults, ``--config``, its flags, then ``--set`` (which overrides anything)."""
    from pipeline.utils.config import config_keys, follow_layers, load_config
    from pipeline.utils.schema import flag_values, parse_assignments

    shown = FLAGS[args.command_name]
    overrides = flag_values(args, [config_keys()[k] for k in ("extract.progress", *shown)])
    if "train.cache" in shown:
        overrides = follow_layers(overrides)
    overrides.update(parse_assignments(args.set))
    return load_config(args.config, overrides)


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

    result = extract(_load(args), rebuild=args.rebuild)
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

    cfg = _load(args)
    infos = list_caches(cfg.extract.cache_dir)
    if not infos:
        print(f"no caches in {cfg.extract.cache_dir}")
        return 0
    print(f"{'status':<10} {'rows':>8} {'size':>9}  {'backbone':<20} {'dataset':<16} path  (source)")
    for i in infos:
        print(
            f"{i['status']:<10} {i['rows']:>8} {_human(i['size']):>9}  {str(i.get('backbone') or '?'):<20} {str(i.get('dataset') or '?'):<16} {i['path']}"
            + (f"  ({i['source']})" if i.get("source") else "")
        )
    return 0


def cmd_cache_info(args) -> int:
    from pipeline.cache.store import FeatureCache

    _load(args)  # the same --config and --set as every command: a bad key fails here too
    with FeatureCache(args.file) as c:
        info = c.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            print(f"{k:>15}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
    return 0


def cmd_train(args) -> int:
    cfg = _load(args)
    params = _parse_params(args.param)
    choose_cache(cfg)  # before the stage's imports: a missing cache or folder answers at once
    from pipeline.stages.train import train

    if params:
        cfg.train.params = {**cfg.train.params, **params}
    run = train(cfg)
    print(run.summary())
    return 0


def cmd_search(args) -> int:
    cfg = _load(args)
    choose_cache(cfg)
    from pipeline.stages.search import search

    run = search(cfg, fresh=args.fresh)
    print(run.summary())
    return 0


def cmd_finetune(args) -> int:
    cfg = _load(args)
    if not cfg.finetune.run:
        choose_cache(cfg)
    from pipeline.stages.finetune import finetune

    print(finetune(cfg).summary())
    return 0


def cmd_report(args) -> int:
    from pipeline.stages.report import report

    cfg = _load(args)
    choose_cache(cfg)
    print(report(cfg).summary())
    return 0


def cmd_compare(args) -> int:
    from pipeline.api import compare

    result = compare(_load(args))
    print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
    return 0


def cmd_runs_ls(args) -> int:
    from pipeline.cache.locate import resolve_cache, runs_root
    from pipeline.cache.state import runs_by_cache, runs_of_cache
    from pipeline.utils.run_text import format_cache_runs, format_runs, no_runs

    cfg = _load(args)
    if args.all:  # every run of the runs folder, grouped by the cache each was made from
        root = runs_root(cfg, Path(cfg.train.cache or Path(cfg.extract.cache_dir) / "-").expanduser())
        groups = runs_by_cache(root, [Path(cfg.extract.cache_dir).expanduser(), root.parent])
        rows = [r for g in groups for r in g.rows]
        print(json.dumps(rows, indent=2, default=str) if args.json else format_cache_runs(groups, root))
        return 0
    choose_cache(cfg)
    cache_path = resolve_cache(cfg)
    root = runs_root(cfg, cache_path)
    rows = runs_of_cache(root, cache_path)
    text = format_runs(rows) if rows else no_runs(root, cache_path)
    print(json.dumps(rows, indent=2, default=str) if args.json else text)
    return 0


def cmd_runs_show(args) -> int:
    from pipeline.cache.locate import resolve_run
    from pipeline.cache.state import run_state
    from pipeline.utils.run_text import format_run
    from pipeline.utils.runs import describe_run

    cfg = _load(args)
    choose_cache(cfg)
    run_dir = resolve_run(cfg, args.run)
    info = describe_run(run_dir, run_state(run_dir, [cfg.extract.cache_dir]))
    print(json.dumps(info, indent=2, default=str) if args.json else format_run(info))
    return 0


def cmd_runs_upgrade(args) -> int:
    from pipeline.cache.locate import resolve_run
    from pipeline.heads.persist import upgrade_run

    cfg = _load(args)
    if not Path(args.run).expanduser().is_dir():  # a folder someone handed over needs no cache beside it
        choose_cache(cfg)
    run_dir = resolve_run(cfg, args.run)
    files = upgrade_run(run_dir, trust_pickle=cfg.security.trust_pickle)
    print(
        f"{run_dir}: rewritten as {', '.join(files)} with a fresh manifest; it loads without --trust-pickle now"
    )
    return 0


def cmd_predict(args) -> int:
    from pipeline.stages.predict import format_csv, format_json, format_table, predict

    cfg = _load(args)
    if not args.model:  # the newest finished run of the cache the selection picks (it says which)
        choose_cache(cfg)
    _, results = predict(args.model, args.images, cfg)
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
    from pipeline.stages.export import export, format_report, parse_formats

    cfg = _load(args)
    parse_formats(cfg.export.formats)  # an unknown format fails before anything is read
    if not cfg.export.run:
        choose_cache(cfg)
    report = export(cfg=cfg, progress=cfg.extract.progress and not args.json)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def cmd_audit(args) -> int:
    from pipeline.stages.audit import audit

    if args.top < 0:
        raise FeatcacheError(f"--top must be >= 0, got {args.top}")
    cfg = _load(args)
    choose_cache(cfg)
    result = audit(cfg)
    print(json.dumps(result.to_json()) if args.json else result.table(args.top))
    return 0


def _parse_params(items: list[str]) -> dict[str, Any]:
    from pipeline.utils.schema import parse_assignments

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
    p = _command(sub, "extract", cmd_extract, help="run the backbone over a dataset and cache the features")
    p.add_argument("--rebuild", action="store_true", help="ignore and replace an existing (or damaged) cache")


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="inspect caches")
    csub = p.add_subparsers(dest="cache_command", metavar="ls|info")
    _command(
        csub, "cache ls", cmd_cache_ls, help="list caches: backbone, dataset, rows, size, complete or not"
    )
    q = _command(csub, "cache info", cmd_cache_info, help="print one cache's metadata")
    q.add_argument("file", metavar="FILE")
    q.add_argument("--json", action="store_true")


def _add_train(sub) -> None:
    p = _command(sub, "train", cmd_train, help="fit a head on cached features")
    p.add_argument(
        "--param",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="head hyperparameter, e.g. --param C=0.5",
    )


def _add_search(sub) -> None:
    help_ = "search heads and hyperparameters on the val split, then train the best as a run; resumable"
    p = _command(sub, "search", cmd_search, help=help_)
    p.add_argument(
        "--fresh", action="store_true", help="forget finished trials of this search and start over"
    )


def _add_finetune(sub) -> None:
    help_ = "rebuild a run's head end to end and fine-tune it on the images; resumable"
    _command(sub, "finetune", cmd_finetune, help=help_)


def _add_predict(sub) -> None:
    help_ = "top-k classes of images from a run, a fine-tuned or an exported model"
    p = _command(sub, "predict", cmd_predict, help=help_)
    p.add_argument(
        "--model",
        metavar="RUN_OR_FILE",
        help="run folder or run id (stage 2 or fine-tuned), .keras, saved_model/, .tflite or .onnx "
        "(default: the newest finished run of the selected cache)",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON instead of a table")
    out.add_argument("--csv", action="store_true", help="CSV (one row per image and rank) instead of a table")


def _add_export(sub) -> None:
    help_ = "export .keras, SavedModel and TFLite (float, dynamic, int8), each checked"
    p = _command(sub, "export", cmd_export, help=help_)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_audit(sub) -> None:
    help_ = "likely label errors and near-duplicates (within and across splits), from the cache"
    p = _command(sub, "audit", cmd_audit, help=help_)
    p.add_argument(
        "--top", type=int, default=20, metavar="N", help="rows of each list in the table (default 20)"
    )
    p.add_argument(
        "--json", action="store_true", help='print one JSON object: {"label_issues", "near_duplicates"}'
    )


def _add_find(sub) -> None:
    from pipeline.cli_find import HELP, add_find, run_find  # its arguments and output: cli.py's 500 lines

    add_find(_command(sub, "find", lambda args: run_find(args, _load(args), choose_cache), help=HELP))


def _add_report(sub) -> None:
    help_ = "one self-contained HTML page: the cache, a leaderboard of every run, the best run in detail"
    _command(sub, "report", cmd_report, help=help_)


def _add_compare(sub) -> None:
    help_ = "choose the backbone: candidates extracted once each, scored by one linear probe; resumable"
    p = _command(sub, "compare", cmd_compare, help=help_)
    p.add_argument("--json", action="store_true", help='print {"candidates": [...]}, best first by val')


def _add_runs(sub) -> None:
    p = sub.add_parser("runs", help="list the runs, fine-tuned runs and searches of a cache, or show one")
    rsub = p.add_subparsers(dest="runs_command", metavar="ls|show|upgrade")
    q = _command(
        rsub, "runs ls", cmd_runs_ls, help="one line a run: id, kind, head, val/test accuracy, created"
    )
    q.add_argument("--json", action="store_true", help="print the rows as JSON")
    q.add_argument("--all", action="store_true", help="every run in the runs folder, grouped by cache")
    q = _command(
        rsub, "runs show", cmd_runs_show, help="one run's settings, metrics, per-class scores and files"
    )
    q.add_argument("run", metavar="RUN", help="run id, a unique prefix of it, or a run folder")
    q.add_argument("--json", action="store_true", help="print everything as JSON")
    help_ = "rewrite a featcache 0.1 run's pickles as skops files, once"
    q = _command(rsub, "runs upgrade", cmd_runs_upgrade, help=help_)
    q.add_argument("run", metavar="RUN", help="run id, a unique prefix of it, or a run folder")


COMMANDS = (
    _add_extract,
    _add_cache,
    _add_train,
    _add_search,
    _add_finetune,
    _add_predict,
    _add_export,
    _add_audit,
    _add_find,
    _add_report,
    _add_compare,
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
    parser = build_parser()  # TF_CPP_MIN_LOG_LEVEL: set by ``import pipeline`` (pipeline.utils.quiet)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if argv is None:  # a real process, not a call from Python code: we own its file descriptors and its exit
        from pipeline.utils.collector import skip_gc_at_exit
        from pipeline.utils.pages import base_pages
        from pipeline.utils.quiet import filter_native_stderr

        base_pages()  # before numpy is imported
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
