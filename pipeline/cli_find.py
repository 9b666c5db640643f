"""``featcache find``'s arguments and output, beside :mod:`pipeline.cli` (which holds every other command
and stays under its 500 lines): the parser ``cli`` made for it gets its queries here."""

from __future__ import annotations

import json
import sys

HELP = "the cached rows most similar to images, cached keys or words (exact, or a FAISS index at scale)"


def add_find(p) -> None:
    """Queries: image files or folders (positional), ``--key`` and ``--text`` (each repeatable)."""
    p.add_argument(
        "images", nargs="*", metavar="FILE|FOLDER", help="query images (folders: every image in them)"
    )
    p.add_argument(
        "--key", action="append", default=[], metavar="KEY", help="a cached key as the query (repeatable)"
    )
    p.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help="words as the query (a backbone with a text tower)",
    )
    p.add_argument("--json", action="store_true", help='print [{"query", "neighbors": [...]}, ...]')


def run_find(args, cfg, choose_cache) -> int:
    """Pick the cache (``choose_cache``: one line on stderr), answer, print; exit 2 if an image failed."""
    from pipeline.data.images import expand_inputs
    from pipeline.utils.errors import FeatcacheError

    if not (args.images or args.key or args.text):
        raise FeatcacheError("nothing to find: give image files or folders, --key KEY or --text TEXT")
    if args.images:
        expand_inputs(args.images)  # a missing file answers before the cache is even looked for
    choose_cache(cfg)
    from pipeline.stages.find import find

    result = find(args.images, keys=args.key, texts=args.text, cfg=cfg)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.table())
    if result.failed:
        n, total = len(result.failed), len(result.queries)
        print(f"featcache: error: {n} of {total} query image(s) could not be read", file=sys.stderr)
        return 2
    return 0
