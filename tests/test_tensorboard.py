"""EMATensorBoard: each EMA a TensorBoard run beside Keras's validation run."""

import glob
import os
import sys

import keras
import numpy as np
import pytest

import keras_ema

pytestmark = pytest.mark.all_backends

DECAYS = (0.3, 0.5)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    return x, y


def _model():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _scalars(run_dir):
    """`{tag: {step: value}}` of the scalar summaries in a run's event files."""
    import tensorflow as tf

    found = {}
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, {})[event.step] = float(
                    tf.make_ndarray(value.tensor))
    return found


def _runs(log_dir):
    """The run directories (relative to `log_dir`) that hold event files."""
    paths = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    return {os.path.relpath(os.path.dirname(p), log_dir) for p in paths}


def test_each_ema_is_a_validation_run_with_keras_tags(tmp_path):
    pytest.importorskip("tensorboard")
    x, y = _data()
    log_dir = str(tmp_path / "logs")
    ema = keras_ema.MultiEMA(decays=DECAYS, period=1, validation_data=(x, y), verbose=0)
    history = _model().fit(
        x, y, batch_size=16, epochs=3, validation_data=(x, y), verbose=0,
        callbacks=[ema, keras.callbacks.TensorBoard(log_dir, write_graph=False),
                   keras_ema.EMATensorBoard(ema, log_dir)])
    logs = history.history

    assert _runs(log_dir) == {"train", "validation",
                              os.path.join("ema_0.3", "validation"),
                              os.path.join("ema_0.5", "validation")}
    steps = {0: None, 1: None, 2: None}
    # Keras's own validation run: the SGD weights, tags epoch_<metric>.
    sgd = _scalars(os.path.join(log_dir, "validation"))
    for metric in ("accuracy", "loss"):
        assert set(sgd[f"epoch_{metric}"]) == set(steps)
        np.testing.assert_allclose([sgd[f"epoch_{metric}"][e] for e in steps],
                                   logs[f"val_{metric}"], rtol=1e-6)
    for decay in DECAYS:
        run = _scalars(os.path.join(log_dir, f"ema_{decay}", "validation"))
        # The same tags as Keras's validation run, so they share its charts.
        assert set(run) == {"epoch_accuracy", "epoch_loss"}
        for metric in ("accuracy", "loss"):
            assert set(run[f"epoch_{metric}"]) == set(steps)
            np.testing.assert_allclose([run[f"epoch_{metric}"][e] for e in steps],
                                       logs[f"ema_{decay}_val_{metric}"], rtol=1e-6)
    # The two EMAs differ from each other (the runs are not copies of one).
    assert logs["ema_0.3_val_loss"] != logs["ema_0.5_val_loss"]


def test_placed_before_multi_ema_warns(tmp_path):
    pytest.importorskip("tensorboard")
    x, y = _data()
    ema = keras_ema.MultiEMA(decays=DECAYS, period=1, validation_data=(x, y), verbose=0)
    board = keras_ema.EMATensorBoard(ema, str(tmp_path))
    with pytest.warns(UserWarning, match=r"EMATensorBoard comes before MultiEMA"):
        _model().fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[board, ema])


def test_needs_validation_data(tmp_path):
    pytest.importorskip("tensorboard")
    x, y = _data()
    ema = keras_ema.MultiEMA(decays=DECAYS, period=1, verbose=0)
    board = keras_ema.EMATensorBoard(ema, str(tmp_path))
    with pytest.raises(ValueError, match=r"needs a MultiEMA with `validation_data`"):
        _model().fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema, board])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"Received: ema='logs'"):
        keras_ema.EMATensorBoard("logs")
    ema = keras_ema.MultiEMA(decays=DECAYS, verbose=0)
    with pytest.raises(ValueError, match=r"Received: log_dir=None"):
        keras_ema.EMATensorBoard(ema, None)


def test_without_tensorflow_a_one_line_error(monkeypatch):
    # `None` in sys.modules makes `import tensorflow` raise ImportError.
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    monkeypatch.setitem(sys.modules, "tensorflow.summary", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    ema = keras_ema.MultiEMA(decays=DECAYS, verbose=0)
    with pytest.raises(ImportError, match=r'pip install "keras-ema\[tensorflow\]"') as error:
        keras_ema.EMATensorBoard(ema, "logs")
    assert "\n" not in str(error.value)
