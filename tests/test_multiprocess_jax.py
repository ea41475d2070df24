"""train.py as 2 JAX processes on loopback (keras.distribution, DataParallel).

See tests/multiprocess_runs.py: the processes choose their own backend, so
these tests run once, in the TensorFlow pass of the README's test command.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import read_h5
from multiprocess_runs import (JAX_FLAGS, KILL_AT, TRAIN, assert_same_history,
                               digits_folder, finish, free_ports, history_rows,
                               jax_env, jax_start, jax_two_processes)


@pytest.fixture(scope="module")
def jax_runs(tmp_path_factory):
    """The same run as 2 JAX processes and as one, started together."""
    pytest.importorskip("jax")
    tmp_path = tmp_path_factory.mktemp("jax")
    data = digits_folder(str(tmp_path / "digits"))
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    processes = jax_two_processes(two, tmp_path, data)
    # The reference: one process whose CPU is 2 devices, so that every batch
    # is split and summed as by the 2 processes. (Against 1 device, a run of
    # 8 steps of this tiny ResNet drifts by up to 1e-3 in val_loss from the
    # different order of the sums alone, as it does in one process.)
    env = dict(jax_env(tmp_path), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    processes.append(jax_start((TRAIN,), one, env, data))
    results = finish(processes)
    for code, out, err in results:
        assert code == 0, err[-3000:]
    return tmp_path, data, two, one, results


def test_jax_two_processes_match_one(jax_runs):
    tmp_path, _, two, one, results = jax_runs
    # Each process fed half of every batch of 128; BatchNorm and the loss
    # see the global batch, as in one process.
    assert_same_history(history_rows(two), history_rows(one), atol=1e-6)
    for name in ("sgd_last.weights.h5", "ema_0.8_last.weights.h5"):
        a = read_h5(os.path.join(two, name))
        b = read_h5(os.path.join(one, name))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)
    # Process 0 wrote the run; process 1 a temporary directory, removed.
    assert "process 0 writes" in results[1][1]
    assert not [n for n in os.listdir(tmp_path) if n.startswith("workertemp_")]


@pytest.mark.slow
def test_jax_killed_process_resumes_to_the_same_result(jax_runs, tmp_path):
    _, data, reference, _, _ = jax_runs
    run = str(tmp_path / "run")
    # Process 1 dies after the second batch of epoch 1; process 0, whose
    # peer's connection then closes, says so in one line (it used to wait in
    # its collective, then abort natively a minute later: status 134).
    (survivor, _, err), (killed, _, _) = finish(jax_two_processes(
        run, tmp_path, data, scripts=((TRAIN,), (KILL_AT, "mid_epoch"))))
    assert killed == -signal.SIGKILL
    assert survivor == 1, err[-3000:]
    assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "train.py: error: process 1 of 2 stopped responding; rerun both with the "
        "same command (the run resumes from its last finished epoch)")
    # The killed process could not remove its temporary directory ...
    assert [n for n in os.listdir(tmp_path) if n.startswith("workertemp_1_")]
    assert len(history_rows(run)) == 1
    results = finish(jax_two_processes(run, tmp_path, data))
    for code, out, err in results:
        assert code == 0, err[-3000:]
    assert "Resuming" in results[0][1]
    # ... the next start did.
    assert not [n for n in os.listdir(tmp_path) if n.startswith("workertemp_")]
    assert_same_history(history_rows(run), history_rows(reference), atol=1e-6)


def test_jax_unreachable_coordinator_fails_in_one_line(tmp_path):
    pytest.importorskip("jax")
    run = str(tmp_path / "run")
    coordinator = f"127.0.0.1:{free_ports(1)[0]}"  # nobody listens there
    process = subprocess.Popen(
        [sys.executable, TRAIN, *JAX_FLAGS, "--dataset=digits",
         f"--output_dir={run}", "--connect_timeout=5"],
        env=jax_env(tmp_path, coordinator, 1),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, err = finish([process])[0]
    assert code == -signal.SIGKILL
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    assert "process 1 of 2 could not reach" in lines[0]
    assert not os.path.exists(run)


