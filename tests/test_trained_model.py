"""Tests for zoo/trained_model.py: a run's model rebuilt, loaded, BN recomputed."""

import types

import keras
import numpy as np
import pytest

from zoo.run import run_dir
from zoo.trained_model import build_model
from zoo.trained_model import trained_model

pytestmark = pytest.mark.all_backends


def _config(**overrides):
    values = dict(model="resnet18", width=0.125, weight_decay=0.0, batch_size=8,
                  mixed_precision="")
    values.update(overrides)
    return types.SimpleNamespace(**values)


def _data(n=16):
    rng = np.random.default_rng(0)
    return types.SimpleNamespace(
        x_train=rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8),
        mean=np.array([0.5, 0.4, 0.3], np.float32),
        std=np.array([0.2, 0.25, 0.3], np.float32),
        num_classes=3, image_shape=(8, 8, 3))


def _saved(tmp_path, config, data):
    """A weights file with random values in every variable, and those values."""
    model = build_model(config, data)
    rng = np.random.default_rng(1)
    for v in model.weights:
        value = rng.normal(size=v.shape).astype("float32")
        v.assign(np.abs(value) + 0.5 if "variance" in v.path else value)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    return path, {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


def test_loads_the_file_and_recomputes_only_the_bn_statistics(tmp_path):
    config, data = _config(), _data()
    path, saved = _saved(tmp_path, config, data)

    kept = trained_model(config, data, path, bn_recompute=False)
    for v in kept.weights:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), saved[v.path])

    recomputed = trained_model(config, data, path)
    moving = [v for v in recomputed.weights if "moving_" in v.path]
    assert moving
    for v in recomputed.weights:
        value = keras.ops.convert_to_numpy(v)
        if "moving_" in v.path:
            continue
        np.testing.assert_array_equal(value, saved[v.path])
    # The stem BN's statistics are those of the stem conv's output on the
    # normalized training images: mean over batch and pixels, computed here.
    x = (data.x_train.astype(np.float32) / 255.0 - data.mean) / data.std
    stem = keras.Model(recomputed.input, recomputed.get_layer("stem_conv").output)
    features = keras.ops.convert_to_numpy(stem(x))
    expected_mean = features.reshape(-1, features.shape[-1]).mean(axis=0)
    bn = recomputed.get_layer("stem_bn")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean),
                               expected_mean, rtol=1e-4, atol=1e-4)
    assert not np.allclose(saved[bn.moving_mean.path], expected_mean, atol=1e-2)


def test_an_existing_model_is_loaded_into_and_a_model_without_bn_kept(tmp_path):
    config, data = _config(model="vgg16"), _data(n=8)
    data.x_train = np.zeros((8, 32, 32, 3), np.uint8)
    data.image_shape = (32, 32, 3)
    path, saved = _saved(tmp_path, config, data)
    target = build_model(config, data)
    model = trained_model(config, data, path, model=target)
    assert model is target
    for v in model.weights:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), saved[v.path])


def test_builds_under_the_runs_policy_and_restores_the_global_one():
    before = keras.config.dtype_policy()
    try:
        model = trained_model(_config(mixed_precision="mixed_float16"), _data(),
                              bn_recompute=False)
        after = keras.config.dtype_policy()
    finally:
        keras.config.set_dtype_policy(before)
    assert model.get_layer("stem_conv").compute_dtype == "float16"
    assert after.name == before.name == "float32"


def test_a_missing_file_is_one_line_with_the_remedy(tmp_path):
    config, data = _config(), _data()
    path = str(tmp_path / "gone.weights.h5")
    with pytest.raises(run_dir.DamagedFileError, match="retrain it") as info:
        trained_model(config, data, path, remedy="retrain it")
    assert "gone.weights.h5" in str(info.value)
    assert "\n" not in str(info.value)
