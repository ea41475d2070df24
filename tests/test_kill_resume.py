"""train.py killed with SIGKILL mid-epoch, rerun, ends like an uninterrupted run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import subprocesses
from conftest import read_h5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _rows(run):
    path = os.path.join(run, "history.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


# A SIGTERM, then a SIGKILL at each moment of a run's life, each followed by
# the same command, ends like one uninterrupted run.
LIFE_FLAGS = ["--dataset=digits", "--model=resnet18", "--width=0.0625",
              "--epochs=2", "--batch_size=256", "--lr=0.05", "--warmup_epochs=0",
              "--ema_decays=0.5,0.8", "--ema_period=2", "--seed=7", "--export"]
KILL_AT = os.path.join(ROOT, "tests", "scripts", "kill_at.py")


def _life_command(output_dir, phase=None):
    script = [KILL_AT, phase] if phase else [os.path.join(ROOT, "train.py")]
    return [sys.executable, *script, *LIFE_FLAGS, f"--output_dir={output_dir}"]


def _summary(run):
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    summary.pop("train_seconds")
    return summary


def _predictions(run):
    import keras

    path = os.path.join(run, "export", "model.keras")
    with zipfile.ZipFile(path) as archive:  # loads without zoo's classes
        assert b"zoo" not in archive.read("config.json")
    model = keras.saving.load_model(path)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3))
    return keras.ops.convert_to_numpy(model(images.astype("float32")))


@pytest.mark.slow
def test_sigterm_then_sigkill_at_every_phase_then_rerun(tmp_path):
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    # The uninterrupted run trains alongside the killed one (another process,
    # another directory; op determinism makes both independent of timing).
    log = open(tmp_path / "clean.log", "w+")
    reference = subprocess.Popen(_life_command(clean), env=_env(),
                                 stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        _kill_at_every_phase_then_rerun(killed)
        subprocesses.communicate([reference])
    finally:
        reference.kill()
        reference.wait()
        log.seek(0)
        stderr = log.read()
        log.close()
    assert reference.returncode == 0, stderr[-2000:]
    _assert_same_run(killed, clean)


def _kill_at_every_phase_then_rerun(killed):
    # SIGTERM once an epoch is done: one line, no traceback, resumable.
    process = subprocess.Popen(_life_command(killed), env=_env(), text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while (not os.path.exists(os.path.join(killed, "summary.json"))
           and process.poll() is None):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    ((_, _, stderr),) = subprocesses.communicate([process])
    assert process.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (
        "train.py: stopped by SIGTERM; what was trained is kept: rerun the same "
        "command to resume.")

    for phase in ("startup", "mid_epoch", "results", "export", "cleanup"):
        result = subprocesses.run(_life_command(killed, phase), env=_env(),
                                capture_output=True, text=True)
        assert result.returncode == -signal.SIGKILL, (phase, result.stderr[-2000:])
        completed = os.path.exists(os.path.join(killed, "summary.json")) and (
            _summary(killed)["completed"])
        assert completed is (phase == "cleanup"), phase

    result = subprocesses.run(_life_command(killed), env=_env(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "holds a completed run" in result.stdout


def _assert_same_run(killed, clean):
    assert _summary(killed) == _summary(clean)
    assert _rows(killed) == _rows(clean)
    for name in ("sgd_last.weights.h5", "ema_0.5_best_accuracy.weights.h5",
                 "ema_0.8_best_loss.weights.h5"):
        x, y = read_h5(os.path.join(clean, name)), read_h5(os.path.join(killed, name))
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}:{key}")
    np.testing.assert_array_equal(_predictions(killed), _predictions(clean))
    assert sorted(os.listdir(killed)) == sorted(os.listdir(clean))
    assert not [n for n in os.listdir(killed) if ".tmp" in n]


@pytest.mark.slow
def test_second_process_on_a_run_directory_is_refused(tmp_path):
    from zoo.run import run_dir

    run = tmp_path / "run"
    run.mkdir()
    with run_dir.RunLock(str(run)):
        result = subprocesses.run(_life_command(run), env=_env(),
                                capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"train.py: error: --output_dir={run} is in use by process "
        f"{os.getpid()}; wait for it to finish or choose another --output_dir.")
    assert os.listdir(run) == [".lock"]
