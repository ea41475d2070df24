"""MultiEMA, SwitchEMA and Belay on 2 faked devices match a 1-device fit.

Each mode runs `tests/scripts/distributed_fit.py` in a fresh process, once for
its three averagers, since the devices must be faked before the backend
starts: 2 logical CPUs for `tf.distribute.MirroredStrategy` and
`MultiWorkerMirroredStrategy` (one worker, two devices),
`--xla_force_host_platform_device_count=2` for JAX's
`keras.distribution.DataParallel`.
"""

import json
import os
import sys

import pytest
import subprocesses

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts",
                      "distributed_fit.py")


def _backend_available(mode):
    module = "jax" if mode == "data_parallel" else "tensorflow"
    try:
        __import__(module)
    except ImportError:
        return False
    return True


AVERAGINGS = ["ema", "sema", "belay"]


@pytest.fixture(scope="module")
def fits():
    """`{mode: {averaging: output}}`: one process per mode fits every averager."""
    results = {}

    def run(mode):
        if mode not in results:
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
            env.pop("KERAS_BACKEND", None)
            env.pop("TF_CONFIG", None)
            result = subprocesses.run([sys.executable, SCRIPT, mode, ",".join(AVERAGINGS)],
                                      env=env, capture_output=True, text=True)
            assert result.returncode == 0, result.stderr[-3000:]
            lines = [json.loads(line) for line in result.stdout.strip().splitlines()
                     if line.startswith("{")]
            results[mode] = {out["averaging"]: out for out in lines}
            assert sorted(results[mode]) == sorted(AVERAGINGS), result.stdout[-3000:]
        return results[mode]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("averaging", AVERAGINGS)
@pytest.mark.parametrize("mode", ["mirrored", "multiworker", "data_parallel"])
def test_two_devices_match_one(mode, averaging, fits):
    if not _backend_available(mode):
        pytest.skip(f"{mode} needs its backend installed")
    out = fits(mode)[averaging]
    # Same data, same order, BatchNorm statistics over the global batch: the
    # EMAs agree to float32 rounding.
    assert out["max_gap_vs_single"] < 1e-5, out
    # One update per period, not one per replica.
    assert out["updates"][0] == out["updates"][1] == 4, out
    if averaging == "ema":
        # ...and each update is the EMA of the 2-device run's own weights.
        assert out["max_gap_vs_reference"] < 1e-5, out
