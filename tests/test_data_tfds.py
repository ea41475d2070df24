"""Tests for zoo.data.tfds: the CIFAR datasets through mocked TFDS.

Nothing here touches the network: TFDS datasets are mocked with
`tfds.testing.mock_data` on top of real metadata written into tmp_path, and
the download-host probe is replaced unless a test restores it.
"""

import time

import numpy as np
import pytest

from zoo.data import DatasetError
from zoo.data import load_dataset
from zoo.data import tfds as tfds_source


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any probe of a download host fails the test unless a test replaces it."""

    def probe(*args, **kwargs):
        raise AssertionError(f"network probe attempted: {args}")

    monkeypatch.setattr(tfds_source, "_host_reachable", probe)


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
