"""Options declared once: each config key's type, default, choices or range, flag and help in one line.

A key is a dataclass field made by :func:`opt` (``top_k: int = opt(5, flag="--top-k", min=1, help=...)``).
From that one declaration come the typing of a value from a file, a flag or ``--set`` (:func:`coerce`),
its checks (:func:`check`), its command-line flag (:func:`add_flags`) and its plain keyword in the Python
API (:func:`plain_names`). Only the standard library is imported, so building the CLI stays instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass
from typing import Any

from pipeline.utils.errors import FeatcacheError


@dataclass(frozen=True)
class Option:
    """What a key declares besides its type and default."""

    help: str = ""
    flag: str = ""  # the command-line flag; "" = set only in the file or with --set
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    unknown: str = (
        ""  # the message for a value outside ``choices`` ({value!r}, {known}) instead of the generic one
    )
    min: float | None = None
    max: float | None = None
    below: float | None = None  # an open upper bound: [min, below)
    above: float | None = None  # an open lower bound: (above, ...
    zero: str = ""  # 0 is allowed too and means this; the range holds for every other value
    nonempty: bool = False
    repeat: bool = False  # a list key whose flag is given once per item (--layer a --layer b)
    check: Callable[[Any], str | None] | None = None  # an irregular rule: the complaint, or None


def opt(default: Any = MISSING, *, factory: Any = MISSING, **option: Any) -> Any:
    """A config field with its :class:`Option` (``factory`` for mutable defaults, as ``default_factory``)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"option": Option(**option)})


@dataclass(frozen=True, eq=False)  # hashed by identity: a default may be a list
class Key:
    """One config key: ``section.name``, its annotation, default and option."""

    dotted: str
    section: str
    name: str
    type: Any
    default: Any
    option: Option

    @property
    def plain(self) -> str:
        """The keyword its flag stands for (``--image-size`` → ``image_size``); "" when it has none, or when
        the flag turns a true default off (``--quiet`` is not ``quiet=True``)."""
        if not self.option.flag or (self.type is bool and self.default is True):
            return ""
        return self.option.flag.lstrip("-").replace("-", "_")


@functools.cache
def keys(root: type) -> dict[str, Key]:
    """Every key of ``root`` (a dataclass of section dataclasses), in declaration order."""
    out: dict[str, Key] = {}
    for section, cls in typing.get_type_hints(root).items():
        if section not in {f.name for f in dataclasses.fields(root)}:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            option = f.metadata.get("option", Option())
            out[f"{section}.{f.name}"] = Key(
                f"{section}.{f.name}", section, f.name, hints[f.name], default, option
            )
    return out


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against the field's annotation; strings from the CLI are parsed here."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif annotation in (int, float):
        if isinstance(value, str):
            try:
                return annotation(value)
            except ValueError:
                pass
        elif isinstance(value, int if annotation is int else (int, float)) and not isinstance(value, bool):
            return annotation(value)
    elif annotation is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    elif origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if typing.get_args(annotation) == (int,) and isinstance(value, (list, tuple)):
            if all(type(v) is int or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in value):
                return [int(v) for v in value]
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif annotation is Any:
        return value
    kind = getattr(annotation, "__name__", str(annotation))
    raise FeatcacheError(f"config: {key} must be {kind}, got {value!r}")


def _in_range(o: Option, v: float) -> bool:
    """Written so that NaN is out of every range."""
    return (
        (o.min is None or v >= o.min)
        and (o.max is None or v <= o.max)
        and (o.below is None or v < o.below)
        and (o.above is None or v > o.above)
    )


def _describe_range(o: Option) -> str:
    low = f"[{o.min}" if o.min is not None else f"({o.above}" if o.above is not None else ""
    high = f"{o.max}]" if o.max is not None else f"{o.below})" if o.below is not None else ""
    if low and high:
        text = f"in {low}, {high}"
    elif low:
        text = (">= " if low[0] == "[" else "> ") + low[1:]
    else:
        text = ("<= " if high[-1] == "]" else "< ") + high[:-1]
    return f"0 ({o.zero}) or {text}" if o.zero else text


def check(key: Key, value: Any) -> None:
    """Raise the one-line :class:`FeatcacheError` for the first rule ``value`` breaks."""
    o, name = key.option, key.dotted
    if any(isinstance(v, str) and "\x00" in v for v in (value if isinstance(value, list) else [value])):
        raise FeatcacheError(f"config: {name} must not contain a NUL character")
    if o.nonempty and not value.strip():
        raise FeatcacheError(f"config: {name} must not be empty")
    if o.choices and value not in o.choices:
        if o.unknown:
            raise FeatcacheError(o.unknown.format(value=value, known=", ".join(o.choices)))
        raise FeatcacheError(f"config: {name} must be one of {', '.join(o.choices)}, got {value!r}")
    ranged = any(b is not None for b in (o.min, o.max, o.below, o.above))
    if ranged and not (o.zero and value == 0) and not _in_range(o, value):
        raise FeatcacheError(f"config: {name} must be {_describe_range(o)}, got {value}")
    complaint = o.check(value) if o.check else None
    if complaint:
        raise FeatcacheError(f"config: {name} {complaint}")


def validate(obj: Any) -> None:
    """Check every key of ``obj`` (a dataclass of sections) against its own rules."""
    for key in keys(type(obj)).values():
        check(key, getattr(getattr(obj, key.section), key.name))


def assign(obj: Any, dotted: str, value: Any, origin: str) -> None:
    """Set ``section.name`` of ``obj`` to ``value`` typed by :func:`coerce`; an unknown key is one line
    naming it, and what is known where it was looked for."""
    known = keys(type(obj))
    if dotted not in known:
        section, _, name = dotted.partition(".")
        sections = sorted({k.section for k in known.values()})
        if section not in sections or not name:
            raise FeatcacheError(f"{origin}: unknown config key {dotted!r} (sections: {', '.join(sections)})")
        names = ", ".join(k.name for k in known.values() if k.section == section)
        raise FeatcacheError(f"{origin}: unknown config key {dotted!r} (known in [{section}]: {names})")
    key = known[dotted]
    setattr(getattr(obj, key.section), key.name, coerce(dotted, value, key.type))


def _help(key: Key) -> str | None:
    """The key's help, with its default unless the help already says what the default means."""
    text, default = key.option.help, key.default
    if not text or "default" in text or key.type is bool or default in ("", [], {}):
        return text or None
    shown = ",".join(default) if isinstance(default, list) else default
    return f"{text} (default {shown})"


def add_flags(parser, chosen: Iterable[Key]) -> None:
    """The flags of ``chosen`` on an argparse parser; each one's value lands under its dotted key (None: not
    given, so the file or the default decides)."""
    for key in chosen:
        o = key.option
        kwargs: dict[str, Any] = {"dest": key.dotted, "default": None, "help": _help(key)}
        if key.type is bool:
            kwargs.update(action="store_const", const=not key.default)
        else:
            kwargs["metavar"] = o.metavar
            if o.repeat:
                kwargs["action"] = "append"
            elif o.choices and not o.unknown:  # a message of its own answers a bad value, not argparse's
                kwargs.update(choices=list(o.choices), metavar=None)
            elif key.type in (int, float):
                kwargs["type"] = key.type
        parser.add_argument(o.flag, **kwargs)


def flag_values(args, chosen: Iterable[Key]) -> dict[str, Any]:
    """``{dotted key: value}`` of the flags given on the command line."""
    return {k.dotted: getattr(args, k.dotted) for k in chosen if getattr(args, k.dotted, None) is not None}


@functools.cache
def _by_keyword(all_keys: tuple[Key, ...]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(keyword → keys, by flag; keyword → keys, by field name)."""
    by_flag: dict[str, list[str]] = {}
    by_name: dict[str, list[str]] = {}
    for k in all_keys:
        if k.plain:
            by_flag.setdefault(k.plain, []).append(k.dotted)
        by_name.setdefault(k.name, []).append(k.dotted)
    return by_flag, by_name


def keyword_key(name: str, all_keys: dict[str, Key], section: str = "") -> str:
    """The dotted key a keyword of the Python API sets: ``data__source`` is ``data.source``; a plain name
    is a flag's (``data``, ``image_size``, ``cache``) or else a field's own (``head``, ``n_trials``), looked
    for in ``section`` (the calling stage's) first when several sections have it."""
    if "__" in name:
        return name.replace("__", ".")
    pools = _by_keyword(tuple(all_keys.values()))
    for pool in pools:
        found = pool.get(name, [])
        if len(found) > 1 and section:
            found = [k for k in found if k.startswith(section + ".")] or found
        if len(found) == 1:
            return found[0]
        if found:
            raise FeatcacheError(
                f"keyword {name!r} could be {', '.join(found)}: say which, e.g. {found[0].replace('.', '__')}=..."
            )
    close = difflib.get_close_matches(name, sorted({n for pool in pools for n in pool}), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise FeatcacheError(
        f"unknown keyword {name!r}{hint}: pass a config key as section__key (data__source=...) or a plain"
        " name such as data, backbone, image_size, head, top_k"
    )


def parse_assignments(items: list[str], origin: str = "--set") -> dict[str, str]:
    """``["a.b=1", ...]`` → ``{"a.b": "1"}``; values are typed later against the dataclass fields."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FeatcacheError(f"{origin}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out
