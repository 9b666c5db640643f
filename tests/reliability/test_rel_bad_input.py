"""The bad-input zoo through the real command line: every awkward file is decoded or reported by name with
a reason, the summary counts them, nothing crashes.

The zoo (``tests/zoo.py``, generated at test time) holds a zero-byte file, truncated JPEG/PNG/WebP, text
named ``.jpg``, PNG RGBA/LA/palette/16-bit, CMYK/YCCK JPEGs, grayscale, an animated GIF, BMP, WebP, TIFF,
an EXIF-rotated photo, a 1×1 image, a PNG whose header claims 50,000×50,000 pixels, a non-UTF-8 and a
space-laden name, a symlink loop, a dangling symlink, a folder named ``.jpg`` and hidden files. Added
here: a FIFO named ``.jpg`` (a naive reader blocks on it forever), a directory symlink looping to its own
folder, a non-image extension, and a file that cannot be opened (permission denied, injected by the
fault shim because the tests run as root); and, separately, an empty class folder.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
from conftest import write_photo_folder
from faultkit import extract_args, fault_env, one_line_error, run, the_cache
from zoo import OK, ZOO_CASES, make_zoo

from pipeline.cache.quarantine import quarantine_path
from pipeline.cache.store import FeatureCache
from pipeline.data.sources import storable_key

EXTRA_BAD = {"pipe.jpg": "not a regular file", "locked.jpg": "permission denied"}
EXTRA_IGNORED = {"notes.txt"}


def build_zoo(root: Path) -> tuple[Path, dict[str, str]]:
    """Two classes of real photos plus a ``zoo`` class holding every case; name → expected outcome."""
    write_photo_folder(root, per_class=3)
    zoo = root / "zoo"
    zoo.mkdir()
    expected = make_zoo(zoo)
    if hasattr(os, "mkfifo"):
        os.mkfifo(zoo / "pipe.jpg")
        expected["pipe.jpg"] = EXTRA_BAD["pipe.jpg"]
    os.symlink(".", zoo / "loop_dir")  # not followed: the walk must not spin
    (zoo / "notes.txt").write_text("not an image, and not named like one\n")
    shutil.copy(zoo / "rgb.jpg", zoo / "locked.jpg")
    (zoo / "locked.jpg").write_bytes((zoo / "locked.jpg").read_bytes() + b"\0")  # its own content
    expected["locked.jpg"] = EXTRA_BAD["locked.jpg"]
    return zoo, expected


def _locked(zoo: Path) -> dict[str, str]:
    return fault_env(zoo, ops="read", match="locked.jpg", errno="EACCES")


def _classify(zoo: Path, expected: dict[str, str]):
    """(names that must be skipped with their reason, names that must be cached, hidden/ignored names)."""
    bad, ok, ignored = {}, set(), set(EXTRA_IGNORED)
    for name, outcome in expected.items():
        if name.startswith("."):
            ignored.add(name)
        elif (zoo / name).is_dir() and not (zoo / name).is_symlink():
            continue  # a folder named x.jpg is walked like any folder (it is empty)
        elif outcome == OK:
            ok.add(name)
        else:
            bad[name] = outcome
    return bad, ok, ignored


def test_the_zoo_is_decoded_or_reported_by_name_and_counted(tmp_path):
    zoo, expected = build_zoo(tmp_path / "photos")
    bad, ok, ignored = _classify(zoo, expected)
    res = run(*extract_args(tmp_path / "photos", tmp_path / "c", "--quiet"), env=_locked(zoo))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    out = res.stdout
    cache = the_cache(tmp_path / "c")

    # the summary counts them
    assert f" {len(bad)} skipped " in out, out
    assert f"{len(ignored)} non-image files ignored" in out, out
    # each is reported by name with its reason: on screen (the first ten) and in the quarantine list
    with open(quarantine_path(cache), newline="", encoding="utf-8") as f:
        listed = {row["key"]: row["reason"] for row in csv.DictReader(f)}
    assert set(listed) == {storable_key(f"zoo/{n}") for n in bad}, listed
    for name, reason in bad.items():
        assert reason in listed[storable_key(f"zoo/{name}")], (name, listed)
    shown = [line for line in out.splitlines() if line.startswith("  skipped ")]
    assert len(shown) == min(10, len(bad)) and all(": " in line for line in shown)
    # everything else is in the cache, the odd names included
    with FeatureCache(cache) as c:
        zoo_keys = {k for k in c.keys if k.startswith("zoo/")}
        assert zoo_keys == {storable_key(f"zoo/{n}") for n in ok}
        assert c.n_rows == len(ok) + 6
    print(f"bad inputs tried: {len(bad)} reported, {len(ok)} decoded, {len(ignored)} ignored")

    # a rerun does not decode them again, and still reports them all
    again = run(*extract_args(tmp_path / "photos", tmp_path / "c", "--quiet"), env=_locked(zoo))
    assert again.returncode == 0 and f" {len(bad)} skipped " in again.stdout and "0 extracted" in again.stdout


ON_ERROR_FAIL_CI = ["loop_a.jpg", "bomb.png"]


def _on_error_fail(tmp_path: Path, name: str) -> None:
    """A folder with good photos and one bad file, run with ``--on-error fail``: exit 2, naming it."""
    root = tmp_path / f"data-{name}"
    zoo, expected = build_zoo(root)
    keep = {name, "rgb.jpg"} | ({"loop_a.jpg", "loop_b.jpg"} if name.startswith("loop_") else set())
    for other in list(zoo.iterdir()):
        if other.name not in keep:
            shutil.rmtree(other) if other.is_dir() and not other.is_symlink() else other.unlink()
    res = run(*extract_args(root, tmp_path / f"c-{name}", "--quiet", "--on-error", "fail"), env=_locked(zoo))
    one_line_error(res, "loop_" if name.startswith("loop_") else name, expected[name])


@pytest.mark.parametrize("name", ON_ERROR_FAIL_CI)
def test_on_error_fail_names_the_file_and_the_reason(tmp_path, name):
    _on_error_fail(tmp_path, name)


@pytest.mark.reliability_long
def test_on_error_fail_for_every_bad_input(tmp_path):
    names = [
        n for n, o in ZOO_CASES.items() if o != OK and not n.startswith(".") and n not in ON_ERROR_FAIL_CI
    ]
    names = [n for n in names if n not in ("folder.jpg", "unreadable.jpg")] + list(EXTRA_BAD)
    for name in names:
        _on_error_fail(tmp_path, name)


def test_an_empty_class_folder_is_named(tmp_path):
    root = tmp_path / "photos"
    write_photo_folder(root, per_class=2)
    (root / "empty_class").mkdir()
    (root / "empty_class" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files do not count
    res = run(*extract_args(root, tmp_path / "c", "--quiet"))
    one_line_error(res, "class folder has no images", "empty_class")


@pytest.mark.reliability_long
def test_the_zoo_listed_in_a_csv(tmp_path):
    """The same files named by a CSV (hidden ones included: a CSV names them on purpose) plus a missing one."""
    root = tmp_path / "photos"
    zoo, expected = build_zoo(root)
    rows = ["path,label"] + [
        f"{p.relative_to(root).as_posix()},{c}"
        for c in ("china", "flower")
        for p in sorted((root / c).iterdir())
    ]
    rows += [f'"zoo/{n}",zoo' for n in expected if "\udce9" not in n and not (zoo / n).is_dir()]
    rows += ["zoo/missing.jpg,zoo"]
    (tmp_path / "photos" / "list.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    res = run(*extract_args(tmp_path / "photos" / "list.csv", tmp_path / "c", "--quiet"), env=_locked(zoo))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    with open(quarantine_path(the_cache(tmp_path / "c")), newline="", encoding="utf-8") as f:
        listed = {row["key"]: row["reason"] for row in csv.DictReader(f)}
    assert listed["zoo/missing.jpg"] == "file not found"
    for name, outcome in expected.items():
        if outcome != OK and f"zoo/{name}" in listed:
            assert outcome in listed[f"zoo/{name}"]
