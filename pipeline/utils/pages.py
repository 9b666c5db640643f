"""How a featcache process takes fresh memory from the OS: base pages, not numpy's huge pages.

numpy asks the kernel for transparent huge pages on every large array (``madvise(MADV_HUGEPAGE)``). On
some virtual machines (the 2-core VM this project is measured on, whose host backs guest memory lazily) a
fresh 2 MB page costs far more than 512 small ones: filling a new 1M × 1280 float32 array took 6.6–11.9 s
with huge pages and 2.35 s without (0.9 s either way once its pages exist), and ``train`` read its 1M
cached rows in 18–20 s against 6.4–6.8 s. Where huge pages are cheap, base pages cost little: the arrays
are streamed through, not walked at random.
"""

from __future__ import annotations

import os


def base_pages() -> None:
    """Fresh numpy arrays on base pages in this process and the workers it starts (they inherit the
    environment), unless ``NUMPY_MADVISE_HUGEPAGE`` is set already. Takes effect before numpy's import."""
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
