"""Export of an EMA model: a SavedModel that serves the EMA's predictions."""

import os

import keras
import numpy as np
import pytest

import keras_ema
from keras_ema.export import export_ema


def trained_ema():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Dense(2),
    ])
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ema = keras_ema.MultiEMA(decays=(0.9, 0.99), period=1, verbose=0)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[ema])
    return model, ema, x


@pytest.mark.all_backends
def test_saved_model_serves_the_ema(tmp_path):
    tf = pytest.importorskip("tensorflow")
    model, ema, x = trained_ema()
    live = [np.array(w) for w in model.get_weights()]
    export_ema(ema, 0.9, str(tmp_path), verbose=0)
    with ema.swapped_in(0.9):
        expected = keras.ops.convert_to_numpy(model(x, training=False))
    served = tf.saved_model.load(str(tmp_path / "saved_model"))
    np.testing.assert_allclose(served.serve(x).numpy(), expected, atol=1e-5)
    reloaded = keras.saving.load_model(str(tmp_path / "model.keras"))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded(x)), expected, atol=1e-5
    )
    # The live weights are untouched and the EMA differs from them.
    for a, b in zip(live, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(expected, keras.ops.convert_to_numpy(model(x)))
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "saved_model"]


@pytest.mark.all_backends
def test_export_recomputes_batch_norm_first(tmp_path):
    tf = pytest.importorskip("tensorflow")
    model, ema, x = trained_ema()
    exported = export_ema(ema, 0.99, str(tmp_path), batch_norm_data=x, verbose=0)
    # The statistics are those of x after the first Dense layer of the EMA.
    with ema.swapped_in(0.99):
        kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.layers[0].weights)
    h = x @ kernel + bias
    bn = exported.layers[1]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn.moving_mean), h.mean(0), rtol=1e-4, atol=1e-5)
    served = tf.saved_model.load(str(tmp_path / "saved_model"))
    np.testing.assert_allclose(
        served.serve(x).numpy(),
        keras.ops.convert_to_numpy(exported(x, training=False)), atol=1e-5)


@pytest.mark.all_backends
def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path):
    model, ema, x = trained_ema()
    bias = model.layers[-1].bias
    good = keras.ops.convert_to_numpy(bias)
    bias.assign(np.array([0.0, np.inf], "float32"))
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"{bias.path} holds NaN or inf") as e:
        keras_ema.export_model(model, str(target), verbose=0)
    assert "\n" not in str(e.value)
    assert not target.exists()
    bias.assign(good)
    # An EMA holding a NaN (a corrupt shadow) is refused the same way.
    shadow = ema._shadows[0]
    value = np.array(keras.ops.convert_to_numpy(shadow))
    value[0].flat[0] = np.nan
    shadow.assign(value)
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        export_ema(ema, 0.9, str(target), verbose=0)
    assert not target.exists()
    export_ema(ema, 0.99, str(target), verbose=0)  # the other EMA is finite
    assert sorted(os.listdir(target)) == ["model.keras", "saved_model"]


def test_export_logs_no_tensorflow_info_lines(tmp_path, caplog):
    # SavedModel writing logs INFO lines (signature_serialization) that ask
    # nothing of the user; a user who asked for INFO elsewhere keeps it.
    import logging

    pytest.importorskip("tensorflow")
    model, ema, _ = trained_ema()
    tf_logger = logging.getLogger("tensorflow")
    with caplog.at_level(logging.INFO, logger="tensorflow"):
        export_ema(ema, 0.9, str(tmp_path), verbose=0)
        assert tf_logger.level == logging.INFO  # restored
    info = [r.getMessage()[:80] for r in caplog.records
            if r.name.startswith("tensorflow") and r.levelno < logging.WARNING]
    assert info == []


@pytest.mark.all_backends
def test_without_tensorflow_a_one_line_error_and_nothing_written(tmp_path, monkeypatch):
    import sys

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    # `None` in sys.modules makes `import tensorflow` raise ImportError.
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    target = tmp_path / "out"
    with pytest.raises(ImportError, match=r'pip install "keras-ema\[tensorflow\]"') as e:
        keras_ema.export_model(model, str(target), verbose=0)
    assert "\n" not in str(e.value)
    assert not target.exists()


@pytest.mark.all_backends
def test_export_to_an_existing_file_is_a_one_line_error(tmp_path):
    pytest.importorskip("tensorflow")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    target = tmp_path / "out"
    target.write_text("mine")
    with pytest.raises(ValueError, match=r"^Cannot export to '.*out': it is a "
                       r"file, not a directory\. Pass a new or existing "
                       r"directory\.$"):
        keras_ema.export_model(model, str(target), verbose=0)
    assert target.read_text() == "mine"
    assert os.listdir(tmp_path) == ["out"]


def test_an_ema_never_updated_is_not_exported(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ema = keras_ema.MultiEMA(decays=(0.9,), period=10**30, verbose=0)
    with pytest.warns(UserWarning, match=r"epoch 1 ended after 4 optimizer steps "
                      r"with no EMA update yet \(one every 10+ steps\): the EMAs "
                      r"still equal the initial weights"):
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[ema])
    assert ema.num_updates == 0
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=r"^Cannot export the EMA with decay 0\.9: "
                       r"it was never updated \(no update in 4 optimizer steps") as e:
        export_ema(ema, 0.9, str(target), verbose=0)
    assert "\n" not in str(e.value)
    assert not target.exists()
