"""Keep TensorFlow's native start-up chatter off the user's terminal.

TensorFlow 2.2x logs through absl before any setting is read (``TF_CPP_MIN_LOG_LEVEL`` does not stop
the "oneDNN custom operations" / "Could not find cuda drivers" lines), straight to file descriptor 2.
The CLI therefore points Python's ``sys.stderr`` at a duplicate of the real stderr, and routes fd 2,
which only native code still writes to, through a thread that drops those known lines and forwards
everything else untouched.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading

_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|[IW]\d{4} [\d:.]+\s+\d+ \S+:\d+\]"
    rb"|E\d{4} .*(cuInit|cuda|CUDA)"
    rb"|To enable the following instructions:"
    rb"|This TensorFlow binary is optimized"
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate"
    rb"|fully_quantize: )"
)


def filter_native_stderr() -> None:
    if os.environ.get("FEATCACHE_RAW_STDERR") or not hasattr(os, "dup2"):
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

    def pump() -> None:
        with io.FileIO(r, "r") as src:
            for line in io.BufferedReader(src):
                if not _NOISE.match(line):
                    os.write(real, line)

    threading.Thread(target=pump, name="featcache-stderr", daemon=True).start()
