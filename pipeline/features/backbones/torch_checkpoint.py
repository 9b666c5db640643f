"""Read a PyTorch ``state_dict`` checkpoint (``.pth``) into numpy arrays, without torch.

Why: the pretrained EfficientNet-Lite0 weights ship only as a PyTorch checkpoint, and torch is
a ~1 GB dependency we do not want at runtime just to read ~18 MB of float32 tensors.

Why a restricted unpickler: a ``.pth`` file is a pickle, and an ordinary ``pickle.load`` of an
untrusted file can call any importable function (``os.system`` ...). Here ``find_class`` resolves
only the handful of globals a plain state_dict needs, to local stand-ins that build numpy arrays,
and refuses everything else with :class:`pickle.UnpicklingError` before anything is called.

Both container formats are read:

* the zip format (torch >= 1.6): ``<prefix>/data.pkl`` plus one ``<prefix>/data/<key>`` entry of
  raw little-endian bytes per storage;
* the legacy format (torch < 1.6, and what the EfficientNet-Lite0 package ships): a stream of
  pickles (magic number, protocol version, system info, the object, the storage keys) followed
  by each storage's raw bytes, each prefixed with its element count as an int64.

The very old (torch < 0.1.10) tar format is recognised and refused with a clear message.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Written first in a legacy-format file (torch.serialization.MAGIC_NUMBER).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


_LEGACY_PROTOCOL = 1001


# torch.<Name>Storage -> numpy dtype. bfloat16 has no numpy dtype: it is read as uint16 bit
# patterns and widened to float32 (exact), see _widen_bfloat16.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "DoubleStorage": np.dtype("<f8"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: all a state_dict needs from it is the dtype."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """A reference to a (slice of a) storage; the bytes are attached once they are read."""

    key: str
    stype: _StorageType
    numel: int
    offset: int = 0  # elements into the root storage (legacy storage views)


@dataclass(frozen=True, slots=True)
class _PendingTensor:
    """What ``_rebuild_tensor_v2`` returns: materialised after all storages are available."""

    storage: _StorageRef
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest
):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, reads nothing."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("checkpoint tensor does not refer to a storage")
    try:
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
        storage_offset = int(storage_offset)
    except (TypeError, ValueError) as exc:
        raise pickle.UnpicklingError(f"malformed tensor metadata in checkpoint: {exc}") from None
    if len(size) != len(stride):
        raise pickle.UnpicklingError("tensor size and stride have different lengths in checkpoint")
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    """Stand-in for ``torch._utils._rebuild_parameter``: a Parameter is just its data here."""
    return data


_ALLOWED_FUNCTIONS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _SafeCall:
    """A fresh, immutable wrapper per resolved global.

    Why: pickle's BUILD opcode can set attributes on any object the stream holds, including the
    callables ``find_class`` returned; wrapping them means a crafted file cannot, say, rewrite
    ``__defaults__`` of this module's functions for later loads.
    """

    __slots__ = ("_fn",)

    def __init__(self, fn):
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError("checkpoint tried to modify a loader object")

    def __call__(self, *args):
        return self._fn(*args)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only state_dict globals, to harmless local stand-ins."""

    def __init__(self, file, storages: dict[str, _StorageRef]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED_FUNCTIONS.get((module, name))
        if allowed is not None:
            return _SafeCall(allowed)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name!s} from a checkpoint: only plain state_dict "
            "contents (OrderedDict, tensors, storages) are allowed"
        )

    def persistent_load(self, pid):
        # Zip format: ('storage', type, key, location, numel)
        # Legacy format: ('storage', type, root_key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id in checkpoint: {pid!r:.80}")
        stype, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(stype, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage reference in checkpoint: {pid!r:.80}")
        root = self._storages.setdefault(key, _StorageRef(key, stype, numel))
        if root.stype != stype or root.numel != numel:
            raise pickle.UnpicklingError(f"storage {key!r} is declared twice with different types/sizes")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return root
        # Legacy storage view: (view_key, offset, view_size) into the root storage.
        try:
            _view_key, offset, view_size = view
            offset, view_size = int(offset), int(view_size)
        except (TypeError, ValueError):
            raise pickle.UnpicklingError(f"malformed storage view in checkpoint: {view!r:.80}") from None
        if offset < 0 or view_size < 0 or offset + view_size > numel:
            raise pickle.UnpicklingError(f"storage view out of bounds in checkpoint: {view!r:.80}")
        return _StorageRef(key, stype, view_size, offset)


def _widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so shifting the bits up is an exact conversion."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _materialise(t: _PendingTensor, data: dict[str, np.ndarray]) -> np.ndarray:
    """Apply the tensor's offset/size/stride to its storage: a bounds-checked as_strided + copy."""
    flat = data[t.storage.key]
    start = t.storage.offset + t.storage_offset
    if any(s < 0 for s in t.size) or any(s < 0 for s in t.stride) or start < 0:
        raise pickle.UnpicklingError("negative size, stride or offset in checkpoint tensor")
    # Check that every element the view touches lies inside the storage slice, since as_strided
    # itself would happily read out-of-bounds memory from a malformed file.
    if 0 not in t.size:
        last = start + sum((n - 1) * s for n, s in zip(t.size, t.stride, strict=True))
        if last >= t.storage.offset + t.storage.numel or last >= flat.size:
            raise pickle.UnpicklingError(f"tensor view exceeds its storage {t.storage.key!r} in checkpoint")
        item = flat.itemsize
        arr = np.lib.stride_tricks.as_strided(
            flat[start:], shape=t.size, strides=[s * item for s in t.stride], writeable=False
        )
    else:
        arr = np.empty(t.size, dtype=flat.dtype)
    arr = np.array(arr, dtype=flat.dtype.newbyteorder("="), order="C", copy=True)
    if t.storage.stype.name == "BFloat16Storage":
        arr = _widen_bfloat16(arr)
    return arr


def _resolve(obj, data: dict[str, np.ndarray]):
    """Replace every pending tensor in the loaded object (dicts/lists/tuples) by a numpy array."""
    if isinstance(obj, _PendingTensor):
        return _materialise(obj, data)
    if isinstance(obj, dict):
        return {k: _resolve(v, data) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, data) for v in obj)
    return obj


def _flatten_state_dict(obj, path: Path) -> dict[str, np.ndarray]:
    """Return ``{name: array}``; accepts a bare state_dict or the common ``{'state_dict': ...}`` wrapper."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"{path} does not contain a state_dict (got {type(obj).__name__})")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            out[str(k)] = v
    return out


def _load_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pkl) != 1:
            raise pickle.UnpicklingError(f"{path}: expected exactly one data.pkl in the zip checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        big_endian = False
        if f"{prefix}byteorder" in names:
            big_endian = zf.read(f"{prefix}byteorder").strip() == b"big"
        storages: dict[str, _StorageRef] = {}
        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), storages).load()
        data: dict[str, np.ndarray] = {}
        for key, ref in storages.items():
            try:
                raw = zf.read(f"{prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(
                    f"{path}: storage {key!r} missing from the zip checkpoint"
                ) from None
            dtype = ref.stype.dtype.newbyteorder(">") if big_endian else ref.stype.dtype
            need = ref.numel * dtype.itemsize
            if len(raw) < need:
                raise pickle.UnpicklingError(f"{path}: storage {key!r} is truncated")
            data[key] = np.frombuffer(raw, dtype=dtype, count=ref.numel)
    return _flatten_state_dict(_resolve(obj, data), path)


def _load_legacy(path: Path) -> dict[str, np.ndarray]:
    buf = path.read_bytes()
    f = io.BytesIO(buf)
    storages: dict[str, _StorageRef] = {}

    def next_pickle():
        return _RestrictedUnpickler(f, storages).load()

    try:
        magic = next_pickle()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise pickle.UnpicklingError(f"{path} is not a PyTorch checkpoint: {exc}") from None
    if magic != _LEGACY_MAGIC:
        raise pickle.UnpicklingError(f"{path} is not a PyTorch checkpoint (bad magic number)")
    protocol = next_pickle()
    if protocol != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError(f"{path}: unsupported legacy protocol version {protocol!r}")
    sys_info = next_pickle()
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    obj = next_pickle()
    keys = next_pickle()
    if not isinstance(keys, list):
        raise pickle.UnpicklingError(f"{path}: malformed storage key list")
    pos = f.tell()
    data: dict[str, np.ndarray] = {}
    for key in keys:
        ref = storages.get(str(key))
        if ref is None:
            raise pickle.UnpicklingError(f"{path}: storage {key!r} listed but never referenced")
        if pos + 8 > len(buf):
            raise pickle.UnpicklingError(f"{path}: truncated before storage {key!r}")
        (numel,) = struct.unpack("<q" if little else ">q", buf[pos : pos + 8])
        dtype = ref.stype.dtype.newbyteorder("<" if little else ">")
        pos += 8
        end = pos + numel * dtype.itemsize
        if numel != ref.numel or end > len(buf):
            raise pickle.UnpicklingError(f"{path}: storage {key!r} has a bad size or is truncated")
        data[str(key)] = np.frombuffer(buf, dtype=dtype, count=numel, offset=pos)
        pos = end
    missing = set(storages) - set(data)
    if missing:
        raise pickle.UnpicklingError(f"{path}: storages {sorted(missing)[:3]} have no data")
    return _flatten_state_dict(_resolve(obj, data), path)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state_dict checkpoint into ``{name: numpy array}`` without importing torch.

    Arrays keep the checkpoint's logical (PyTorch) shapes, e.g. conv kernels are OIHW, and are
    fresh C-contiguous copies. Non-tensor entries are dropped. Raises ``pickle.UnpicklingError``
    for anything that is not a plain state_dict, including any pickle that references a global
    other than the few a state_dict needs (so loading a malicious file executes nothing).
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] != b"\x80" and tarfile.is_tarfile(path):
        raise pickle.UnpicklingError(
            f"{path} uses the pre-0.1.10 PyTorch tar format, which is not supported; re-save it with a recent torch"
        )
    return _load_legacy(path)
