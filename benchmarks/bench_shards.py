"""Data at scale (issue 14): listing + digesting, and reading back, the same images from a folder, WebDataset
tar shards and Hugging Face-layout Parquet; a rerun over unchanged shards; memory while streaming a shard.

No backbone runs here: these are the I/O passes extraction does before and around it. Every figure is a
ratio to the folder measured in the same run.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _photos(n: int) -> list[tuple[str, str, bytes]]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    images = load_sample_images().images
    out = []
    for i in range(n):
        c = (i // 3) % 2  # not i % 2: every shard (photos[s::shards]) must hold both classes
        cls, photo = ("china", "flower")[c], images[c]
        y, x = int(rng.integers(0, photo.shape[0] - 160)), int(rng.integers(0, photo.shape[1] - 160))
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(photo[y : y + 160, x : x + 160])).save(buf, "JPEG", quality=90)
        out.append((cls, f"{cls}_{i:05d}", buf.getvalue()))
    return out


def _write(work: Path, photos, shards: int) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / "folder"
    for cls, key, data in photos:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        (folder / cls / f"{key}.jpg").write_bytes(data)
    (work / "tar").mkdir(exist_ok=True)
    for s in range(shards):
        with tarfile.open(work / "tar" / f"train-{s:04d}.tar", "w") as tar:
            for cls, key, data in photos[s::shards]:
                for name, blob in ((f"{key}.jpg", data), (f"{key}.txt", cls.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": d, "path": k} for _, k, d in photos], type=struct),
            "label": [0 if c == "china" else 1 for c, _, _ in photos],
        }
    ).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": {"label": {"names": ["china", "flower"]}}}})}
    )
    pq.write_table(table, work / "data.parquet", row_group_size=256)
    return {
        "folder": str(folder),
        "tar": str(work / "tar" / f"train-{{0000..{shards - 1:04d}}}.tar"),
        "parquet": str(work / "data.parquet"),
    }


def _listing(src: str, index: Path | None) -> tuple[float, Any]:
    """Seconds to list the source with every sample's content digest (extraction's first pass)."""
    from pipeline.data.sources import digest_bytes, load_dataset
    from pipeline.utils.config import DataConfig

    t0 = time.perf_counter()
    ds = load_dataset(DataConfig(source=src), index)
    digests = [s.digest or digest_bytes(ds.read(s)) for s in ds.samples]
    assert len(digests) == len(ds.samples)
    return time.perf_counter() - t0, ds


def _read_back(ds) -> float:
    """Seconds to read every image's bytes back in dataset order (the decode pass's I/O)."""
    t0 = time.perf_counter()
    for s in ds.samples:
        ds.read(s)
    ds.close()
    return time.perf_counter() - t0


def _peak_mib(src: str) -> float:
    from pipeline.data.sources import load_dataset
    from pipeline.utils.config import DataConfig

    tracemalloc.start()
    try:
        ds = load_dataset(DataConfig(source=src))
        for s in ds.samples:
            ds.read(s)
        ds.close()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def run(out_dir: Path, quick: bool) -> dict[str, Any]:
    import tempfile

    n, shards = (400, 4) if quick else (4000, 8)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        work = Path(tmp)
        photos = _photos(n)
        sources = _write(work, photos, shards)
        result: dict[str, Any] = {
            "images": n,
            "shards": shards,
            "mib": sum(len(d) for *_, d in photos) / 2**20,
        }
        for name, src in sources.items():
            listed, ds = _listing(src, work / "index")
            result[name] = {"list_s": round(listed, 3), "read_s": round(_read_back(ds), 3)}
        result["tar_rerun_s"] = round(_listing(sources["tar"], work / "index")[0], 3)
        result["parquet_rerun_s"] = round(_listing(sources["parquet"], work / "index")[0], 3)
        one = str(work / "tar" / "train-0000.tar")
        result["one_shard_mib"] = round((work / "tar" / "train-0000.tar").stat().st_size / 2**20, 1)
        result["one_shard_peak_mib"] = round(_peak_mib(one), 1)
    (out_dir / "shards.json").write_text(json.dumps(result, indent=2))
    return result


def markdown(r: dict[str, Any]) -> str:
    f = r["folder"]
    rows = [
        f"{r['images']} JPEGs (160 px, {r['mib']:.0f} MiB); tar in {r['shards']} shards; Parquet in one file.",
        "",
        "| source | list + digest | × folder | read back in order | × folder |",
        "|---|---|---|---|---|",
    ]
    for name in ("folder", "tar", "parquet"):
        x = r[name]
        rows.append(
            f"| {name} | {x['list_s']} s | {x['list_s'] / f['list_s']:.2f} | {x['read_s']} s | "
            f"{x['read_s'] / f['read_s']:.2f} |"
        )
    rows += [
        "",
        f"Rerun over unchanged shards (listing from the shard index, no shard read): tar {r['tar_rerun_s']} s "
        f"({r['tar_rerun_s'] / r['tar']['list_s']:.3f} × the first listing), Parquet {r['parquet_rerun_s']} s.",
        f"Streaming one {r['one_shard_mib']} MiB shard (list + read back): peak traced memory "
        f"{r['one_shard_peak_mib']} MiB.",
    ]
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    res = run(out, quick="--quick" in sys.argv)
    print(markdown(res))
