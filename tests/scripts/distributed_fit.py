"""Fits a small model with an averager on 2 devices and on 1; prints the gap.

    python distributed_fit.py {mirrored|multiworker|data_parallel} {ema|sema|belay}[,...] [cpu]

Run in a fresh process: the 2 devices are faked on the CPU before the backend
starts (logical devices on TensorFlow, XLA_FLAGS on JAX). Several averagers,
separated by commas, are fitted one after the other (each on a model built
afresh from seed 0), sharing the start-up. Prints one JSON line per averager:
the largest difference between the EMA weights of the two fits, the
largest difference between the 2-device EMA and a numpy reference over the
2-device run's own weights, and the number of updates of each. With `cpu`
the averager keeps its shadows in host memory (`shadow_device="cpu"`).
"""

import json
import os
import sys

mode, AVERAGINGS = sys.argv[1], sys.argv[2].split(",")
SHADOW_DEVICE = sys.argv[3] if len(sys.argv) > 3 else None
if mode == "data_parallel":
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
else:
    os.environ["KERAS_BACKEND"] = "tensorflow"
    if mode == "multiworker":
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": ["localhost:0"]}, "task": {"type": "worker", "index": 0}})
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    # MultiWorkerMirroredStrategy must exist before TensorFlow starts.
    STRATEGY = (tf.distribute.MultiWorkerMirroredStrategy()
                if mode == "multiworker" else None)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402
from ema_reference import Recorder  # noqa: E402
from ema_reference import ReferenceEMA  # noqa: E402


def decays(averaging):
    return (0.5, 0.9) if averaging == "ema" else (0.8,)


def build():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8)(inputs)
    # Statistics over the global batch, so 2 devices compute what 1 does
    # (JAX's DataParallel computes them over the global batch anyway).
    x = keras.layers.BatchNormalization(
        synchronized=keras.backend.backend() == "tensorflow")(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(3)(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def averager(averaging):
    common = dict(period=2, verbose=0, shadow_device=SHADOW_DEVICE)
    if averaging == "sema":
        return keras_ema.SwitchEMA(decays(averaging)[0], **common)
    if averaging == "belay":
        return keras_ema.Belay(decays(averaging)[0], coupling=0.3, **common)
    return keras_ema.MultiEMA(decays(averaging), **common)


def fit(distributed, averaging):
    if distributed and mode == "data_parallel":
        keras.distribution.set_distribution(keras.distribution.DataParallel(
            devices=keras.distribution.list_devices("cpu")))
    try:
        if distributed and mode != "data_parallel":
            import tensorflow as tf

            strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
                        if mode == "mirrored"
                        else STRATEGY)
            with strategy.scope():
                model = build()
        else:
            model = build()
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 4)).astype("float32")
        y = rng.integers(0, 3, size=(64,)).astype("int32")
        ema, recorder = averager(averaging), Recorder()
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                  callbacks=[ema, recorder])
        return model, ema, recorder
    finally:
        if distributed and mode == "data_parallel":
            keras.distribution.set_distribution(None)


def compare(averaging):
    single_model, single, _ = fit(False, averaging)
    model, multi, recorder = fit(True, averaging)
    chosen = decays(averaging)
    gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for d in chosen for a, b in zip(single.ema_weights(d), multi.ema_weights(d)))
    out = {"mode": mode, "averaging": averaging, "max_gap_vs_single": gap,
           "updates": [single.num_updates, multi.num_updates]}
    if averaging == "ema":
        # Each update applied once: the 2-device EMA is the EMA of its own
        # recorded weights.
        records = recorder.records
        ref = ReferenceEMA(records[0][1], chosen, 2, True, records[0][0])
        for step, weights in records[1:]:
            ref.advance(step, weights)
        out["max_gap_vs_reference"] = max(
            float(np.max(np.abs(np.asarray(a) - b)))
            for k, d in enumerate(chosen)
            for a, b in zip(multi.ema_weights(d), ref.shadows[k]))
    return out


for averaging in AVERAGINGS:
    print(json.dumps(compare(averaging)), flush=True)
