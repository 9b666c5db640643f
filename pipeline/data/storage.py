"""fsspec helpers every source shares: URLs, brace ranges and globs, signatures, clear errors, the shard index.

fsspec (and, behind it, s3fs, gcsfs, adlfs, aiohttp) does every byte of I/O; this module only turns a
``--data`` string into files, and failures into one readable line. Credentials come from where each
back-end looks for them (environment, profiles, instance metadata) plus ``[data] storage_options``.

The *shard index* remembers, per shard (a tar, a Parquet file, a remote image), the samples it held and
their content digests under the shard's signature (size + ETag/mtime). A rerun whose shard still has the
same signature gets its samples back without reading a byte of it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pipeline.utils.config import redact_options
from pipeline.utils.errors import FeatcacheError

#: scheme → (extra, package) for the install hint when a back-end is missing.
BACKENDS = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"),
    "abfs": ("azure", "adlfs"),
    "abfss": ("azure", "adlfs"),
    "adl": ("azure", "adlfs"),
    "http": ("http", "aiohttp"),
    "https": ("http", "aiohttp"),
}

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
#: info() fields that change whenever an object's content does, most specific first.
_VERSION_FIELDS = (
    "ETag",
    "etag",
    "md5Hash",
    "generation",
    "version_id",
    "mtime",
    "LastModified",
    "last_modified",
)


def digest_bytes(data: bytes) -> str:
    """A sample's identity: the hash of its bytes, wherever they were read from."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def is_url(src: str | None) -> bool:
    return bool(src) and bool(_SCHEME.match(src))


def scheme(src: str) -> str:
    m = _SCHEME.match(src)
    return m.group(1).lower() if m else "file"


def filesystem(url: str, storage_options: dict | None = None):
    """``(fs, path)`` for a URL or a local path; a missing back-end names the extra that installs it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError:
        extra, pkg = BACKENDS.get(scheme(url), (None, None))
        hint = f"pip install 'featcache[{extra}]' (or {pkg})" if extra else "install its fsspec back-end"
        raise FeatcacheError(f"{url}: no fsspec back-end for {scheme(url)}:// installed; {hint}") from None
    except ValueError as e:  # unknown protocol
        raise FeatcacheError(f"{url}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a back-end refusing its options is a user error
        raise storage_error(url, e) from None


def storage_error(url: str, e: BaseException) -> FeatcacheError:
    """One line for why ``url`` cannot be used: not found, denied, no credentials, unreachable."""
    return FeatcacheError(f"{url}: {storage_reason(e)}")


def storage_reason(e: BaseException) -> str:
    name = type(e).__name__
    text = str(e).strip() or name
    if isinstance(e, FileNotFoundError):
        return "not found"
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError") or (
        "credential" in text.lower() and "invalid" not in text.lower()
    ):
        return f"missing credentials ({text.splitlines()[0]}); set them in the environment or [data] storage_options"
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text or "403" in text:
        return f"access denied ({text.splitlines()[0]}); check the credentials"
    if name in (
        "EndpointConnectionError",
        "ClientConnectorError",
        "ConnectTimeoutError",
        "ConnectionError",
    ) or (isinstance(e, OSError) and ("connect" in text.lower() or "resolve" in text.lower())):
        return f"unreachable ({text.splitlines()[0]})"
    return f"cannot read ({name}: {text.splitlines()[0]})"


def join_url(fs, path: str) -> str:
    """A full URL for ``path`` on ``fs`` (local paths stay plain paths)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def expand_braces(pattern: str) -> list[str]:
    """``train-{0000..0099}.tar`` → 100 names (zero padding kept); several ranges multiply."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    step = 1 if int(hi) >= int(lo) else -1
    out = []
    for i in range(int(lo), int(hi) + step, step):
        out += expand_braces(pattern[: m.start()] + f"{i:0{width}d}" + pattern[m.end() :])
    return out


def has_magic(path: str) -> bool:
    return any(c in path for c in "*?[") or bool(_BRACE.search(path))


def expand(src: str, storage_options: dict | None = None) -> tuple[Any, list[str]]:
    """``(fs, paths)``: the files a path, brace range or glob names, sorted; an empty match is an error."""
    fs, paths = None, []
    for pattern in expand_braces(src):
        fs, path = filesystem(pattern, storage_options)
        if not is_url(pattern):
            path = str(Path(path).expanduser())
        try:
            if any(c in path for c in "*?["):
                paths += sorted(fs.glob(path))
            else:
                fs.info(path)  # not exists(): some back-ends answer False for a connection error
                paths.append(path)
        except FileNotFoundError as e:
            cause = e.__cause__  # fsspec's HTTP back-end reports a refused connection as "not found"
            if cause is not None and not isinstance(cause, FileNotFoundError):
                raise storage_error(pattern, cause) from None
            raise FeatcacheError(f"data source not found: {pattern}") from None
        except Exception as e:  # noqa: BLE001 - listing failures (credentials, network) are the user's to fix
            raise storage_error(pattern, e) from None
    if not paths:
        raise FeatcacheError(f"data source {src}: no files match")
    return fs, paths


def signature(fs, path: str, info: dict | None = None) -> str | None:
    """Size plus the first version field the store reports; None when it reports nothing usable."""
    try:
        info = info or fs.info(path)
    except Exception:  # noqa: BLE001 - no signature just means "read it again"
        return None
    version = next((info[k] for k in _VERSION_FIELDS if info.get(k) not in (None, "")), None)
    if version is None or info.get("size") is None:
        return None
    return f"{info['size']}:{version}"


def open_file(url: str, storage_options: dict | None = None, block_size: int = 4 << 20):
    """A binary file object for streaming ``url`` (local paths open directly)."""
    if not is_url(url):
        return open(url, "rb")
    fs, path = filesystem(url, storage_options)
    return fs.open(path, "rb", block_size=block_size)


def read_url(url: str, storage_options: dict | None = None) -> bytes:
    """The whole object at ``url``; OSError (with a readable reason) for anything that stops it."""
    try:
        fs, path = filesystem(url, storage_options)
        return fs.cat_file(path)
    except FeatcacheError as e:
        raise OSError(str(e)) from None
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - becomes a quarantine reason
        raise OSError(storage_reason(e)) from None


class ShardIndex:
    """Samples and digests per shard URL and signature, as small JSON files in ``folder`` (None: in memory)."""

    def __init__(self, folder: str | Path | None, storage_options: dict | None = None):
        self.folder = Path(folder) if folder else None
        # the same URL on another endpoint is another object
        self.scope = json.dumps(redact_options(storage_options or {}), sort_keys=True, default=str)

    def _file(self, url: str) -> Path | None:
        if self.folder is None:
            return None
        name = hashlib.blake2b(f"{url}\n{self.scope}".encode(), digest_size=12).hexdigest()
        return self.folder / (name + ".json")

    def get(self, url: str, sig: str | None) -> dict | None:
        f = self._file(url)
        if sig is None or f is None or not f.is_file():
            return None
        try:
            entry = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if entry.get("url") != url or entry.get("signature") != sig:
            return None
        return entry

    def put(self, url: str, sig: str | None, entry: dict) -> None:
        f = self._file(url)
        if sig is None or f is None:
            return
        from pipeline.utils.io import write_json

        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            write_json(f, {"url": url, "signature": sig, **entry}, indent=None)
        except OSError:
            pass  # the index only saves time; a read-only cache folder just means reading again
