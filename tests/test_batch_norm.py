"""recompute_batch_norm_statistics against a numpy forward pass.

The reference is written here, independently of keras_ema: a numpy forward
pass of the test model in training mode (each BatchNorm normalizes with the
statistics of the current batch), which gives the input of every BatchNorm
for every batch; then per batch

    mean_i = mean(x_i)                   over every axis but the channels
    var_i  = mean((x_i - mean_i) ** 2)   the BIASED batch variance

and the expected moving statistics are their plain averages over the batches,
each batch weighing the same (the last, smaller batch included). The biased
variance is the one Keras' BatchNorm normalizes with and stores in
`moving_variance` during training (`ops.moments`), and it is what
`recompute_batch_norm_statistics` documents ("the exact average of the
per-batch statistics that training-mode BN computes"); PyTorch's
`update_bn` would store the unbiased one instead, i.e. var_i * m / (m - 1).
The tests would catch that choice: for the Dense BatchNorm m is the batch
size (16, 2), a 7% to 100% difference.
"""

import keras
import numpy as np
import pytest

from keras_ema.batch_norm import batch_norm_layers
from keras_ema.batch_norm import batch_norm_statistics
from keras_ema.batch_norm import recompute_batch_norm_statistics

pytestmark = pytest.mark.all_backends

N, BATCH = 50, 16  # batches of 16, 16, 16 and 2 samples
BN_NAMES = ("bn1", "bn2", "bn3")


def bn_model():
    """conv-BN-relu, conv-BN-relu, flatten, dense-BN, dense: BN at 3 depths."""
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, padding="valid", name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, name="dense")(x)
    x = keras.layers.BatchNormalization(name="bn3")(x)
    outputs = keras.layers.Dense(2, name="out")(x)
    model = keras.Model(inputs, outputs)
    # Non-trivial weights everywhere: random gammas, betas and biases, and
    # moving statistics far from the answer (a recompute must overwrite them).
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
            layer.beta.assign(rng.normal(size=c).astype("float32"))
            layer.moving_mean.assign(np.full(c, 7.0, "float32"))
            layer.moving_variance.assign(np.full(c, 5.0, "float32"))
        elif layer.weights:
            layer.weights[1].assign(
                rng.normal(scale=0.3, size=layer.weights[1].shape).astype(
                    "float32"
                )
            )
    return model


def data(n=N, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=0.5, scale=1.5, size=(n, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 2, size=(n,)).astype("int32")
    return x, y


# --- the numpy reference -----------------------------------------------------


def np_conv(x, kernel, bias, padding):
    """Stride-1 2D convolution, NHWC input, HWIO kernel (Keras' layout)."""
    kh, kw = kernel.shape[:2]
    if padding == "same":
        ph, pw = (kh - 1) // 2, (kw - 1) // 2
        x = np.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], h, w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", x[:, i:i + h, j:j + w],
                             kernel[i, j])
    return out + bias


def np_batch_norm_train(x, gamma, beta, epsilon):
    """Training-mode BatchNorm: (output, batch mean, biased batch variance)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    var = ((x - mean) ** 2).mean(axis=axes)
    return (x - mean) / np.sqrt(var + epsilon) * gamma + beta, mean, var


def np_bn_inputs(model, x):
    """The input of bn1, bn2, bn3 for the batch `x`, computed in float64."""
    w = {layer.name: [np.asarray(v, np.float64) for v in layer.get_weights()]
         for layer in model.layers}
    eps = {name: model.get_layer(name).epsilon for name in BN_NAMES}

    def bn(h, name):
        gamma, beta = w[name][0], w[name][1]
        return np_batch_norm_train(h, gamma, beta, eps[name])[0]

    inputs = {}
    h = np_conv(np.asarray(x, np.float64), *w["conv1"], padding="same")
    inputs["bn1"] = h
    h = np.maximum(bn(h, "bn1"), 0)
    h = np_conv(h, *w["conv2"], padding="valid")
    inputs["bn2"] = h
    h = np.maximum(bn(h, "bn2"), 0)
    h = h.reshape(h.shape[0], -1) @ w["dense"][0] + w["dense"][1]
    inputs["bn3"] = h
    return inputs


def expected_statistics(model, x, batch_size=BATCH, steps=None,
                        by_size=False, ddof=0):
    """{bn name: (mean, variance)}: per-batch statistics averaged over batches.

    The defaults are the documented semantics (every batch weighs the same,
    biased variance); `by_size` weighs each batch by its number of samples
    and `ddof=1` takes unbiased variances, the two plausible mistakes.
    """
    per_batch = {name: ([], []) for name in BN_NAMES}
    starts = list(range(0, x.shape[0], batch_size))
    if steps is not None:
        starts = starts[:steps]
    sizes = [min(batch_size, x.shape[0] - start) for start in starts]
    for start in starts:
        inputs = np_bn_inputs(model, x[start:start + batch_size])
        for name in BN_NAMES:
            h = inputs[name]
            axes = tuple(range(h.ndim - 1))
            m = h.size // h.shape[-1]  # values per channel
            mean = h.mean(axis=axes)
            var = ((h - mean) ** 2).sum(axis=axes) / (m - ddof)
            per_batch[name][0].append(mean)
            per_batch[name][1].append(var)
    weights = sizes if by_size else None
    return {name: (np.average(m, axis=0, weights=weights),
                   np.average(v, axis=0, weights=weights))
            for name, (m, v) in per_batch.items()}


def moving_statistics(model):
    return {
        name: (
            keras.ops.convert_to_numpy(model.get_layer(name).moving_mean),
            keras.ops.convert_to_numpy(model.get_layer(name).moving_variance),
        )
        for name in BN_NAMES
    }


def assert_statistics_close(got, expected):
    for name in BN_NAMES:
        np.testing.assert_allclose(got[name][0], expected[name][0],
                                   rtol=1e-4, atol=1e-4, err_msg=f"{name} mean")
        np.testing.assert_allclose(got[name][1], expected[name][1],
                                   rtol=1e-4, atol=1e-4,
                                   err_msg=f"{name} variance")


def other_weights(model):
    """Every variable but the moving statistics, as numpy copies, by path."""
    stats = set()
    for layer in batch_norm_layers(model):
        stats |= {id(layer.moving_mean), id(layer.moving_variance)}
    return {v.path: np.array(keras.ops.convert_to_numpy(v))
            for v in model.variables if id(v) not in stats}


# --- tests -------------------------------------------------------------------


def test_batch_norm_layers_finds_every_layer():
    model = bn_model()
    assert [layer.name for layer in batch_norm_layers(model)] == list(BN_NAMES)


def test_batch_norm_statistics_of_nested_and_unbuilt_layers():
    # A BatchNorm inside a nested model is found; an unbuilt one (never
    # called) holds no statistics yet and is left out.
    inner = keras.Sequential(
        [keras.layers.Dense(3), keras.layers.BatchNormalization(name="inner_bn")],
        name="inner",
    )
    unused = keras.layers.BatchNormalization(name="unused_bn")
    inputs = keras.Input((4,))
    outputs = keras.layers.BatchNormalization(name="outer_bn")(inner(inputs))
    model = keras.Model(inputs, outputs)
    model.unused = unused
    inner_bn, outer_bn = inner.get_layer("inner_bn"), model.get_layer("outer_bn")
    expected = [inner_bn.moving_mean, inner_bn.moving_variance,
                outer_bn.moving_mean, outer_bn.moving_variance]
    got = batch_norm_statistics(model)
    assert sorted(v.path for v in got) == sorted(v.path for v in expected)
    assert all(any(v is e for e in expected) for v in got)
    assert "unused_bn" in [layer.name for layer in batch_norm_layers(model)]


def test_matches_numpy_average_of_per_batch_statistics():
    model = bn_model()
    x, _ = data()
    expected = expected_statistics(model, x)
    before = other_weights(model)
    momenta = [layer.momentum for layer in batch_norm_layers(model)]

    returned = recompute_batch_norm_statistics(model, x, batch_size=BATCH)

    assert returned is model
    got = moving_statistics(model)
    assert_statistics_close(got, expected)
    # The test can tell the alternatives apart: weighing the batches by their
    # sizes (the last one has 2 samples, not 16), or unbiased variances.
    by_size = expected_statistics(model, x, by_size=True)
    unbiased = expected_statistics(model, x, ddof=1)
    for name in BN_NAMES:
        assert not np.allclose(got[name][0], by_size[name][0],
                               rtol=1e-4, atol=1e-4)
        assert not np.allclose(got[name][1], unbiased[name][1],
                               rtol=1e-4, atol=1e-4)
    # Everything else is unchanged, bit for bit, and so are the momenta.
    after = other_weights(model)
    assert after.keys() == before.keys()
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert [layer.momentum for layer in batch_norm_layers(model)] == momenta


def test_steps_limits_the_batches():
    model = bn_model()
    x, _ = data()
    expected = expected_statistics(model, x, steps=2)
    recompute_batch_norm_statistics(model, x, batch_size=BATCH, steps=2)
    assert_statistics_close(moving_statistics(model), expected)


def _generator(x, y):
    for start in range(0, x.shape[0], BATCH):
        yield x[start:start + BATCH], y[start:start + BATCH]


@pytest.mark.parametrize(
    "form", ["array", "tuple", "generator", "list_of_x", "tf_data"]
)
def test_every_data_form_gives_the_same_statistics(form):
    x, y = data()
    if form == "array":
        kwargs = dict(data=x, batch_size=BATCH)
    elif form == "tuple":
        kwargs = dict(data=(x, y), batch_size=BATCH)
    elif form == "generator":
        kwargs = dict(data=_generator(x, y))
    elif form == "list_of_x":
        kwargs = dict(data=[x[s:s + BATCH] for s in range(0, N, BATCH)])
    else:
        tf = pytest.importorskip("tensorflow")
        kwargs = dict(
            data=tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
        )
    model = bn_model()
    expected = expected_statistics(model, x)
    recompute_batch_norm_statistics(model, **kwargs)
    assert_statistics_close(moving_statistics(model), expected)


def test_other_state_is_restored_after_a_training_mode_pass():
    # Dropout runs in training mode too and draws from its seed generator,
    # whose state is a variable: it must come back as it was.
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="d")(inputs)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(20, 4)).astype("float32")
    before = other_weights(model)
    assert any("seed" in path for path in before)
    recompute_batch_norm_statistics(model, xs, batch_size=8)
    after = other_weights(model)
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    # ...and the statistics did change.
    assert not np.allclose(
        keras.ops.convert_to_numpy(model.get_layer("bn").moving_variance), 1.0
    )


def test_an_error_during_the_pass_restores_everything():
    model = bn_model()
    x, y = data()
    before = {v.path: np.array(keras.ops.convert_to_numpy(v))
              for v in model.variables}

    def failing():
        yield x[:BATCH], y[:BATCH]
        raise RuntimeError("data source broke")

    with pytest.raises(RuntimeError, match="broke"):
        recompute_batch_norm_statistics(model, failing())
    for v in model.variables:
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(v), before[v.path], err_msg=v.path
        )
    assert [layer.momentum for layer in batch_norm_layers(model)] == [0.99] * 3


def test_non_finite_moving_statistics_are_recomputed():
    # A diverged model: `inf * momentum 0` would be NaN, not the batch value.
    model = bn_model()
    bn = model.get_layer("bn2")
    bn.moving_mean.assign(np.full(4, np.inf, "float32"))
    bn.moving_variance.assign(np.full(4, np.nan, "float32"))
    x, _ = data()
    expected = expected_statistics(model, x)
    recompute_batch_norm_statistics(model, x, batch_size=BATCH)
    assert_statistics_close(moving_statistics(model), expected)


def test_frozen_batch_norm_keeps_its_statistics_with_a_warning():
    model = bn_model()
    model.get_layer("bn1").trainable = False
    x, _ = data()
    before = moving_statistics(model)
    with pytest.warns(UserWarning, match="bn1"):
        recompute_batch_norm_statistics(model, x, batch_size=BATCH)
    after = moving_statistics(model)
    np.testing.assert_array_equal(after["bn1"][0], before["bn1"][0])
    np.testing.assert_array_equal(after["bn1"][1], before["bn1"][1])
    assert not np.allclose(after["bn3"][0], before["bn3"][0])


def test_model_without_batch_norm_is_unchanged_with_a_warning():
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(keras.layers.Dense(4)(inputs))
    model = keras.Model(inputs, outputs)
    before = [np.array(w) for w in model.get_weights()]
    x = np.ones((8, 3), "float32")
    with pytest.warns(UserWarning, match="no BatchNormalization"):
        returned = recompute_batch_norm_statistics(model, x)
    assert returned is model
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(data=np.zeros((0, 6, 6, 2), "float32")), "no batches"),
        (dict(data=iter(())), "no batches"),
        (dict(data=[]), "no batches"),
        (dict(data=()), "tuple"),
        (dict(data=(np.zeros((4, 6, 6, 2)),) * 4), "tuple"),
        (dict(data=5), "int"),
        (dict(data=np.float32(1.0)), "batch dimension"),
        (dict(data=np.zeros((4, 6, 6, 2)), batch_size=0), "batch_size=0"),
        (dict(data=np.zeros((4, 6, 6, 2)), batch_size=2.0), "batch_size=2.0"),
        (dict(data=np.zeros((4, 6, 6, 2)), steps=0), "steps=0"),
        (dict(data=np.zeros((4, 6, 6, 2)), steps=True), "steps=True"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_unchanged(kwargs, match):
    model = bn_model()
    before = {v.path: np.array(keras.ops.convert_to_numpy(v))
              for v in model.variables}
    with pytest.raises(ValueError, match=match) as info:
        recompute_batch_norm_statistics(model, **kwargs)
    assert "\n" not in str(info.value)
    for v in model.variables:
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(v), before[v.path], err_msg=v.path
        )
    assert [layer.momentum for layer in batch_norm_layers(model)] == [0.99] * 3


class _TwiceBN(keras.Model):
    """A subclassed model that applies one BatchNorm to two activations."""

    def __init__(self):
        super().__init__()
        self.d1 = keras.layers.Dense(3)
        self.d2 = keras.layers.Dense(3)
        self.bn = keras.layers.BatchNormalization(name="twice")

    def call(self, x, training=False):
        return self.bn(self.d1(x), training=training) + self.bn(
            self.d2(x), training=training
        )


def test_batch_norm_called_twice_is_refused_and_nothing_changes():
    inputs = keras.Input((4,))
    shared = keras.layers.BatchNormalization(name="shared")
    once = keras.layers.BatchNormalization(name="single")
    a = shared(keras.layers.Dense(3, name="da")(inputs))
    b = shared(keras.layers.Dense(3, name="db")(inputs))
    outputs = once(keras.layers.Add()([a, b]))
    functional = keras.Model(inputs, outputs)
    subclassed = _TwiceBN()
    x = np.random.default_rng(0).normal(size=(20, 4)).astype("float32")
    subclassed(x[:2])
    for model, name in ((functional, "shared"), (subclassed, "twice")):
        before = [np.array(keras.ops.convert_to_numpy(v))
                  for v in model.variables]
        with pytest.raises(ValueError, match=rf"\['{name} \(2 calls\)'\]") as e:
            recompute_batch_norm_statistics(model, x, batch_size=8)
        assert "single" not in str(e.value) and "\n" not in str(e.value)
        for v, value in zip(model.variables, before):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), value)
        # The layers are left callable as before (no counting wrapper).
        for layer in batch_norm_layers(model):
            assert "call" not in layer.__dict__
        assert [layer.momentum for layer in batch_norm_layers(model)] == [
            0.99
        ] * len(batch_norm_layers(model))
