"""Hostile configuration: invalid, missing or contradictory config values and CLI flags.

Every one must end as exit code 2 with one line naming the option, key or file at fault — never a
traceback. The property tests call ``pipeline.cli.main(argv)`` in-process (it returns the exit code;
argparse's own usage errors arrive as SystemExit(2)); a handful of cases also run as real processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import string
from datetime import date, datetime, time
from pathlib import Path

import pytest
from conftest import write_photo_folder
from faultkit import one_line_error, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.features.backbones.registry import BACKBONES, normalize_name
from pipeline.utils.config import Config

PROFILE = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
COUNTS: dict[str, int] = {}


def call(argv: list[str]) -> tuple[int, str, str]:
    """``featcache ARGV`` in this process: (exit code, stdout, stderr). Any other exception escapes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_clean_failure(code: int, out: str, err: str, *any_of: str) -> str:
    assert code == 2, f"exit {code} for a hostile input\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("featcache"), err
    if any_of:
        assert any(n in lines[0] for n in any_of), f"none of {any_of} named in: {lines[0]}"
    return lines[0]


@pytest.fixture(scope="module")
def ground(tmp_path_factory) -> dict[str, Path]:
    """A valid small dataset and a scratch cache folder, so every failure is the hostile value's doing."""
    root = tmp_path_factory.mktemp("hostile")
    write_photo_folder(root / "photos", per_class=2)
    (root / "a_file").write_text("I am a file, not a folder\n")
    return {"root": root, "data": root / "photos", "cache": root / "cache", "file": root / "a_file"}


# ------------------------------------------------------------------------------ invalid values, by construction

printable = st.text(alphabet=string.ascii_letters + string.digits + " _-./:=,%+@", min_size=1, max_size=20)
not_int = printable.filter(lambda s: not s.strip().lstrip("+-").isdigit())
not_float = printable.filter(lambda s: not _is_float(s))


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _not_choice(choices):
    return printable.filter(lambda s: s not in choices)


unknown_backbone = printable.filter(lambda s: normalize_name(s) not in BACKBONES and s.strip())

# flag → (strategy of invalid values, words one of which the message must contain)
FLAG_CASES = {
    "--batch-size": (st.one_of(st.integers(max_value=0), not_int), ("--batch-size", "extract.batch_size")),
    "--image-size": (
        st.one_of(st.integers(max_value=-1), st.integers(1, 15), st.integers(2049, 10**30), not_int),
        ("--image-size", "backbone.image_size"),
    ),
    "--limit": (st.one_of(st.integers(max_value=-1), not_int), ("--limit", "data.limit")),
    "--threads": (st.one_of(st.integers(max_value=-1), not_int), ("--threads", "extract.threads")),
    "--pooling": (_not_choice({"avg", "max", "flatten", "none"}), ("--pooling",)),
    "--resize": (_not_choice({"stretch", "crop", "pad"}), ("--resize",)),
    "--dtype": (_not_choice({"float32", "float16"}), ("--dtype",)),
    "--compression": (_not_choice({"none", "gzip", "lzf"}), ("--compression",)),
    "--on-error": (_not_choice({"skip", "fail"}), ("--on-error",)),
    "--backbone": (unknown_backbone, ("unknown backbone", "backbone.name")),
    "--weights": (
        printable.filter(lambda s: s not in ("imagenet", "none")).map(lambda s: f"/no/such/dir/{s}"),
        ("--weights",),
    ),
    "--data": (printable.map(lambda s: f"/no/such/dir/{s}"), ("/no/such/dir",)),
}


@PROFILE
@given(data=st.data())
def test_invalid_flag_values(ground, data):
    flag = data.draw(st.sampled_from(sorted(FLAG_CASES)))
    strategy, names = FLAG_CASES[flag]
    value = data.draw(strategy)
    argv = ["extract", "--data", ground["data"], "--cache-dir", ground["cache"], "--quiet", flag, value]
    # A value starting with "-" is read by argparse as another option; it then names the bare flag.
    if str(value).startswith("-"):
        names = (*names, f"argument {flag}")
    assert_clean_failure(*call(argv), *names)
    COUNTS["flags"] = COUNTS.get("flags", 0) + 1


def _dotted_fields() -> dict[str, type]:
    import dataclasses
    import typing

    out = {}
    cfg = Config()
    for sec in dataclasses.fields(cfg):
        section = type(getattr(cfg, sec.name))
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            out[f"{sec.name}.{f.name}"] = hints[f.name]
    return out


FIELDS = _dotted_fields()
NUMERIC = [k for k, t in FIELDS.items() if t in (int, float)]
BOOLS = [k for k, t in FIELDS.items() if t is bool]
# values that break a constraint of a well-typed key
CONSTRAINED = {
    "data.val_fraction": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just("nan")),
    "data.test_fraction": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just("inf")),
    "data.limit": st.integers(max_value=-1),
    "data.group_pattern": st.sampled_from(["(", "[a-", "*x", "(?P<", "a{2,1}"]),
    "data.on_error": _not_choice({"skip", "fail"}),
    "data.source": st.just(""),
    "extract.batch_size": st.integers(max_value=0),
    "extract.threads": st.integers(max_value=-1),
    "extract.cache_dir": st.just(""),
    "extract.engine": _not_choice({"auto", "tensorflow", "tflite"}),
    "backbone.image_size": st.one_of(st.integers(1, 15), st.integers(min_value=2049)),
    "backbone.name": st.one_of(st.just(" "), unknown_backbone),
    "search.n_trials": st.integers(max_value=0),
    "search.n_jobs": st.just(0),
    "search.cv": st.one_of(st.just(1), st.integers(max_value=-1)),
    "search.strategy": _not_choice({"grid", "random", "halving"}),
    "train.streaming": _not_choice({"auto", "memory", "stream"}),
    "finetune.learning_rate": st.one_of(st.floats(max_value=0.0), st.just("nan")),
    "finetune.batch_size": st.integers(max_value=0),
}


@st.composite
def bad_assignment(draw) -> tuple[list[str], tuple[str, ...]]:
    kind = draw(st.sampled_from(["unknown", "type", "bool", "constraint", "malformed", "contradiction"]))
    if kind == "unknown":
        key = draw(
            st.one_of(
                printable.filter(lambda k: k.strip() not in FIELDS and "=" not in k),
                st.sampled_from(sorted(FIELDS)).map(lambda k: k + "x"),
            )
        )
        # argparse reads a value that starts with "-" as an option: its error names --set instead
        return [f"{key}=1"], (key.strip(), "argument --set") if key.startswith("-") else (key.strip(),)
    if kind == "type":
        key = draw(st.sampled_from(NUMERIC))
        value = draw(not_int if FIELDS[key] is int else not_float)
        return [f"{key}={value}"], (key,)
    if kind == "bool":
        key = draw(st.sampled_from(BOOLS))
        value = draw(
            printable.filter(lambda v: v.strip().lower() not in ("true", "false", "1", "0", "yes", "no"))
        )
        return [f"{key}={value}"], (key,)
    if kind == "constraint":
        key = draw(st.sampled_from(sorted(CONSTRAINED)))
        return [f"{key}={draw(CONSTRAINED[key])}"], (key, "unknown backbone") if key == "backbone.name" else (
            key,
        )
    if kind == "malformed":
        item = draw(st.one_of(printable.filter(lambda s: "=" not in s), printable.map(lambda v: "=" + v)))
        return [item], ("--set",)  # also covers items starting with "-"
    val = draw(st.floats(0.01, 0.99))
    test = draw(st.floats(max(0.0, 1.0 - val), 0.999))
    if val + test < 1.0:  # 1.0 - val can round so that val + test lands just below 1: a valid config
        test = 0.999
    return ["data.val_fraction=" + repr(val), "data.test_fraction=" + repr(test)], ("val_fraction",)


@PROFILE
@given(case=bad_assignment(), command=st.sampled_from(["extract", "train", "search"]))
def test_invalid_set_assignments(ground, case, command):
    items, names = case
    argv = [command, "--data", ground["data"], "--cache-dir", ground["cache"], "--quiet"]
    for item in items:
        argv += ["--set", item]
    assert_clean_failure(*call(argv), *names)
    COUNTS["set"] = COUNTS.get("set", 0) + 1


# ------------------------------------------------------------------------------ TOML files, anything goes

bare_key = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
toml_scalar = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=30),  # NUL and other control characters included: TOML escapes them
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
    st.dates(),
    st.times(),
)
toml_value = st.recursive(
    toml_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(bare_key, inner, max_size=3)),
    max_leaves=8,
)
known_key = st.sampled_from(sorted(FIELDS)).map(lambda k: tuple(k.split(".")))
any_key = st.tuples(
    st.one_of(st.sampled_from(["data", "backbone", "extract", "train", "search"]), bare_key), bare_key
)


def toml_literal(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are TOML basic-string escapes
    if isinstance(v, (datetime, date, time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_literal(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {toml_literal(x)}" for k, x in v.items()) + "}"


@st.composite
def toml_document(draw) -> str:
    entries = draw(st.dictionaries(st.one_of(known_key, any_key), toml_value, max_size=6))
    sections: dict[str, dict] = {}
    for (sec, key), value in entries.items():
        sections.setdefault(sec, {})[key] = value
    lines = []
    if draw(st.booleans()):  # a top-level key, not in a [section]
        lines.append(f"{draw(bare_key)} = {toml_literal(draw(toml_scalar))}")
    for sec, values in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {toml_literal(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@PROFILE
@given(doc=st.one_of(toml_document(), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_any_toml_file_is_a_clean_exit(ground, tmp_path_factory, doc):
    """Whatever the file holds, the data path is missing: so every outcome is a clean exit 2."""
    path = tmp_path_factory.mktemp("toml") / "config.toml"
    path.write_text(doc, encoding="utf-8", errors="surrogateescape")
    argv = [
        "extract",
        "--config",
        path,
        "--data",
        "/no/such/dir/data",
        "--cache-dir",
        ground["cache"],
        "--quiet",
    ]
    assert_clean_failure(*call(argv))
    COUNTS["toml"] = COUNTS.get("toml", 0) + 1


@PROFILE
@given(raw=st.binary(min_size=1, max_size=120))
def test_config_file_that_is_not_text(ground, tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("raw") / "config.toml"
    path.write_bytes(b"\xff\xfe" + raw)
    assert_clean_failure(*call(["extract", "--config", path, "--quiet"]), str(path))
    COUNTS["toml"] = COUNTS.get("toml", 0) + 1


# ------------------------------------------------------------------------------ argv soup

VOCAB = {
    "extract": [
        "--limit",
        "--on-error",
        "--backbone",
        "--weights",
        "--layer",
        "--pooling",
        "--image-size",
        "--resize",
        "--batch-size",
        "--dtype",
        "--compression",
        "--threads",
        "--rebuild",
        "--quiet",
        "--set",
        "--bogus",
        "-x",
        "--",
    ],
    "train": ["--layer", "--head", "--backbone", "--param", "--set", "--quiet", "--bogus"],
    "search": [
        "--layer",
        "--space",
        "--strategy",
        "--n-trials",
        "--n-jobs",
        "--cv",
        "--backbone",
        "--set",
        "--fresh",
        "--no-refit",
        "--bogus",
    ],
}
token = st.one_of(
    printable,
    st.integers(-5, 5).map(str),
    st.sampled_from(["", "=", "a=b", "x.y=1", "data.val_fraction=0.9", "-1", "nan", "1e400"]),
)


def _asks_help(word: str) -> bool:
    """``-h``, ``-hx`` or an abbreviation of ``--help``: argparse rightly prints help and exits 0."""
    return word.startswith("-h") or (word.startswith("--h") and "--help".startswith(word.split("=", 1)[0]))


@PROFILE
@given(data=st.data())
def test_argv_soup_never_crashes(ground, data):
    """Random flags and values in random order; a missing source (or cache) guarantees the run cannot
    start, so the only acceptable outcome is one line and exit 2."""
    command = data.draw(st.sampled_from(sorted(VOCAB)))
    words = data.draw(st.lists(st.one_of(st.sampled_from(VOCAB[command]), token), max_size=8))
    words = [w for w in words if "cache_dir" not in w and "runs_dir" not in w and not _asks_help(w)]
    tail = ["--data", "/no/such/dir"] if command == "extract" else ["--cache", "/no/such/cache.h5"]
    argv = [command, *words, "--cache-dir", ground["cache"], *tail]
    code, out, err = call(argv)
    assert_clean_failure(code, out, err)
    COUNTS["soup"] = COUNTS.get("soup", 0) + 1


def test_zz_report_counts():
    print(f"hostile configurations tried in-process: {COUNTS} (total {sum(COUNTS.values())})")


# ------------------------------------------------------------------------------ a few real processes


def test_hostile_configs_in_real_processes(ground, tmp_path):
    bad_toml = tmp_path / "types.toml"
    bad_toml.write_text('[data]\nval_fraction = "a lot"\n')
    nul_toml = tmp_path / "nul.toml"
    nul_toml.write_text('[backbone]\nweights = "a\\u0000b"\n')
    cases = [
        (["--config", bad_toml], ("data.val_fraction",)),
        (["--config", nul_toml], ("backbone.weights",)),
        (["--config", tmp_path / "missing.toml"], ("missing.toml",)),
        (["--set", "data.val_fraction=0.6", "--set", "data.test_fraction=0.5"], ("val_fraction",)),
        (["--image-size", "huge"], ("--image-size",)),
        (["--cache-dir", ground["file"]], (ground["file"].name,)),
        (["--data", "/no/such/\udcff/dir"], ("/no/such/",)),
    ]
    for extra, names in cases:
        res = run("extract", "--data", ground["data"], "--cache-dir", ground["cache"], "--quiet", *extra)
        one_line_error(res, *map(str, names))
    res = run("train", "--cache", ground["file"], "--quiet")
    one_line_error(res, ground["file"].name)
    res = run("cache", "info", ground["file"])
    one_line_error(res, ground["file"].name)
