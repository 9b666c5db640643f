"""Data at scale: WebDataset tar shards, Hugging Face-layout Parquet, and object storage (a real S3-protocol
server, moto's, started here) give the same samples, digests, splits and features as a plain folder."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.sources import digest_bytes, load_dataset
from pipeline.utils.config import DataConfig, load_config
from pipeline.utils.errors import FeatcacheError
from tests.conftest import run_cli, small_config

CLASSES = ("china", "flower")


def _images(per_class: int = 5) -> dict[str, list[tuple[str, bytes]]]:
    """Real photo crops at 40–64 px, PNG and JPEG, as file bytes per class."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(7)
    out: dict[str, list[tuple[str, bytes]]] = {}
    for cls, photo in zip(CLASSES, load_sample_images().images, strict=True):
        out[cls] = []
        for i in range(per_class):
            h, w = int(rng.integers(40, 64)), int(rng.integers(40, 64))
            y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
            buf = io.BytesIO()
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(np.ascontiguousarray(photo[y : y + h, x : x + w])).save(
                buf, format="PNG" if ext == "png" else "JPEG", quality=90
            )
            out[cls].append((f"{cls}_{i:03d}.{ext}", buf.getvalue()))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_folder(root: Path, images) -> Path:
    for cls, files in images.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (root / cls / name).write_bytes(data)
    return root


def write_shards(folder: Path, images, n: int = 2, extra: list[tuple[str, bytes]] = ()) -> list[Path]:
    """WebDataset shards: ``<key>.<ext>`` + a label member (.txt class name, .json label, .cls index)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [(cls, name, data) for cls in CLASSES for name, data in images[cls]]
    paths = []
    for s in range(n):
        p = folder / f"train-{s:04d}.tar"
        with tarfile.open(p, "w") as tar:
            for j, (cls, name, data) in enumerate(items[s::n]):
                key, ext = name.split(".")
                _add(tar, f"{key}.{ext}", data)
                if j % 2:
                    _add(tar, f"{key}.txt", cls.encode())
                else:
                    _add(tar, f"{key}.json", json.dumps({"label": cls, "caption": "x"}).encode())
            if s == n - 1:
                for name, data in extra:
                    _add(tar, name, data)
        paths.append(p)
    return paths


def write_parquet(path: Path, images, with_names: bool = True, drop: str | None = None) -> Path:
    """The Hugging Face layout: image struct{bytes, path}, label ClassLabel (names in the metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(name, data, CLASSES.index(cls)) for cls in CLASSES for name, data in images[cls]]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = {
        "image": pa.array([{"bytes": d, "path": n} for n, d, _ in rows], type=image_type),
        "label": pa.array([lab for _, _, lab in rows], type=pa.int64()),
    }
    if drop:
        cols.pop(drop)
    table = pa.table(cols)
    if with_names:
        features = {
            "image": {"_type": "Image"},
            "label": {"names": list(CLASSES), "_type": "ClassLabel"},
        }
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)
    return path


@pytest.fixture(scope="module")
def images():
    return _images()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3-protocol server on localhost, a real HTTP server in its own process."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:  # pragma: no cover
        proc.kill()
        pytest.fail("moto server did not start")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _s3(endpoint: str, **extra):
    import s3fs

    return s3fs.S3FileSystem(
        key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True, **extra
    )


# ----------------------------------------------------------------------------- listing (no backbone)


def test_tar_shards_list_the_folder_samples_with_the_same_digests(tmp_path, images):
    write_shards(tmp_path / "shards", images, n=3)
    ds = load_dataset(DataConfig(source=str(tmp_path / "shards" / "train-{0000..0002}.tar")))
    assert ds.class_names == list(CLASSES) and not ds.problems
    want = {digest_bytes(d): cls for cls in CLASSES for _, d in images[cls]}
    assert {s.digest: s.label for s in ds.samples} == want
    assert {s.key.split("/")[0] for s in ds.samples} == {f"train-{i:04d}.tar" for i in range(3)}
    # the same through a glob and through file://
    by_glob = load_dataset(DataConfig(source=str(tmp_path / "shards" / "*.tar")))
    by_url = load_dataset(DataConfig(source="file://" + str(tmp_path / "shards" / "train-*.tar")))
    assert [s.digest for s in by_glob.samples] == [s.digest for s in ds.samples]
    assert [s.digest for s in by_url.samples] == [s.digest for s in ds.samples]
    # reading members back in shard order (and out of order) serves the right bytes
    for s in ds.samples[::-1] + ds.samples:
        assert digest_bytes(ds.read(s)) == s.digest
    ds.close()


def test_cls_labels_are_class_indices(tmp_path, images):
    p = tmp_path / "s.tar"
    with tarfile.open(p, "w") as tar:
        for cls in CLASSES:
            for name, data in images[cls][:2]:
                key, ext = name.split(".")
                _add(tar, name, data)
                _add(tar, f"{key}.cls", str(CLASSES.index(cls)).encode())
    ds = load_dataset(DataConfig(source=str(p)))
    assert ds.class_names == ["0", "1"]
    assert sorted({s.label for s in ds.samples}) == ["0", "1"]


def test_parquet_in_the_hugging_face_layout(tmp_path, images):
    f = write_parquet(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet", images)
    want = {digest_bytes(d): cls for cls in CLASSES for _, d in images[cls]}
    for source in (f, tmp_path / "hf", tmp_path / "hf" / "data" / "*.parquet"):
        ds = load_dataset(DataConfig(source=str(source)))
        assert ds.class_names == list(CLASSES)
        assert {s.digest: s.label for s in ds.samples} == want
        for s in ds.samples[::3] + ds.samples[:2]:
            assert digest_bytes(ds.read(s)) == s.digest
        ds.close()
    # plain bytes, no ClassLabel metadata, a split column
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [(d, CLASSES.index(c)) for c in CLASSES for _, d in images[c]]
    table = pa.table(
        {
            "image": pa.array([d for d, _ in flat], pa.binary()),
            "label": [lab for _, lab in flat],
            "split": ["test" if i % 5 == 0 else "train" for i in range(len(flat))],
        }
    )
    pq.write_table(table, tmp_path / "flat.parquet")
    ds = load_dataset(DataConfig(source=str(tmp_path / "flat.parquet")))
    assert ds.class_names == ["0", "1"]
    assert [s.split for s in ds.samples] == ["test" if i % 5 == 0 else "train" for i in range(len(flat))]


def test_bad_input_is_named(tmp_path, images):
    good = images["china"][0][1]
    p = tmp_path / "bad" / "x-0000.tar"
    p.parent.mkdir()
    with tarfile.open(p, "w") as tar:
        _add(tar, "a.png", images["china"][1][1])
        _add(tar, "a.txt", b"china")
        _add(tar, "nolabel.jpg", good)
        _add(tar, "noimage.txt", b"flower")
        _add(tar, "b.png", images["flower"][1][1])
        _add(tar, "b.cls", b"not-a-number")
        _add(tar, "c.png", images["flower"][2][1])
        _add(tar, "c.json", b'{"label": "flower"}')
        _add(tar, "d.png", images["flower"][3][1])
        _add(tar, "d.txt", b"flower")
    data = p.read_bytes()
    cut = data.index(images["flower"][3][1][:64]) + 100  # inside the last image
    (tmp_path / "bad" / "x-0001.tar").write_bytes(data[:cut])
    (tmp_path / "bad" / "x-0002.tar").write_bytes(b"this is not a tar file at all" * 40)
    ds = load_dataset(DataConfig(source=str(tmp_path / "bad" / "x-{0000..0002}.tar")))
    reasons = {s.key: r for s, r in ds.problems}
    assert "no label" in reasons["x-0000.tar/nolabel"]
    assert "no image" in reasons["x-0000.tar/noimage"]
    assert "bad .cls" in reasons["x-0000.tar/b"]
    assert "truncated" in reasons["x-0001.tar/d"] and "truncated" in reasons["x-0001.tar"]
    assert "not a readable tar" in reasons["x-0002.tar"]
    assert {s.key for s in ds.samples} == {
        "x-0000.tar/a",
        "x-0000.tar/c",
        "x-0000.tar/d",
        "x-0001.tar/a",
        "x-0001.tar/c",
    }
    # Parquet rows without image bytes or label are quarantined; the rest are samples
    import pyarrow as pa
    import pyarrow.parquet as pq

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": good, "path": "a.jpg"}, {"bytes": None, "path": "elsewhere.jpg"}, None]
    cells += [
        {"bytes": images["flower"][0][1], "path": None},
        {"bytes": images["flower"][1][1], "path": None},
    ]
    table = pa.table({"image": pa.array(cells, type=struct), "label": [0, 1, 1, None, 1]})
    pq.write_table(table, tmp_path / "rows.parquet")
    ds = load_dataset(DataConfig(source=str(tmp_path / "rows.parquet")))
    assert [(s.key, r.split(" (")[0]) for s, r in ds.problems] == [
        ("rows.parquet/1", "image has no bytes"),
        ("rows.parquet/2", "no image"),
        ("rows.parquet/3", "no label"),
    ]
    assert [s.key for s in ds.samples] == ["rows.parquet/0", "rows.parquet/4"]
    # the whole source unusable: one clear error
    with pytest.raises(FeatcacheError, match="no 'label' column"):
        load_dataset(
            DataConfig(source=str(write_parquet(tmp_path / "nolabel.parquet", images, drop="label")))
        )
    with pytest.raises(FeatcacheError, match="not found"):
        load_dataset(DataConfig(source=str(tmp_path / "bad" / "x-{0000..0003}.tar")))
    with pytest.raises(FeatcacheError, match="no files match"):
        load_dataset(DataConfig(source=str(tmp_path / "nothing-*.tar")))


def test_a_shard_streams_in_bounded_memory(tmp_path):
    """Listing keeps digests, not bytes; reading back holds at most the look-ahead buffer."""
    import tracemalloc

    from pipeline.data import webdataset

    rng = np.random.default_rng(0)
    p = tmp_path / "big.tar"
    n, size = 48, 1 << 20
    with tarfile.open(p, "w") as tar:
        for i in range(n):
            _add(tar, f"s{i:03d}.png", rng.bytes(size))
            _add(tar, f"s{i:03d}.cls", str(i % 2).encode())
    tracemalloc.start()
    try:
        ds = load_dataset(DataConfig(source=str(p)))
        _, listing_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert all(digest_bytes(ds.read(s)) == s.digest for s in ds.samples)
        _, reading_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        ds.close()
    assert len(ds.samples) == n
    assert listing_peak < 4 * size  # one member at a time, of a 48 MB shard
    assert reading_peak < webdataset.BUFFER_BYTES + 4 * size


def test_unchanged_shards_are_not_read_again(tmp_path, images):
    paths = write_shards(tmp_path / "shards", images, n=2)
    cfg = DataConfig(source=str(tmp_path / "shards" / "train-{0000..0001}.tar"))
    index = tmp_path / "index"
    first = load_dataset(cfg, index)
    # same size and mtime, different bytes: only a listing that re-reads the shard would notice
    st = paths[0].stat()
    paths[0].write_bytes(b"\0" * st.st_size)
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    again = load_dataset(cfg, index)
    assert [(s.key, s.digest) for s in again.samples] == [(s.key, s.digest) for s in first.samples]
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed shard is read again
    changed = load_dataset(cfg, index)
    assert len(changed.samples) < len(first.samples) and changed.problems


def test_missing_backend_and_credentials_name_the_fix(s3_server, monkeypatch, tmp_path):
    with pytest.raises(FeatcacheError, match=r"featcache\[gcs\]|gcsfs"):
        load_dataset(DataConfig(source="gs://bucket/shards/*.tar"))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {"endpoint_url": s3_server, "skip_instance_cache": True}
    with pytest.raises(FeatcacheError, match="credentials"):
        load_dataset(DataConfig(source="s3://nobucket/train-{0000..0001}.tar", storage_options=options))


def test_folders_and_csvs_behind_an_s3_url(s3_server, tmp_path, images, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    write_folder(tmp_path / "photos", images)
    (tmp_path / "photos" / "notes.md").write_text("not an image")
    rows = [f"{cls}/{name},{cls}" for cls in CLASSES for name, _ in images[cls]]
    (tmp_path / "photos" / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    fs = _s3(s3_server)
    fs.mkdir("remote")
    fs.put(str(tmp_path / "photos") + "/", "remote/photos/", recursive=True)
    options = {"endpoint_url": s3_server}
    want = {digest_bytes(d): cls for cls in CLASSES for _, d in images[cls]}
    for src in ("s3://remote/photos/", "s3://remote/photos/labels.csv"):
        ds = load_dataset(DataConfig(source=src, storage_options=options))
        assert ds.class_names == list(CLASSES)
        assert {digest_bytes(ds.read(s)): s.label for s in ds.samples} == want
    assert all(
        s.stamp is not None
        for s in load_dataset(DataConfig("s3://remote/photos/", storage_options=options)).samples
    )
    # an endpoint nobody listens on: one line naming the URL, quickly
    dead = {
        "endpoint_url": f"http://127.0.0.1:{_free_port()}",
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    t0 = time.monotonic()
    with pytest.raises(FeatcacheError, match=r"s3://remote/x-0000\.tar: unreachable"):
        load_dataset(DataConfig(source="s3://remote/x-{0000..0001}.tar", storage_options=dead))
    assert time.monotonic() - t0 < 30


# ----------------------------------------------------------------------------- end to end (real backbone)


def _features(path) -> dict[str, tuple[np.ndarray, str, int]]:
    from pipeline.cache.store import FeatureCache

    with FeatureCache(path) as c:
        x = c.features()
        return {d: (x[i], c.class_names[int(c.labels[i])], int(c.split[i])) for i, d in enumerate(c.ids)}


@pytest.mark.slow
def test_folder_tar_parquet_and_s3_give_identical_features(tmp_path, images, s3_server, monkeypatch):
    from pipeline.stages.extract import extract

    folder = write_folder(tmp_path / "photos", images)
    broken = [("broken.png", b"\x89PNG\r\n\x1a\n not really"), ("broken.txt", b"china")]
    write_shards(tmp_path / "shards", images, n=2, extra=broken)
    write_parquet(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet", images)
    fs = _s3(s3_server)
    fs.mkdir("bucket")
    fs.put(str(tmp_path / "shards") + "/", "bucket/shards/", recursive=True)
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)

    sources = {
        "folder": str(folder),
        "tar": str(tmp_path / "shards" / "train-{0000..0001}.tar"),
        "parquet": str(tmp_path / "hf"),
        "s3": "s3://bucket/shards/train-{0000..0001}.tar",
    }
    caches, results = {}, {}
    for name, src in sources.items():  # one cache folder: one weights digest, one engine choice
        cfg = load_config(
            None, small_config(tmp_path / "cache", src, **{"data.name": name, "extract.batch_size": 16})
        )
        results[name] = extract(cfg)
        caches[name] = _features(results[name].path)
    ref = caches["folder"]
    assert len(ref) == 10
    for name in ("tar", "parquet", "s3"):
        got = caches[name]
        assert set(got) == set(ref), name
        for d, (x, label, split) in ref.items():
            # the same pixels; only the batch they shared the backbone with differs (float summation order)
            np.testing.assert_allclose(got[d][0], x, rtol=1e-4, atol=2e-5, err_msg=name)
            assert got[d][1:] == (label, split), name
    for name in ("tar", "s3"):  # the undecodable member is quarantined with its reason, nothing else lost
        assert [k for k, _ in results[name].problems] == ["train-0001.tar/broken"]
        assert results[name].quarantine is not None
    # a rerun reads no shard again and runs no backbone
    again = extract(load_config(None, small_config(tmp_path / "cache", sources["s3"], **{"data.name": "s3"})))
    assert again.extracted == 0 and again.rows == 10


def test_cli_unusable_sources_exit_2_with_one_line(tmp_path, images):
    write_parquet(tmp_path / "p.parquet", images, drop="image")
    r = run_cli("extract", "--data", str(tmp_path / "p.parquet"), "--set", f"extract.cache_dir={tmp_path}")
    assert r.returncode == 2, r.stderr
    assert "no 'image' column" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_credentials_never_reach_a_cache_or_a_run_folder(s3_server, tmp_path, images, monkeypatch):
    """Keys given in ``[data] storage_options`` reach fsspec and nothing else: no byte of the cache, its
    sidecar files or the run folder holds them (docs/security.md)."""
    from pipeline.stages.extract import extract
    from pipeline.stages.train import train

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    write_folder(tmp_path / "photos", images)
    fs = _s3(s3_server)
    fs.mkdir("private")
    fs.put(str(tmp_path / "photos") + "/", "private/photos/", recursive=True)
    secrets = {"key": "AKIAFEATCACHEKEY0001", "secret": "s3cr3t-FEATCACHE-do-not-store"}
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)  # the keys come from the config alone
    cfg = load_config(None, small_config(tmp_path / "cache", "s3://private/photos/"))
    cfg.data.storage_options = {"endpoint_url": s3_server, **secrets}
    result = extract(cfg)
    assert result.rows == 10
    cfg.train.cache = str(result.path)
    run = train(cfg)
    written = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert run.run_dir in {p.parent for p in written} and len(written) >= 5
    for p in written:
        data = p.read_bytes()
        for value in secrets.values():
            assert value.encode() not in data, f"{p} holds a credential"
