"""Where the shadows live: sharded like their weights, or in host memory."""

import json
import os
import sys

import keras
import numpy as np
import pytest
import subprocesses

import keras_ema
from keras_ema import MultiEMA
from ema_reference import Recorder
from ema_reference import data
from ema_reference import reference_ema
from ema_reference import tiny_model

pytestmark = pytest.mark.all_backends

DECAYS = (0.5, 0.9)
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts",
                      "sharded_fit.py")


def _on_host(variable):
    value = variable.value
    if keras.backend.backend() == "jax":
        return all(d.platform == "cpu" for d in value.devices())
    return "CPU" in value.device.upper()


def _placement(variable):
    value = variable.value
    if keras.backend.backend() == "jax":
        return value.sharding
    return value.device


@pytest.mark.parametrize("bad", ["gpu", "CPU:0", 0, True, ["cpu"]])
def test_shadow_device_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="shadow_device") as info:
        MultiEMA(DECAYS, shadow_device=bad)
    assert repr(bad) in str(info.value)
    assert "\n" not in str(info.value)


def test_host_shadows_match_numpy_reference():
    model = tiny_model()
    x, y = data()
    recorder = Recorder()
    ema = MultiEMA(DECAYS, period=3, warmup=False, verbose=0,
                   shadow_device="cpu")
    model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0,
              callbacks=[recorder, ema])
    assert ema.num_updates == 30 // 3
    assert all(_on_host(s) for s in ema._shadows)
    expected = reference_ema(recorder.records, DECAYS, 3, False,
                             [True] * len(model.weights))
    for k, decay in enumerate(DECAYS):
        for j, (g, e) in enumerate(zip(ema.ema_weights(decay), expected[k])):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6,
                                       err_msg=f"decay {decay} weight {j}")
    # Swapping in copies the host values into the model, placed like the
    # live weights, and gives the live weights back bit for bit.
    live = model.get_weights()
    placed = [_placement(v) for v in model.weights]
    with ema.swapped_in(0.9) as swapped:
        for g, e in zip(swapped.get_weights(), expected[1]):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        assert [_placement(v) for v in swapped.weights] == placed
    for a, b in zip(model.get_weights(), live):
        np.testing.assert_array_equal(a, b)
    # A restored state stays in host memory.
    state = ema.get_state()
    ema.set_state(state)
    assert all(_on_host(s) for s in ema._shadows)


@pytest.mark.slow
def test_sharded_shadows_under_model_parallel():
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution.ModelParallel shards on JAX only")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocesses.run([sys.executable, SCRIPT], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # Each kernel's stack of EMAs is split like the kernel (4 ways, the
    # decay axis whole), so device 0 holds a quarter of the kernels' EMAs
    # plus the replicated small ones (biases, BatchNorm).
    for weight_shard, shadow_shard in out["kernel_shards"]:
        assert shadow_shard == [len((0.5, 0.8, 0.9))] + weight_shard, out
    sharded = out["total_bytes"] - out["replicated_bytes"]
    assert out["replicated_bytes"] < out["total_bytes"] / 4, out
    assert out["device0_bytes"] <= sharded / 4 + out["replicated_bytes"], out
    # The compiled update works shard by shard.
    assert not out["all_gather"], out
    # Every update applied once, equal to a numpy EMA of the run's own
    # weights and to a single-device fit.
    assert out["updates"] == [4, 4], out
    assert out["max_gap_vs_reference"] < 1e-5, out
    assert out["max_gap_vs_single"] < 1e-5, out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mirrored", "data_parallel"])
def test_host_shadows_on_two_devices_match_one(mode):
    if keras.backend.backend() != "jax" and mode == "data_parallel":
        pytest.skip("the JAX run covers DataParallel")
    if keras.backend.backend() == "jax" and mode == "mirrored":
        pytest.skip("the TensorFlow run covers MirroredStrategy")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERAS_BACKEND", None)
    env.pop("TF_CONFIG", None)
    script = os.path.join(os.path.dirname(SCRIPT), "distributed_fit.py")
    result = subprocesses.run([sys.executable, script, mode, "ema", "cpu"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["updates"] == [4, 4], out
    assert out["max_gap_vs_single"] < 1e-5, out
    assert out["max_gap_vs_reference"] < 1e-5, out
