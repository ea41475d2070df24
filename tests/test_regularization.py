"""PyTorchSGD against a NumPy transcription of torch.optim.SGD's update."""

import math

import keras
import numpy as np
import pytest

from zoo.regularization import PyTorchSGD
from zoo.regularization import weight_decay_regularizer
from zoo.schedules import WarmupCosine

PEAK, TOTAL, WARMUP, MU = 0.5, 60, 20, 0.9


def lr_at(step):
    """The warm-up-cosine learning rate of `step`, written out here."""
    if step < WARMUP:
        return PEAK * (step + 1) / WARMUP
    return PEAK * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (TOTAL - WARMUP)))


def quadratic():
    """Gradient A w - c of the quadratic 0.5 w'Aw - c'w, and its minimizer."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(6, 6))
    a = q @ q.T / 6 + 0.5 * np.eye(6)
    c = rng.normal(size=6)
    return a, c, np.linalg.solve(a, c)


def torch_reference(a, c, w0, nesterov):
    """torch.optim.SGD(momentum=MU, dampening=0): the iterates, float64."""
    w, b = w0.astype(np.float64), np.zeros_like(w0, np.float64)
    path = []
    for step in range(TOTAL):
        g = a @ w - c
        b = MU * b + g
        w = w - lr_at(step) * (g + MU * b if nesterov else b)
        path.append(w)
    return np.array(path)


def run(optimizer, a, c, w0):
    w = keras.Variable(w0.astype("float32"))
    path = []
    for _ in range(TOTAL):
        g = a @ keras.ops.convert_to_numpy(w).astype(np.float64) - c
        optimizer.apply([g.astype("float32")], [w])
        path.append(keras.ops.convert_to_numpy(w).astype(np.float64))
    return np.array(path)


@pytest.mark.all_backends
@pytest.mark.parametrize("nesterov", [True, False])
def test_pytorch_sgd_follows_torch_under_a_changing_learning_rate(nesterov):
    a, c, solution = quadratic()
    w0 = np.zeros(6)
    expected = torch_reference(a, c, w0, nesterov)
    got = run(PyTorchSGD(WarmupCosine(PEAK, TOTAL, WARMUP), momentum=MU,
                         nesterov=nesterov), a, c, w0)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(solution).max())
    # Keras's own SGD keeps lr inside its velocity: during the warm-up it
    # leaves the PyTorch trajectory (why the zoo does not use it), by up to
    # 0.34 (Nesterov) and 0.55 (heavy ball) of the solution's scale here.
    keras_sgd = run(keras.optimizers.SGD(WarmupCosine(PEAK, TOTAL, WARMUP),
                                         momentum=MU, nesterov=nesterov), a, c, w0)
    drift = np.abs(keras_sgd - expected).max() / np.abs(solution).max()
    print(f"keras.optimizers.SGD(nesterov={nesterov}) drift: {drift:.3f}")
    assert drift > 0.05


@pytest.mark.all_backends
def test_pytorch_sgd_round_trips_and_decays_like_torch_weight_decay():
    optimizer = PyTorchSGD(0.1, momentum=0.9, nesterov=True)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(clone, PyTorchSGD)
    assert (clone.momentum, clone.nesterov) == (0.9, True)
    # L2(wd / 2) adds wd * w to the gradient: PyTorch's weight_decay=wd.
    regularizer = weight_decay_regularizer(0.01)
    w = keras.Variable(np.array([2.0, -4.0], "float32"))
    assert float(keras.ops.convert_to_numpy(regularizer(w))) == pytest.approx(
        0.005 * (4.0 + 16.0))


@pytest.mark.all_backends
@pytest.mark.parametrize(
    "weight_decay, match",
    [
        (-1, "weight_decay=-1"),
        (float("nan"), "weight_decay=nan"),
        (float("inf"), "weight_decay=inf"),
        (True, "weight_decay=True"),
        ("5e-4", "weight_decay='5e-4'"),
    ],
)
def test_weight_decay_must_be_a_finite_nonnegative_number(weight_decay, match):
    # float() used to turn NaN, True and strings into an L2 penalty.
    with pytest.raises(ValueError, match=match):
        weight_decay_regularizer(weight_decay)


@pytest.mark.all_backends
def test_weight_decay_accepts_numpy_numbers_and_zero():
    assert weight_decay_regularizer(0) is None
    assert weight_decay_regularizer(np.float64(0.0)) is None
    assert weight_decay_regularizer(np.float32(0.5)).l2 == pytest.approx(0.25)
