"""MultiEMA with the fit options users pass: datasets, monitors, subclassed models."""

import keras
import numpy as np
import pytest

import keras_ema
from ema_reference import Recorder
from ema_reference import data
from ema_reference import reference_ema
from ema_reference import tiny_model

pytestmark = [
    pytest.mark.all_backends,
    # Runs of 16-100 steps end inside the decays' warm-up, as intended here.
    pytest.mark.filterwarnings("ignore:MultiEMA. the warm-up"),
]

DECAYS = (0.9, 0.968)


def averaged(model):
    stats = set()
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            stats |= {id(layer.moving_mean), id(layer.moving_variance)}
    return [v.trainable or id(v) in stats for v in model.weights]


def assert_follows_reference(model, ema, recorder, period):
    expected = reference_ema(recorder.records, DECAYS, period, True, averaged(model))
    for k, decay in enumerate(DECAYS):
        for g, e in zip(ema.ema_weights(decay), expected[k]):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ema.ema_weights(0.968)[0], model.get_weights()[0])


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, i):
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[s], self.y[s]


@pytest.mark.parametrize("kind", ["tf.data", "tf.data.repeat", "pydataset"])
def test_dataset_inputs_follow_the_reference(kind):
    import tensorflow as tf

    x, y = data(40)
    model = tiny_model()
    if kind == "pydataset":
        train, steps = Batches(x, y, 4), None
    else:
        train = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
        steps = None
        if kind == "tf.data.repeat":  # unknown length, steps_per_epoch given
            train, steps = train.repeat(), 10
    recorder = Recorder()
    ema = keras_ema.MultiEMA(DECAYS, period=3, verbose=0, validation_data=train
                             if kind == "pydataset" else (x[:12], y[:12]))
    model.fit(train, epochs=3, steps_per_epoch=steps, verbose=0,
              callbacks=[recorder, ema])
    assert ema.step == 30 and ema.num_updates == 10
    assert_follows_reference(model, ema, recorder, period=3)


def test_early_stopping_and_reduce_lr_read_the_ema_loss():
    x, y = data(40)
    xv, yv = data(12, seed=3)
    model = tiny_model()
    ema = keras_ema.MultiEMA(DECAYS, period=2, verbose=0, validation_data=(xv, yv))
    # min_delta larger than any change: no epoch improves on the first.
    stop = keras.callbacks.EarlyStopping(monitor="ema_0.968_val_loss", mode="min",
                                         patience=2, min_delta=100.0)
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="ema_0.968_val_loss", mode="min", patience=1, factor=0.5,
        min_delta=100.0, verbose=0)
    history = model.fit(x, y, batch_size=4, epochs=10, verbose=0,
                        callbacks=[ema, stop, plateau])
    losses = history.history["ema_0.968_val_loss"]
    assert len(losses) == 3  # stopped after patience=2 epochs without progress
    assert stop.best == pytest.approx(losses[0])
    # Halved at the end of epochs 1 and 2 (patience 1), each epoch logging
    # the rate it trained with.
    np.testing.assert_allclose(history.history["learning_rate"],
                               [0.1, 0.1, 0.05], rtol=1e-6)
    assert float(keras.ops.convert_to_numpy(
        model.optimizer.learning_rate)) == pytest.approx(0.025)


def test_early_stopping_restores_the_best_epoch_by_the_ema_loss():
    x, y = data(40)
    model = tiny_model()
    ema = keras_ema.MultiEMA(DECAYS, period=1, verbose=0, validation_data=(x, y))
    stop = keras.callbacks.EarlyStopping(monitor="ema_0.9_val_loss", mode="min",
                                         patience=10)
    history = model.fit(x, y, batch_size=4, epochs=4, verbose=0,
                        callbacks=[ema, stop])
    losses = history.history["ema_0.9_val_loss"]
    assert stop.best == pytest.approx(min(losses))
    assert ema.best[0.9]["loss"]["epoch"] == int(np.argmin(losses))


@pytest.mark.parametrize(
    "make_callback,ema_kwargs,match",
    [
        (lambda: keras.callbacks.EarlyStopping(monitor="ema_0.968_val_loss"),
         {}, r"^EarlyStopping\(monitor='ema_0.968_val_loss'\) needs an explicit "
             r"mode.*Pass mode='min'\.$"),
        (lambda: keras.callbacks.ReduceLROnPlateau(monitor="ema_0.9_val_accuracy"),
         {}, r"ReduceLROnPlateau.*Pass mode='max'\.$"),
        (lambda: keras.callbacks.EarlyStopping(monitor="ema_0.99_val_loss",
                                               mode="min"),
         {}, r"does not keep: monitor one of ema_0.9_val_loss, ema_0.968_val_loss\.$"),
        (lambda: keras.callbacks.EarlyStopping(monitor="ema_0.9_val_loss",
                                               mode="min"),
         {"validation_data": None},
         r"MultiEMA has no validation_data .*validation_split.*Pass "
         r"MultiEMA\(validation_data=\(x_val, y_val\)\)\.$"),
    ],
)
def test_monitors_that_cannot_work_fail_before_the_first_step(
        make_callback, ema_kwargs, match):
    x, y = data(40)
    model = tiny_model()
    kwargs = dict(validation_data=(x[:8], y[:8]), verbose=0)
    kwargs.update(ema_kwargs)
    ema = keras_ema.MultiEMA(DECAYS, period=2, **kwargs)
    with pytest.raises(ValueError, match=match) as info:
        model.fit(x, y, batch_size=4, epochs=2, validation_split=0.25, verbose=0,
                  callbacks=[ema, make_callback()])
    assert "\n" not in str(info.value)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0


def test_validation_split_trains_and_the_ema_is_evaluated_on_its_own_data():
    x, y = data(40)
    model = tiny_model()
    # Keras' validation_split holds out the last 25% before shuffling: give
    # MultiEMA the same rows to compare the EMA with the live model on them.
    ema = keras_ema.MultiEMA(DECAYS, period=2, verbose=0,
                             validation_data=(x[30:], y[30:]))
    history = model.fit(x, y, batch_size=4, epochs=2, validation_split=0.25,
                        verbose=0, callbacks=[ema])
    assert ema.step == 16  # 30 training rows, 8 batches per epoch
    with ema.swapped_in(0.968) as m:
        expected = m.evaluate(x[30:], y[30:], verbose=0, return_dict=True)
    assert history.history["ema_0.968_val_loss"][-1] == pytest.approx(
        expected["loss"], rel=1e-6)
    live = model.evaluate(x[30:], y[30:], verbose=0, return_dict=True)
    assert history.history["val_loss"][-1] == pytest.approx(live["loss"], rel=1e-6)


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1 = keras.layers.Dense(8, name="d1")
        self.bn = keras.layers.BatchNormalization(name="bn")
        self.d2 = keras.layers.Dense(3, name="d2")

    def call(self, x, training=False):
        return self.d2(keras.ops.relu(self.bn(self.d1(x), training=training)))


def test_subclassed_model_follows_the_reference_and_copies():
    x, y = data(40)
    model = Subclassed()
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    recorder = Recorder()
    ema = keras_ema.MultiEMA(DECAYS, period=2, verbose=0,
                             validation_data=(x[:12], y[:12]))
    history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
                        callbacks=[recorder, ema])
    assert "ema_0.968_val_accuracy" in history.history
    assert_follows_reference(model, ema, recorder, period=2)
    with ema.swapped_in(0.968) as m:
        expected = keras.ops.convert_to_numpy(m(x[:5]))
    copy = ema.ema_model(0.968)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(copy(x[:5])), expected,
                               rtol=1e-6, atol=1e-6)


def test_frozen_layer_with_validation_data_keeps_the_live_weights():
    # The frozen kernel is not averaged: each EMA evaluation leaves it as it
    # was (on JAX, evaluate donates its buffer, which a swap must not keep).
    x, y = data(40)
    model = tiny_model()
    model.get_layer("d1").trainable = False
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    frozen = keras.ops.convert_to_numpy(model.get_layer("d1").kernel)
    ema = keras_ema.MultiEMA(DECAYS, period=2, verbose=0,
                             validation_data=(x[:12], y[:12]))
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema])
    assert len(history.history["ema_0.968_val_loss"]) == 2
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.get_layer("d1").kernel), frozen)
    model.evaluate(x, y, verbose=0)
