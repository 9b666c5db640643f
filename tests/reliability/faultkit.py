"""Shared tools of the reliability suite: the fault-injection shim, real ``featcache`` subprocesses, data.

Everything here drives the real command line in real processes; nothing is mocked. The LD_PRELOAD shim
(``faultfs.c``, compiled on first use into the temp folder, once per version of the source) makes the file system fail under one
directory: disk full part-way through a write, permission denied, read-only folder, failed rename or fsync,
or a SIGKILL at an exact byte of the write stream. See the C file for its environment variables.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from pipeline.cache.store import FeatureCache

HERE = Path(__file__).resolve().parent
SEED = int(os.environ.get("FEATCACHE_RELIABILITY_SEED", "20240611"))
LIBC_ERRNO_TEXT = {
    "ENOSPC": "No space left on device",
    "EACCES": "Permission denied",
    "EROFS": "Read-only file system",
    "EIO": "Input/output error",
    "EDQUOT": "Disk quota exceeded",
}

_SHIM: Path | None = None


def shim() -> Path:
    """The compiled shim (once per test process); skips the test when there is no C compiler."""
    global _SHIM
    if _SHIM is not None and _SHIM.exists():
        return _SHIM
    if sys.platform != "linux":
        pytest.skip("the LD_PRELOAD fault shim needs Linux (glibc)")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        pytest.skip("no C compiler (cc/gcc/clang) to build the fault-injection shim")
    source = (HERE / "faultfs.c").read_bytes()
    out = Path(tempfile.gettempdir()) / f"featcache-faultfs-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not out.exists():  # one build per version of the source, shared by test processes
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        res = subprocess.run(
            [cc, "-shared", "-fPIC", "-O1", "-o", str(tmp), str(HERE / "faultfs.c"), "-ldl", "-lpthread"],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.skip(f"could not compile the fault-injection shim: {res.stderr.strip()[:300]}")
        os.replace(tmp, out)
    _SHIM = out
    return out


def fault_env(directory: Path, **settings) -> dict[str, str]:
    """Environment for a subprocess whose file writes under ``directory`` fail as ``settings`` say.

    Keys are the shim's variables without the ``FEATCACHE_FAULT_`` prefix, lower case:
    ``ops``, ``errno``, ``after_bytes``, ``after_ops``, ``match``, ``action``, ``log``.
    """
    env = {"LD_PRELOAD": str(shim()), "FEATCACHE_FAULT_DIR": str(Path(directory).resolve())}
    for k, v in settings.items():
        if v is not None:
            env["FEATCACHE_FAULT_" + k.upper()] = str(v)
    return env


def read_log(path: Path) -> dict[str, int]:
    text = Path(path).read_text().split()
    return {k: int(v) for k, v in (item.split("=") for item in text)}


# --------------------------------------------------------------------------------------------- processes


def featcache_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *map(str, args)]


def extract_args(data: Path, cache_dir: Path, *extra: str, name: str = "", batch_size: int = 0) -> list[str]:
    """``featcache extract`` arguments at 64 px, the size every reliability test uses; ``extra`` last."""
    args = ["extract", "--data", str(data), "--image-size", "64", "--cache-dir", str(cache_dir)]
    if batch_size:
        args += ["--batch-size", str(batch_size)]
    if name:
        args += ["--set", f"data.name={name}"]
    return args + list(extra)


def run(*args, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """``featcache ARGS`` as a real subprocess."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(
        featcache_cmd(*args), cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def start(
    *args, env: dict | None = None, cwd: Path | None = None, stderr=subprocess.PIPE
) -> subprocess.Popen:
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.Popen(
        featcache_cmd(*args),
        cwd=cwd or REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def wait_stopped(proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until ``proc`` froze itself (the shim's ACTION=stop); fails if it ended instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before reaching its stop point")
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError("the process never reached its stop point")


def resume(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGCONT)


def kill9_after(proc: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL ``proc`` ``seconds`` after now; False if it had already finished by then."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return True


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, containing every needle."""
    err = res.stderr.strip()
    assert res.returncode == 2, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


# --------------------------------------------------------------------------------------------- files


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(directory: Path) -> list[str]:
    """Temporary files a write could leave behind (``*.tmp*``), anywhere under ``directory``."""
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*") if ".tmp" in p.name)


def the_cache(directory: Path) -> Path:
    (path,) = Path(directory).glob("*.h5")
    return path


def digits_npz(path: Path, n: int | None = None) -> Path:
    """scikit-learn's 1797 real 8×8 digit scans as an ``.npz`` source (the first ``n`` of them)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * 16).clip(0, 255).astype(np.uint8)
    labels = d.target
    if n is not None:
        images, labels = images[:n], labels[:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels, class_names=np.array([str(i) for i in range(10)]))
    return path


def cache_content(path: Path) -> dict:
    with FeatureCache(path) as c:
        return {
            "keys": list(c.keys),
            "ids": list(c.ids),
            "labels": np.asarray(c.labels),
            "split": np.asarray(c.split),
            "class_names": list(c.class_names),
            "layers": list(c.layers),
            "features": {layer: c.features(layer) for layer in c.layers},
            "fingerprint": c.fingerprint,
        }


def assert_same_cache(a: Path | dict, b: Path | dict, atol: float = 1e-5, ordered: bool = True) -> None:
    """Same rows in the same order (any order, ``ordered=False``), same labels, splits and classes, features
    equal within ``atol``."""
    a = a if isinstance(a, dict) else cache_content(a)
    b = b if isinstance(b, dict) else cache_content(b)
    if not ordered:
        a, b = _by_key(a), _by_key(b)
    assert len(set(a["keys"])) == len(a["keys"]), "a key is duplicated"
    assert a["keys"] == b["keys"], "rows differ"
    assert a["ids"] == b["ids"]
    assert a["class_names"] == b["class_names"] and a["layers"] == b["layers"]
    assert a["fingerprint"] == b["fingerprint"]
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["split"], b["split"])
    for layer in a["layers"]:
        np.testing.assert_allclose(a["features"][layer], b["features"][layer], atol=atol, rtol=0)


def _by_key(c: dict) -> dict:
    """``c`` with its rows sorted by key."""
    order = np.argsort(np.asarray(c["keys"]), kind="stable")
    out = dict(c, features={k: v[order] for k, v in c["features"].items()})
    for name in ("keys", "ids"):
        out[name] = [c[name][i] for i in order]
    for name in ("labels", "split"):
        out[name] = np.asarray(c[name])[order]
    return out


def rng(*salt) -> random.Random:
    return random.Random(f"{SEED}:{':'.join(map(str, salt))}")
