"""Tests for zoo models: parameter counts, shapes, training, serialization.

Parameter counts follow PyTorch's `sum(p.numel() for p in model.parameters())`:
conv kernels, conv/dense biases, dense kernels and BN gamma + beta. BN moving
mean/variance are buffers in PyTorch and non-trainable weights in Keras; they
are counted separately.
"""

import os
import sys

import keras
import numpy as np
import pytest
import subprocesses

import zoo.models
from zoo import layers
from zoo import resnet
from zoo import vgg
from zoo import wide_resnet

pytestmark = pytest.mark.all_backends

NARROW = 0.125  # ResNet-18 stacks 8/16/32/64 filters, WRN-28-10 2/20/40/80.


# --- Independent parameter count, from the architecture description ---------


def _conv(k, cin, cout, bias=False):
    return k * k * cin * cout + (cout if bias else 0)


def _bn(c):
    return 2 * c  # gamma + beta


def _dense(cin, cout):
    return (cin + 1) * cout


def _resnet_count(blocks, filters=(64, 128, 256, 512), num_classes=10):
    """(params, bn_channels) of the CIFAR ResNet with projection shortcuts."""
    params = _conv(3, 3, filters[0]) + _bn(filters[0])
    bn_channels = filters[0]
    cin = filters[0]
    for stack, (n, f) in enumerate(zip(blocks, filters)):
        for block in range(n):
            stride = 2 if stack > 0 and block == 0 else 1
            params += _conv(3, cin, f) + _bn(f) + _conv(3, f, f) + _bn(f)
            bn_channels += 2 * f
            if stride != 1 or cin != f:
                params += _conv(1, cin, f) + _bn(f)
                bn_channels += f
            cin = f
    return params + _dense(cin, num_classes), bn_channels


def _wrn_count(depth, k, num_classes=10):
    """(params, bn_channels) of WRN-d-k as in xternalz/WideResNet-pytorch."""
    n = (depth - 4) // 6
    params, bn_channels, cin = _conv(3, 3, 16), 0, 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            params += _bn(cin) + _conv(3, cin, w) + _bn(w) + _conv(3, w, w)
            bn_channels += cin + w
            if cin != w:
                params += _conv(1, cin, w)
            cin = w
    params += _bn(cin) + _dense(cin, num_classes)
    return params, bn_channels + cin


def _vgg_count(batch_norm, num_classes=10):
    """(params, bn_channels) of CIFAR VGG-16 with one linear classifier."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"]
    cfg += [512, 512, 512, "M", 512, 512, 512, "M"]
    params, bn_channels, cin = 0, 0, 3
    for v in cfg:
        if v == "M":
            continue
        params += _conv(3, cin, v, bias=True) + (_bn(v) if batch_norm else 0)
        bn_channels += v if batch_norm else 0
        cin = v
    return params + _dense(cin, num_classes), bn_channels


def _trainable_and_buffers(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    buffers = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, buffers


@pytest.mark.parametrize(
    "name, overrides, expected",
    [
        ("resnet18", {}, _resnet_count([2, 2, 2, 2])),
        ("resnet34", {}, _resnet_count([3, 4, 6, 3])),
        ("wrn28_10", {}, _wrn_count(28, 10)),
        ("vgg16", {}, _vgg_count(batch_norm=False)),
        ("vgg16", {"batch_norm": True}, _vgg_count(batch_norm=True)),
    ],
)
def test_parameter_count_matches_architecture_formula(name, overrides, expected):
    model = zoo.models.get_model(name, num_classes=10, **overrides)
    params, bn_channels = expected
    assert _trainable_and_buffers(model) == (params, 2 * bn_channels)
    if not overrides:
        assert zoo.models.MODELS[name][1]["params"] == params


def test_parameter_counts_of_the_reference_pytorch_models():
    # kuangliu/pytorch-cifar ResNet18() and xternalz WideResNet(28, 10, 10).
    assert _resnet_count([2, 2, 2, 2])[0] == 11_173_962
    assert _wrn_count(28, 10)[0] == 36_479_194
    assert _vgg_count(batch_norm=True)[0] == 14_728_266
    assert resnet.VARIANTS["resnet18"]["params"] == 11_173_962
    assert wide_resnet.VARIANTS["wrn28_10"]["params"] == 36_479_194
    assert vgg.VARIANTS["vgg16"]["params"] == 14_719_818


def test_parameter_count_follows_num_classes_and_not_input_size():
    small = zoo.models.get_model("resnet18", 200, (32, 32, 3), width=NARROW)
    large = zoo.models.get_model("resnet18", 200, (64, 64, 3), width=NARROW)
    filters = [8, 16, 32, 64]
    expected = _resnet_count([2, 2, 2, 2], filters, num_classes=200)[0]
    assert _trainable_and_buffers(small)[0] == expected
    assert _trainable_and_buffers(large)[0] == expected


# --- Shapes, names, stems -----------------------------------------------------


@pytest.mark.parametrize("name", list(zoo.models.MODELS))
@pytest.mark.parametrize("size", [32, 64])
def test_output_shape_and_head_names(name, size):
    model = zoo.models.get_model(name, 7, (size, size, 3), width=NARROW)
    logits = model.predict(np.zeros((2, size, size, 3), "float32"), verbose=0)
    assert logits.shape == (2, 7)
    assert model.layers[-1].name == "classifier"
    assert model.get_layer("classifier").activation.__name__ == "linear"
    assert model.get_layer("pool").output.shape[-1] == (
        model.get_layer("classifier").kernel.shape[0]
    )


def test_resnet_stem_is_chosen_from_input_size():
    assert zoo.models.get_model("resnet18", width=NARROW).resolved_stem == "cifar"
    tiny = zoo.models.get_model("resnet18", 200, (64, 64, 3), width=NARROW)
    assert tiny.resolved_stem == "downsample"
    # The stacks see CIFAR-sized maps: 32 -> 16 -> 8 -> 4.
    assert tiny.get_layer("stack0_block1_out").output.shape[1:3] == (32, 32)
    assert tiny.get_layer("stack3_block1_out").output.shape[1:3] == (4, 4)
    full = zoo.models.get_model(
        "resnet18", 200, (64, 64, 3), width=NARROW, stem="cifar"
    )
    assert full.get_layer("stack3_block1_out").output.shape[1:3] == (8, 8)


def test_width_scales_every_filter_count():
    model = zoo.models.get_model("wrn28_10", width=0.01)
    # 16 * 0.01 rounds to 0 and is clamped to 1; 160 * 0.01 = 1.6 -> 2.
    assert model.get_layer("stem_conv").filters == 1
    assert model.get_layer("group0_block0_1_conv").filters == 2
    assert model.get_layer("group2_block3_2_conv").filters == 6


def test_names_are_stable_across_builds():
    first = [layer.name for layer in zoo.models.get_model("resnet18", width=NARROW).layers]
    second = [layer.name for layer in zoo.models.get_model("resnet18", width=NARROW).layers]
    assert first == second
    assert "stack1_block0_0_conv" in first  # projection shortcut
    assert "stack0_block0_0_conv" not in first  # identity shortcut


# --- Training, weight decay ---------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("resnet18", {}),
        ("resnet34", {}),
        ("wrn28_10", {"dropout": 0.3}),
        ("vgg16", {}),
    ],
)
def test_one_training_step_changes_weights(name, overrides):
    model = zoo.models.get_model(name, 5, width=NARROW, **overrides)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 5, size=(8,))
    before = keras.ops.convert_to_numpy(model.get_layer("classifier").kernel)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = keras.ops.convert_to_numpy(model.get_layer("classifier").kernel)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(before, after)


@pytest.mark.parametrize("name", ["resnet18", "wrn28_10", "vgg16"])
def test_models_carry_no_regularizer(name):
    # Weight decay is the optimizer's (zoo.regularization.PyTorchSGD): a loss
    # term would be added to every logged loss, which must be the
    # cross-entropy alone.
    model = zoo.models.get_model(name, 3, width=NARROW)
    assert model.losses == []
    for layer in model.layers:
        for attribute in ("kernel_regularizer", "bias_regularizer",
                          "activity_regularizer", "gamma_regularizer",
                          "beta_regularizer"):
            assert getattr(layer, attribute, None) is None, (layer.name, attribute)


def test_configs_written_with_weight_decay_still_load():
    # Models saved when weight decay was an L2 regularizer of the model wrote
    # it into their config; it changes nothing the model computes.
    model = zoo.models.get_model("resnet18", 3, width=NARROW)
    config = dict(model.get_config(), weight_decay=5e-4)
    clone = zoo.models.ResNet.from_config(config)
    assert clone.get_config() == model.get_config()
    assert clone.losses == []
    # The optimizer's now: refused, where keras.Model would drop it silently.
    for build in (lambda: zoo.models.get_model("vgg16", weight_decay=5e-4),
                  lambda: zoo.models.ResNet(weight_decay=5e-4),
                  lambda: zoo.models.WideResNet(weight_decay=0.0)):
        with pytest.raises(ValueError, match=r"PyTorchSGD\(weight_decay=\.\.\.\)\. "
                           r"Received: weight_decay="):
            build()


# --- Serialization --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("resnet18", {"stem": "downsample"}),
        ("wrn28_10", {"dropout": 0.3}),
        ("vgg16", {"batch_norm": True}),
    ],
)
def test_config_round_trip(name, overrides):
    model = zoo.models.get_model(name, 3, width=NARROW, **overrides)
    config = model.get_config()
    clone = model.__class__.from_config(config)
    assert clone.get_config() == config
    assert [w.path for w in clone.weights] == [w.path for w in model.weights]
    for key, value in overrides.items():
        assert config[key] == value


@pytest.mark.parametrize("name", ["resnet18", "wrn28_10", "vgg16"])
def test_keras_file_reload_gives_equal_outputs(name, tmp_path):
    model = zoo.models.get_model(name, 4, width=NARROW)
    x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype("float32")
    # Move the BN statistics away from their initial values first.
    model(x, training=True)
    expected = model.predict(x, verbose=0)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored) is type(model)
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6
    )


# --- Strided shortcuts -----------------------------------------------------------

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _shortcut_gradients(model, x, upstream):
    """(output, d<output * upstream>/dx, d.../dkernel) on the backend under test."""
    if keras.backend.backend() == "jax":
        import jax

        def loss(x, weights):
            out, _ = model.stateless_call(weights, [], x)
            return (out * upstream).sum(), out

        (_, out), (dx, (dw,)) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            x, [w.value for w in model.trainable_weights]
        )
        return np.asarray(out), np.asarray(dx), np.asarray(dw)
    import tensorflow as tf

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = model(x)
        loss = tf.reduce_sum(out * upstream)
    dx, dw = tape.gradient(loss, [x, model.trainable_weights[0]])
    return out.numpy(), dx.numpy(), dw.numpy()


@pytest.mark.parametrize("size", [8, 9])
def test_subsample_then_1x1_conv_equals_a_stride_2_1x1_conv(size):
    # Reference in numpy: a stride-2 1x1 'valid' conv reads pixels (2i, 2j)
    # and gives ceil(size / 2) rows; its gradient flows to those pixels only.
    rng = np.random.default_rng(0)
    batch, cin, cout = 3, 5, 4
    images = keras.Input((size, size, cin))
    conv = keras.layers.Conv2D(cout, 1, use_bias=False, name="s_0_conv")
    model = keras.Model(images, conv(layers.subsample(images, 2, name="s_sub")))
    kernel = rng.normal(size=(1, 1, cin, cout)).astype("float32")
    conv.kernel.assign(kernel)
    x = rng.normal(size=(batch, size, size, cin)).astype("float32")
    half = (size + 1) // 2
    upstream = rng.normal(size=(batch, half, half, cout)).astype("float32")

    out, dx, dw = _shortcut_gradients(model, x, upstream)

    picked = x[:, 0::2, 0::2, :]
    assert picked.shape[1:3] == (half, half)
    np.testing.assert_allclose(out, picked @ kernel[0, 0], rtol=1e-5, atol=1e-5)
    expected_dx = np.zeros_like(x)
    expected_dx[:, 0::2, 0::2, :] = upstream @ kernel[0, 0].T
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-5, atol=1e-5)
    expected_dw = np.einsum("bijc,bijd->cd", picked, upstream)
    np.testing.assert_allclose(dw[0, 0], expected_dw, rtol=1e-4, atol=1e-4)
    assert layers.subsample(images, 1, name="unused") is images


def _old_layout_models():
    return {
        "resnet": zoo.models.ResNet(stackwise_num_blocks=[1, 1], stackwise_num_filters=[4, 8],
                             num_classes=3, input_shape=(9, 9, 3)),
        "wrn": zoo.models.WideResNet(depth=10, widen_factor=1, width=0.25, num_classes=3,
                              input_shape=(9, 9, 3)),
    }


@pytest.mark.parametrize("key", ["resnet", "wrn"])
def test_checkpoints_of_the_strided_conv_shortcut_still_load(key):
    # tests/data holds weights saved when the shortcut was one stride-2 1x1
    # Conv2D (random values in every variable, BN statistics included) and
    # that model's logits on 9x9 images (odd size: ceil(9 / 2) = 5 rows).
    model = _old_layout_models()[key]
    model.load_weights(os.path.join(DATA, f"{key}_stride2_shortcut.weights.h5"))
    reference = np.load(os.path.join(DATA, "stride2_shortcut_outputs.npz"))
    logits = model(reference["images"], training=False)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(logits), reference[key], rtol=1e-5, atol=1e-4
    )
    shortcut = [w for w in model.weights if "_0_conv" in w.path]
    assert shortcut and all(tuple(w.shape)[:2] == (1, 1) for w in shortcut)


def _before_layers_models():
    return {
        "vgg_bn": zoo.models.VGG(stackwise_num_filters=[4, 8], stackwise_num_repeats=[1, 2],
                          batch_norm=True, num_classes=3, input_shape=(8, 8, 3)),
        "resnet_downsample": zoo.models.ResNet(
            stackwise_num_blocks=[1, 1], stackwise_num_filters=[4, 8], num_classes=3,
            input_shape=(16, 16, 3), stem="downsample"),
        "wrn_dropout": zoo.models.WideResNet(depth=10, widen_factor=1, width=0.25, dropout=0.2,
                                      num_classes=3, input_shape=(8, 8, 3)),
    }


@pytest.mark.parametrize("key", ["vgg_bn", "resnet_downsample", "wrn_dropout"])
def test_checkpoints_from_before_the_shared_layers_still_load(key):
    # tests/data holds weights saved when each model wrote out its own conv
    # and BN layers (random values in every variable, BN statistics
    # included) and that model's logits; the layers moved to zoo/layers.py
    # with the same names, so the file loads and the logits are equal.
    model = _before_layers_models()[key]
    model.load_weights(os.path.join(DATA, f"{key}_before_layers.weights.h5"))
    reference = np.load(os.path.join(DATA, "before_layers_outputs.npz"))
    logits = model(reference[f"{key}_images"], training=False)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(logits), reference[key], rtol=1e-5, atol=1e-4
    )


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="oneDNN is TensorFlow's"
)
@pytest.mark.own_backend
def test_every_model_trains_at_odd_batch_sizes_without_a_native_crash():
    # TensorFlow 2.21's oneDNN backward pass of a stride-2 1x1 conv aborts
    # the process (SIGSEGV or a malloc error) at odd batch sizes; a
    # subprocess keeps such a crash from taking pytest down with it.
    code = (
        "import numpy as np, keras, zoo.models\n"
        "rng = np.random.default_rng(0)\n"
        "for name in zoo.models.MODELS:\n"
        "    model = zoo.models.get_model(name, 3, width=0.125)\n"
        "    model.compile(keras.optimizers.SGD(0.01), keras.losses."
        "SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)\n"
        "    for batch in (1, 3, 29):\n"
        "        x = rng.random((batch, 32, 32, 3), dtype='float32')\n"
        "        model.train_on_batch(x, rng.integers(0, 3, batch))\n"
        "    print(name, 'ok', flush=True)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=root)
    result = subprocesses.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
        text=True,
    )
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-2000:])
    assert result.stdout.count(" ok") == len(zoo.models.MODELS)


# --- Export ---------------------------------------------------------------------


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the export writes a SavedModel"
)
def test_exported_keras_file_loads_and_predicts_without_zoo(tmp_path):
    import types

    from zoo.run import experiment
    from zoo.schedules import WarmupCosine

    # What training hands to `_export`: a compiled copy of a zoo model whose
    # optimizer has the zoo's learning-rate schedule.
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(6, 8, 8, 3)).astype("uint8")
    ema = zoo.models.get_model("resnet18", 3, (8, 8, 3), width=0.0625)
    ema.compile(keras.optimizers.SGD(WarmupCosine(0.1, 10, 2)),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    averager = types.SimpleNamespace(ema_model=lambda decay: ema, num_updates=1)
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    data = types.SimpleNamespace(x_train=x_train, mean=mean, std=std,
                                 image_shape=(8, 8, 3))
    config = experiment.Config(output_dir=str(tmp_path), export_decay=0.5,
                               batch_size=4)
    experiment._export(config, averager, data, str(tmp_path))

    images = rng.integers(0, 256, size=(5, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "images.npy", images)
    # Independent reference: the zoo model (BN statistics as recomputed by the
    # export) on images normalized in numpy.
    expected = keras.ops.convert_to_numpy(
        ema((images / 255.0 - mean) / std, training=False))
    code = (
        "import sys, numpy as np, keras\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "assert model.compiled is False or not model.optimizer\n"
        "np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'zoo'], 'zoo imported'\n"
    )
    result = subprocesses.run(
        [sys.executable, "-c", code, str(tmp_path / "export" / "model.keras"),
         str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
        cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=""), capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected,
                               rtol=1e-4, atol=1e-4)


# --- Mixed precision ------------------------------------------------------------


@pytest.fixture
def restore_dtype_policy():
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_outputs_float32_logits(policy, restore_dtype_policy):
    keras.config.set_dtype_policy(policy)
    model = zoo.models.get_model("resnet18", 3, width=NARROW)
    assert model.get_layer("stack0_block0_1_conv").compute_dtype == policy[6:]
    assert model.get_layer("stack0_block0_1_conv").kernel.dtype == "float32"
    logits = model(np.zeros((2, 32, 32, 3), "float32"))
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


# --- Errors ---------------------------------------------------------------------


def test_unknown_name_lists_known_models():
    with pytest.raises(
        ValueError,
        match="Unknown model name 'x'. Known: resnet18, resnet34, wrn28_10, vgg16",
    ):
        zoo.models.get_model("x")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: zoo.models.WideResNet(depth=27), "Received: depth=27"),
        (lambda: zoo.models.ResNet([2, 2], [64]), r"stackwise_num_blocks=\[2, 2\]"),
        (lambda: zoo.models.ResNet(stem="imagenet"), "Received: stem='imagenet'"),
        (lambda: zoo.models.VGG(width=0), "Received: width=0"),
        (lambda: zoo.models.ResNet(width=True), "Received: width=True"),
        (lambda: zoo.models.ResNet([2, 2.5], [4, 8]), r"stackwise_num_blocks=\[2, 2.5\]"),
        (lambda: zoo.models.WideResNet(dropout="0.1"), "Received: dropout=0.1"),
        (lambda: zoo.models.WideResNet(depth=True), "Received: depth=True"),
    ],
)
def test_invalid_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_numpy_ints_are_accepted_where_ints_are():
    # Sizes read from arrays or configs arrive as NumPy ints.
    model = zoo.models.WideResNet(depth=np.int64(10), widen_factor=np.int32(1), width=0.25,
                           num_classes=3, input_shape=(8, 8, 3))
    assert type(model.get_config()["depth"]) is int
    assert model.count_params() == zoo.models.WideResNet(
        depth=10, widen_factor=1, width=0.25, num_classes=3,
        input_shape=(8, 8, 3)).count_params()


# --- Imports --------------------------------------------------------------------


@pytest.mark.own_backend
def test_zoo_imports_and_builds_without_tensorflow():
    pytest.importorskip("jax")
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'tensorflow':\n"
        "            raise ImportError('tensorflow is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import zoo.models\n"
        "m = zoo.models.get_model('resnet18', width=0.0625)\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print(m.output_shape)\n"
    )
    env = dict(os.environ, KERAS_BACKEND="jax")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocesses.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(None, 10)" in result.stdout
