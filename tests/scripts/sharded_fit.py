"""Fits a model whose dense kernels are sharded 4 ways, with MultiEMA.

    python sharded_fit.py

Run in a fresh process: 8 CPU devices are faked before JAX starts
(`--xla_force_host_platform_device_count=8`), arranged as a (2, 4) mesh
("batch", "model") under `keras.distribution.ModelParallel`; every Dense
kernel is split over "model" along its output axis. Prints one JSON line:
the bytes of shadows addressable on device 0 against their total and the
replicated part, the largest gap between the EMAs and a numpy reference over
the run's own weights and against a single-device fit, and whether the
compiled update holds an all-gather.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402
from ema_reference import Recorder  # noqa: E402
from ema_reference import ReferenceEMA  # noqa: E402

DECAYS = (0.5, 0.8, 0.9)
PERIOD = 2


def build():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    x = keras.layers.Dense(64, name="d1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dense(32, name="d2")(x)
    outputs = keras.layers.Dense(4, name="d3")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def model_parallel():
    devices = keras.distribution.list_devices("cpu")
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["d.*/kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layout_map,
                                            batch_dim_name="batch")


def fit(distribution):
    if distribution is not None:
        keras.distribution.set_distribution(distribution)
    try:
        model = build()
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 16)).astype("float32")
        y = rng.integers(0, 4, size=(64,)).astype("int32")
        ema = keras_ema.MultiEMA(DECAYS, period=PERIOD, warmup=False, verbose=0)
        recorder = Recorder()
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                  callbacks=[ema, recorder])
        return model, ema, recorder
    finally:
        keras.distribution.set_distribution(None)


assert len(jax.devices()) == 8, jax.devices()
_, single, _ = fit(None)
model, sharded, recorder = fit(model_parallel())

device = jax.devices()[0]
total = local = replicated = 0
kernel_shards = []
for v, s in zip(sharded._variables, sharded._shadows):
    array = s.value
    total += array.nbytes
    here = sum(shard.data.nbytes for shard in array.addressable_shards
               if shard.device == device)
    local += here
    if here == array.nbytes:
        replicated += array.nbytes
    if v.path.endswith("kernel"):
        # The stacked shadow keeps its weight's split: same shard shape
        # behind the decay axis.
        w_shard = v.value.addressable_shards[0].data.shape
        s_shard = array.addressable_shards[0].data.shape
        kernel_shards.append([list(w_shard), list(s_shard)])

# The compiled update of the sharded run, as XLA will run it.
hlo = sharded._update.compiled_text().lower()

records = recorder.records
ref = ReferenceEMA(records[0][1], DECAYS, PERIOD, False, records[0][0])
for step, weights in records[1:]:
    ref.advance(step, weights)
gap_reference = max(float(np.max(np.abs(np.asarray(a) - b)))
                    for k, d in enumerate(DECAYS)
                    for a, b in zip(sharded.ema_weights(d), ref.shadows[k]))
gap_single = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for d in DECAYS
                 for a, b in zip(single.ema_weights(d), sharded.ema_weights(d)))
print(json.dumps({
    "total_bytes": total, "device0_bytes": local, "replicated_bytes": replicated,
    "kernel_shards": kernel_shards, "all_gather": "all-gather" in hlo,
    "max_gap_vs_reference": gap_reference, "max_gap_vs_single": gap_single,
    "updates": [single.num_updates, sharded.num_updates],
}))
