"""I/O faults at the file layer: a write that fails part-way, permission denied, a read-only cache folder,
a failed rename or fsync — injected by the LD_PRELOAD shim into a real ``featcache extract`` process, in
the writes of CPython and of HDF5's C library alike.

The scene: a complete cache of 20 photos exists; the run adds 10 photos (and one unreadable file, so a
quarantine list is written too). Under every fault the run must exit 2 with one line naming the path and
the reason, leave the previous complete cache byte-identical (sha256) and no temporary file behind; once
the fault is gone, the same command must produce what an undisturbed run produces.

Also here: truncated and garbled cache files (seeded random damage) are reported — never served — and
``--rebuild`` replaces them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_photo_folder
from faultkit import (
    LIBC_ERRNO_TEXT,
    assert_same_cache,
    cache_content,
    extract_args,
    fault_env,
    leftovers,
    one_line_error,
    read_log,
    rng,
    run,
    sha256,
    the_cache,
)

from pipeline.cache.store import FeatureCache, list_caches
from pipeline.utils.errors import FeatcacheError


class Scene:
    def __init__(self, root: Path):
        self.root = root
        # one source that grows, as a user's folder does: the base cache holds its first 20 photos, every
        # later run brings that cache up to date with the 30 (+ an unreadable file) it holds afterwards
        self.photos = self.more = root / "photos"
        write_photo_folder(self.photos, per_class=10)
        self.base = root / "base"
        res = run(*extract_args(self.photos, self.base, "--quiet", name="photos"))
        assert res.returncode == 0, res.stderr
        self.base_sha = sha256(the_cache(self.base))
        write_photo_folder(self.more, per_class=5, seed=1, start=10)
        (self.more / "china" / "broken.jpg").write_bytes(b"")  # lands in the quarantine list
        ref = self.copy_base("reference")
        log = root / "reference.log"
        res = run(
            *extract_args(self.more, ref, "--quiet", name="photos"),
            env=fault_env(ref, log=log, after_bytes=10**15),
        )
        assert res.returncode == 0, res.stderr
        self.total_bytes = read_log(log)["bytes"]
        self.reference = cache_content(the_cache(ref))
        assert len(self.reference["keys"]) == 30
        # the same run killed as it was about to write the new cache: its new rows are all in parts, so
        # a rerun goes straight to the consolidation (no backbone, no TensorFlow: the fast way to fault it)
        self.pending = self.copy_base("pending")
        res = run(
            *extract_args(self.more, self.pending, "--quiet", name="photos"),
            env=fault_env(self.pending, ops="open", match=".h5.tmp-", action="kill"),
        )
        assert res.returncode == -9 and len(list(self.pending.glob("*.partial/part-*.npz"))) == 1, res.stderr

    def copy_base(self, name: str, start: Path | None = None) -> Path:
        d = self.root / name
        shutil.copytree(start or self.base, d)
        return d

    def inject(self, name: str, pending: bool = False, **fault) -> tuple[Path, object]:
        d = self.copy_base(name, self.pending if pending else None)
        res = run(*extract_args(self.more, d, "--quiet", name="photos"), env=fault_env(d, **fault))
        return d, res

    def check_failed_cleanly(self, d: Path, res, reason: str, where: str) -> str:
        err = one_line_error(res, reason, where)
        assert sha256(the_cache(d)) == self.base_sha, "the previous complete cache was modified"
        assert leftovers(d) == [], f"temporary files left behind: {leftovers(d)}"
        return err

    def check_recovers(self, d: Path) -> None:
        res = run(*extract_args(self.more, d, "--quiet", name="photos"))
        assert res.returncode == 0, res.stderr
        assert_same_cache(the_cache(d), self.reference)
        assert leftovers(d) == []


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Scene:
    return Scene(tmp_path_factory.mktemp("io-faults"))


# (name, shim settings, expected reason, a piece of the path the message must name, check recovery)
CASES = [
    ("disk full mid-part", {"match": "part-", "after_bytes": "R:40000"}, "ENOSPC", ".partial", True),
    ("disk full on manifest", {"ops": "open", "match": "manifest"}, "ENOSPC", ".partial", False),
    ("permission denied", {"ops": "open,mkdir,rename"}, "EACCES", ".lock", False),
    # these start from the killed run's parts: only the consolidation is left to fail
    # the new rows' segment (10 photos): ~60 kB written, the fault lands inside it
    ("disk full mid-hdf5", {"match": ".h5.tmp-", "after_bytes": "R:50000"}, "ENOSPC", ".h5", True),
    ("quota on quarantine list", {"ops": "open", "match": "quarantine"}, "EDQUOT", "quarantine.csv", False),
    ("rename of the new cache", {"ops": "rename", "match": ".h5.tmp-"}, "EIO", ".h5", False),
    ("fsync of the new cache", {"ops": "fsync"}, "EIO", ".h5", False),
]
PENDING = {
    "disk full mid-hdf5",
    "quota on quarantine list",
    "rename of the new cache",
    "fsync of the new cache",
}


def _settings(case: str, fault: dict, errno_name: str) -> dict:
    r = rng("io", case)
    out = {"errno": errno_name}
    for k, v in fault.items():
        out[k] = r.randrange(int(v[2:])) if isinstance(v, str) and v.startswith("R:") else v
    return out


@pytest.mark.parametrize(
    ("case", "fault", "errno_name", "where", "recover"), CASES, ids=[c[0].replace(" ", "-") for c in CASES]
)
def test_failed_write_is_one_clear_line_and_leaves_the_old_cache_untouched(
    scene, case, fault, errno_name, where, recover
):
    d, res = scene.inject(case.replace(" ", "-"), case in PENDING, **_settings(case, fault, errno_name))
    scene.check_failed_cleanly(d, res, LIBC_ERRNO_TEXT[errno_name], where)
    if recover:
        scene.check_recovers(d)


def test_killed_while_writing_the_quarantine_list_leaves_nothing_behind(scene):
    """A crash (not an error) half-way through the quarantine list: the next run sweeps the temp file."""
    d, res = scene.inject(
        "killed-quarantine", True, ops="write", match="quarantine", after_bytes=20, action="kill"
    )
    assert res.returncode == -9, res.stderr
    assert leftovers(d), "the kill was meant to leave a half-written temp file"
    assert sha256(the_cache(d)) == scene.base_sha
    scene.check_recovers(d)


def test_read_only_cache_folder(scene):
    d, res = scene.inject("read-only", ops="open,mkdir,rename,unlink,access", errno="EROFS")
    scene.check_failed_cleanly(d, res, "not writable", str(d.name))
    # the same folder seen by a process that cannot even ask (access() lies, as it does for root)
    d, res = scene.inject("read-only-root", ops="open,mkdir,rename,unlink", errno="EROFS")
    scene.check_failed_cleanly(d, res, LIBC_ERRNO_TEXT["EROFS"], ".lock")


@pytest.mark.reliability_long
def test_disk_full_at_20_seeded_offsets_of_the_write_stream(scene):
    """ENOSPC at a random byte of everything the run writes, then the disk is freed and the run redone."""
    r = rng("io-stream")
    for i in range(20):
        after = r.randrange(scene.total_bytes)
        d, res = scene.inject(f"stream-{i}", after_bytes=after, errno=r.choice(["ENOSPC", "EDQUOT", "EIO"]))
        errno_name = next(k for k, v in LIBC_ERRNO_TEXT.items() if v in res.stderr)
        scene.check_failed_cleanly(d, res, LIBC_ERRNO_TEXT[errno_name], str(d))
        scene.check_recovers(d)


@pytest.mark.reliability_long
def test_every_case_recovers_and_random_metadata_ops_fail(scene):
    for case, fault, errno_name, where, _ in CASES:
        d, res = scene.inject("again-" + case.replace(" ", "-"), **_settings(case, fault, errno_name))
        scene.check_failed_cleanly(d, res, LIBC_ERRNO_TEXT[errno_name], where)
        scene.check_recovers(d)
    r = rng("io-ops")
    for i in range(8):
        errno_name = r.choice(["EACCES", "EROFS", "ENOSPC"])
        d, res = scene.inject(
            f"ops-{i}", ops="open,mkdir,rename", after_ops=r.randrange(12), errno=errno_name
        )
        scene.check_failed_cleanly(d, res, LIBC_ERRNO_TEXT[errno_name], str(d))
        scene.check_recovers(d)


# --------------------------------------------------------------------------------------------- damage


def _garble(data: bytes, r) -> tuple[bytes, str]:
    kind = r.choice(["truncate", "bytes", "block", "zero-page"])
    buf = bytearray(data)
    if kind == "truncate":
        cut = r.randrange(len(buf))
        return bytes(buf[:cut]), f"truncated to {cut}"
    if kind == "zero-page":
        start = r.randrange(0, len(buf), 4096)
        buf[start : start + 4096] = bytes(len(buf[start : start + 4096]))
        return bytes(buf), f"zeroed page at {start}"
    off, n = r.randrange(len(buf)), 1 if kind == "bytes" else r.choice([8, 64, 512])
    for i in range(off, min(len(buf), off + n)):
        buf[i] = (buf[i] + r.randrange(1, 256)) % 256
    return bytes(buf), f"{n} byte(s) changed at {off}"


def _read_all(path: Path) -> dict:
    content = cache_content(path)
    with FeatureCache(path) as c:  # and every other column the cache holds
        content["sizes"], content["mtimes"], content["meta"] = c.sizes, c.mtimes, c.meta
    return content


def garble_round(scene: Scene, tmp: Path, n: int, salt: str) -> dict[str, int]:
    """Damage a copy of a complete cache ``n`` times: each must be reported or read back unchanged."""
    original_path = the_cache(scene.base)
    original, data = _read_all(original_path), original_path.read_bytes()
    r = rng("garble", salt)
    outcome = {"reported": 0, "harmless": 0}
    victim = tmp / original_path.name
    for _ in range(n):
        damaged, what = _garble(data, r)
        victim.write_bytes(damaged)
        try:
            got = _read_all(victim)
        except FeatcacheError as e:
            assert "--rebuild" in str(e) and victim.name in str(e), str(e)
            outcome["reported"] += 1
            continue
        # not detected: then it must not matter (free space, padding...): every value read back is intact
        try:
            assert_same_cache(got, original, atol=0)
            np.testing.assert_array_equal(got["sizes"], original["sizes"])
            np.testing.assert_array_equal(got["mtimes"], original["mtimes"])
            assert got["meta"] == original["meta"]
        except AssertionError as e:
            raise AssertionError(f"damage served silently ({what}): {e}") from None
        outcome["harmless"] += 1
    return outcome


def test_garbled_or_truncated_cache_is_never_served(scene, tmp_path):
    outcome = garble_round(scene, tmp_path, 500, "ci")
    print(f"500 damaged copies: {outcome}")
    assert outcome["reported"] > 400


@pytest.mark.reliability_long
def test_garbled_or_truncated_cache_is_never_served_long(scene, tmp_path):
    outcome = garble_round(scene, tmp_path, 5000, "long")
    print(f"5000 damaged copies: {outcome}")


@pytest.mark.parametrize(
    "damage", [pytest.param("truncated", marks=pytest.mark.reliability_long), "garbled-header"]
)
def test_damaged_cache_is_reported_by_the_cli_and_rebuilt_on_request(scene, damage):
    d = scene.copy_base("cli-" + damage)
    path = the_cache(d)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    else:
        path.write_bytes(data[:8] + bytes(range(40)) + data[48:])  # the superblock, after the signature
    res = run(*extract_args(scene.photos, d, "--quiet", name="photos"))
    one_line_error(res, path.name, "--rebuild")
    assert [c["status"] for c in list_caches(d)] == ["damaged"]
    res = run("cache", "info", str(path))
    one_line_error(res, path.name, "--rebuild")
    res = run(*extract_args(scene.photos, d, "--quiet", "--rebuild", name="photos"))
    assert res.returncode == 0, res.stderr
    # the folder as it is now, as an uninterrupted run made it; a rebuilt cache holds its rows in the
    # folder's order, a grown one in the order they came (the base's, then the segment's)
    assert_same_cache(path, scene.reference, ordered=False)
    assert leftovers(d) == []
