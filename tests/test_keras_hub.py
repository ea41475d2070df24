"""MultiEMA on keras-hub models: text and image backbones, LoRA, the EMA adapter file.

Every model is built from constructor arguments (a few layers, a width of
16, random weights): nothing is downloaded. keras-hub comes with the `test`
extra; `keras_ema` itself never imports it.
"""

import os
import subprocess
import sys
import textwrap

import keras
import keras_hub
import numpy as np
import pytest

import keras_ema
from ema_reference import Recorder
from ema_reference import StopAtEpoch
from ema_reference import reference_ema

pytestmark = [
    pytest.mark.all_backends,
    # Runs of 8-16 steps end inside every decay's warm-up, as intended here.
    pytest.mark.filterwarnings("ignore:MultiEMA. the warm-up"),
]

DECAYS = (0.9, 0.968)
LR = 0.1
SEQ = 8
VOCAB = 64


def averaged_mask(model):
    """Which of `model.weights` MultiEMA averages: trainable floats and BN statistics."""
    stats = set()
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            stats |= {id(layer.moving_mean), id(layer.moving_variance)}
    return [("float" in str(v.dtype)) and (v.trainable or id(v) in stats)
            for v in model.weights]


def check_against_reference(model, ema, recorder, period, rtol=1e-5, atol=1e-6):
    expected = reference_ema(recorder.records, DECAYS, period, True,
                             averaged_mask(model))
    for k, decay in enumerate(DECAYS):
        for v, g, e in zip(model.weights, ema.ema_weights(decay), expected[k]):
            np.testing.assert_allclose(g, e, rtol=rtol, atol=atol,
                                       err_msg=f"decay {decay} {v.path}")


def text_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = {"token_ids": rng.integers(0, VOCAB, (n, SEQ)).astype("int32"),
         "segment_ids": np.zeros((n, SEQ), "int32"),
         "padding_mask": np.ones((n, SEQ), "int32")}
    # A learnable rule: is token 0 in the lower half of the vocabulary?
    y = (x["token_ids"][:, 0] < VOCAB // 2).astype("int32")
    return x, y


def bert_classifier():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=SEQ, dropout=0.0)
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2,
                                                preprocessor=None, dropout=0.0)
    return backbone, model


def compile_(model):
    model.compile(
        optimizer=keras.optimizers.SGD(LR, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])


def gpt2_lm(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=SEQ, dropout=0.0)
    return backbone, keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


def lm_data(n=32, seed=0):
    """Counting sequences: token t + 1 follows token t (mod the vocabulary)."""
    rng = np.random.default_rng(seed)
    ids = (rng.integers(0, VOCAB, (n, 1)) + np.arange(SEQ + 1)) % VOCAB
    x = {"token_ids": ids[:, :-1].astype("int32"),
         "padding_mask": np.ones((n, SEQ), "int32")}
    return x, ids[:, 1:].astype("int32")


def test_text_classifier_follows_the_reference_and_ships(tmp_path):
    _, model = bert_classifier()
    compile_(model)
    x, y = text_data()
    recorder = Recorder()
    ema = keras_ema.MultiEMA(DECAYS, period=2, verbose=0,
                             validation_data=text_data(16, seed=1))
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[recorder, ema])
    assert ema.step == 16
    check_against_reference(model, ema, recorder, period=2)
    live = model.predict(x, verbose=0)
    with ema.swapped_in(0.968) as swapped:
        expected = swapped.predict(x, verbose=0)
    np.testing.assert_array_equal(model.predict(x, verbose=0), live)
    assert not np.allclose(expected, live)
    shipped = ema.ema_model(0.968)
    np.testing.assert_allclose(shipped.predict(x, verbose=0), expected,
                               rtol=1e-5, atol=1e-6)
    if keras.backend.backend() == "tensorflow":
        keras_ema.export_model(shipped, str(tmp_path / "export"), verbose=0)
        loaded = keras.saving.load_model(str(tmp_path / "export/model.keras"))
        np.testing.assert_allclose(loaded.predict(x, verbose=0), expected,
                                   rtol=1e-5, atol=1e-6)


@pytest.fixture
def bfloat16_policy():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy(previous)


def resnet_classifier():
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64], stackwise_num_blocks=[1],
        stackwise_num_strides=[1], block_type="basic_block",
        image_shape=(8, 8, 3))
    return keras_hub.models.ResNetImageClassifier(backbone, num_classes=3)


def image_data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 8, 8, 3)).astype("float32"),
            rng.integers(0, 3, n).astype("int32"))


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_image_classifier_with_batch_norm_follows_the_reference(request, policy):
    if policy == "mixed_bfloat16":
        request.getfixturevalue("bfloat16_policy")
    model = resnet_classifier()
    compile_(model)
    x, y = image_data()
    recorder = Recorder()
    ema = keras_ema.MultiEMA(DECAYS, period=2, verbose=0)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[recorder, ema])
    mask = averaged_mask(model)
    bn = [m for v, m in zip(model.weights, mask) if "moving_" in v.path]
    assert len(bn) == 6 and all(bn)  # 3 BatchNormalization layers
    assert all(str(s.dtype) == "float32" for s in ema._shadows)
    check_against_reference(model, ema, recorder, period=2)
    with ema.swapped_in(0.968) as swapped:
        expected = keras.ops.convert_to_numpy(swapped(x[:4]))
    got = keras.ops.convert_to_numpy(ema.ema_model(0.968)(x[:4]))
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got.astype("float32"), expected.astype("float32"),
                               rtol=1e-5, atol=1e-6)


def nbytes(variables):
    return sum(int(np.prod(v.shape)) * np.dtype(str(v.dtype)).itemsize
               for v in variables)


def test_lora_keeps_shadows_of_the_trainable_weights_alone():
    backbone, model = bert_classifier()
    backbone.enable_lora(rank=2)
    compile_(model)
    x, y = text_data()
    recorder = Recorder()
    ema = keras_ema.MultiEMA(DECAYS, period=2, verbose=0)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[recorder, ema])
    trainable = model.trainable_weights
    paths = {v.path for v in trainable}
    assert {v.path for v in ema._variables} == paths
    assert sum("lora_kernel" in p for p in paths) == 8  # q and v of 2 layers, A and B
    assert any(p.startswith("logits/") for p in paths)  # the head
    shadow = sum(int(np.prod(s.shape)) * 4 for s in ema._shadows)
    assert shadow == len(DECAYS) * nbytes(trainable)
    assert shadow < 0.2 * nbytes(model.weights)
    check_against_reference(model, ema, recorder, period=2)
    # The frozen base is the live one in every EMA.
    for v, w in zip(model.weights, ema.ema_weights(0.968)):
        if not v.trainable:
            np.testing.assert_array_equal(w, keras.ops.convert_to_numpy(v))


def test_lora_resume_with_backup_and_restore_matches_uninterrupted(tmp_path):
    x, y = text_data()
    val = text_data(16, seed=1)
    models = []

    def run(backup, extra=()):
        keras.utils.set_random_seed(3)
        backbone, model = bert_classifier()
        models.append(model)
        backbone.enable_lora(rank=2)
        compile_(model)
        ema = keras_ema.MultiEMA(DECAYS, period=3, validation_data=val,
                                 backup_dir=backup, verbose=0)
        callbacks = [ema]
        if backup:
            callbacks.append(keras.callbacks.BackupAndRestore(backup))
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                  callbacks=callbacks + list(extra))
        return ema

    ema_a = run(None)
    backup = str(tmp_path / "backup")
    with pytest.raises(KeyboardInterrupt):
        run(backup, [StopAtEpoch(2)])
    ema_b = run(backup)
    # A Keras weights file stores each LoRA layer merged (base + A @ B) and
    # zeroes A and B on loading; the MultiEMA state carries them, and the
    # resumed model trains its adapters again, as the uninterrupted one.
    for a, b in zip(models[0].weights, models[2].weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a),
                                   keras.ops.convert_to_numpy(b),
                                   rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert ema_b.step == ema_a.step == 12
    assert ema_b.num_updates == ema_a.num_updates == 4
    for decay in DECAYS:
        for criterion in ("accuracy", "loss"):
            a, b = ema_a.best[decay][criterion], ema_b.best[decay][criterion]
            assert a["epoch"] == b["epoch"]
            assert a["value"] == pytest.approx(b["value"], rel=1e-6)
        for a, b in zip(ema_a.ema_weights(decay), ema_b.ema_weights(decay)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


LOAD_ADAPTER = textwrap.dedent("""
    import sys
    import keras, keras_hub, numpy as np
    base, adapter, data, out = sys.argv[1:5]
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=8, dropout=0.0)
    backbone.load_weights(base)
    backbone.load_lora_weights(adapter)
    lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    x = dict(np.load(data))
    np.save(out, keras.ops.convert_to_numpy(lm(x)))
""")


def test_ema_adapter_file_loads_into_a_fresh_backbone(tmp_path):
    backbone, model = gpt2_lm()
    base = str(tmp_path / "base.weights.h5")
    backbone.save_weights(base)
    backbone.enable_lora(rank=2)
    for v in backbone.trainable_weights:  # the adapters alone are trained
        if "lora_kernel" not in v.path:
            v.trainable = False
    model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = lm_data()
    ema = keras_ema.MultiEMA(DECAYS, period=2, verbose=0)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema])
    with ema.swapped_in(0.968) as swapped:
        expected = keras.ops.convert_to_numpy(swapped(x))
    assert not np.allclose(expected, keras.ops.convert_to_numpy(model(x)))
    adapter = str(tmp_path / "adapters" / "ema_0.968.lora.h5")
    with_warnings = []
    import warnings
    with warnings.catch_warnings(record=True) as with_warnings:
        warnings.simplefilter("always")
        assert ema.save_lora_weights(0.968, adapter) == adapter
    assert not [w for w in with_warnings if "save_lora_weights" in str(w.message)]
    assert os.listdir(tmp_path / "adapters") == ["ema_0.968.lora.h5"]
    np.savez(tmp_path / "x.npz", **x)
    script = tmp_path / "load.py"
    script.write_text(LOAD_ADAPTER)
    subprocess.run(
        [sys.executable, str(script), base, adapter, str(tmp_path / "x.npz"),
         str(tmp_path / "out.npy")],
        check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected,
                               rtol=1e-5, atol=1e-5)
    # ema_model keeps the LoRA layers and the tied output layer.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ema.ema_model(0.968)(x)), expected,
        rtol=1e-5, atol=1e-6)


def test_save_lora_weights_bad_uses(tmp_path):
    backbone, model = bert_classifier()
    compile_(model)
    x, y = text_data(8)
    ema = keras_ema.MultiEMA(DECAYS, period=1, verbose=0)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
    with pytest.raises(ValueError, match=r"no keras-hub backbone with LoRA .*enable_lora"):
        ema.save_lora_weights(0.9, str(tmp_path / "a.lora.h5"))
    with pytest.raises(ValueError, match=r"must end in `\.lora\.h5`"):
        ema.save_lora_weights(0.9, str(tmp_path / "a.weights.h5"))
    backbone.enable_lora(rank=2)  # after the EMAs were created
    compile_(model)  # Keras traces the new trainable variables on compile
    with pytest.raises(ValueError, match=r"has no EMA.*ema\.reset\(\)"):
        ema.save_lora_weights(0.9, str(tmp_path / "a.lora.h5"))
    ema.reset()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
    # The LoRA layers' biases stay trainable: their EMA is not in the file.
    with pytest.warns(UserWarning, match=r"not the EMA of 4 other trained .*query/bias"):
        ema.save_lora_weights(0.9, str(tmp_path / "a.lora.h5"))
    assert os.listdir(tmp_path) == ["a.lora.h5"]
