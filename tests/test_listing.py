"""A folder source listed as arrays (pipeline.data.listing): the same samples, keys and order as a walk of
the folder file by file, and a rerun over a few thousand files that only looks at what changed: an image
edited in place (same name) is extracted again, a new image in one class folder is found, the rest reused."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import small_keywords
from PIL import Image

from pipeline.cache.match import among
from pipeline.cache.store import FeatureCache
from pipeline.data.listing import is_image_name, storable_key
from pipeline.data.sources import load_dataset
from pipeline.stages.extract import extract
from pipeline.utils.config import DataConfig


def _png(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _walked(root: Path, split: str | None = None) -> list[tuple[str, str, str | None, str]]:
    """(key, label, split, path) of every image, found file by file: what the listing must give."""
    out = []
    base = root.parent if split else root
    for cls in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(cls):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if is_image_name(fn):
                    key = storable_key(os.path.join(os.path.relpath(dirpath, base), fn))
                    out.append((key, cls.name, split, os.path.join(dirpath, fn)))
    return out


def _awkward_folder(root: Path) -> None:
    """Class folders with what a listing must get right: upper-case and double extensions, hidden and
    non-image files, sub-folders (a hidden one too), a link to a folder, names that are not UTF-8."""
    seed = 0
    for cls in ("cats", "dogs", "a b", "é"):
        (root / cls).mkdir(parents=True)
        for name in ("a.png", "B.JPG", "c.jpeg", "d.Tiff", "ü.png", "a b.png", "a_b.png", "x.y.PNG"):
            seed += 1
            _png(root / cls / name, seed)
        for name in (".hidden.png", ".png", "notes.txt", "noext", "x.png.txt"):
            (root / cls / name).write_bytes(b"not an image")
    os.symlink(root / "cats", root / "dogs" / "link")  # a folder: neither sample nor ignored
    (root / "a b" / "sub" / "deeper").mkdir(parents=True)
    _png(root / "a b" / "sub" / "q.png", 90)
    _png(root / "a b" / "sub" / "deeper" / "r.gif", 91)
    (root / "a b" / ".hidden").mkdir()
    _png(root / "a b" / ".hidden" / "h.png", 92)
    if sys.platform == "linux":
        for k, raw in enumerate((b"\xff\xfe.png", b"a\xc3A.png")):
            _png(Path(os.fsdecode(os.path.join(os.fsencode(root / "dogs"), raw))), 93 + k)


@pytest.mark.parametrize("layout", ["classes", "splits"])
def test_listing_gives_the_samples_a_file_by_file_walk_gives(tmp_path, layout):
    root = tmp_path / "data"
    splits = ["train", "test"] if layout == "splits" else [None]
    for split in splits:
        _awkward_folder(root / split if split else root)
    want = [w for s in splits for w in _walked(root / s if s else root, s)]

    ds = load_dataset(DataConfig(source=str(root), group_pattern=r"^(?:train/|test/)?([^/]*)/"))
    listing = ds.listing
    assert listing is not None and len(listing) == len(want)
    keys = listing.keys()
    assert keys.tolist() == [k.encode("utf-8") for k, _, _, _ in want]
    labels = listing.labels(ds.class_names)
    assert [ds.class_names[i] for i in labels] == [c for _, c, _, _ in want]
    sizes, mtimes = listing.stats()
    stats = [os.stat(p) for _, _, _, p in want]
    assert sizes.tolist() == [s.st_size for s in stats]
    assert mtimes.tolist() == [s.st_mtime_ns for s in stats]
    assert any(k.endswith("dogs/notes.txt") for k in ds.ignored)
    assert not any(k.endswith("dogs/link") for k in ds.ignored)

    samples = ds.samples  # built from the listing, in its order
    assert [(s.key, s.label, s.split, s.path) for s in samples] == want
    assert all(s.group == s.label for s in samples)  # the group pattern names the class folder
    assert ds.listing is listing
    ds.samples = samples[:3]  # samples set by hand are the dataset from then on
    assert ds.listing is None and len(ds.samples) == 3


def test_among_is_isin_whichever_side_is_larger():
    rng = np.random.default_rng(0)
    for n, m in [(0, 5), (5, 0), (1, 1), (40, 2000), (2000, 40), (300, 300)]:
        values = rng.integers(0, 500, n).astype("S")  # with repeats
        pool = rng.integers(0, 500, m).astype("S")
        np.testing.assert_array_equal(among(values, pool), np.isin(values, pool))
    # long strings that share their first 8 bytes: the integer prefix meets, the whole string decides
    values = np.asarray([b"digest--%d" % i for i in rng.integers(0, 500, 40)], "S")
    pool = np.asarray([b"digest--%d" % i for i in rng.integers(250, 900, 2000)] + [b"d"], "S")
    np.testing.assert_array_equal(among(values, pool), np.isin(values, pool))
    assert 0 < among(values, pool).sum() < len(values)


def _settings(data: Path, cache: Path) -> dict:
    return small_keywords(
        cache, data, backbone__image_size=32, extract__batch_size=64, extract__engine="tflite"
    )


def _features(path: Path) -> dict[str, tuple[str, int, np.ndarray]]:
    with FeatureCache(path) as c:
        feats = c.features()
        return {k: (c.ids[i], int(c.labels[i]), feats[i]) for i, k in enumerate(c.keys)}


def test_rerun_over_thousands_of_files_finds_an_edit_in_place_and_a_new_file(tmp_path):
    data, per_class = tmp_path / "data", 600
    for c, cls in enumerate(("ant", "bee", "cow")):
        (data / cls).mkdir(parents=True)
        for i in range(per_class):
            _png(data / cls / f"{i:05d}.png", c * per_class + i)
    first = extract(**_settings(data, tmp_path / "c"))
    assert (first.extracted, first.rows) == (3 * per_class, 3 * per_class)
    again = extract(**_settings(data, tmp_path / "c"))
    assert (again.written, again.extracted, again.reused) == ("unchanged", 0, 3 * per_class)
    before = _features(first.path)

    edited = data / "bee" / f"{per_class // 2:05d}.png"  # in place: same name, other pixels, new mtime
    _png(edited, 10_000)
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 1_000_000_000))
    r = extract(**_settings(data, tmp_path / "c"))
    assert (r.extracted, r.rows, r.removed) == (1, 3 * per_class, 1)
    after = _features(first.path)
    key = f"bee/{per_class // 2:05d}.png"
    assert after[key][0] != before[key][0] and not np.allclose(after[key][2], before[key][2])
    assert all(np.array_equal(after[k][2], before[k][2]) for k in before if k != key)

    _png(data / "cow" / "new.png", 20_000)  # a new file in one class folder: a segment of one row
    grown = extract(**_settings(data, tmp_path / "c"))
    assert (grown.written, grown.extracted, grown.rows) == ("segment", 1, 3 * per_class + 1)
    fresh = extract(**_settings(data, tmp_path / "fresh"))
    got, whole = _features(first.path), _features(fresh.path)
    assert got.keys() == whole.keys() and got["cow/new.png"][1] == 2
    for k, (cid, label, feat) in whole.items():
        assert got[k][:2] == (cid, label)
        np.testing.assert_allclose(got[k][2], feat, atol=1e-6, rtol=0)

    # a new file and an edit in place in one run: the new file goes through the backbone while the cached
    # files' stats are read (on a forked child); the edit found, every row is looked at again and the new
    # file's row comes from the part the first pass wrote
    _png(data / "ant" / "newer.png", 30_000)
    edited = data / "ant" / "00007.png"
    _png(edited, 40_000)
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 1_000_000_000))
    both = extract(**_settings(data, tmp_path / "c"))
    assert (both.written, both.extracted, both.rows, both.removed) == ("rewritten", 2, 3 * per_class + 2, 1)
    fresh = extract(**_settings(data, tmp_path / "fresh2"))
    assert fresh.extracted == 3 * per_class + 2
    got, whole = _features(first.path), _features(fresh.path)
    assert got.keys() == whole.keys()
    for k, (cid, label, feat) in whole.items():
        assert got[k][:2] == (cid, label)
        np.testing.assert_allclose(got[k][2], feat, atol=1e-6, rtol=0)


def test_a_forked_fill_answers_or_fails_as_an_oserror():
    from pipeline.utils.forked import ForkedFill, can_fork

    if not can_fork():
        pytest.skip("fork is used on Linux only")

    def squares(a, b):
        a[:] = np.arange(len(a)) ** 2
        b[:] = -1

    a, b = ForkedFill(squares, [(1000, np.int64), (3, np.float32)]).result()
    np.testing.assert_array_equal(a, np.arange(1000) ** 2)
    np.testing.assert_array_equal(b, [-1, -1, -1])

    def gone(a):
        os.stat("/nonexistent/featcache-file")

    with pytest.raises(OSError, match="exit code 1"):
        ForkedFill(gone, [(1, np.int64)]).result()
