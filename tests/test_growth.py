"""Growth costs the new rows: added images go to a segment beside the untouched base, and what a reader
serves is always base + a complete chain of segments of that base (never a stale, superseded or garbled one)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, small_keywords, write_photo_folder

import pipeline.cache.growth as growth
from pipeline.cache.segments import segment_dir
from pipeline.cache.store import FeatureCache
from pipeline.stages.extract import extract
from pipeline.utils.errors import FeatcacheError


def _settings(data: Path, cache: Path) -> dict:
    return small_keywords(cache, data, extract__engine="tflite")


def _by_key(path: Path) -> dict[str, tuple]:
    with FeatureCache(path) as c:
        feats = c.features()
        return {k: (c.ids[i], int(c.labels[i]), int(c.split[i]), feats[i]) for i, k in enumerate(c.keys)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _segments(final: Path) -> list[str]:
    d = segment_dir(final)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_added_images_go_to_a_segment_and_equal_a_fresh_extraction(tmp_path):
    data = tmp_path / "data"
    write_photo_folder(data, per_class=5)
    first = extract(**_settings(data, tmp_path / "c"))
    assert first.written == "rewritten"
    base, base_sha = first.path, _sha(first.path)
    for k in range(2):
        write_photo_folder(data, per_class=1, seed=20 + k, start=100 + k)
        r = extract(**_settings(data, tmp_path / "c"))
        assert (r.written, r.extracted, r.rows) == ("segment", 2, 12 + 2 * k)
        assert "only the new rows were written" in r.summary()
    assert _sha(base) == base_sha, "the base was rewritten"
    assert _segments(base) == ["seg-000001-000001.h5", "seg-000002-000002.h5"]
    again = extract(**_settings(data, tmp_path / "c"))
    assert (again.written, again.extracted) == ("unchanged", 0)

    fresh = extract(**_settings(data, tmp_path / "fresh"))
    grown, whole = _by_key(base), _by_key(fresh.path)
    assert grown.keys() == whole.keys()
    for key, (cid, label, split, feat) in whole.items():
        assert grown[key][:3] == (cid, label, split)
        np.testing.assert_allclose(grown[key][3], feat, atol=1e-6, rtol=0)
    with FeatureCache(base) as c:
        assert (c.n_rows, c.base_rows, len(c.segments), c.info()["segments"]) == (14, 10, 2, 2)


def test_segments_merge_past_the_limit_and_a_removal_rewrites(tmp_path, monkeypatch):
    monkeypatch.setattr(growth, "MAX_SEGMENTS", 2)
    data = tmp_path / "data"
    write_photo_folder(data, per_class=6)
    base = extract(**_settings(data, tmp_path / "c")).path
    base_sha = _sha(base)
    done = []
    for k in range(3):
        write_photo_folder(data, per_class=1, seed=30 + k, start=100 + k)
        done.append(extract(**_settings(data, tmp_path / "c")).written)
    assert done == ["segment", "segment", "merged"]
    assert _segments(base) == ["seg-000001-000003.h5"] and _sha(base) == base_sha
    assert len(_by_key(base)) == 18
    write_photo_folder(data, per_class=1, seed=39, start=110)  # the run after a merge is run 4
    assert extract(**_settings(data, tmp_path / "c")).written == "segment"
    assert _segments(base) == ["seg-000001-000003.h5", "seg-000004-000004.h5"]
    assert len(_by_key(base)) == 20

    next((data / "china").iterdir()).unlink()
    r = extract(**_settings(data, tmp_path / "c"))
    assert (r.written, r.rows, r.removed) == ("rewritten", 19, 1)
    assert _segments(base) == [] and not segment_dir(base).exists()


def test_only_the_chain_of_this_base_is_served(tmp_path):
    data, other = tmp_path / "data", tmp_path / "other"
    write_photo_folder(data, per_class=5)
    shutil.copytree(data, other)
    base = extract(**_settings(data, tmp_path / "c")).path
    foreign = extract(**_settings(other, tmp_path / "o")).path
    for k in range(2):
        write_photo_folder(data, per_class=1, seed=40 + k, start=100 + k)
        write_photo_folder(other, per_class=1, seed=60 + k, start=100 + k)
        extract(**_settings(data, tmp_path / "c"))
    extract(**_settings(other, tmp_path / "o"))
    served = _by_key(base)
    segs = segment_dir(base)
    # another base's segment under a name that would supersede ours, and a half-written one: not served
    shutil.copy(segment_dir(foreign) / "seg-000001-000001.h5", segs / "seg-000001-000002.h5")
    (segs / "seg-000003-000003.h5.tmp-12345").write_bytes(b"half a file")
    assert _by_key(base).keys() == served.keys()
    extract(**_settings(data, tmp_path / "c"))  # a writer removes what is never served
    assert _segments(base) == ["seg-000001-000001.h5", "seg-000002-000002.h5"]

    seg = segs / "seg-000002-000002.h5"
    raw = bytearray(seg.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # garbled features: the checksum says so
    seg.write_bytes(bytes(raw))
    with pytest.raises(FeatcacheError, match="damaged|rebuild"):
        with FeatureCache(base) as c:
            c.features()
    res = run_cli("extract", "--data", str(data), "--cache-dir", str(tmp_path / "c"), "--image-size", "64",
                  "--set", "extract.engine=tflite", "--rebuild", "--quiet")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert _segments(base) == [] and len(_by_key(base)) == 14
