"""Shadows stay float32 under mixed precision and follow a float64 reference."""

import keras
import numpy as np
import pytest

import keras_ema
from ema_reference import Recorder
from ema_reference import reference_ema

pytestmark = pytest.mark.all_backends


@pytest.fixture
def policy():
    previous = keras.mixed_precision.global_policy()
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(previous)


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_shadows_are_float32_and_exact(policy, name):
    policy(name)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(3, dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    if name == "mixed_float16":
        # A large first scale overflows the float16 gradients: the optimizer
        # skips those steps, which are then no steps for the EMA either.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer,
                                                        initial_scale=2.0**20)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype("float32")
    y = rng.integers(0, 3, size=(40,)).astype("int32")
    ema = keras_ema.MultiEMA((0.5, 0.9), period=2, verbose=0)
    recorder = Recorder()
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema, recorder])

    assert all(w.dtype == "float32" for w in model.weights)
    steps = [step for step, _ in recorder.records]
    if name == "mixed_float16":
        assert len(set(steps)) < len(steps), "no step was skipped"
    assert ema.step == steps[-1]
    for decay, expected in zip((0.5, 0.9), reference_ema(
            recorder.records, (0.5, 0.9), 2, True, [True] * len(model.weights))):
        got = ema.ema_weights(decay)
        assert all(np.asarray(g).dtype == np.float32 for g in got)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(np.asarray(g), e, rtol=1e-6, atol=1e-6)
        with ema.swapped_in(decay) as m:
            assert keras.ops.convert_to_numpy(m(x[:2])).dtype == np.float32
