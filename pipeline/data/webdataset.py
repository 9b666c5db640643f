"""WebDataset tar shards: list a shard's samples in one streaming pass, read members back in order.

A shard is a tar whose members are grouped by key (the name up to its first dot in the last path
component): ``cat_001.jpg``, ``cat_001.cls``. The image is the member with an image extension; the label
is ``.cls`` (a class index as text), the ``label`` field of ``.json``, or ``.txt``. Shards are read with
``tarfile``'s stream mode over an fsspec file: never unpacked, never seeked, memory bounded by one member.

Listing reads every member once to compute the content digests (and keeps only the digests). Reading
images back for decoding goes through a per-shard cursor that streams forward, serving members in the
order extraction asks for them and keeping a few passed-over images in a small buffer for requests that
arrive slightly out of order (parallel decode threads).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import threading
from collections import OrderedDict

from pipeline.data.decode import IMAGE_EXTENSIONS, DecodeError
from pipeline.data.storage import digest_bytes, open_file, storage_reason

_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
LABEL_EXTENSIONS = ("cls", "json", "txt")
#: Images (and bytes) held per open shard for requests that arrive out of order or twice; beyond either
#: bound the oldest are dropped (and a later request for one of them streams the shard again from its start).
BUFFER = 64
BUFFER_BYTES = 32 << 20
#: Shards kept open at once per process.
OPEN_SHARDS = 8


def split_name(name: str) -> tuple[str, str] | None:
    """``dir/cat_001.seg.png`` → (``dir/cat_001``, ``seg.png``); None for names without an extension."""
    m = _NAME.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def is_image_ext(ext: str) -> bool:
    return "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def parse_label(group: dict[str, bytes]) -> tuple[str | list[str], bool] | str:
    """(label, is a class index) from .cls, .json or .txt; or the reason there is none. A ``.json`` with a
    ``labels`` list (and no ``label``) gives a multi-label sample's class names, a list (maybe empty)."""
    if "cls" in group:
        text = group["cls"].decode("utf-8", "replace").strip()
        try:
            return str(int(text)), True
        except ValueError:
            return f"bad .cls label {text[:40]!r} (expected a class index)"
    if "json" in group:
        try:
            meta = json.loads(group["json"])
            value = meta.get("label")
        except (ValueError, AttributeError):
            meta, value = {}, None
        many = meta.get("labels") if value is None else None
        if isinstance(many, list) and all(
            isinstance(x, (str, int)) and not isinstance(x, bool) for x in many
        ):
            return sorted({str(x).strip() for x in many if str(x).strip()}), False
        if isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            return str(value), True
        elif str(value).strip():
            return str(value).strip(), False
    if "txt" in group:
        text = group["txt"].decode("utf-8", "replace").strip()
        if text:
            return text, False
    return "no label (.cls, a .json 'label' field or .txt)"


class _Scan:
    """Accumulates one shard's listing: sample records and problems, grouped by key."""

    def __init__(self):
        self.samples: list[list] = []  # [key, label, member, digest, is_index]
        self.problems: list[list] = []  # [key, member, reason]
        self.key: str | None = None
        self.group: dict[str, bytes] = {}
        self.image: tuple[str, str] | None = None  # (member, digest)

    def start(self, key: str) -> None:
        if key != self.key:
            self.flush()
            self.key, self.group, self.image = key, {}, None

    def flush(self, reason: str | None = None) -> None:
        if self.key is None:
            return
        member = self.image[0] if self.image else ""
        label = parse_label(self.group)
        if reason is None and self.image is None:
            reason = (
                "no image member (" + ", ".join(sorted(self.group)) + " only)" if self.group else "no image"
            )
        if reason is None and isinstance(label, str):
            reason = label
        if reason is not None:
            self.problems.append([self.key, member, reason])
        else:
            self.samples.append([self.key, label[0], member, self.image[1], label[1]])
        self.key, self.group, self.image = None, {}, None


def scan_shard(url: str, storage_options: dict | None = None) -> dict:
    """One streaming pass over a shard: ``{"samples": [...], "problems": [...]}`` (digests, no bytes kept)."""
    scan = _Scan()
    members = 0
    try:
        with open_file(url, storage_options) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for ti in tar:
                parts = split_name(ti.name) if ti.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                scan.start(key)
                members += 1
                if is_image_ext(ext) and scan.image is None:
                    scan.image = (ti.name, digest_bytes(tar.extractfile(ti).read()))
                elif ext in LABEL_EXTENSIONS:
                    scan.group[ext] = tar.extractfile(ti).read(1 << 20)
                else:
                    scan.group.setdefault(ext, b"")
        scan.flush()
        if members == 0:
            scan.problems.append(["", "", "empty tar shard (no members)"])
    except (tarfile.TarError, EOFError, OSError) as e:
        reason = _tar_reason(e, members)
        if scan.key is not None:
            scan.flush(reason)
        scan.problems.append(["", "", reason])
    return {"samples": scan.samples, "problems": scan.problems}


def _tar_reason(e: BaseException, members: int) -> str:
    if isinstance(e, (tarfile.TarError, EOFError)):
        if members == 0:
            return f"not a readable tar file ({e})"
        return f"truncated or corrupt tar after {members} members ({e}); the rest of the shard is unreadable"
    return storage_reason(e)


class _Cursor:
    """A forward-only reader over one shard, shared by the threads that decode its images."""

    def __init__(self, url: str, storage_options: dict | None):
        self.url, self.options = url, storage_options
        self.lock = threading.Lock()
        self.file = self.tar = self.members = None
        self.buffer: OrderedDict[str, bytes] = OrderedDict()
        self.held = 0  # bytes in ``buffer``

    def close(self) -> None:
        for handle in (self.tar, self.file):
            if handle is not None:
                try:
                    handle.close()
                except Exception:  # noqa: BLE001, S110 - closing a broken stream
                    pass
        self.file = self.tar = self.members = None

    def read(self, member: str) -> bytes:
        with self.lock:
            if member in self.buffer:  # passed over, or served just before (augmented views ask again)
                self.buffer.move_to_end(member)
                return self.buffer[member]
            for _ in range(2):  # forward from here; if it is behind us, once more from the start
                found = self._advance_to(member)
                if found is not None:
                    return found
                self.close()
            raise DecodeError(f"member {member} not found in {self.url}")

    def _keep(self, name: str, data: bytes) -> None:
        self.buffer[name] = data
        self.held += len(data)
        while len(self.buffer) > 1 and (len(self.buffer) > BUFFER or self.held > BUFFER_BYTES):
            self.held -= len(self.buffer.popitem(last=False)[1])

    def _advance_to(self, member: str) -> bytes | None:
        try:
            if self.members is None:
                self.file = open_file(self.url, self.options)
                self.tar = tarfile.open(fileobj=self.file, mode="r|*")
                self.members = iter(self.tar)
            for ti in self.members:
                parts = split_name(ti.name) if ti.isfile() else None
                if parts is None or not is_image_ext(parts[1]):
                    continue
                data = self.tar.extractfile(ti).read()
                self._keep(ti.name, data)
                if ti.name == member:
                    return data
        except (tarfile.TarError, EOFError) as e:
            self.close()
            raise DecodeError(f"truncated or corrupt tar shard ({e})") from None
        except OSError as e:
            self.close()
            raise OSError(storage_reason(e)) from None
        return None


_CURSORS: OrderedDict[tuple[str, str], _Cursor] = OrderedDict()
_LOCK = threading.Lock()


def read_member(url: str, member: str, storage_options: dict | None = None) -> bytes:
    """The bytes of ``member`` of shard ``url``; consecutive calls in shard order stream it once."""
    key = (url, json.dumps(storage_options or {}, sort_keys=True, default=str))
    with _LOCK:
        cursor = _CURSORS.get(key)
        if cursor is None:
            cursor = _CURSORS[key] = _Cursor(url, storage_options)
            while len(_CURSORS) > OPEN_SHARDS:
                _, old = _CURSORS.popitem(last=False)
                with old.lock:
                    old.close()
        else:
            _CURSORS.move_to_end(key)
    return cursor.read(member)


def close_readers() -> None:
    with _LOCK:
        while _CURSORS:
            _, cursor = _CURSORS.popitem()
            with cursor.lock:
                cursor.close()
                cursor.buffer.clear()
                cursor.held = 0


def _forget_after_fork() -> None:
    """A forked worker must not share its parent's open streams: start with none."""
    global _LOCK
    _LOCK = threading.Lock()
    _CURSORS.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
