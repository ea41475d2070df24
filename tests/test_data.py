"""Tests for zoo.data: load_dataset on digits, the split and label noise.

Nothing here touches the network: digits is bundled with scikit-learn.
"""

import collections
import os
import sys

import numpy as np
import pytest
import subprocesses

from zoo.data import DatasetError
from zoo.data import load_dataset
from zoo.data.noise import add_symmetric_noise
from zoo.data.noise import parse_label_noise


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


def test_zoo_imports_without_tensorflow():
    code = (
        "import sys, zoo.data, zoo.data.loader, zoo.schedules\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "assert 'tensorflow_datasets' not in sys.modules, 'tfds imported'\n"
        "zoo.data.load_dataset('digits')\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported by digits'\n"
    )
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocesses.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.all_backends
@pytest.mark.parametrize("name", ["digits", "folder:/data"])
def test_data_dir_of_a_dataset_that_reads_none(name):
    from zoo.data import DatasetError
    from zoo.data import reads_data_dir

    with pytest.raises(DatasetError, match=(
            rf"^Argument `data_dir` applies to the TFDS datasets and tiny_imagenet "
            rf"only; '{name}' reads none\. Received: data_dir='/nonexistent'\. "
            r"Leave it unset\.$")):
        load_dataset(name, data_dir="/nonexistent")
    assert [n for n in ("digits", "cifar10", "CIFAR100", "cifar10n", "cifar100n",
                        "tiny_imagenet", "folder:/data") if reads_data_dir(n)] == [
        "cifar10", "CIFAR100", "cifar10n", "cifar100n", "tiny_imagenet"]
