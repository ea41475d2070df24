"""EMACheckpoint saves the EMA's weights (not the live ones) at its best epoch."""

import os
import warnings

import keras
import numpy as np
import pytest

import keras_ema
from ema_reference import Recorder
from ema_reference import data
from ema_reference import reference_ema
from ema_reference import tiny_model

pytestmark = pytest.mark.all_backends

DECAYS = (0.5, 0.9)
BATCHES = 10  # 40 samples in batches of 4


def _fit(tmp_path, monitor, mode="auto", filename="best.weights.h5", epochs=5):
    model = tiny_model()
    x, y = data()
    val = data(24, seed=2)
    recorder = Recorder()
    ema = keras_ema.MultiEMA(DECAYS, period=1, warmup=False, verbose=0,
                             validation_data=val)
    path = str(tmp_path / filename)
    checkpoint = keras_ema.EMACheckpoint(ema, path, decay=0.9, monitor=monitor,
                                         mode=mode)
    history = model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False,
                        verbose=0, callbacks=[recorder, ema, checkpoint])
    return recorder, history.history, checkpoint, path


def _expected_best_epoch(values, sign):
    best, epoch = None, None
    for e, v in enumerate(values):
        if best is None or sign * v > sign * best:
            best, epoch = v, e
    return epoch


@pytest.mark.parametrize("monitor,sign", [("val_loss", -1.0), ("accuracy", 1.0)])
def test_saves_the_ema_weights_of_the_best_epoch(tmp_path, monitor, sign):
    recorder, history, checkpoint, path = _fit(tmp_path, monitor)
    key = "ema_0.9_" + ("val_accuracy" if monitor == "accuracy" else monitor)
    best_epoch = _expected_best_epoch(history[key], sign)
    assert checkpoint.best_epoch == best_epoch  # counted from 0, as history
    assert checkpoint.best == pytest.approx(history[key][best_epoch])

    # The EMA at the end of that epoch, from the recorded live weights.
    records = recorder.records[: BATCHES * (best_epoch + 1) + 1]
    expected = reference_ema(records, DECAYS, 1, False,
                             [True] * len(records[0][1]))[1]
    saved = tiny_model()
    saved.load_weights(path)
    for got, want in zip(saved.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    live = records[-1][1]
    assert not all(np.allclose(g, w, atol=1e-4)
                   for g, w in zip(saved.get_weights(), live))


def test_keras_file_holds_the_ema_model(tmp_path):
    recorder, history, checkpoint, path = _fit(
        tmp_path, "val_loss", filename="best.keras", epochs=2)
    best_epoch = _expected_best_epoch(history["ema_0.9_val_loss"], -1.0)
    records = recorder.records[: BATCHES * (best_epoch + 1) + 1]
    expected = reference_ema(records, DECAYS, 1, False,
                             [True] * len(records[0][1]))[1]
    loaded = keras.saving.load_model(path)
    for got, want in zip(loaded.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_placed_before_the_ema_warns_and_saves_nothing(tmp_path):
    model = tiny_model()
    x, y = data()
    ema = keras_ema.MultiEMA(DECAYS, period=1, warmup=False, verbose=0,
                             validation_data=data(24, seed=2))
    path = str(tmp_path / "best.weights.h5")
    checkpoint = keras_ema.EMACheckpoint(ema, path, decay=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                  callbacks=[checkpoint, ema])
    text = " ".join(str(w.message) for w in caught)
    assert "EMACheckpoint comes before MultiEMA" in text
    assert "logs hold no ema_0.9_val_accuracy" in text
    assert not os.path.exists(path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(filepath="best.h5"), r"filepath='best.h5'"),
        (dict(decay=0.97), r"0.97 is not one of the kept decays \(0.5, 0.9\)"),
        (dict(decay=None), r"needs `decay`.*\(0.5, 0.9\)"),
        (dict(monitor="ema_0.9_val_accuracy"), "monitor='ema_0.9_val_accuracy'"),
        (dict(mode="best"), "mode='best'"),
    ],
)
def test_bad_arguments(kwargs, match):
    ema = keras_ema.MultiEMA(DECAYS, verbose=0)
    args = dict(filepath="best.weights.h5", decay=0.9) | kwargs
    with pytest.raises(ValueError, match=match):
        keras_ema.EMACheckpoint(ema, **args)


def test_single_decay_needs_no_decay_and_validation_data_is_required(tmp_path):
    sema = keras_ema.SwitchEMA(decay=0.9, verbose=0)
    checkpoint = keras_ema.EMACheckpoint(sema, str(tmp_path / "b.weights.h5"))
    assert checkpoint.key == "ema_0.9_val_accuracy"
    model = tiny_model()
    x, y = data()
    with pytest.raises(ValueError, match="needs a MultiEMA with `validation_data`"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[sema, checkpoint])


def test_model_checkpoint_on_an_ema_key_saves_the_live_model(tmp_path):
    # What the README says of Keras's ModelCheckpoint with these keys.
    x, y = data()
    val = data(24, seed=2)
    path = str(tmp_path / "live.weights.h5")
    model = tiny_model()
    ema = keras_ema.MultiEMA(DECAYS, period=1, warmup=False, verbose=0,
                             validation_data=val)
    auto = keras.callbacks.ModelCheckpoint(path, monitor="ema_0.9_val_loss",
                                           save_best_only=True,
                                           save_weights_only=True)
    # Keras 3.15.1 alone fails only after the first epoch ("mode='max'"):
    # MultiEMA refuses it before the first step.
    with pytest.raises(ValueError, match=r"needs an explicit mode.*Pass mode='min'\.$"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema, auto])
    model = tiny_model()
    recorder = Recorder()
    ema = keras_ema.MultiEMA(DECAYS, period=1, warmup=False, verbose=0,
                             validation_data=val)
    checkpoint = keras.callbacks.ModelCheckpoint(
        path, monitor="ema_0.9_val_loss", mode="min", save_best_only=True,
        save_weights_only=True)
    history = model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0,
                        callbacks=[recorder, ema, checkpoint]).history
    best_epoch = _expected_best_epoch(history["ema_0.9_val_loss"], -1.0)
    live = recorder.records[BATCHES * (best_epoch + 1)][1]
    saved = tiny_model()
    saved.load_weights(path)
    for got, want in zip(saved.get_weights(), live):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_of_another_ema_placed_before_this_one_is_fine(tmp_path):
    model = tiny_model()
    x, y = data()
    val = data(24, seed=2)
    first = keras_ema.MultiEMA((0.5,), period=1, warmup=False, verbose=0,
                               validation_data=val)
    second = keras_ema.MultiEMA((0.9,), period=1, warmup=False, verbose=0,
                                validation_data=val)
    path = str(tmp_path / "first.weights.h5")
    checkpoint = keras_ema.EMACheckpoint(first, path, monitor="val_loss")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[first, checkpoint, second])
    assert not [w for w in caught if "callback list" in str(w.message)]
    assert os.path.exists(path)
