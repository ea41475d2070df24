import math
import warnings

import keras
import numpy as np
import pytest

import keras_ema
from keras_ema import MultiEMA
from ema_reference import Recorder
from ema_reference import reference_ema
from ema_reference import tiny_model
from ema_reference import data
from ema_reference import StopAtEpoch

pytestmark = pytest.mark.all_backends

DECAYS = (0.5, 0.9)


def bn_stat_mask(model):
    bn = model.get_layer("bn")
    stats = {id(bn.moving_mean), id(bn.moving_variance)}
    return [id(v) in stats for v in model.weights]


@pytest.mark.parametrize(
    "period,spe,warmup,average_bn",
    [
        (1, 1, True, True),
        (3, 1, True, True),
        (16, 1, True, True),
        (1, 4, True, True),
        (3, 4, True, True),
        (16, 4, True, True),
        (3, 1, False, True),
        (3, 4, True, False),
    ],
)
def test_shadows_match_numpy_reference(period, spe, warmup, average_bn):
    model = tiny_model(spe)
    x, y = data()
    recorder = Recorder()
    ema = MultiEMA(DECAYS, period=period, warmup=warmup,
                   average_batch_norm=average_bn, verbose=0)
    model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0,
              callbacks=[recorder, ema])
    assert recorder.records[-1][0] == 30
    is_bn = bn_stat_mask(model)
    averaged = [not (b and not average_bn) for b in is_bn]
    expected = reference_ema(recorder.records, DECAYS, period, warmup, averaged)
    assert ema.num_updates == sum(
        (s // period - p // period)
        for (p, _), (s, _) in zip(recorder.records, recorder.records[1:])
    )
    for k, decay in enumerate(DECAYS):
        got = ema.ema_weights(decay)
        for j, (g, e) in enumerate(zip(got, expected[k])):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6,
                                       err_msg=f"decay {decay} weight {j}")
    # The EMAs really differ from the live weights and from each other.
    live = model.get_weights()
    assert not np.allclose(ema.ema_weights(0.9)[0], live[0])
    assert not np.allclose(ema.ema_weights(0.5)[0], ema.ema_weights(0.9)[0])


def test_batch_norm_statistics_live_when_not_averaged():
    model = tiny_model()
    x, y = data()
    ema = MultiEMA(DECAYS, period=1, average_batch_norm=False, verbose=0)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
    bn = model.get_layer("bn")
    live_mean = keras.ops.convert_to_numpy(bn.moving_mean).copy()
    live_kernel = keras.ops.convert_to_numpy(model.get_layer("d1").kernel).copy()
    with ema.swapped_in(0.9):
        mean_in_swap = keras.ops.convert_to_numpy(bn.moving_mean).copy()
        kernel_in_swap = keras.ops.convert_to_numpy(model.get_layer("d1").kernel)
    # The BN statistics are not averaged: the swap leaves the live ones...
    np.testing.assert_array_equal(mean_in_swap, live_mean)
    # ...while the kernels are averaged, so they do change.
    assert not np.array_equal(kernel_in_swap, live_kernel)


def test_validation_metrics_equal_evaluate_inside_swap():
    model = tiny_model()
    x, y = data()
    xv, yv = data(24, seed=2)
    ema = MultiEMA(DECAYS, period=2, validation_data=(xv, yv), verbose=0)
    history = model.fit(x, y, batch_size=4, epochs=3, verbose=0,
                        callbacks=[ema])
    for decay in DECAYS:
        with ema.swapped_in(decay) as m:
            expected = m.evaluate(xv, yv, verbose=0, return_dict=True)
        for key in ("loss", "accuracy"):
            got = history.history[f"ema_{decay}_val_{key}"]
            assert len(got) == 3
            assert got[-1] == pytest.approx(expected[key], rel=1e-5, abs=1e-6)
        losses = history.history[f"ema_{decay}_val_loss"]
        accs = history.history[f"ema_{decay}_val_accuracy"]
        assert ema.best[decay]["loss"]["value"] == pytest.approx(min(losses))
        assert ema.best[decay]["loss"]["epoch"] == int(np.argmin(losses))
        assert ema.best[decay]["accuracy"]["value"] == pytest.approx(max(accs))
        assert ema.best[decay]["accuracy"]["epoch"] == int(np.argmax(accs))


def test_best_weights_are_saved(tmp_path):
    model = tiny_model()
    x, y = data()
    ema = MultiEMA(DECAYS, period=1, validation_data=(x, y),
                   best_weights_dir=str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"ema_{d}_best_{c}.weights.h5" for d in DECAYS for c in ("accuracy", "loss")
    )
    # The file of the last-epoch best holds that epoch's EMA.
    if ema.best[0.9]["loss"]["epoch"] == 1:
        other = tiny_model()
        other.load_weights(str(tmp_path / "ema_0.9_best_loss.weights.h5"))
        for a, b in zip(other.get_weights(), ema.ema_weights(0.9)):
            np.testing.assert_array_equal(a, b)


class _EMAWeightsPerEpoch(keras.callbacks.Callback):
    def __init__(self, ema):
        super().__init__()
        self.ema, self.weights = ema, []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append({d: self.ema.ema_weights(d) for d in self.ema.decays})


def test_best_files_hold_weights_only_each_written_once(tmp_path, monkeypatch):
    import os

    import h5py

    from keras_ema import multi_ema

    writes = []
    write = multi_ema.write_weights

    def counted(model, path, **kwargs):
        writes.append(path)
        write(model, path, **kwargs)

    monkeypatch.setattr(multi_ema, "write_weights", counted)
    model = tiny_model()
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    x, y = data()
    ema = MultiEMA(DECAYS, period=1, validation_data=(x, y),
                   best_weights_dir=str(tmp_path), verbose=0)
    per_epoch = _EMAWeightsPerEpoch(ema)
    history = model.fit(x, y, batch_size=4, epochs=4, verbose=0,
                        callbacks=[ema, per_epoch]).history
    # Improvements recomputed from the logs: one serialization per (decay,
    # epoch) that improved either criterion, however many criteria did.
    improved = set()
    for decay in DECAYS:
        for key, sign in (("accuracy", 1), ("loss", -1)):
            values = history[f"ema_{decay}_val_{key}"]
            for epoch, value in enumerate(values):
                if all(sign * value > sign * v for v in values[:epoch]):
                    improved.add((decay, epoch))
    assert len(writes) == len(improved)
    assert len(improved) < 4 * len(DECAYS)  # some epoch improved both
    for decay in DECAYS:
        paths = {c: str(tmp_path / f"ema_{decay}_best_{c}.weights.h5")
                 for c in ("accuracy", "loss")}
        for criterion, path in paths.items():
            with h5py.File(path, "r") as f:
                assert "optimizer" not in f and "layers" in f
            other = tiny_model()
            other.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
            other.load_weights(path)
            want = per_epoch.weights[ema.best[decay][criterion]["epoch"]][decay]
            for a, b in zip(other.get_weights(), want):
                np.testing.assert_array_equal(a, b)
        same = (ema.best[decay]["accuracy"]["epoch"]
                == ema.best[decay]["loss"]["epoch"])
        inodes = {os.stat(p).st_ino for p in paths.values()}
        assert len(inodes) == (1 if same else 2)


def test_swap_restores_bit_for_bit_also_on_exception():
    model = tiny_model()
    x, y = data()
    ema = MultiEMA(DECAYS, period=1, verbose=0)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
    before = model.get_weights()
    with ema.swapped_in(0.5):
        inside = model.get_weights()
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(inside, ema.ema_weights(0.5)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped_in(0.9):
            raise RuntimeError("boom")
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="already swapped in"):
        with ema.swapped_in(0.9):
            with ema.swapped_in(0.5):
                pass
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_ema_model_is_independent_and_predicts_like_the_swap():
    model = tiny_model()
    x, y = data()
    ema = MultiEMA(DECAYS, period=1, verbose=0)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
    before = model.get_weights()
    shipped = ema.ema_model(0.9)
    with ema.swapped_in(0.9) as m:
        expected = m.predict(x, verbose=0)
    np.testing.assert_allclose(shipped.predict(x, verbose=0), expected,
                               rtol=1e-6, atol=1e-6)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert shipped.evaluate(x, y, verbose=0) is not None  # compiled copy


def test_nonfinite_weights_skip_the_update_and_warn():
    model = tiny_model()
    x, y = data(8)

    class Poison(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                w = self.model.get_layer("d2").bias
                w.assign(np.full(w.shape, np.nan, "float32"))

    ema = MultiEMA(DECAYS, period=1, verbose=0)
    with pytest.warns(UserWarning, match="skipped the EMA update"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[Poison(), ema])
    assert ema.skipped_steps == [1, 2]
    assert ema.num_updates == 0
    for w in ema.ema_weights(0.9):
        assert np.all(np.isfinite(w))

    model = tiny_model()
    ema = MultiEMA(DECAYS, period=1, raise_on_nonfinite=True, verbose=0)
    with pytest.raises(FloatingPointError, match="step 1"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[Poison(), ema])


def test_resume_with_backup_and_restore_matches_uninterrupted(tmp_path):
    x, y = data()
    xv, yv = data(12, seed=3)

    def run(callbacks_extra, backup):
        keras.utils.set_random_seed(7)
        model = tiny_model()
        ema = MultiEMA(DECAYS, period=3, validation_data=(xv, yv),
                       backup_dir=backup, verbose=0)
        callbacks = [ema]
        if backup:
            callbacks.append(keras.callbacks.BackupAndRestore(backup))
        model.fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0,
                  callbacks=callbacks + callbacks_extra)
        return model, ema

    model_a, ema_a = run([], None)
    backup = str(tmp_path / "backup")
    with pytest.raises(KeyboardInterrupt):
        run([StopAtEpoch(2)], backup)
    model_b, ema_b = run([], backup)
    assert ema_b.step == ema_a.step == 40
    assert ema_b.num_updates == ema_a.num_updates
    for decay in DECAYS:
        for criterion in ("accuracy", "loss"):
            a, b = ema_a.best[decay][criterion], ema_b.best[decay][criterion]
            assert a["epoch"] == b["epoch"]
            assert a["value"] == pytest.approx(b["value"], rel=1e-6)
    for decay in DECAYS:
        for a, b in zip(ema_a.ema_weights(decay), ema_b.ema_weights(decay)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Without its state the resumed run would restart the EMAs (and the test
    # above could not pass): check the files were really used.
    assert ema_b.num_updates == 13


def test_warmup_end_steps_and_schedule_summary():
    assert [keras_ema.warmup_end_step(d) for d in keras_ema.DEFAULT_DECAYS] == [
        272, 553, 1115, 2240, 4490
    ]
    # At the end step the warm-up value reaches the decay, one step before not.
    for d in keras_ema.DEFAULT_DECAYS:
        t = keras_ema.warmup_end_step(d)
        assert (t + 1) / (t + 10) >= d - 1e-12
        assert t / (t + 9) < d
    assert keras_ema.warmup_decay(0.998, 0) == pytest.approx(0.1)
    text = MultiEMA(period=16, verbose=0).schedule_summary()
    assert f"{0.998 ** (1 / 16):.6f}" in text and "4490" in text


def test_short_run_warns():
    model = tiny_model()
    x, y = data(8)
    with pytest.warns(UserWarning, match="stay identical"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[MultiEMA((0.99, 0.999), verbose=0)])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(decays=(0.9, 1.0)), r"decays=\(0.9, 1.0\)"),
        (dict(decays=(0.0,)), "strictly between 0 and 1"),
        (dict(decays=()), r"decays=\(\)"),
        (dict(decays=(0.9, 0.9)), "distinct"),
        (dict(decays="abc"), "decays='abc'"),
        (dict(period=0), "period=0"),
        (dict(period=2.5), "period=2.5"),
        (dict(period=True), "period=True"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiEMA(**kwargs)


def test_use_before_training_and_unknown_decay():
    ema = MultiEMA(DECAYS, verbose=0)
    with pytest.raises(ValueError, match="fit"):
        with ema.swapped_in(0.9):
            pass
    model = tiny_model()
    x, y = data(8)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
    with pytest.raises(ValueError, match=r"0\.7 is not one of the kept decays"):
        with ema.swapped_in(0.7):
            pass


def test_unbuilt_model_is_refused():
    model = keras.Sequential([keras.layers.Dense(2)])
    ema = MultiEMA(DECAYS, verbose=0)
    ema.set_model(model)
    with pytest.raises(ValueError, match="built model"):
        ema._build(model)


def test_update_is_one_compiled_call_without_retracing():
    model = tiny_model()
    x, y = data()
    ema = MultiEMA(DECAYS, period=1, verbose=0)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema])
    if keras.backend.backend() == "tensorflow":
        assert ema._update.tracing_count() == 1
    assert math.isclose(ema.num_updates, 20)


# === Issue 17: optimizer steps, steps_per_execution, what is averaged ===


class WeightChanges(keras.callbacks.Callback):
    """Counts the batches after which the weights changed (real steps)."""

    def on_train_begin(self, logs=None):
        self.last = self.model.get_weights()[0]
        self.changes = 0

    def on_train_batch_end(self, batch, logs=None):
        now = self.model.get_weights()[0]
        self.changes += int(not np.array_equal(now, self.last))
        self.last = now


@pytest.mark.parametrize(
    "accumulation,period,loss_scale,spe",
    [
        (None, 1, False, 1),
        (None, 3, False, 1),
        (4, 1, False, 1),
        (4, 3, False, 1),
        (4, 3, True, 1),  # LossScaleOptimizer: its step is read per batch
        (4, 1, False, 3),  # steps_per_execution=3 on top
    ],
)
def test_gradient_accumulation_counts_real_optimizer_steps(
    accumulation, period, loss_scale, spe
):
    model = tiny_model(spe, accumulation=accumulation, loss_scale=loss_scale)
    x, y = data()
    per_step = 4 if accumulation else 1
    # A first fit of 10 batches leaves the batch counter at 10, not a
    # multiple of 4: the second fit must start from 2 real steps, 2 batches
    # into the third.
    first, second, changes = Recorder(), Recorder(), WeightChanges()
    ema = MultiEMA(DECAYS, period=period, verbose=0)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0,
              callbacks=[first, changes, ema])
    n_changes = changes.changes
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[second, changes, ema])
    n_changes += changes.changes
    records = first.records + second.records[1:]
    # Keras's own count: 30 batches are 30 // 4 = 7 real steps, and the
    # weights changed exactly that many times.
    assert records[-1][0] == 30 // per_step == n_changes
    assert ema.step == 30 // per_step
    assert ema.num_updates == (30 // per_step) // period
    expected = reference_ema(records, DECAYS, period, True,
                             [True] * len(model.weights))
    for k, decay in enumerate(DECAYS):
        for j, (g, e) in enumerate(zip(ema.ema_weights(decay), expected[k])):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6,
                                       err_msg=f"decay {decay} weight {j}")


def test_misaligned_steps_per_execution_warns_once_with_a_period():
    x, y = data(32)  # 8 batches of 4
    model = tiny_model(steps_per_execution=4)
    with pytest.warns(UserWarning, match=r"up to 3 batches late.*period=4") as rec:
        model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                  callbacks=[MultiEMA(DECAYS, period=3, verbose=0)])
    assert sum("batches late" in str(w.message) for w in rec) == 1
    model = tiny_model(steps_per_execution=4, accumulation=2)
    with pytest.warns(UserWarning, match=r"period=2 \(period \* gradient"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[MultiEMA(DECAYS, period=1, verbose=0)])
    for period in (4, 8):
        model = tiny_model(steps_per_execution=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            warnings.filterwarnings("ignore", message=".*stay identical")
            model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                      callbacks=[MultiEMA(DECAYS, period=period, verbose=0)])


class Counter(keras.layers.Layer):
    """Adds 1.0 to a float non-trainable variable at every training call."""

    def build(self, input_shape):
        self.count = self.add_weight(shape=(), initializer="zeros",
                                     trainable=False, name="count")

    def call(self, x, training=False):
        if training:
            self.count.assign_add(1.0)
        return x


def test_non_trainable_counter_is_copied_not_averaged():
    inputs = keras.Input((4,))
    h = Counter(name="counter")(inputs)
    h = keras.layers.Dense(8, name="d1")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    outputs = keras.layers.Dense(3, name="d2")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(84)
    recorder = Recorder()
    ema = MultiEMA((0.9,), period=1, verbose=0)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0,
              callbacks=[recorder, ema])
    counter = model.get_layer("counter").count
    index = [i for i, v in enumerate(model.weights) if v is counter][0]
    assert float(keras.ops.convert_to_numpy(counter)) == 21.0
    # Everything but the counter is averaged (kernels, biases, BN gamma and
    # beta, BN moving statistics); the counter takes its live value.
    averaged = [i != index for i in range(len(model.weights))]
    expected = reference_ema(recorder.records, (0.9,), 1, True, averaged)[0]
    got = ema.ema_weights(0.9)
    assert float(got[index]) == 21.0
    for j, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=str(j))
    with ema.swapped_in(0.9):
        assert float(keras.ops.convert_to_numpy(counter)) == 21.0
    shipped = ema.ema_model(0.9)
    count = shipped.get_layer("counter").count
    assert float(keras.ops.convert_to_numpy(count)) == 21.0
    assert counter.path not in ema.get_state()["paths"]


def test_set_state_is_all_or_nothing():
    model = tiny_model()
    x, y = data()
    ema = MultiEMA(DECAYS, period=1, verbose=0)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
    before = ema.get_state()
    for corrupt, match in [
        (lambda s: s["shadows"].__setitem__(-1, s["shadows"][-1][..., :1]),
         "shadow 7 has shape"),
        (lambda s: s["shadows"][-1].__setitem__((0, 0), np.nan),
         "shadow 7 .* NaN"),
        (lambda s: s.pop("best"), r"missing keys \['best'\]"),
        (lambda s: s.__setitem__("step", "ten"), "bad step"),
        (lambda s: s.__setitem__("step", -5), "step=-5 is negative"),
        (lambda s: s.__setitem__("attempted", -1), "attempted=-1 is negative"),
        (lambda s: s["update_log"].pop("steps"), "update_log is malformed"),
        (lambda s: s["update_log"].__setitem__("start", "zero"),
         "update_log is malformed"),
        (lambda s: s["update_log"]["steps"].pop(), "steps but .* rows of decays"),
        (lambda s: s["update_log"]["decays"][0].pop(), "row of decays"),
        (lambda s: s["update_log"]["steps"].__setitem__(0, -3), "negative steps"),
        (lambda s: s["update_log"]["decays"][0].__setitem__(0, float("nan")),
         "row of decays"),
        (lambda s: s.__setitem__("update_log", "log"), "update_log is malformed"),
    ]:
        state = ema.get_state()
        state["shadows"] = [np.array(s) for s in state["shadows"]]
        # Every shadow but the last is changed to a valid new value.
        for s in state["shadows"][:-1]:
            s += 1.0
        corrupt(state)
        with pytest.raises(ValueError, match=match) as info:
            ema.set_state(state)
        assert "\n" not in str(info.value)
        after = ema.get_state()
        assert after["step"] == before["step"]
        assert after["attempted"] == before["attempted"]
        assert after["update_log"] == before["update_log"]
        for a, b in zip(before["shadows"], after["shadows"]):
            np.testing.assert_array_equal(a, b)


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size=8):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, i):
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[s], self.y[s]


def _as(kind, x, y):
    if kind == "tuple":
        return (x, y)
    if kind == "pydataset":
        return _Batches(x, y)
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


@pytest.mark.parametrize("kind", ["tuple", "pydataset", "tf.data"])
def test_bad_validation_data_fails_before_training(kind):
    x, y = data()
    xv, yv = data(16, seed=2)
    cases = [
        (xv[:, :3], yv, "cannot be evaluated on its first batch"),
        (xv, (yv + 3).astype("int32"), r"class labels must be integers in \[0, 2\]"),
    ]
    for bad_x, bad_y, match in cases:
        model = tiny_model()
        ema = MultiEMA(DECAYS, validation_data=_as(kind, bad_x, bad_y),
                       verbose=0)
        with pytest.raises(ValueError, match=match) as err:
            model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
        assert "\n" not in str(err.value)
        # Nothing was trained.
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0


def test_validation_data_check_changes_no_result():
    x, y = data()
    xv, yv = data(16, seed=2)

    def run(validation_data):
        keras.utils.set_random_seed(3)
        model = tiny_model()
        ema = MultiEMA(DECAYS, period=2, validation_data=validation_data,
                       verbose=0)
        model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema])
        return model.get_weights() + ema.ema_weights(0.9)

    for a, b in zip(run(None), run(_as("pydataset", xv, yv))):
        np.testing.assert_array_equal(a, b)


def test_unfrozen_layer_after_the_first_fit_warns():
    model = tiny_model()
    model.get_layer("d1").trainable = False
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    ema = MultiEMA(DECAYS, period=1, verbose=0)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
    kernel = model.get_layer("d1").kernel
    assert kernel.path not in ema.get_state()["paths"]
    model.get_layer("d1").trainable = True
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.warns(UserWarning, match=r"d1/kernel.*became trainable"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
    # The frozen kernel was copied live, never averaged; reset() averages it.
    ema.reset()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
    assert kernel.path in ema.get_state()["paths"]

def test_restore_backup_outside_fit(tmp_path):
    x, y = data()
    backup = str(tmp_path / "backup")
    model = tiny_model()
    trained = MultiEMA(DECAYS, period=3, validation_data=data(12, seed=3),
                       backup_dir=backup, verbose=0)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[trained])
    # A new MultiEMA, as in a program started after training ended.
    restored = MultiEMA(DECAYS, period=3, backup_dir=backup, verbose=0)
    assert restored.restore_backup(model) is True
    assert restored.step == 20 and restored.num_updates == trained.num_updates
    assert restored.best == trained.best
    for decay in DECAYS:
        for a, b in zip(trained.ema_weights(decay), restored.ema_weights(decay)):
            np.testing.assert_array_equal(a, b)
    # No state at the model's step: the EMAs start from the current weights.
    model.optimizer.iterations.assign(7)
    fresh = MultiEMA(DECAYS, period=3, backup_dir=str(tmp_path / "none"), verbose=0)
    assert fresh.restore_backup(model) is False
    for a, b in zip(fresh.ema_weights(0.5), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="backup_dir=None"):
        MultiEMA(DECAYS, verbose=0).restore_backup(model)


@pytest.mark.parametrize(
    "make,late",
    [
        (lambda: MultiEMA((0.5, 0.99), verbose=0), "decay 0.99 ends at optimizer step 890"),
        (lambda: keras_ema.SwitchEMA(0.998, verbose=0), "decay 0.998 ends at optimizer step 4490"),
        (lambda: keras_ema.Belay(0.998, verbose=0), "decay 0.998 ends at optimizer step 4490"),
    ],
)
def test_short_run_warns_for_any_ema_still_warming_up(make, late):
    # 10 optimizer steps: 0.5 leaves its warm-up at step 8, 0.99 at 890.
    model = tiny_model()
    x, y = data()
    with pytest.warns(UserWarning, match=f"{late}, after the run's 10 steps"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[make()])


def test_short_run_without_warmup_or_past_it_does_not_warn():
    x, y = data()
    for ema in (MultiEMA((0.99,), warmup=False, verbose=0), MultiEMA((0.5,), verbose=0)):
        model = tiny_model()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
        assert not [w for w in caught if "warm-up" in str(w.message)]


def test_schedule_summary_names_the_class_and_counts():
    assert MultiEMA(verbose=0).schedule_summary().startswith(
        "MultiEMA: 5 EMAs, one update every 16 optimizer steps")
    assert MultiEMA((0.9,), period=1, verbose=0).schedule_summary().startswith(
        "MultiEMA: 1 EMA (decay 0.9), one update every optimizer step,")
    assert keras_ema.SwitchEMA(verbose=0).schedule_summary().startswith(
        "SwitchEMA: 1 EMA (decay 0.998), one update every 16 optimizer steps")
    assert keras_ema.Belay(verbose=0).schedule_summary().startswith(
        "Belay: 1 EMA (decay 0.998),")


def test_best_of_an_untracked_decay_names_the_tracked_ones():
    ema = MultiEMA(DECAYS, period=1, verbose=0)
    with pytest.raises(KeyError) as caught:
        ema.best[0.9]
    assert str(caught.value) == (
        "No best epoch recorded yet for decay 0.9: `best` is filled at each "
        "epoch end, and only with `validation_data`.")
    model = tiny_model()
    x, y = data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0,
              callbacks=[ema])
    with pytest.raises(KeyError) as caught:
        ema.best[0.97]
    assert str(caught.value) == (
        "Invalid decay: 0.97 is not one of the kept decays (0.5, 0.9).")
    assert isinstance(caught.value, keras_ema.UntrackedDecayError)


def _order_warnings(callbacks, ema):
    model = tiny_model()
    x, y = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=callbacks)
    return [str(w.message) for w in caught if "callback list" in str(w.message)]


def test_callbacks_before_multi_ema_that_miss_its_keys_warn(tmp_path):
    val = data(12, seed=2)
    ema = MultiEMA(DECAYS, period=1, verbose=0, validation_data=val)
    csv = str(tmp_path / "log.csv")
    found = _order_warnings([
        keras.callbacks.CSVLogger(csv),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "m.weights.h5"),
                                        save_weights_only=True),
        keras.callbacks.EarlyStopping(monitor="ema_0.9_val_loss", mode="min"),
        ema,
    ], ema)
    assert found == [
        "MultiEMA: CSVLogger, EarlyStopping come before MultiEMA in the "
        "callback list, so at each epoch end it runs before the "
        "`ema_<decay>_val_*` keys are added and never sees them (a CSVLogger "
        "writes no EMA column). Put MultiEMA first: callbacks=[multiema, ...]."
    ]
    with open(csv) as f:
        assert "ema_0.9_val_accuracy" not in f.readline()


def test_multi_ema_first_gives_no_order_warning_and_full_logs(tmp_path):
    val = data(12, seed=2)
    ema = MultiEMA(DECAYS, period=1, verbose=0, validation_data=val)
    csv = str(tmp_path / "log.csv")
    assert _order_warnings([ema, keras.callbacks.CSVLogger(csv)], ema) == []
    with open(csv) as f:
        assert "ema_0.9_val_accuracy" in f.readline()
    # Without validation_data there are no EMA keys to miss.
    quiet = MultiEMA(DECAYS, period=1, verbose=0)
    assert _order_warnings([keras.callbacks.CSVLogger(csv), quiet], quiet) == []


def test_schedule_summary_follows_verbose_and_keras_logging(capsys, caplog):
    import logging

    model = tiny_model(1)
    x, y = data()
    summary = "MultiEMA: 1 EMA (decay 0.5), one update every optimizer step"

    def fit(verbose):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[MultiEMA((0.5,), period=1, verbose=verbose)])
        return capsys.readouterr().out

    assert summary in fit(1)
    assert "MultiEMA" not in fit(0)
    # With Keras' interactive logging off, the summary goes to absl.logging
    # (as Keras' own messages do), not to stdout.
    caplog.set_level(logging.INFO, logger="absl")
    keras.config.disable_interactive_logging()
    try:
        out = fit(1)
    finally:
        keras.config.enable_interactive_logging()
    assert "MultiEMA" not in out
    assert any(summary in r.getMessage() for r in caplog.records)


def test_state_file_round_trip_keeps_the_two_newest(tmp_path):
    import os

    from keras_ema import state_file

    shadows = [np.arange(6, dtype=np.float32).reshape(1, 2, 3),
               np.float32([[0.25]])]
    state = {"decays": [0.5], "attempted": 3, "best": {"0.5": {}},
             "shadows": shadows}
    for step in (3, 7, 12):
        state_file.write_state_file(str(tmp_path), dict(state, step=step))
    assert sorted(os.listdir(tmp_path)) == [
        "multi_ema_step000000000007.npz", "multi_ema_step000000000012.npz"]
    newest = tmp_path / "multi_ema_step000000000012.npz"
    back = state_file.read_state_file(str(newest))
    assert back["step"] == 12 and back["decays"] == [0.5]
    assert back["best"] == {"0.5": {}} and back["attempted"] == 3
    assert len(back["shadows"]) == 2
    for got, sent in zip(back["shadows"], shadows):
        np.testing.assert_array_equal(got, sent)
    assert state_file.backup_steps(str(tmp_path)) == [7, 12]
    newest.write_bytes(b"not a zip file")
    assert state_file.backup_steps(str(tmp_path)) == [7]
    with pytest.raises(ValueError, match=r"step000000000012.npz is damaged"):
        state_file.read_state_file(str(newest))


def test_an_epoch_that_ends_before_the_first_update_warns():
    # 10 steps per epoch, one update every 15: epoch 0 ends with the EMAs still
    # the initial weights (their metrics the initial model's); epoch 1 updates.
    model = tiny_model()
    x, y = data()
    ema = MultiEMA((0.9,), period=15, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema])
    found = [str(w.message) for w in caught if "no EMA update" in str(w.message)]
    assert found == [
        "MultiEMA: epoch 0 ended after 10 optimizer steps with no EMA update yet "
        "(one every 15 steps): the EMAs still equal the initial weights, and "
        "their metrics are the initial model's. Use a period of at most the "
        "steps per epoch, or train longer."]
    assert ema.num_updates == 1
