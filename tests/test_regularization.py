"""PyTorchSGD against a NumPy transcription of torch.optim.SGD's update and weight decay."""

import math

import keras
import numpy as np
import pytest

import zoo.models
from zoo.regularization import PyTorchSGD
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


# --- Weight decay ----------------------------------------------------------------

KERNEL_SHAPE = (2, 2)  # the first 4 entries of w: a rank-2 variable, decayed
KERNEL_ONLY = np.array([1.0] * 4 + [0.0] * 2)  # the last 2: a bias, not decayed
WEIGHT_DECAY = 0.05  # large enough that the decay moves the iterates visibly


def torch_reference_with_decay(a, c, w0, nesterov, momentum, weight_decay,
                               decayed=KERNEL_ONLY):
    """torch.optim.SGD with weight_decay on the `decayed` entries, float64.

    torch: `g = g + weight_decay * w` before the momentum; the entries not
    decayed are in a param group with weight_decay=0.
    """
    w, b = w0.astype(np.float64), np.zeros_like(w0, np.float64)
    path = []
    for step in range(TOTAL):
        g = a @ w - c + weight_decay * decayed * w
        if momentum:
            b = momentum * b + g
            w = w - lr_at(step) * (g + momentum * b if nesterov else b)
        else:
            w = w - lr_at(step) * g
        path.append(w)
    return np.array(path)


def run_kernel_and_bias(optimizer, a, c, w0):
    """Iterates of `optimizer` on the quadratic, w split as a kernel and a bias."""
    kernel = keras.Variable(w0[:4].reshape(KERNEL_SHAPE).astype("float32"), name="kernel")
    bias = keras.Variable(w0[4:].astype("float32"), name="bias")
    path = []
    for _ in range(TOTAL):
        w = np.concatenate([keras.ops.convert_to_numpy(v).astype(np.float64).ravel()
                            for v in (kernel, bias)])
        g = (a @ w - c).astype("float32")
        optimizer.apply([g[:4].reshape(KERNEL_SHAPE), g[4:]], [kernel, bias])
        path.append(np.concatenate([keras.ops.convert_to_numpy(v).astype(np.float64).ravel()
                                    for v in (kernel, bias)]))
    return np.array(path)


@pytest.mark.all_backends
@pytest.mark.parametrize("nesterov, momentum", [(True, MU), (False, MU), (False, 0.0)])
def test_weight_decay_is_torchs_coupled_decay_on_kernels_only(nesterov, momentum):
    a, c, solution = quadratic()
    w0 = np.linspace(-2.0, 2.0, 6)
    expected = torch_reference_with_decay(a, c, w0, nesterov, momentum, WEIGHT_DECAY)
    schedule = WarmupCosine(PEAK, TOTAL, WARMUP)
    got = run_kernel_and_bias(PyTorchSGD(schedule, momentum=momentum, nesterov=nesterov,
                                         weight_decay=WEIGHT_DECAY), a, c, w0)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=1e-5 * scale)
    # The test can tell: decaying the bias too, or nothing, is far off.
    for decay, decayed in ((WEIGHT_DECAY, np.ones(6)), (0.0, KERNEL_ONLY)):
        other = torch_reference_with_decay(a, c, w0, nesterov, momentum, decay, decayed)
        assert np.abs(other - expected).max() > 100 * 1e-5 * scale


@pytest.mark.all_backends
def test_pytorch_sgd_round_trips_with_its_weight_decay():
    optimizer = PyTorchSGD(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(clone, PyTorchSGD)
    assert (clone.momentum, clone.nesterov, clone.weight_decay) == (0.9, True, 5e-4)
    assert PyTorchSGD(0.1).weight_decay == 0.0
    assert PyTorchSGD(0.1, weight_decay=None).weight_decay == 0.0
    assert PyTorchSGD(0.1, weight_decay=np.float32(0.5)).weight_decay == 0.5


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
    with pytest.raises(ValueError, match=match):
        PyTorchSGD(0.1, weight_decay=weight_decay)


@pytest.mark.all_backends
@pytest.mark.parametrize("name", ["resnet18", "wrn28_10", "vgg16"])
def test_decayed_variables_are_the_conv_and_dense_kernels(name):
    vgg = name == "vgg16"  # five 2x2 pools: 32 pixels at least
    model = zoo.models.get_model(name, 3, (32, 32, 3) if vgg else (8, 8, 3),
                                 width=0.0625, **({"batch_norm": True} if vgg else {}))
    kernels = [layer.kernel.path for layer in model.layers
               if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    assert len(kernels) > 3
    optimizer = PyTorchSGD(0.1, momentum=0.9, weight_decay=5e-4)
    optimizer.build(model.trainable_variables)
    assert [v.path for v in model.trainable_variables if optimizer.decays(v)] == kernels
    # Biases and BatchNorm gamma/beta are trainable and not decayed.
    assert len(model.trainable_variables) > len(kernels)
    assert not any(PyTorchSGD(0.1).decays(v) for v in model.trainable_variables)
    excluded = PyTorchSGD(0.1, weight_decay=5e-4)
    classifier = model.get_layer("classifier").kernel
    excluded.exclude_from_weight_decay(var_list=[classifier])
    assert [v for v in model.trainable_variables if excluded.decays(v)] == [
        v for v in model.trainable_variables if v.path in kernels[:-1]]


@pytest.fixture
def policy():
    previous = keras.mixed_precision.global_policy()
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(previous)


@pytest.mark.all_backends
@pytest.mark.parametrize("name", ["float32", "mixed_float16"])
def test_first_fit_step_decays_kernels_by_lr_1_plus_mu_wd_w(policy, name):
    """One `fit` step with and without decay: the kernels differ by exactly it.

    The first Nesterov step is `lr * (g + mu * b)` with `b = g + wd * w`, so
    the decay moves a kernel by `lr * (1 + mu) * wd * w0` more; everything else
    (biases, BatchNorm gamma/beta, the logged loss) is the same. Under
    mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer, whose
    unscaled gradients it receives.
    """
    policy(name)
    lr, decay = 0.1, 0.05
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4, 4, 3)).astype("float32")
    y = rng.integers(0, 3, size=(8,))
    results = []
    for weight_decay in (0.0, decay):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((4, 4, 3))
        h = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(h))
        model = keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(h))
        optimizer = PyTorchSGD(lr, momentum=MU, nesterov=True, weight_decay=weight_decay)
        if name == "mixed_float16":
            # A scale the float16 gradients do not overflow: no skipped step.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=16.0)
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        after = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
        results.append((before, after, history.history["loss"][0], model))
    (before, plain, plain_loss, model), (_, decayed, decayed_loss, _) = results
    assert model.losses == []
    assert decayed_loss == plain_loss  # the loss is the cross-entropy alone
    for variable, w0, p, d in zip(model.trainable_variables, before, plain, decayed):
        expected = lr * (1 + MU) * decay * w0 if len(w0.shape) >= 2 else 0.0
        np.testing.assert_allclose(p - d, expected, rtol=1e-3, atol=1e-6,
                                   err_msg=variable.path)
