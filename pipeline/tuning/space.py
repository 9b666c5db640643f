"""A search space: the TOML schema and its parser, and the candidates a strategy draws from it.

A space is a TOML file (``pipeline/configs/search_space.toml`` is the built-in one, and documents the
format): ``[[heads]]`` tables, each a head with lists of choices or ranges for its parameters, and the
transform chains and layers to try. It is validated whole before any trial runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.utils.config import TEXT_HEADS, read_toml
from pipeline.utils.errors import FeatcacheError

DISTRIBUTIONS = ("loguniform", "uniform", "randint")


@dataclass(frozen=True)
class Dist:
    """A continuous or integer range for random and halving search: ``{ loguniform = [1e-3, 10] }``."""

    kind: str
    low: float
    high: float

    def sample(self, rng: np.random.Generator):
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        if self.kind == "uniform":
            return float(rng.uniform(self.low, self.high))
        return int(rng.integers(int(self.low), int(self.high) + 1))


@dataclass
class Entry:
    """One ``[[heads]]`` table: a head, its parameter choices, and the transform chains and layers to try."""

    head: str
    params: dict[str, list[Any] | Dist]
    transforms: list[list[str]]
    layers: list[str]

    @property
    def finite(self) -> bool:
        return not any(isinstance(v, Dist) for v in self.params.values())

    def grid(self) -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
        names = list(self.params)
        out = []
        for layer, chain in itertools.product(self.layers, self.transforms):
            for values in itertools.product(*(self.params[n] for n in names)):
                out.append((layer, tuple(chain), dict(zip(names, values, strict=True))))
        return out


@dataclass(frozen=True)
class Candidate:
    """One configuration to score: a head with fixed params, a transform chain and a layer."""

    head: str
    params_json: str  # canonical JSON: hashable, and the same string for the same params
    transforms: tuple[str, ...]
    layer: str

    @classmethod
    def make(cls, head: str, params: dict[str, Any], transforms, layer: str) -> Candidate:
        return cls(head, json.dumps(params, sort_keys=True), tuple(transforms), layer)

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    def key(self, fingerprint: str, cv: int, resource: float, seed: int) -> str:
        ident = {
            "layer": self.layer,
            "head": self.head,
            "params": self.params,
            "transforms": list(self.transforms),
            "fingerprint": fingerprint,
            "cv": cv,
            "resource": round(resource, 6),
            "seed": seed,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.head} {params} [{'+'.join(self.transforms) or 'none'}]".replace("  ", " ")


@dataclass
class Space:
    """A parsed space: its ``[[heads]]`` entries and the file they came from."""

    entries: list[Entry]
    source: str

    def canonical(self) -> str:
        def enc(v):
            return {"dist": [v.kind, v.low, v.high]} if isinstance(v, Dist) else v

        return json.dumps(
            [
                [e.head, {k: enc(v) for k, v in e.params.items()}, e.transforms, e.layers]
                for e in self.entries
            ],
            sort_keys=True,
        )

    @property
    def finite(self) -> bool:
        return all(e.finite for e in self.entries)

    def size(self) -> int | None:
        return sum(len(e.grid()) for e in self.entries) if self.finite else None


def default_space_path(multilabel: bool = False) -> Path:
    """The built-in space, shipped inside the package (``pipeline/configs/search_space.toml``; on a
    multi-label cache ``search_space_multilabel.toml``)."""
    name = "search_space_multilabel.toml" if multilabel else "search_space.toml"
    p = Path(__file__).resolve().parents[1] / "configs" / name
    if not p.is_file():
        raise FeatcacheError(f"built-in search space {p} not found (a broken install?); pass --space FILE")
    return p


def _choices(head: str, name: str, value: Any) -> list[Any] | Dist:
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
            raise FeatcacheError(
                f"space: {head}.{name}: a table must be one of {{{', '.join(DISTRIBUTIONS)} = [low, high]}}"
            )
        kind, bounds = next(iter(value.items()))
        if not (
            isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
        ):
            raise FeatcacheError(f"space: {head}.{name}: {kind} needs [low, high]")
        low, high = float(bounds[0]), float(bounds[1])
        if not low < high or (kind == "loguniform" and low <= 0):
            raise FeatcacheError(f"space: {head}.{name}: bad {kind} range [{bounds[0]}, {bounds[1]}]")
        return Dist(kind, low, high)
    if isinstance(value, list):
        if not value:
            raise FeatcacheError(f"space: {head}.{name}: empty list of choices")
        return list(value)
    return [value]


def parse_space(raw: dict[str, Any], source: str, default_layer: str) -> Space:
    """Validate a space (heads, parameter names, transforms) before any trial runs."""
    from pipeline.heads.registry import make_head
    from pipeline.heads.transforms import parse_transforms

    known_top = {"layers", "transforms", "heads"}
    unknown = set(raw) - known_top
    if unknown:
        raise FeatcacheError(
            f"space {source}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known_top))})"
        )
    layers = raw.get("layers") or [default_layer]
    transforms = raw.get("transforms", [["standardize"]])
    heads = raw.get("heads")
    if not isinstance(heads, list) or not heads:
        raise FeatcacheError(f"space {source}: needs at least one [[heads]] table")
    entries = []
    for i, h in enumerate(heads):
        if not isinstance(h, dict) or "name" not in h:
            raise FeatcacheError(f"space {source}: [[heads]] #{i + 1} needs a name")
        extra = set(h) - {"name", "params", "transforms", "layers"}
        if extra:
            raise FeatcacheError(
                f"space {source}: [[heads]] {h['name']}: unknown key(s) {', '.join(sorted(extra))}"
            )
        chains = h.get("transforms", transforms)
        if not isinstance(chains, list) or not all(isinstance(c, list) for c in chains):
            raise FeatcacheError(
                f'space {source}: {h["name"]}.transforms must be a list of chains, e.g. [["standardize"]]'
            )
        if h["name"] in TEXT_HEADS:  # the joint-space embedding as cached: the head normalises it itself
            if "transforms" in h and any(h["transforms"]):
                raise FeatcacheError(
                    f"space {source}: {h['name']}.transforms: a text head reads the embedding as cached; "
                    "give it none (transforms = [[]])"
                )
            chains = [[]]
        for chain in chains:
            parse_transforms(chain)
        params = {k: _choices(h["name"], k, v) for k, v in (h.get("params") or {}).items()}
        first = {k: (v.low if isinstance(v, Dist) else v[0]) for k, v in params.items()}
        make_head(h["name"], {k: v for k, v in first.items() if k != "class_weight"})  # names checked here
        entries.append(Entry(h["name"], params, [list(c) for c in chains], list(h.get("layers") or layers)))
    return Space(entries, source)


def load_space(path: str | Path | None, default_layer: str, multilabel: bool = False) -> Space:
    p = Path(path) if path else default_space_path(multilabel)
    return parse_space(read_toml(p, "search space"), str(p), default_layer)


def convertible_space(space: Space) -> Space:
    """``space`` without the heads finetune/export cannot convert (``search --convertible``)."""
    from pipeline.heads.registry import NOT_CONVERTIBLE, convertible_head

    kept = [e for e in space.entries if convertible_head(e.head)]
    if not kept:
        raise FeatcacheError(
            f"{space.source}: --convertible leaves no head to search ({', '.join(sorted(NOT_CONVERTIBLE))}"
            " cannot be converted); add a linear, MLP or Keras head to the space"
        )
    return Space(kept, space.source)


def multilabel_space(space: Space) -> tuple[Space, list[str]]:
    """``space`` without the heads a multi-label cache cannot train, and a note naming them."""
    from pipeline.heads.multilabel import MULTILABEL_HEADS

    kept = [e for e in space.entries if e.head in MULTILABEL_HEADS]
    skipped = sorted({e.head for e in space.entries if e.head not in MULTILABEL_HEADS})
    if not kept:
        raise FeatcacheError(
            f"{space.source}: no head in this space trains on a multi-label cache; use one of "
            f"{', '.join(MULTILABEL_HEADS)}"
        )
    notes = [f"multi-label cache: skipped {', '.join(skipped)} (no multi-label training)"] if skipped else []
    return Space(kept, space.source), notes


def grid_candidates(space: Space) -> list[Candidate]:
    for e in space.entries:
        for name, v in e.params.items():
            if isinstance(v, Dist):
                raise FeatcacheError(
                    f"space: {e.head}.{name} is a {v.kind} range; grid search needs a list (use --strategy random)"
                )
    seen: dict[Candidate, None] = {}
    for e in space.entries:
        for layer, chain, params in e.grid():
            seen.setdefault(Candidate.make(e.head, params, chain, layer))
    return list(seen)


def random_candidates(space: Space, n: int, seed: int) -> list[Candidate]:
    """``n`` distinct draws: without replacement from a finite space, else sampled from the ranges."""
    rng = np.random.default_rng(seed)
    if space.finite:
        grid = grid_candidates(space)
        if len(grid) <= n:
            return grid
        return [grid[i] for i in sorted(rng.choice(len(grid), size=n, replace=False))]
    out: dict[Candidate, None] = {}
    for _ in range(50 * n):
        if len(out) >= n:
            break
        e = space.entries[int(rng.integers(len(space.entries)))]
        params = {
            k: (v.sample(rng) if isinstance(v, Dist) else v[int(rng.integers(len(v)))])
            for k, v in e.params.items()
        }
        chain = e.transforms[int(rng.integers(len(e.transforms)))]
        layer = e.layers[int(rng.integers(len(e.layers)))]
        out.setdefault(Candidate.make(e.head, params, chain, layer))
    return list(out)


def strategy_candidates(space: Space, strategy: str, n_trials: int, seed: int) -> list[Candidate]:
    """What a strategy starts from: the grid, ``n_trials`` draws, or (halving) the whole grid."""
    if strategy == "grid":
        return grid_candidates(space)
    if strategy == "random" or not space.finite:
        return random_candidates(space, n_trials, seed)
    return grid_candidates(space)
