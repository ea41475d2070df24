"""train.py killed with SIGKILL mid-epoch, rerun, ends like an uninterrupted run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--dataset=digits", "--model=resnet18", "--width=0.0625", "--epochs=4",
         "--batch_size=64", "--lr=0.05", "--warmup_epochs=1",
         "--ema_decays=0.5,0.8", "--ema_period=2", "--seed=5"]


def _command(output_dir):
    return [sys.executable, os.path.join(ROOT, "train.py"), *FLAGS,
            f"--output_dir={output_dir}"]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _rows(run):
    path = os.path.join(run, "history.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _h5(path):
    import h5py

    values = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: values.__setitem__(name, np.array(obj))
                     if isinstance(obj, h5py.Dataset) else None)
    return values


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun(tmp_path):
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    subprocess.run(_command(clean), env=_env(), check=True, capture_output=True,
                   timeout=600)

    process = subprocess.Popen(_command(killed), env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(_rows(killed)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2 (of 0..3), between its batches
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    summary = json.load(open(os.path.join(killed, "summary.json")))
    assert summary["completed"] is False, "the run ended before it was killed"

    result = subprocess.run(_command(killed), env=_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resuming" in result.stdout

    assert _rows(killed) == _rows(clean)
    a = json.load(open(os.path.join(clean, "summary.json")))
    b = json.load(open(os.path.join(killed, "summary.json")))
    for key in ("sgd", "ema", "epochs_done", "completed"):
        assert a[key] == b[key], key
    for name in ("sgd_last.weights.h5", "ema_0.5_best_accuracy.weights.h5",
                 "ema_0.8_best_loss.weights.h5"):
        x, y = _h5(os.path.join(clean, name)), _h5(os.path.join(killed, name))
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}:{key}")
    # Nothing half-written is left behind.
    assert not [n for n in os.listdir(killed) if ".tmp" in n]
