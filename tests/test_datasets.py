"""Tests for zoo.data: loading, splits, label noise and ArrayLoader.

Nothing here touches the network: digits is bundled with scikit-learn, image
folders are written into tmp_path, TFDS datasets are mocked with
`tfds.testing.mock_data` on top of real metadata written into tmp_path.
"""

import collections
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from zoo.data import DatasetError
from zoo.data import load_dataset
from zoo.data import tfds as tfds_source
from zoo.data.loader import ArrayLoader
from zoo.data.loader import EpochSetter
from zoo.data.loader import crop_and_flip
from zoo.data.noise import add_symmetric_noise
from zoo.data.noise import parse_label_noise


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any probe of a download host fails the test unless a test replaces it."""

    def probe(*args, **kwargs):
        raise AssertionError(f"network probe attempted: {args}")

    monkeypatch.setattr(tfds_source, "_host_reachable", probe)


def _rows(x, y):
    """Multiset of (image bytes, label) pairs."""
    return collections.Counter(
        (img.tobytes(), int(label)) for img, label in zip(x, y)
    )


# === digits ===


def test_digits_shapes_dtypes_and_ranges():
    data = load_dataset("digits", val_fraction=0.2, seed=0)
    # 1797 images: the last 360 are the test set, 20% of the other 1437 the
    # validation set.
    assert data.x_train.shape == (1150, 32, 32, 3)
    assert data.x_val.shape == (287, 32, 32, 3)
    assert data.x_test.shape == (360, 32, 32, 3)
    for x in (data.x_train, data.x_val, data.x_test):
        assert x.dtype == np.uint8
    for y in (data.y_train, data.y_val, data.y_test):
        assert y.dtype == np.int32
        assert y.min() >= 0 and y.max() <= 9
    assert data.x_train.max() == 255 and data.x_train.min() == 0
    assert data.num_classes == 10
    assert data.class_names == [str(d) for d in range(10)]
    assert data.noise_mask is None and data.label_noise is None
    assert data.mean.dtype == np.float32 and data.mean.shape == (3,)
    scaled = data.x_train.astype(np.float64) / 255
    np.testing.assert_allclose(data.mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(data.std, scaled.std(axis=(0, 1, 2)), rtol=1e-5)
    assert "digits: train 1150, val 287, test 360" in data.summary()


def test_digits_upsampling_by_hand():
    # scikit-learn's image 1437 (the first test image, a "2") has the 8x8 row
    # 2 = [0, 9, 10, 6, 14, 0, 0, 0] and row 0 = [0, 4, 16, 15, 2, 0, 0, 0].
    data = load_dataset("digits")
    image = data.x_test[0]
    assert data.y_test[0] == 2
    # Value 10 at (row 2, col 2): round(10 * 255 / 16) = round(159.375) = 159,
    # repeated over rows 8..11, columns 8..11, on every channel.
    np.testing.assert_array_equal(image[8:12, 8:12, :], 159)
    # Value 4 at (0, 1): round(63.75) = 64; value 16 at (0, 2): 255.
    np.testing.assert_array_equal(image[0:4, 4:8, :], 64)
    np.testing.assert_array_equal(image[0:4, 8:12, :], 255)
    np.testing.assert_array_equal(image[:, :, 0], image[:, :, 2])


def test_digits_split_is_a_seeded_partition():
    full = load_dataset("digits", val_fraction=0)
    assert full.x_val is None and full.y_val is None
    assert len(full.x_train) == 1437

    a = load_dataset("digits", val_fraction=0.25, seed=3)
    b = load_dataset("digits", val_fraction=0.25, seed=3)
    c = load_dataset("digits", val_fraction=0.25, seed=4)
    assert len(a.x_val) == round(0.25 * 1437)
    # Train and validation together are exactly the full training set.
    assert _rows(a.x_train, a.y_train) + _rows(a.x_val, a.y_val) == _rows(
        full.x_train, full.y_train
    )
    np.testing.assert_array_equal(a.x_val, b.x_val)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.y_val, c.y_val)
    # The test set does not depend on the seed.
    np.testing.assert_array_equal(a.x_test, c.x_test)
    np.testing.assert_array_equal(a.y_test, full.y_test)


# === label noise ===


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.45])
def test_symmetric_noise_changes_exactly_round_rate_n(rate):
    clean = load_dataset("digits", seed=1)
    noisy = load_dataset("digits", seed=1, label_noise=f"symmetric:{rate}")
    n = len(clean.y_train)
    changed = noisy.y_train != clean.y_train
    assert changed.sum() == round(rate * n)
    np.testing.assert_array_equal(noisy.noise_mask, changed)
    assert noisy.noise_mask.dtype == bool and noisy.noise_mask.shape == (n,)
    assert noisy.label_noise == f"symmetric:{rate:g}"
    # Same images, clean validation and test labels.
    np.testing.assert_array_equal(noisy.x_train, clean.x_train)
    np.testing.assert_array_equal(noisy.y_val, clean.y_val)
    np.testing.assert_array_equal(noisy.y_test, clean.y_test)
    assert noisy.y_train.min() >= 0 and noisy.y_train.max() < 10


def test_symmetric_noise_is_seeded():
    a = load_dataset("digits", seed=5, label_noise="symmetric:0.3")
    b = load_dataset("digits", seed=5, label_noise="symmetric:0.3")
    c = load_dataset("digits", seed=6, label_noise="symmetric:0.3")
    np.testing.assert_array_equal(a.y_train, b.y_train)
    np.testing.assert_array_equal(a.noise_mask, b.noise_mask)
    assert not np.array_equal(a.noise_mask, c.noise_mask[: len(a.noise_mask)])


def test_symmetric_noise_is_uniform_over_other_classes():
    labels = np.zeros(60000, np.int32)
    noisy, mask = add_symmetric_noise(labels, 0.5, 4, seed=0)
    assert mask.sum() == 30000
    counts = np.bincount(noisy[mask], minlength=4)
    assert counts[0] == 0
    # 10000 expected per class; 5 standard deviations is about 410.
    np.testing.assert_allclose(counts[1:], 10000, atol=410)


def test_parse_label_noise():
    parse = parse_label_noise
    assert parse(None) is None
    assert parse("") is None
    assert parse("none") is None
    assert parse("symmetric:0.4") == ("symmetric", 0.4)
    assert parse("symmetric:0") == ("symmetric", 0.0)
    assert parse("worse") == ("cifar_n", "worse")
    assert parse("random2") == ("cifar_n", "random2")
    assert parse("noise") == ("cifar_n", "noise")


@pytest.mark.parametrize(
    "spec", ["symmetric:1.5", "symmetric:1", "symmetric:-0.1", "symmetric:abc",
             "symmetric", "pairflip:0.2", "worst"]
)
def test_bad_label_noise_specs_name_the_value(spec):
    with pytest.raises(DatasetError, match=spec):
        parse_label_noise(spec)
    with pytest.raises(DatasetError, match=spec):
        load_dataset("digits", label_noise=spec)


def test_cifar_n_label_set_on_another_dataset():
    with pytest.raises(DatasetError, match="'aggre' belongs to cifar10n"):
        load_dataset("digits", label_noise="aggre")
    with pytest.raises(DatasetError, match="'noise' belongs to cifar100n"):
        load_dataset("cifar10n", label_noise="noise")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="mnist"), "Unknown dataset 'mnist'. Known: digits, cifar10"),
        (dict(name="digits", val_fraction=1.0), "val_fraction=1.0"),
        (dict(name="digits", val_fraction=-0.1), "val_fraction=-0.1"),
        (dict(name="digits", seed=-1), "seed=-1"),
        (dict(name="digits", image_size=64), "image_size"),
        (dict(name="folder:x", image_size=0), "image_size=0"),
        (dict(name="folder:x", image_size=(True, 8)), r"image_size=\(True, 8\)"),
        (dict(name="digits", val_fraction="0.2"), "val_fraction='0.2'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(DatasetError, match=match):
        load_dataset(**kwargs)


# === ArrayLoader ===


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


# === image folders ===


def _write_png(path, size=(6, 6), color=(255, 0, 0), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    value = color if mode == "RGB" else color[0]
    Image.new(mode, size[::-1], value).save(path)


def _make_folder(root, classes=("cat", "dog"), n_train=3, n_test=2, size=(6, 6)):
    for k, name in enumerate(classes):
        for split, count in (("train", n_train), ("test", n_test)):
            for i in range(count):
                _write_png(root / split / name / f"{i}.png", size, (k * 100, i, 7))
    return root


def test_folder_dataset(tmp_path):
    root = _make_folder(tmp_path / "pets", classes=("dog", "cat", "bird"))
    _write_png(root / "train" / "cat" / "x.png", mode="L", color=(9,))
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0junk")
    data = load_dataset(f"folder:{root}", val_fraction=0)
    assert data.class_names == ["bird", "cat", "dog"]
    assert data.x_train.shape == (10, 6, 6, 3) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (6, 6, 6, 3)
    np.testing.assert_array_equal(np.bincount(data.y_train), [3, 4, 3])
    np.testing.assert_array_equal(data.y_test, [0, 0, 1, 1, 2, 2])
    # bird = class 0 was written with red 200, dog = 2 with red 0.
    assert data.x_test[0, 0, 0, 0] == 200 and data.x_test[-1, 0, 0, 0] == 0
    # The grayscale image became 3 equal channels.
    gray = data.x_train[data.y_train == 1][-1]
    np.testing.assert_array_equal(gray, 9)
    split = load_dataset(f"folder:{root}", val_fraction=0.3, seed=0)
    assert len(split.x_train) + len(split.x_val) == 10


def test_folder_sizes_must_match_unless_resized(tmp_path):
    root = _make_folder(tmp_path / "f")
    odd = root / "test" / "dog" / "big.png"
    _write_png(odd, size=(9, 7))
    with pytest.raises(DatasetError, match="big.png.*--image_size=64 to train.py"):
        load_dataset(f"folder:{root}")
    data = load_dataset(f"folder:{root}", image_size=(5, 4), val_fraction=0)
    assert data.x_train.shape[1:] == (5, 4, 3)
    assert data.x_test.shape == (5, 5, 4, 3)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    one = _make_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(DatasetError, match="single class"):
        load_dataset(f"folder:{one}")
    no_test = _make_folder(tmp_path / "no_test")
    for p in (no_test / "test").rglob("*.png"):
        p.unlink()
    with pytest.raises(DatasetError, match="no image files"):
        load_dataset(f"folder:{no_test}")
    hollow = _make_folder(tmp_path / "hollow")
    (hollow / "train" / "emu").mkdir()
    with pytest.raises(DatasetError, match="emu is empty"):
        load_dataset(f"folder:{hollow}")


def test_folder_corrupt_file_is_named(tmp_path):
    root = _make_folder(tmp_path / "f")
    (root / "train" / "dog" / "broken.png").write_bytes(b"not an image at all")
    start = time.monotonic()
    with pytest.raises(DatasetError, match=r"broken\.png") as info:
        load_dataset(f"folder:{root}")
    assert time.monotonic() - start < 5
    assert "\n" not in str(info.value)


def test_folder_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    from PIL import Image

    root = _make_folder(tmp_path / "f", size=(2, 3))
    wide = np.array([[0, 257, 32768], [40000, 65278, 65535]], np.uint16)
    path = root / "train" / "cat" / "0.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    data = load_dataset(f"folder:{root}", val_fraction=0)
    image = data.x_train[0]
    # 255 / 65535 = 1 / 257: 32768 / 257 = 127.5 -> 128, 40000 / 257 = 155.6.
    expected = np.array([[0, 1, 128], [156, 254, 255]], np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], expected)


def test_folder_decompression_bomb_is_named(tmp_path, monkeypatch):
    from PIL import Image

    root = _make_folder(tmp_path / "f")
    # Pillow refuses images above twice this many pixels; 6x6 = 36 > 2 * 10.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DatasetError, match=r"^Image .*0\.png is too large to decode "
                       r"safely \(.*\)\. Remove the file or shrink it\.$"):
        load_dataset(f"folder:{root}")


def test_folder_class_symlink_loops_are_named(tmp_path):
    ancestor = _make_folder(tmp_path / "ancestor")
    os.symlink("..", ancestor / "train" / "loop")
    with pytest.raises(DatasetError, match=r"train/loop is a symlink loop: it points "
                       r"to \.\., which contains it\."):
        load_dataset(f"folder:{ancestor}")
    itself = _make_folder(tmp_path / "itself")
    os.symlink("self", itself / "test" / "self")
    with pytest.raises(DatasetError, match=r"test/self is a symlink to self that "
                       r"loops or points nowhere\."):
        load_dataset(f"folder:{itself}")
    fine = _make_folder(tmp_path / "fine")
    os.symlink(ancestor / "train" / "cat", fine / "train" / "lion")
    os.symlink(ancestor / "test" / "cat", fine / "test" / "lion")
    assert load_dataset(f"folder:{fine}").class_names == ["cat", "dog", "lion"]


def test_folder_empty_test_class_is_refused(tmp_path):
    root = _make_folder(tmp_path / "f")
    for p in (root / "test" / "dog").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"^Class folder .*test/dog is empty\. "
                       r"Add images or remove the folder\.$"):
        load_dataset(f"folder:{root}")


# === Tiny-ImageNet layout ===


def _make_tiny_imagenet(root, wnids=("n02", "n01", "n03"), size=(8, 8)):
    for k, wnid in enumerate(wnids):
        for i in range(2):
            _write_png(
                root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG",
                size,
                (k * 100, 0, 0),
            )
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n01"]):
        name = f"val_{i}.JPEG"
        _write_png(root / "val" / "images" / name, size)
        lines.append(f"{name}\t{wnid}\t0\t0\t7\t7")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_layout(tmp_path):
    root = _make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    data = load_dataset("tiny_imagenet", data_dir=str(root), val_fraction=0)
    assert data.class_names == ["n01", "n02", "n03"]
    assert data.x_train.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(data.y_train, [0, 0, 1, 1, 2, 2])
    # n01 was written with red 100, n02 with 0.
    assert data.x_train[0, 0, 0, 0] == 100 and data.x_train[2, 0, 0, 0] == 0
    # The official validation set is the test set.
    np.testing.assert_array_equal(data.y_test, [2, 0, 0])
    # The parent folder works too; image_size resizes.
    resized = load_dataset(
        "tiny_imagenet", data_dir=str(tmp_path), val_fraction=0.5, image_size=4
    )
    assert resized.x_train.shape == (3, 4, 4, 3)
    assert resized.x_test.shape == (3, 4, 4, 3)


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(DatasetError, match="--data_dir"):
        load_dataset("tiny_imagenet")
    with pytest.raises(DatasetError, match="no train/ folder"):
        load_dataset("tiny_imagenet", data_dir=str(tmp_path))
    root = _make_tiny_imagenet(tmp_path / "t")
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DatasetError, match="val_annotations.txt is missing"):
        load_dataset("tiny_imagenet", data_dir=str(root))


# === TensorFlow Datasets ===


def _prepared_metadata(root, tfds_name, num_examples):
    """Real dataset_info.json / features.json so the builder counts as prepared."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(tfds_name, data_dir=str(root))
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=split, shard_lengths=[num_examples], num_bytes=0
                )
                for split in ("train", "test")
            ]
        )
    )
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
    return builder


def _raw_split(tfds_name, split, num_examples):
    import tensorflow_datasets as tfds

    builder = tfds.builder(tfds_name)
    return tfds.as_numpy(builder.as_dataset(split=split, batch_size=num_examples))


def test_cifar10_through_mocked_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    _prepared_metadata(tmp_path, "cifar10", 40)
    with tfds.testing.mock_data(num_examples=40, data_dir=str(tmp_path)):
        data = load_dataset("cifar10", data_dir=str(tmp_path), seed=0)
        raw_test = next(iter(_raw_split("cifar10", "test", 40)))
    assert data.x_train.shape == (32, 32, 32, 3) and data.x_train.dtype == np.uint8
    assert data.x_val.shape == (8, 32, 32, 3)
    assert data.x_test.shape == (40, 32, 32, 3)
    assert data.y_train.dtype == np.int32 and data.num_classes == 10
    np.testing.assert_array_equal(data.y_test, raw_test["label"])
    np.testing.assert_array_equal(data.x_test, raw_test["image"])
    assert data.noise_mask is None


def test_cifar100_with_symmetric_noise_through_mocked_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    _prepared_metadata(tmp_path, "cifar100", 50)
    with tfds.testing.mock_data(num_examples=50, data_dir=str(tmp_path)):
        data = load_dataset(
            "cifar100", data_dir=str(tmp_path), val_fraction=0,
            label_noise="symmetric:0.2",
        )
        raw = next(iter(_raw_split("cifar100", "train", 50)))
    assert data.num_classes == 100
    assert data.noise_mask.sum() == 10
    np.testing.assert_array_equal(data.noise_mask, data.y_train != raw["label"])


@pytest.mark.parametrize("label_set, feature", [("aggre", "aggre_label"),
                                                (None, "worse_label")])
def test_cifar10n_label_sets_through_mocked_tfds(tmp_path, label_set, feature):
    tfds = pytest.importorskip("tensorflow_datasets")
    _prepared_metadata(tmp_path, "cifar10_n", 30)
    with tfds.testing.mock_data(num_examples=30, data_dir=str(tmp_path)):
        data = load_dataset(
            "cifar10n", data_dir=str(tmp_path), val_fraction=0,
            label_noise=label_set,
        )
        split = load_dataset(
            "cifar10n", data_dir=str(tmp_path), val_fraction=0.2,
            label_noise=label_set,
        )
        raw = next(iter(_raw_split("cifar10_n", "train", 30)))
        raw_test = next(iter(_raw_split("cifar10_n", "test", 30)))
    np.testing.assert_array_equal(data.y_train, raw[feature])
    np.testing.assert_array_equal(data.noise_mask, raw[feature] != raw["label"])
    assert data.label_noise == f"cifar_n:{label_set or 'worse'}"
    # The test labels are the clean ones.
    np.testing.assert_array_equal(data.y_test, raw_test["label"])
    # The validation labels are clean too; the training ones keep the noise.
    clean = dict(zip(map(bytes, raw["image"]), raw["label"]))
    assert [clean[bytes(img)] for img in split.x_val] == list(split.y_val)
    assert len(split.noise_mask) == len(split.y_train) == 24


def test_cifar100n_label_set(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    _prepared_metadata(tmp_path, "cifar100_n", 20)
    with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
        data = load_dataset("cifar100n", data_dir=str(tmp_path), val_fraction=0)
        raw = next(iter(_raw_split("cifar100_n", "train", 20)))
    np.testing.assert_array_equal(data.y_train, raw["noise_label"])
    assert data.label_noise == "cifar_n:noise" and data.num_classes == 100


def test_unprepared_tfds_dataset_without_network_fails_fast(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    probed = []

    def unreachable(host, *args, **kwargs):
        probed.append(host)
        return False

    monkeypatch.setattr(tfds_source, "_host_reachable", unreachable)
    start = time.monotonic()
    with pytest.raises(DatasetError, match=r"^cifar10: .*--data_dir") as info:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    assert probed == ["www.cs.toronto.edu"]
    assert "\n" not in str(info.value)


def test_cifar10n_without_manual_files_fails_before_any_probe(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    start = time.monotonic()
    with pytest.raises(DatasetError, match="cifar10n: .*downloads/manual") as info:
        load_dataset("cifar10n", data_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "CIFAR-10_human_annotations.csv" in message and "\n" not in message


def test_host_probe_is_quick_and_local(monkeypatch):
    monkeypatch.undo()  # The real probe, against a closed local port.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # Bound but not listening: refused.
        start = time.monotonic()
        assert tfds_source._host_reachable("127.0.0.1", port, timeout=1.0) is False
    assert time.monotonic() - start < 2


def test_zoo_imports_without_tensorflow():
    code = (
        "import sys, zoo.data, zoo.data.loader, zoo.schedules\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "assert 'tensorflow_datasets' not in sys.modules, 'tfds imported'\n"
        "zoo.data.load_dataset('digits')\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported by digits'\n"
    )
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
