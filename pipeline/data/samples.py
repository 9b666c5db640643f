"""What a source lists: :class:`Sample` (one image, by reference) and :class:`Dataset` (the list + how to read).

Both are plain, picklable data: a sample names its file, shard member or Parquet row by URL/path and name or
index, never by an open handle, so a dataset can be sent to worker processes. Readers that stream shards keep
their open files in a per-process registry (:mod:`pipeline.data.webdataset`, :mod:`pipeline.data.parquet`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def label_sets(labels: list[tuple[str, ...] | None]) -> list[str] | None:
    """The class names of a multi-label dataset (every name in ``labels``), None for a single-label one."""
    if not labels or labels[0] is None:
        return None
    return sorted({c for s in labels for c in s or ()})


@dataclass(slots=True, unsafe_hash=True)  # not frozen: a frozen __init__ costs 2× at a million samples
class Sample:
    key: str  # stable within the dataset: relative path, "<shard>/<key>", or "<part>/<row>" for arrays
    label: str
    split: str | None = None  # fixed by the layout: train | val | test | trainval; None = hashed
    group: str | None = None  # samples of one group always share a split
    path: str | None = None  # file, shard or URL to read (file and shard sources)
    index: int = -1  # row in ``Dataset.arrays`` (array sources) or in the Parquet file (Parquet sources)
    member: str = ""  # the image's member name inside a tar shard (WebDataset sources)
    digest: str = ""  # content digest, when listing already read the bytes (shards) or remembered them
    stamp: tuple[int, int] | None = None  # (size, version) of a remote file, for rerun skipping
    labels: tuple[str, ...] | None = None  # a multi-label sample's classes (``label`` joins them with ";")


@dataclass
class Dataset:
    """A source's samples and how to read them. A folder source's ``samples`` are built from its
    ``listing`` (:class:`pipeline.data.listing.FileListing`, arrays) when first asked for: a rerun that
    finds every file cached never builds them."""

    name: str
    source: str
    samples: list[Sample]  # None with a ``listing``; setting a list drops the listing
    class_names: list[str]
    arrays: np.ndarray | None = None  # N×H×W[×C] uint8 for array sources
    ignored: list[str] = field(default_factory=list)  # non-image or hidden files seen while scanning
    problems: list[tuple[Sample, str]] = field(default_factory=list)  # unusable samples found while listing
    storage_options: dict = field(default_factory=dict)  # fsspec options for URL sources
    multilabel: bool = False  # samples carry ``labels`` (a set, maybe empty) rather than one ``label``
    listing: Any = field(default=None, repr=False, compare=False)  # a folder's files, as arrays

    def __post_init__(self) -> None:
        if self.__dict__.get("_samples") is not None:
            self.listing = None  # samples given (``dataclasses.replace``): they are the dataset

    @property
    def is_files(self) -> bool:
        return self.arrays is None

    def read(self, sample: Sample) -> bytes | np.ndarray:
        """Raw content: file, member or row bytes (decoded later) or a uint8 array.

        Tar members and Parquet rows come from a per-shard sequential reader: reading a shard's samples
        in order streams it once.
        """
        if self.arrays is not None:
            return self.arrays[sample.index]
        if sample.member:
            from pipeline.data.webdataset import read_member

            return read_member(sample.path, sample.member, self.storage_options)
        if sample.index >= 0:
            from pipeline.data.parquet import read_row

            return read_row(sample.path, sample.index, self.storage_options)
        from pipeline.data.storage import is_url

        if is_url(sample.path):
            from pipeline.data.storage import read_url

            return read_url(sample.path, self.storage_options)
        from pipeline.data.decode import read_bytes

        return read_bytes(sample.path)

    def close(self) -> None:
        """Close the shard readers this process opened (they reopen on the next read)."""
        from pipeline.data.parquet import close_readers as close_parquet
        from pipeline.data.webdataset import close_readers as close_tars

        close_tars()
        close_parquet()

    def label_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.class_names)}

    def multi_hot(self, sample: Sample) -> tuple[int, ...]:
        """A multi-label sample's row of the N×C label matrix: 1 for each of its classes."""
        have = set(sample.labels or ())
        return tuple(int(c in have) for c in self.class_names)


def _samples(ds: Dataset) -> list[Sample]:
    if ds.__dict__.get("_samples") is None:
        ds.__dict__["_samples"] = ds.listing.samples() if ds.listing is not None else []
    return ds.__dict__["_samples"]


def _set_samples(ds: Dataset, samples: list[Sample] | None) -> None:
    ds.__dict__["_samples"] = samples
    if samples is not None and "listing" in ds.__dict__:
        ds.listing = None  # the samples given are the dataset now


# after the dataclass is made, so that ``samples`` stays an ordinary argument of ``Dataset(...)``
Dataset.samples = property(_samples, _set_samples)  # type: ignore[assignment]
