"""``model(x, training=False)`` as one traced TensorFlow function per Keras model, whatever the batch sizes.

Tracing a backbone costs seconds, so each model is traced once: its function takes any batch size (the
input signature leaves the batch dimension open, so a short last batch or a halved GPU batch does not
trace again). Each model's function is its own for TensorFlow's frequent-retracing check too (a
``functools.partial`` over the model, not one shared closure): featcache builds a function per model on
purpose (extraction engines, fine-tuning checks, export checks, ``predict``), and one trace per model is
not the retracing that check warns about.
"""

from __future__ import annotations

import functools
import weakref

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _call(ref: weakref.ref, x):
    m = ref()
    if m is None:  # a caller dropped its model and kept the function: a bug, said plainly
        raise RuntimeError("the Keras model was freed: hold it (KerasRunner) while running it")
    return m(x, training=False)


def compiled(model):
    """The traced ``model(x, training=False)`` of ``model``, made once and cached for the model's lifetime.

    The cache keeps only a weak reference (it must not keep models alive): whoever runs a model holds it.
    Inputs are cast to the model's input dtype (numpy batches of any float or integer type).
    """
    run = _COMPILED.get(model)
    if run is None:
        import tensorflow as tf

        fn = functools.partial(_call, weakref.ref(model))
        inputs = getattr(model, "inputs", None) or []
        if len(inputs) == 1 and inputs[0].shape is not None:
            dtype = tf.as_dtype(inputs[0].dtype)
            spec = tf.TensorSpec([None, *inputs[0].shape[1:]], dtype)
            traced = tf.function(fn, input_signature=[spec])

            def run(x):
                return traced(tf.cast(x, dtype))
        else:  # several inputs, or a model never built: TensorFlow relaxes shapes after a second trace
            run = tf.function(fn, reduce_retracing=True)
        _COMPILED[model] = run
    return run
