"""Tests for zoo.data.loader: ArrayLoader, crop_and_flip and EpochSetter."""


import hashlib

import keras
import numpy as np
import pytest

from zoo.data.loader import ArrayLoader
from zoo.data.loader import EpochSetter
from zoo.data.loader import crop_and_flip


def _images(n=50, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return x, np.arange(n, dtype=np.int32)


def test_loader_normalizes_like_numpy():
    x, y = _images(10)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    loader = ArrayLoader(x, y, 4, mean, std)
    assert len(loader) == 3
    xb, yb = loader[2]
    assert xb.dtype == np.float32 and yb.dtype == np.int32
    np.testing.assert_array_equal(yb, [8, 9])
    want = (x[8:10] / 255.0 - mean) / std
    np.testing.assert_allclose(xb, want, rtol=1e-5, atol=1e-5)


def test_loader_len_and_drop_remainder():
    x, y = _images(10)
    assert len(ArrayLoader(x, y, 4, 0.5, 0.25, drop_remainder=True)) == 2
    assert len(ArrayLoader(x, y, 5, 0.5, 0.25, drop_remainder=True)) == 2
    assert len(ArrayLoader(x, y, 3, 0.5, 0.25)) == 4
    with pytest.raises(IndexError):
        ArrayLoader(x, y, 4, 0.5, 0.25, drop_remainder=True)[2]
    with pytest.raises(ValueError, match="batch_size=0"):
        ArrayLoader(x, y, 0, 0.5, 0.25)
    with pytest.raises(ValueError, match="no batch"):
        ArrayLoader(x, y, 11, 0.5, 0.25, drop_remainder=True)
    with pytest.raises(ValueError, match="dtype float32"):
        ArrayLoader(x.astype(np.float32), y, 4, 0.5, 0.25)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=True), "batch_size=True"),
        (dict(batch_size=2.0), "batch_size=2.0"),
        (dict(seed=-1), "seed=-1"),
        (dict(seed=1.0), "seed=1.0"),
        # int() used to truncate a fractional shard to (0, 2).
        (dict(shard=(0.5, 2)), r"shard=\(0.5, 2\)"),
        (dict(shard=(0, 2, 1)), r"shard=\(0, 2, 1\)"),
        (dict(shard=(0, 5)), r"shard=\(0, 5\), batch_size=4"),
    ],
)
def test_loader_bad_arguments_echo_the_value(kwargs, match):
    x, y = _images(10)
    args = dict(batch_size=4, mean=0.5, std=0.25) | kwargs
    with pytest.raises(ValueError, match=match):
        ArrayLoader(x, y, **args)


def _epoch_labels(loader):
    return np.concatenate([loader[i][1] for i in range(len(loader))])


def test_loader_order_depends_only_on_seed_and_epoch():
    x, y = _images(50)
    a = ArrayLoader(x, y, 8, 0.5, 0.25, shuffle=True, seed=7)
    b = ArrayLoader(x, y, 8, 0.5, 0.25, shuffle=True, seed=7)
    epoch0 = _epoch_labels(a)
    assert sorted(epoch0) == list(range(50))
    np.testing.assert_array_equal(
        epoch0, np.random.default_rng([7, 0]).permutation(50)
    )
    # `a` goes through epochs 0..3, `b` jumps straight to 3.
    for _ in range(3):
        a.on_epoch_begin()
        _epoch_labels(a)
        a.on_epoch_end()
    assert a.epoch == 3
    b.set_epoch(3)
    np.testing.assert_array_equal(_epoch_labels(a), _epoch_labels(b))
    assert not np.array_equal(_epoch_labels(b), epoch0)
    b.set_epoch(0)
    np.testing.assert_array_equal(_epoch_labels(b), epoch0)
    other_seed = ArrayLoader(x, y, 8, 0.5, 0.25, shuffle=True, seed=8)
    assert not np.array_equal(_epoch_labels(other_seed), epoch0)
    # Without shuffling, the array order.
    plain = ArrayLoader(x, y, 8, 0.5, 0.25)
    np.testing.assert_array_equal(_epoch_labels(plain), y)


def test_loader_ignores_passes_that_are_not_epochs():
    x, y = _images(20)
    loader = ArrayLoader(x, y, 8, 0.5, 0.25, shuffle=True)
    loader.on_epoch_end()  # Keras calls this once before training.
    assert loader.epoch == 0
    loader.on_epoch_begin()
    loader[0]  # A one-batch pass (JAX builds the model with one).
    loader.on_epoch_end()
    assert loader.epoch == 0
    loader.on_epoch_begin()
    _epoch_labels(loader)
    loader.on_epoch_end()
    assert loader.epoch == 1
    with pytest.raises(ValueError, match="epoch=-1"):
        loader.set_epoch(-1)


def _crops_and_flips(image, pad=4):
    """All 2 * (2 * pad + 1) ** 2 augmentations of one image."""
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = padded[top : top + h, left : left + w]
            yield (top, left, False), crop
            yield (top, left, True), crop[:, ::-1]


def test_augmentation_is_a_crop_and_flip_of_the_padded_image():
    x, y = _images(64, size=8)
    # mean 0, std 1/255: the loader yields raw pixel values.
    loader = ArrayLoader(x, y, 32, 0.0, 1 / 255, augment=True, seed=3)
    seen = set()
    for index in range(len(loader)):
        xb, yb = loader[index]
        pixels = np.round(xb).astype(np.int64)
        np.testing.assert_allclose(xb, pixels, atol=1e-3)
        for image, label in zip(pixels, yb):
            matches = [
                params
                for params, candidate in _crops_and_flips(x[label])
                if np.array_equal(candidate, image)
            ]
            assert matches, f"image {label} is no crop/flip of its source"
            seen.add(matches[0])
    # Both flips and a range of offsets occur.
    assert {flip for _, _, flip in seen} == {False, True}
    assert len({(top, left) for top, left, _ in seen}) > 20


def test_augmentation_depends_only_on_seed_epoch_and_batch():
    x, y = _images(40)
    make = lambda seed: ArrayLoader(  # noqa: E731
        x, y, 16, 0.5, 0.25, shuffle=True, augment=True, seed=seed
    )
    a, b = make(1), make(1)
    b.set_epoch(2)
    b[1]
    b.set_epoch(0)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i][0], b[i][0])
    a.set_epoch(1)
    assert not np.array_equal(a[0][0], b[0][0])
    assert not np.array_equal(make(2)[0][0], b[0][0])
    # Same batch twice: same augmentation.
    np.testing.assert_array_equal(a[2][0], a[2][0])


def test_crop_and_flip_matches_its_documented_draws():
    x, _ = _images(16, size=6)
    got = crop_and_flip(x, np.random.default_rng(0), pad=2)
    rng = np.random.default_rng(0)
    top, left = rng.integers(0, 5, 16), rng.integers(0, 5, 16)
    flip = rng.random(16) < 0.5
    for i in range(16):
        padded = np.pad(x[i], ((2, 2), (2, 2), (0, 0)))
        want = padded[top[i] : top[i] + 6, left[i] : left[i] + 6]
        if flip[i]:
            want = want[:, ::-1]
        np.testing.assert_array_equal(got[i], want)


def _reference_batch(x, y, batch_size, mean, std, seed, epoch, index, pad=4):
    """The loader's algorithm as first written: a per-pixel gather for the
    crop and flip, normalization by broadcasting per-channel vectors."""
    rows = np.random.default_rng([seed, epoch]).permutation(len(x))
    rows = rows[index * batch_size:(index + 1) * batch_size]
    images = x[rows]
    rng = np.random.default_rng([seed, epoch, index])
    n, height, width, _ = images.shape
    top = rng.integers(0, 2 * pad + 1, size=n)
    left = rng.integers(0, 2 * pad + 1, size=n)
    flip = rng.random(n) < 0.5
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    r = top[:, None] + np.arange(height)
    c = left[:, None] + np.arange(width)
    c = np.where(flip[:, None], c[:, ::-1], c)
    images = padded[np.arange(n)[:, None, None], r[:, :, None], c[:, None, :]]
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
    shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32))
    images = images.astype(np.float32)
    images *= scale
    images -= shift.astype(np.float32)
    return images, y[rows].astype(np.int32)


CIFAR_MEAN = [0.5071, 0.4865, 0.4409]
CIFAR_STD = [0.2673, 0.2564, 0.2762]


def _digest(batches):
    digest = hashlib.sha256()
    for batch in batches:
        for array in batch if isinstance(batch, tuple) else (batch,):
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def test_batches_are_bit_identical_to_the_first_algorithm():
    # CIFAR-shaped, the training setting: batch 128, shuffle, crop and flip.
    rng = np.random.default_rng(2024)
    x = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, 300)
    loader = ArrayLoader(x, y, 128, CIFAR_MEAN, CIFAR_STD, shuffle=True,
                         augment=True, seed=5)
    for epoch in (0, 7):
        loader.set_epoch(epoch)
        for index in range(len(loader)):
            got_x, got_y = loader[index]
            want_x, want_y = _reference_batch(
                x, y, 128, CIFAR_MEAN, CIFAR_STD, 5, epoch, index
            )
            assert got_x.dtype == np.float32 and got_x.shape == want_x.shape
            # Bits, not values: -0.0 == 0.0 and NaN != NaN would hide changes.
            np.testing.assert_array_equal(got_x.view(np.uint32),
                                          want_x.view(np.uint32))
            np.testing.assert_array_equal(got_y, want_y)
    # The same batches, pinned by digests of the first algorithm's output
    # (computed before it was replaced), so the reference above cannot drift
    # with the loader.
    loader.set_epoch(0)
    assert _digest(loader[i] for i in range(3)) == "793a6dc1b417bacf"
    loader.set_epoch(7)
    assert _digest(loader[i] for i in range(3)) == "763cad65fe2b0715"
    plain = ArrayLoader(x, y, 256, CIFAR_MEAN, CIFAR_STD)
    assert _digest(plain[i] for i in range(2)) == "17912da54b5f8779"
    # One channel, an image smaller than the padding, a shard, no labels.
    gray = rng.integers(0, 256, (37, 8, 8, 1), dtype=np.uint8)
    shard = ArrayLoader(gray, None, 16, 0.3, 0.2, shuffle=True, augment=True,
                        seed=1, shard=(1, 3))
    assert _digest(shard[i] for i in range(3)) == "26611226afe76ac5"


class _EpochRecorder(keras.callbacks.Callback):
    def __init__(self, loader):
        super().__init__()
        self.loader = loader
        self.epochs = []

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self.epochs.append(self.loader.epoch)


def _fit(loader, callbacks, **kwargs):
    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(20)]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
    recorder = _EpochRecorder(loader)
    model.fit(
        loader, shuffle=False, verbose=0, callbacks=[*callbacks, recorder],
        **kwargs
    )
    return recorder.epochs


def test_fit_sees_the_right_epochs_and_a_resume_reproduces_them():
    x, y = _images(20, size=4)
    make = lambda: ArrayLoader(  # noqa: E731
        x, y, 8, 0.5, 0.25, shuffle=True, augment=True
    )
    fresh = make()
    assert _fit(fresh, [EpochSetter(fresh)], epochs=3) == [0, 1, 2]
    # Without EpochSetter a fresh run still counts right ...
    counted = make()
    assert _fit(counted, [], epochs=3) == [0, 1, 2]
    # ... but a resumed run needs it.
    resumed = make()
    assert _fit(resumed, [EpochSetter(resumed)], epochs=4, initial_epoch=2) == [
        2,
        3,
    ]
    assert _fit(make(), [], epochs=4, initial_epoch=2) == [0, 1]
    with pytest.raises(ValueError, match="set_epoch"):
        EpochSetter(object())
