"""Keep TensorFlow's native start-up chatter and known third-party import warnings off the user's terminal.

TensorFlow 2.2x logs through absl before any setting is read (``TF_CPP_MIN_LOG_LEVEL`` does not stop
the "oneDNN custom operations" / "Could not find cuda drivers" lines, and level 2 keeps the "failed call to
cuInit" error), straight to file descriptor 2. Two scopes:

- the CLI owns its process: :func:`filter_native_stderr` points Python's ``sys.stderr`` at a duplicate of the
  real stderr and routes fd 2, which only native code still writes to, through a thread that drops those
  known lines and forwards everything else untouched;
- the Python API does not own fd 2, so ``import pipeline`` calls :func:`quiet_api`: TensorFlow's import and
  its first GPU probe (where those lines are written) run with fd 2 filtered the same way, and fd 2 is
  given back as soon as they finish. A TensorFlow imported before ``pipeline`` is left alone.

``FEATCACHE_RAW_STDERR=1`` turns both off; a ``TF_CPP_MIN_LOG_LEVEL`` the user set is kept.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import io
import os
import re
import sys
import threading
import warnings

_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|[IW]\d{4} [\d:.]+\s+\d+ \S+:\d+\]"
    rb"|E\d{4} .*(cuInit|cuda|CUDA)"
    rb"|To enable the following instructions:"
    rb"|This TensorFlow binary is optimized"
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate"
    rb"|fully_quantize: )"
)


def _raw() -> bool:
    return bool(os.environ.get("FEATCACHE_RAW_STDERR")) or not hasattr(os, "dup2")


def _pump(r: int, out: int) -> None:
    """Copy lines from pipe ``r`` to fd ``out``, dropping :data:`_NOISE`, until the pipe's writers close."""
    with io.FileIO(r, "r") as src:
        for line in io.BufferedReader(src):
            if not _NOISE.match(line):
                os.write(out, line)


def filter_native_stderr() -> None:
    if _raw():
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        r, w = os.pipe()
    except (OSError, ValueError):
        return
    sys.stderr = io.TextIOWrapper(
        io.FileIO(real, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
    )
    os.dup2(w, 2)
    os.close(w)
    threading.Thread(target=_pump, args=(r, real), name="featcache-stderr", daemon=True).start()


@contextlib.contextmanager
def native_noise_dropped():
    """fd 2 through :data:`_NOISE`'s filter for the duration of the block, then given back as it was."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        r, w = os.pipe()
    except (OSError, ValueError):
        yield
        return
    os.dup2(w, 2)
    os.close(w)
    pump = threading.Thread(target=_pump, args=(r, saved), name="featcache-tf-start", daemon=True)
    pump.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the pump forwards what is left and ends
        pump.join(timeout=5)
        os.close(saved)


class _QuietStart(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``tensorflow`` once, as the other finders would, and executes it inside
    :func:`native_noise_dropped` together with the first GPU probe (the "failed call to cuInit" line)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once: every later import is TensorFlow's own business
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self.loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader  # as if this finder never was
        with native_noise_dropped():
            self.loader.exec_module(module)
            with contextlib.suppress(Exception):  # a broken CUDA set-up speaks again where a GPU is used
                module.config.list_physical_devices("GPU")


def quiet_api() -> None:
    """What ``import pipeline`` sets up: native start-up lines of TensorFlow dropped when featcache imports
    it first, TensorFlow's C++ info/warning logs off unless the user chose a level, and urllib3's SOCKS
    ``DependencyWarning`` (TensorFlow's import reaches ``urllib3.contrib.socks`` through ``requests``;
    with a SOCKS proxy configured and no PySocks it is noise: featcache makes no HTTP request) ignored."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message="SOCKS support in urllib3", module=r"urllib3\.contrib\.socks")
    if _raw() or "tensorflow" in sys.modules or any(isinstance(f, _QuietStart) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietStart())
