"""train.py as several processes on loopback: what the tests that start them share.

Each test starts its processes with `subprocess` on 127.0.0.1 ports picked
free at run time; every process is killed if the processes stop making
progress (`subprocesses.communicate`: no CPU time, no output), never on a
wall-clock deadline a busy machine could miss. The processes set their own
`KERAS_BACKEND`, so those tests run once, in the TensorFlow pass of the
README's test command.
"""

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
from subprocesses import communicate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
KILL_AT = os.path.join(ROOT, "tests", "scripts", "kill_at.py")
TWO_DEVICES = os.path.join(ROOT, "tests", "scripts", "two_devices.py")
# 512 training and 128 test images of 8x8 (`_digits_folder`): 4 steps of
# 128 per epoch, each split in halves between the 2 processes.
FLAGS = ["--model=resnet18", "--width=0.0625", "--epochs=2", "--batch_size=128",
         "--lr=0.01", "--warmup_epochs=0", "--ema_decays=0.5,0.8",
         "--ema_period=2", "--seed=7", "--val_fraction=0",
         "--distribution=multiworker"]


def digits_folder(root, train=512, test=128):
    """scikit-learn's 8x8 digits as a folder: dataset, sizes that split in 2."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    for split, rows in (("train", range(train)), ("test", range(train, train + test))):
        for i in rows:
            folder = os.path.join(root, split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(images[i]).save(os.path.join(folder, f"{i}.png"))
    return root


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_env(tmp_path, tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow",
               PYTHONPATH=ROOT, TMPDIR=str(tmp_path))
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def worker_config(ports, index):
    return {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index}}


def tf_start(script, run, env, data, *extra):
    return subprocess.Popen([sys.executable, *script, *FLAGS,
                             f"--dataset=folder:{data}", *extra,
                             f"--output_dir={run}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(processes):
    """Waits for all; returns `[(returncode, stdout, stderr)]`; kills leftovers.

    Fails only on a hang (see `subprocesses.communicate`), never because a
    busy machine is slow.
    """
    return communicate(processes)


def two_workers(run, tmp_path, data, scripts=((TRAIN,), (TRAIN,)), extra=()):
    ports = free_ports(2)
    processes = []
    try:
        for index, script in enumerate(scripts):
            processes.append(tf_start(script, run, tf_env(tmp_path, worker_config(ports, index)),
                                    data, *extra))
    except BaseException:
        for p in processes:
            p.kill()
        raise
    return processes


def history_rows(run):
    with open(os.path.join(run, "history.csv")) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def assert_same_history(a, b, atol):
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert abs(ra[key] - rb[key]) <= atol, (key, ra, rb)



JAX_FLAGS = ["--model=resnet18", "--width=0.0625", "--epochs=2", "--batch_size=128",
             "--lr=0.01", "--warmup_epochs=0", "--ema_decays=0.5,0.8",
             "--ema_period=2", "--seed=7", "--val_fraction=0",
             "--distribution=data_parallel"]


def jax_env(tmp_path, coordinator=None, index=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="jax",
               PYTHONPATH=ROOT, TMPDIR=str(tmp_path))
    for name in ("XLA_FLAGS", "KERAS_DISTRIBUTION_JOB_ADDRESSES",
                 "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID"):
        env.pop(name, None)
    if coordinator is not None:
        env.update(KERAS_DISTRIBUTION_JOB_ADDRESSES=coordinator,
                   KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                   KERAS_DISTRIBUTION_PROCESS_ID=str(index))
    return env


def jax_start(script, run, env, data, *extra):
    return subprocess.Popen([sys.executable, *script, *JAX_FLAGS,
                             f"--dataset=folder:{data}", *extra,
                             f"--output_dir={run}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def jax_two_processes(run, tmp_path, data, scripts=((TRAIN,), (TRAIN,))):
    coordinator = f"127.0.0.1:{free_ports(1)[0]}"
    processes = []
    try:
        for index, script in enumerate(scripts):
            processes.append(jax_start(script, run, jax_env(tmp_path, coordinator, index),
                                        data))
    except BaseException:
        for p in processes:
            p.kill()
        raise
    return processes

