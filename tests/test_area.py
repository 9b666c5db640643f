"""The compiled area resize gives TensorFlow's pixels bit for bit, or declines (None) and leaves it to TensorFlow."""

from __future__ import annotations

import collections
import threading

import numpy as np
import pytest

from pipeline.data.area import available, resize_array, shrink
from pipeline.data.preprocess import resize_images


def test_the_compiled_kernel_is_installed():
    assert available()  # numba is a declared dependency: without it every test below would only see None


def _shapes():
    rng = np.random.default_rng(7)
    fixed = [(375, 500), (500, 375), (224, 224), (225, 224), (448, 448), (1000, 1), (300, 229), (7, 5)]
    return fixed + [tuple(int(v) for v in rng.integers(224, 1300, 2)) for _ in range(25)]


@pytest.mark.parametrize("shape", _shapes())
def test_shrink_is_tensorflow_area_bit_for_bit(shape):
    import tensorflow as tf

    rng = np.random.default_rng(shape[0] * 7919 + shape[1])
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    for out in [(224, 224), (min(shape[0], 131), min(shape[1], 97)), (1, 1)]:
        if out[0] > shape[0] or out[1] > shape[1]:
            continue
        want = tf.image.resize(image[None], out, method="area")[0].numpy()
        got = shrink(image, *out)
        assert got.dtype == np.float32 and np.array_equal(got, want), (shape, out)


@pytest.mark.parametrize("policy", ["stretch", "crop", "pad"])
@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (3024, 4032), (224, 300), (230, 1500), (224, 224)])
def test_every_policy_matches_the_shared_resize(policy, shape):
    image = np.random.default_rng(3).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = resize_array(image, 224, policy)
    assert got is not None
    assert np.array_equal(got, resize_images(image, 224, policy).numpy())


@pytest.mark.parametrize("policy", ["stretch", "crop", "pad"])
@pytest.mark.parametrize("shape", [(28, 28), (100, 400), (223, 1000)])
def test_enlarging_is_left_to_tensorflow(policy, shape):
    image = np.zeros((*shape, 3), np.uint8)
    if policy == "pad" and max(shape) >= 224:
        assert np.array_equal(resize_array(image, 224, policy), resize_images(image, 224, policy).numpy())
    else:
        assert resize_array(image, 224, policy) is None


def test_views_and_rotated_photos_read_the_displayed_pixels():
    import tensorflow as tf

    image = np.random.default_rng(5).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    view = np.rot90(image)  # not C-contiguous: what EXIF rotation or an array dataset can hand over
    want = tf.image.resize(np.ascontiguousarray(view)[None], (224, 224), method="area")[0].numpy()
    assert np.array_equal(shrink(view, 224, 224), want)


def _folder(root):
    """Real files of every kind the pooled pipeline meets: photos to shrink (one EXIF-rotated, one PNG), one
    small enough to be enlarged (TensorFlow's branch), and a corrupt file."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0])  # 640×427
    for c in "ab":
        (root / c).mkdir(parents=True)
    photo.save(root / "a" / "0.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.resize((500, 375)).save(root / "a" / "1.jpg", quality=90, exif=exif.tobytes())
    photo.resize((300, 260)).save(root / "a" / "2.png")
    photo.resize((40, 30)).save(root / "b" / "3.jpg", quality=90)
    (root / "b" / "4.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    photo.crop((0, 0, 427, 427)).save(root / "b" / "5.jpg", quality=90)
    return root


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("policy", ["stretch", "crop", "pad"])
def test_pooled_batches_are_the_tf_data_batches(tmp_path, policy, threads):
    """On a pool, or inline for one thread (a single-threaded cluster worker): tf.data's batches exactly."""
    from pipeline.data.images import make_image_dataset, numpy_batches
    from pipeline.data.sources import load_dataset
    from pipeline.utils.config import DataConfig

    ds = load_dataset(DataConfig(source=str(_folder(tmp_path / "img"))))
    want = [
        [np.asarray(t) for t in b] for b in make_image_dataset(ds, ds.samples, 64, policy, 4, decode="dct")
    ]
    read, readers, reads = ds.read, set(), collections.Counter()

    def spy(sample):
        readers.add(threading.current_thread().name.split("_")[0])
        reads[sample.key] += 1
        return read(sample)

    ds.read = spy
    got = list(numpy_batches(ds, ds.samples, 64, policy, 4, decode="dct", threads=threads))
    # the pooled path ran, not tf.data again: on the pool's threads, or only in this one
    here = threading.current_thread().name
    assert readers == ({here, "featcache-decode"} if threads > 1 else {here})
    assert set(reads.values()) == {1}  # the first image, read to choose the path, is not read again
    assert len(got) == len(want) == 2
    for (gi, gx, gok, gwhy), (wi, wx, wok, wwhy) in zip(got, want, strict=True):
        assert np.array_equal(gi, wi) and np.array_equal(gok, wok) and list(gwhy) == list(wwhy)
        assert gx.dtype == np.float32 and np.array_equal(gx[gok], wx[wok])
    bad = [i for i, s in enumerate(ds.samples) if s.key.endswith("4.jpg")][0]
    assert not got[bad // 4][2][bad % 4] and got[bad // 4][3][bad % 4]  # the corrupt file: a reason, no row
