"""The GPU, when TensorFlow sees one: whether extraction runs there, and how many images it gives it at once.

On a GPU, ``auto`` (and ``tensorflow``) run the compiled Keras model there, with no TFLite conversion: TFLite
runs on the CPU. Everything that decides this goes through :func:`visible_gpus`, so a machine without a GPU
(or with ``CUDA_VISIBLE_DEVICES=""``, or TensorFlow without CUDA) takes exactly the CPU path, and tests can
inject a device list.

The speed of this path is **unmeasured** here (the development machines have no GPU); the batch size is a
documented default, not a measurement.
"""

from __future__ import annotations

#: Pixels per GPU batch when ``extract.batch_size`` is not set: 128 images at 224 px, 64 at 240–300 px,
#: 32 at 331–384 px, 16 at 456–600 px (rounded down to a power of two). Inference keeps about one layer's activations alive at a time, so this
#: fits a 16 GiB GPU for every registered backbone; a batch that does not fit is halved
#: (:class:`pipeline.features.engines.TensorFlowEngine`).
GPU_BATCH_PIXELS = 128 * 224 * 224

#: Images per GPU batch at most, and at least.
GPU_BATCH_RANGE = (8, 256)

#: Engines that run TensorFlow, and so the GPU when there is one (TFLite engines stay on the CPU).
GPU_ENGINES = ("auto", "tensorflow")


def visible_gpus() -> list[str]:
    """The GPUs TensorFlow can use in this process ([] on a CPU build or with ``CUDA_VISIBLE_DEVICES=""``).

    Each gets memory growth, so several processes (Dask workers) can share one GPU instead of the first
    taking all of its memory.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):
            pass  # already initialized in this process: keep what it has
    return [gpu.name for gpu in gpus]


def runs_on_gpu(engine: str) -> bool:
    """Whether extraction with ``engine`` runs on a GPU in this process."""
    return engine in GPU_ENGINES and bool(visible_gpus())


def gpu_batch_size(image_size: int) -> int:
    """Images per GPU batch at ``image_size`` px (see :data:`GPU_BATCH_PIXELS`): a power of two."""
    low, high = GPU_BATCH_RANGE
    n = max(low, min(high, GPU_BATCH_PIXELS // max(1, image_size * image_size)))
    return 1 << (n.bit_length() - 1)


def extraction_batch_size(engine: str, image_size: int, batch_size: int, given: bool) -> int:
    """The batch extraction reads: ``extract.batch_size`` when the user set it or the CPU runs the backbone,
    else :func:`gpu_batch_size`."""
    if given or not runs_on_gpu(engine):
        return batch_size
    return gpu_batch_size(image_size)


def gpu_name() -> str:
    """The first visible GPU's model name as its driver reports it (``NVIDIA H100 80GB HBM3``): the one
    TensorFlow places the backbone on; its TensorFlow name when the driver says nothing; "" without a GPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return ""
    try:
        details = tf.config.experimental.get_device_details(gpus[0])
    except (RuntimeError, ValueError):
        details = {}
    return str(details.get("device_name") or gpus[0].name)


def engine_device(engine) -> str:
    """Where ``engine`` runs the backbone: the GPU's name for TensorFlow on a GPU, else ``CPU`` (TFLite
    engines always run on the CPU)."""
    return (gpu_name() or "GPU") if getattr(engine, "gpu", False) else "CPU"
