"""Run a hot loop without the cyclic garbage collector re-scanning everything that was alive before it."""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def frozen_gc():
    """Everything alive on entry (TensorFlow, Keras, the model) is permanent for the loop's duration.

    A batch loop allocates many short-lived objects, and each collection otherwise re-scans TensorFlow's and
    Keras' whole object graph: measured ~6 % of extraction's CPU.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
