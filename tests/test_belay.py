import keras
import numpy as np
import pytest

from keras_ema import _backend
from keras_ema.belay import Belay
from keras_ema.multi_ema import MultiEMA
from ema_reference import ReferenceEMA
from ema_reference import Recorder
from ema_reference import tiny_model
from ema_reference import data

pytestmark = pytest.mark.all_backends

DECAY = 0.9  # (t + 1) / (t + 10) stays below it: every update is a warm-up one


def numpy_linear_run(x, y, kernel, bias, lr, batch, steps_per_execution,
                     epochs, period, coupling):
    """SGD on the mean squared error of x @ kernel + bias, coupled to an EMA."""
    w = [kernel.astype(np.float64), bias.astype(np.float64)]
    ref = ReferenceEMA(w, (DECAY,), period, True)
    step = 0

    def pull(shadows, weights):
        return [v - coupling * (v - s) for v, s in zip(weights, shadows[0])]

    n = len(x)
    for _ in range(epochs):
        for start in range(0, n, batch * steps_per_execution):
            for b in range(start, min(start + batch * steps_per_execution, n),
                           batch):
                xb, yb = x[b:b + batch], y[b:b + batch]
                residual = xb @ w[0] + w[1] - yb
                scale = 2.0 / residual.size
                w = [w[0] - lr * scale * xb.T @ residual,
                     w[1] - lr * scale * residual.sum(axis=0)]
                step += 1
            # Updates due at the same batch end run back to back.
            w = ref.advance(step, w, after_update=pull)
    return w, ref.shadows[0]


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_linear_training_matches_numpy(steps_per_execution):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                  steps_per_execution=steps_per_execution)
    kernel, bias = model.get_weights()
    belay = Belay(DECAY, coupling=0.3, period=3, verbose=0)
    model.fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0,
              callbacks=[belay])
    assert belay.num_updates == 5

    args = (x, y, kernel, bias, 0.1, 4, steps_per_execution, 4, 3)
    live, ema = numpy_linear_run(*args, coupling=0.3)
    for got, want in zip(model.get_weights(), live):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(belay.ema_weights(DECAY), ema):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The pull matters: without it the run ends elsewhere.
    free, _ = numpy_linear_run(*args, coupling=0.0)
    assert np.abs(model.get_weights()[0] - free[0]).max() > 1e-3
    if keras.backend.backend() == "tensorflow":
        assert belay._update.tracing_count() == 1


class Snapshot(keras.callbacks.Callback):
    """Records (optimizer step, all weights) after each batch."""

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.records.append((step, self.model.get_weights()))

    def on_train_begin(self, logs=None):
        self.records = []


def test_pull_on_recorded_trajectory_spares_batch_norm_statistics():
    # With steps_per_execution=3 and period=2, the batch end at step 6 has
    # two updates (after steps 3 and 5), applied back to back.
    model = tiny_model(steps_per_execution=3)
    x, y = data()
    before, after = Recorder(), Snapshot()
    belay = Belay(DECAY, coupling=0.4, period=2, verbose=0)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[before, belay, after])
    bn = model.get_layer("bn")
    trainable = {id(v) for v in model.trainable_variables}
    pulled = [id(v) in trainable for v in model.weights]
    assert pulled.count(False) == 2  # the moving mean and variance
    stats = [id(v) in (id(bn.moving_mean), id(bn.moving_variance))
             for v in model.weights]
    assert [not p for p in pulled] == stats

    step0, start = before.records[0]
    ref = ReferenceEMA(start, (DECAY,), 2, True, step=step0)

    def pull(shadows, weights):
        return [w - 0.4 * (w - s) if p else w
                for w, s, p in zip(weights, shadows[0], pulled)]

    for (step, pre), (step_after, post) in zip(before.records[1:],
                                               after.records):
        assert step == step_after
        expected = ref.advance(step, pre, after_update=pull)
        for j, (got, want, p) in enumerate(zip(post, expected, pulled)):
            if p:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                           err_msg=f"step {step} weight {j}")
            else:
                np.testing.assert_array_equal(got, pre[j])
    for got, want in zip(belay.ema_weights(DECAY), ref.shadows[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The pull changed the trained weights at the update steps.
    assert not np.allclose(after.records[0][1][0], before.records[1][1][0])


def test_zero_coupling_is_multi_ema_bit_for_bit():
    x, y = data()

    def run(callback):
        keras.utils.set_random_seed(5)
        model = tiny_model(steps_per_execution=3)
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
                  callbacks=[callback])
        return model.get_weights(), callback.ema_weights(DECAY)

    live_a, ema_a = run(MultiEMA((DECAY,), period=2, verbose=0))
    live_b, ema_b = run(Belay(DECAY, coupling=0.0, period=2, verbose=0))
    for a, b in zip(live_a + ema_a, live_b + ema_b):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_weights_skip_both_updates():
    model = tiny_model()
    x, y = data(8)

    class Poison(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                w = self.model.get_layer("d2").bias
                w.assign(np.full(w.shape, np.nan, "float32"))

    before, after = Recorder(), Snapshot()
    belay = Belay(DECAY, coupling=0.5, period=1, verbose=0)
    with pytest.warns(UserWarning, match="skipped the EMA update"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[Poison(), before, belay, after])
    assert belay.skipped_steps == [1, 2]
    for got, want in zip(after.records[0][1], before.records[1][1]):
        np.testing.assert_array_equal(got, want)  # nothing pulled
    for got, want in zip(belay.ema_weights(DECAY), before.records[0][1]):
        np.testing.assert_array_equal(got, want)  # the EMA kept its start


@pytest.mark.parametrize("compiled", [True, False])
def test_backend_coupled_update(compiled):
    rng = np.random.default_rng(0)
    w_values = [rng.normal(size=(3, 2)), rng.normal(size=(4,))]
    s_values = [rng.normal(size=(2,) + w.shape) for w in w_values]
    weights = [keras.Variable(w.astype("float32")) for w in w_values]
    shadows = [keras.Variable(s.astype("float32")) for s in s_values]
    pulled = [True, False]
    if compiled:
        update = _backend.make_coupled_update(shadows, weights, pulled)
    else:
        update = _backend._eager_update(shadows, weights, pulled)
    decays, coupling = np.array([0.5, 0.8]), np.array([0.1, 0.2])
    assert bool(keras.ops.convert_to_numpy(update(decays, coupling)))

    a = decays.reshape(-1, 1, 1)
    new = a * s_values[0] + (1 - a) * w_values[0][None]
    k = coupling.reshape(-1, 1, 1)
    moved = w_values[0] - (k * (w_values[0][None] - new)).sum(axis=0)
    got = [keras.ops.convert_to_numpy(v) for v in weights + shadows]
    np.testing.assert_allclose(got[0], moved, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], w_values[1].astype("float32"))
    np.testing.assert_allclose(got[2], new, rtol=1e-6, atol=1e-6)

    weights[1].assign(np.array([1.0, np.inf, 0.0, 0.0], "float32"))
    assert not bool(keras.ops.convert_to_numpy(update(decays, coupling)))
    for v, value in zip(weights[:1] + shadows, got[:1] + got[2:]):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), value)


def test_state_keeps_the_coupling():
    model = tiny_model()
    x, y = data(8)
    belay = Belay(DECAY, coupling=0.2, period=1, verbose=0)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[belay])
    state = belay.get_state()
    assert state["coupling"] == 0.2
    other = Belay(DECAY, coupling=0.3, period=1, verbose=0)
    other.set_model(model)
    other._build(model)
    with pytest.raises(ValueError, match="coupling=0.2"):
        other.set_state(state)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(coupling=-0.1), "coupling=-0.1"),
        (dict(coupling=1.0), "coupling=1.0"),
        (dict(coupling=float("nan")), "coupling=nan"),
        (dict(coupling=True), "coupling=True"),
        (dict(coupling="0.1"), "coupling='0.1'"),
        (dict(decay=0.0), "decay=0.0"),
        (dict(decay=1.5), "decay=1.5"),
        (dict(period=0), "period=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Belay(**kwargs)
