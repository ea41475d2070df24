"""train.py as several processes on loopback: TF_CONFIG workers; pieces of both backends.

Each test starts its processes with `subprocess` on 127.0.0.1 ports picked
free at run time; every process is killed if the processes stop making progress
(`subprocesses.communicate`: no CPU time, no output), never on a wall-clock
deadline a busy machine could miss. The processes set their own `KERAS_BACKEND`, so the tests run
once, in the TensorFlow pass of the README's test command.
"""


import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import read_h5
from subprocesses import communicate
from multiprocess_runs import (FLAGS, JAX_FLAGS, KILL_AT, TRAIN, TWO_DEVICES,
                               assert_same_history, digits_folder, finish, free_ports,
                               history_rows, jax_env, tf_env, tf_start, two_workers,
                               worker_config)


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
    """One uninterrupted run of 2 worker processes."""
    tmp_path = tmp_path_factory.mktemp("two_workers")
    data = digits_folder(str(tmp_path / "digits"))
    run = str(tmp_path / "run")
    results = finish(two_workers(run, tmp_path, data))
    for code, out, err in results:
        assert code == 0, err[-3000:]
    return tmp_path, data, run, results


@pytest.mark.slow
def test_two_workers_only_the_chief_writes(two_worker_run):
    tmp_path, _, run, results = two_worker_run
    names = set(os.listdir(run))
    assert {"flags.cfg", "history.csv", "summary.json", "sgd_last.weights.h5"} <= names
    assert "backup" not in names  # removed at the end, as a single process does
    with open(os.path.join(run, "summary.json")) as f:
        assert json.load(f)["completed"] is True
    assert len(history_rows(run)) == 2
    # Worker 1 wrote only to its temporary directory, and removed it.
    assert "process 0 writes" in results[1][1]
    assert not [n for n in os.listdir(tmp_path) if n.startswith("workertemp_")]
    # Both trained the same model: the same final lines.
    assert results[0][1].splitlines()[-3] == results[1][1].splitlines()[-3]


# 16x16 images at lr=1e-4: 2 workers and one process agree to ~1e-5
# relative over the whole history, and with BatchNorm not synchronized the
# losses differ by 3e-4 to 7e-4, so the 1e-4 tolerance can fail. At the
# FLAGS' 8x8 and lr=0.01 (1x1 last stage) float32 rounding alone, amplified
# over the 8 steps, makes val_loss differ by ~2e-2 (at 32x32, ~2e-3).
MATCH = ("--image_size=16", "--lr=1e-4")


@pytest.mark.slow
def test_two_workers_match_one_process(two_worker_run, tmp_path):
    _, data, _, _ = two_worker_run
    run, single = str(tmp_path / "run"), str(tmp_path / "single")
    results = finish(two_workers(run, tmp_path, data, extra=MATCH))
    # One process: MultiWorkerMirroredStrategy without TF_CONFIG trains one
    # replica on CPU:0 (the second logical CPU is not used), on the whole
    # of every global batch.
    results += finish([tf_start((TWO_DEVICES,), single, tf_env(tmp_path), data, *MATCH)])
    for code, _, err in results:
        assert code == 0, err[-3000:]
    a, b = history_rows(run), history_rows(single)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [0, 1]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            # An accuracy counts images (512 a training epoch, fewer to
            # validate): float rounding may flip one near-tied prediction,
            # so it may differ by one image in 256; the losses by 1e-4.
            tolerance = 1 / 256 if key.endswith("accuracy") else 1e-4 * abs(rb[key])
            assert abs(ra[key] - rb[key]) <= tolerance, (key, ra, rb)


@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_result(two_worker_run, tmp_path):
    _, data, reference, _ = two_worker_run
    run = str(tmp_path / "run")
    # Worker 1 dies after the second batch of epoch 1; the chief, stuck
    # waiting for it, is then killed too (a scheduler restarts both).
    # Worker 1 dies after the second batch of epoch 1; the chief, whose
    # collective then fails, says so in one line.
    (chief, _, err), (worker, _, _) = finish(
        two_workers(run, tmp_path, data, scripts=((TRAIN,), (KILL_AT, "mid_epoch"))))
    assert worker == -signal.SIGKILL
    assert chief == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "train.py: error: process 1 of 2 stopped responding; rerun both with the "
        "same command (the run resumes from its last finished epoch)")
    # The killed worker could not remove its temporary directory ...
    assert [n for n in os.listdir(tmp_path) if n.startswith("workertemp_1_")]
    assert len(history_rows(run)) == 1  # epoch 0 done and backed up
    results = finish(two_workers(run, tmp_path, data))
    for code, out, err in results:
        assert code == 0, err[-3000:]
    assert "Resuming" in results[0][1]
    # ... the next start did.
    assert not [n for n in os.listdir(tmp_path) if n.startswith("workertemp_")]
    assert_same_history(history_rows(run), history_rows(reference), atol=1e-6)
    for name in ("sgd_last.weights.h5", "ema_0.8_last.weights.h5"):
        a, b = read_h5(os.path.join(run, name)), read_h5(os.path.join(reference, name))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)



def test_unreachable_worker_fails_in_one_line(tmp_path):
    run = str(tmp_path / "run")
    ports = free_ports(2)  # nobody listens on the chief's port
    process = subprocess.Popen(
        [sys.executable, TRAIN, *FLAGS, "--dataset=digits", f"--output_dir={run}",
         "--connect_timeout=5"],
        env=tf_env(tmp_path, worker_config(ports, 1)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, err = finish([process])[0]
    assert code == -signal.SIGKILL  # ended by the --connect_timeout watchdog
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    assert "process 1 of 2 could not reach" in lines[0]
    assert "--connect_timeout=5" in lines[0]
    assert not os.path.exists(run)  # a non-chief never writes the run


# === Processes that disagree ===


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_processes_with_different_flags_refuse_in_one_line(tmp_path, backend):
    if backend == "jax":
        pytest.importorskip("jax")
    run = str(tmp_path / "run")
    flags = [f for f in (FLAGS if backend == "tensorflow" else JAX_FLAGS)
             if not f.startswith(("--lr=", "--seed="))]
    if backend == "tensorflow":
        ports = free_ports(2)
        envs = [tf_env(tmp_path, worker_config(ports, i)) for i in range(2)]
    else:
        coordinator = f"127.0.0.1:{free_ports(1)[0]}"
        envs = [jax_env(tmp_path, coordinator, i) for i in range(2)]
    processes = []
    try:
        for env, extra in zip(envs, (["--lr=0.01", "--seed=7"], ["--lr=0.02", "--seed=8"])):
            processes.append(subprocess.Popen(
                [sys.executable, TRAIN, *flags, *extra, "--dataset=digits",
                 f"--output_dir={run}"], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    finally:
        results = communicate(processes)
    for index, (code, out, err) in enumerate(results):
        assert code == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1, err[-3000:]
        assert "different --lr, --seed" in lines[0], lines[0]
        assert f"process {index} has --lr=0.0{index + 1} --seed={7 + index}" in lines[0]
    assert not os.path.exists(run)  # nothing written
    assert not [n for n in os.listdir(tmp_path) if n.startswith("workertemp_")]


# === In-process pieces ===


def test_process_roles_from_tf_config(monkeypatch):
    from zoo.run import experiment
    from zoo.run import processes

    cluster = {"worker": ["h0:1", "h1:1"]}
    for task, index in (({"type": "worker", "index": 0}, 0),
                        ({"type": "worker", "index": 1}, 1)):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        process = processes._tf_config_process(30.0)
        assert (process.index, process.count, process.peers) == (index, 2, "h0:1,h1:1")
    # A separate chief task is process 0, the workers come after it.
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"chief": ["c:1"], "worker": ["w:1"]},
         "task": {"type": "worker", "index": 0}}))
    assert processes._tf_config_process(30.0).index == 1
    monkeypatch.delenv("TF_CONFIG")
    assert processes._tf_config_process(30.0).count == 1
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": 5}}))
    with pytest.raises(experiment.ConfigError, match="TF_CONFIG=.*not a cluster"):
        processes._tf_config_process(30.0)


@pytest.mark.all_backends
def test_bad_process_settings_fail_in_one_line(monkeypatch, tmp_path):
    from zoo.run import experiment
    from zoo.run import processes

    config = experiment.Config(output_dir=str(tmp_path / "run"), epochs=2,
                               warmup_epochs=0, distribution="none")
    with pytest.raises(experiment.ConfigError, match="--connect_timeout=0"):
        experiment.train(config, connect_timeout=0)
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "h0:1")
    with pytest.raises(experiment.ConfigError,
                       match="KERAS_DISTRIBUTION_PROCESS_ID=2: give"):
        processes._jax_process(30.0)
    assert not os.path.exists(config.output_dir)


@pytest.mark.all_backends
def test_array_loader_shards_split_every_batch():
    from zoo.data.loader import ArrayLoader

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(21, 4, 4, 3), dtype=np.uint8)
    y = np.arange(21)
    whole = ArrayLoader(x, y, 8, 0.5, 0.25, shuffle=True, augment=True, seed=3)
    parts = [ArrayLoader(x, y, 8, 0.5, 0.25, shuffle=True, augment=True, seed=3,
                         shard=(i, 2)) for i in range(2)]
    for loader in (whole, *parts):
        loader.set_epoch(1)
    for b in range(len(whole)):
        xb, yb = whole[b]
        keep = len(yb) // 2 * 2  # the last batch of 5 loses 1 example
        got = [p[b] for p in parts]
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), yb[:keep])
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), xb[:keep])
    with pytest.raises(ValueError, match="shard=\\(2, 2\\)"):
        ArrayLoader(x, y, 8, 0.5, 0.25, shard=(2, 2))


@pytest.mark.all_backends
def test_synchronized_bn_switch():
    import keras

    import zoo.models

    if keras.backend.backend() != "tensorflow":
        with pytest.raises(ValueError, match="synchronized_bn=True"):
            zoo.models.get_model("resnet18", 10, (32, 32, 3), width=0.0625,
                          synchronized_bn=True)
        return
    for name in ("resnet18", "wrn28_10", "vgg16"):
        extra = {"batch_norm": True} if name == "vgg16" else {}
        model = zoo.models.get_model(name, 10, (32, 32, 3), width=0.0625,
                              synchronized_bn=True, **extra)
        layers = [layer for layer in model._flatten_layers()
                  if isinstance(layer, keras.layers.BatchNormalization)]
        assert layers and all(layer.synchronized for layer in layers), name
        plain = zoo.models.get_model(name, 10, (32, 32, 3), width=0.0625, **extra)
        assert not any(getattr(layer, "synchronized", False)
                       for layer in plain._flatten_layers())


def test_synchronized_bn_variance_in_two_passes():
    # Keras' synchronized moments take E[x^2] - E[x]^2: at a mean of 1000
    # and a spread of 0.1, float32 keeps none of the variance's digits.
    import keras
    import tensorflow as tf

    import zoo.models

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = zoo.models.get_model("resnet18", 10, (8, 8, 3), width=0.0625,
                              synchronized_bn=True)
    bn = model.get_layer("stem_bn")
    assert bn.synchronized
    x = (1000 + 0.1 * np.random.default_rng(0).standard_normal(
        (16, 8, 8, bn.gamma.shape[0]))).astype(np.float32)
    got = strategy.run(tf.function(lambda: bn(x, training=True)))
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    want = (x64 - mean) / np.sqrt(var + bn.epsilon)  # gamma 1, beta 0
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), want, atol=1e-2)


def test_stale_worker_directories_are_removed_on_the_next_start(monkeypatch, tmp_path):
    import tempfile

    from zoo.run import processes

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # its pid no longer runs
    dead = tmp_path / f"workertemp_1_{ended.pid}_abc"
    alive = tmp_path / f"workertemp_1_{os.getpid()}_abc"
    other = tmp_path / "workertemp_1_unrelated"
    for path in (dead, alive, other):
        (path / "run").mkdir(parents=True)
    with processes.worker_copy(str(tmp_path / "missing_run"),
                               processes.Process(1, 2)) as copy:
        assert os.path.basename(os.path.dirname(copy)).startswith(
            f"workertemp_1_{os.getpid()}_")
        assert not dead.exists()  # its process ended: removed
        assert alive.exists() and other.exists()  # running, or not ours: kept
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, other.name])


def test_a_stopped_peer_is_one_line():
    import tensorflow as tf

    from zoo.run import processes

    error = tf.errors.UnavailableError(
        None, None, "Collective ops is aborted by: ... /job:worker/replica:0/task:1 ...")
    with pytest.raises(processes.PeerStopped) as raised:
        with processes.peer_errors(processes.Process(0, 2)):
            raise error
    assert str(raised.value) == (
        "process 1 of 2 stopped responding; rerun both with the same command "
        "(the run resumes from its last finished epoch)")
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    with pytest.raises(processes.PeerStopped, match="^process 2 of 3 stopped.*rerun all 3"):
        with processes.peer_errors(processes.Process(0, 3)):
            raise error.__class__(None, None, "task:2 unreachable")
    # One process: the error is the backend's own.
    with pytest.raises(tf.errors.UnavailableError):
        with processes.peer_errors(processes.Process()):
            raise error


# Process 0 of a JAX run of 2 (`processes.peer_errors`) with a stand-in peer:
# a small process that connects to the watch as process 1, then either is
# killed or says bye and ends. (JAX on one process: the port's broadcast is
# the identity, so no coordinator is needed.)
_WATCHED = """
import subprocess, sys, time
from jax.experimental import multihost_utils
from zoo.run import processes
peer = []
def broadcast(port):
    peer.append(subprocess.Popen([sys.executable, "-c", '''
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"1\\\\n")
if sys.argv[2] == "bye":
    s.sendall(b"bye\\\\n")
    sys.exit()
time.sleep(600)
''', str(int(port)), sys.argv[1]]))
    return port
multihost_utils.broadcast_one_to_all = broadcast
sys.argv[0] = "train.py"
with processes.peer_errors(processes.Process(0, 2, "127.0.0.1:1")):
    peer[0].wait() if sys.argv[1] == "bye" else peer[0].kill()
    time.sleep(3)  # a step; the watch ends the process meanwhile if the peer was killed
print("finished", flush=True)
"""


@pytest.mark.parametrize("peer", ["killed", "bye"])
def test_jax_watch_notices_a_killed_peer_only(tmp_path, peer):
    pytest.importorskip("jax")
    process = subprocess.Popen([sys.executable, "-c", _WATCHED, peer],
                               env=jax_env(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    code, out, err = finish([process])[0]
    assert "Traceback" not in err, err[-3000:]
    if peer == "bye":
        assert (code, out) == (0, "finished\n"), err[-3000:]
    else:
        assert code == 1 and out == "", err[-3000:]
        assert err.strip().splitlines()[-1] == (
            "train.py: error: process 1 of 2 stopped responding; rerun both with the "
            "same command (the run resumes from its last finished epoch)")
