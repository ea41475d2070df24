"""Tests for zoo.schedules.WarmupCosine."""

import math

import keras
import numpy as np
import pytest

from zoo.schedules import WarmupCosine

pytestmark = pytest.mark.all_backends

PEAK, TOTAL, WARMUP = 0.8, 100, 10


def _expected(step, peak=PEAK, total=TOTAL, warmup=WARMUP):
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= total:
        return 0.0
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _value(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


@pytest.mark.parametrize(
    "step, by_hand",
    [
        (0, 0.08),  # peak / warmup: the first step is not 0.
        (4, 0.4),
        (9, 0.8),  # end of warm-up
        (10, 0.8),  # cosine starts at the peak
        (55, 0.4),  # middle of the cosine phase: cos(pi / 2) = 0
        (100, 0.0),  # total_steps
        (250, 0.0),  # past the end: clamped
    ],
)
def test_values_by_hand(step, by_hand):
    schedule = WarmupCosine(PEAK, TOTAL, WARMUP)
    assert _value(schedule, step) == pytest.approx(by_hand, abs=1e-6)


def test_matches_numpy_formula_everywhere():
    schedule = WarmupCosine(PEAK, TOTAL, WARMUP)
    steps = np.arange(0, TOTAL + 20)
    got = keras.ops.convert_to_numpy(schedule(keras.ops.convert_to_tensor(steps)))
    want = [_expected(s) for s in steps]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.all(np.diff(got[WARMUP:]) <= 1e-7)  # non-increasing after warm-up
    assert np.all(got >= 0)


def test_no_warmup_is_plain_cosine():
    schedule = WarmupCosine(1.0, 4, 0)
    got = [_value(schedule, s) for s in range(5)]
    np.testing.assert_allclose(
        got, [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5,
              0.5 + 0.5 * math.cos(3 * math.pi / 4), 0.0], atol=1e-6
    )


def test_works_inside_an_optimizer_and_compiled_fit():
    schedule = WarmupCosine(0.1, 20, 5)
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=optimizer, loss="mse")
    x = np.ones((8, 3), "float32")
    model.fit(x, np.zeros((8, 2), "float32"), batch_size=2, epochs=1, verbose=0)
    # 4 optimizer steps done: the learning rate now is that of step 4.
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 4
    lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    assert lr == pytest.approx(0.1 * 5 / 5, abs=1e-7)


def test_config_round_trip():
    schedule = WarmupCosine(0.4, 1000, 50)
    config = schedule.get_config()
    assert config == {
        "peak_learning_rate": 0.4,
        "total_steps": 1000,
        "warmup_steps": 50,
    }
    clone = WarmupCosine.from_config(config)
    assert clone.get_config() == config
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    assert isinstance(restored, WarmupCosine)
    for step in (0, 49, 50, 525, 1000):
        assert _value(restored, step) == pytest.approx(_value(schedule, step))
    optimizer = keras.optimizers.SGD.from_config(
        keras.optimizers.SGD(learning_rate=schedule).get_config()
    )
    # A fresh optimizer is at step 0: lr = 0.4 * 1 / 50.
    lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    assert lr == pytest.approx(0.008)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(peak_learning_rate=0.0, total_steps=10), "peak_learning_rate=0.0"),
        (dict(peak_learning_rate=-1, total_steps=10), "peak_learning_rate=-1"),
        (dict(peak_learning_rate=float("nan"), total_steps=10), "nan"),
        (dict(peak_learning_rate=0.1, total_steps=0), "total_steps=0"),
        (dict(peak_learning_rate=0.1, total_steps=2.5), "total_steps=2.5"),
        (dict(peak_learning_rate=0.1, total_steps=10, warmup_steps=-1),
         "warmup_steps=-1"),
        (dict(peak_learning_rate=0.1, total_steps=10, warmup_steps=10),
         "warmup_steps=10"),
    ],
)
def test_invalid_arguments_echo_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupCosine(**kwargs)
