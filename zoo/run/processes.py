"""Runs of several processes or devices: who writes, joining, strategies.

One process of a multi-process run (TensorFlow's `TF_CONFIG`, or JAX's
`KERAS_DISTRIBUTION_*` variables) is process 0 and writes the run directory;
the others write a temporary copy (`worker_copy`). Joining waits at most
`--connect_timeout` seconds, watched by a small process (`_deadline`). The
two workarounds of Keras' multi-worker training sit behind
`build_from_local_batch`.
"""

import contextlib
import dataclasses
import os
import shutil
import sys

import keras

from keras_ema.messages import print_msg
from zoo import _keras_private
from zoo.run import run_dir
from zoo.run.config import DEFAULT_CONNECT_TIMEOUT
from zoo.run.config import Config
from zoo.run.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Process:
    """This process in a run of `count` processes; index 0 writes the run."""

    index: int = 0
    count: int = 1
    peers: str = ""  # the addresses, for messages
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT


def join_processes(config: Config, connect_timeout: float) -> Process:
    """This process's `Process`; on JAX, joins the others first.

    TensorFlow: `TF_CONFIG` (its `cluster` and `task`) names the workers;
    worker 0 (or the `chief` task) writes the run. JAX: the
    `KERAS_DISTRIBUTION_JOB_ADDRESSES`, `KERAS_DISTRIBUTION_NUM_PROCESSES`
    and `KERAS_DISTRIBUTION_PROCESS_ID` variables of
    `keras.distribution.initialize`; process 0 writes the run.
    """
    if not connect_timeout > 0:
        raise ConfigError(f"--connect_timeout={connect_timeout}: must be > 0 seconds")
    if config.distribution == "multiworker":
        return _tf_config_process(connect_timeout)
    if config.distribution == "data_parallel":
        return _jax_process(connect_timeout)
    return Process(connect_timeout=connect_timeout)


def _tf_config_process(connect_timeout):
    import json

    text = os.environ.get("TF_CONFIG", "")
    if not text:
        return Process(connect_timeout=connect_timeout)
    try:
        tf_config = json.loads(text)
        cluster = tf_config.get("cluster", {})
        task = tf_config.get("task", {})
        tasks = [(kind, i) for kind in ("chief", "worker")
                 for i in range(len(cluster.get(kind, [])))]
        index = tasks.index((task.get("type", "worker"), int(task.get("index", 0))))
        peers = ",".join(a for kind in ("chief", "worker") for a in cluster.get(kind, []))
    except (ValueError, AttributeError, TypeError) as error:
        raise ConfigError(
            f"TF_CONFIG={text}: not a cluster with this task among its chief "
            f"or workers ({error}); see README.md, Several machines"
        ) from None
    return Process(index, len(tasks), peers, connect_timeout)


def _jax_process(connect_timeout):
    names = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
             "KERAS_DISTRIBUTION_PROCESS_ID")
    values = {n: os.environ.get(n, "") for n in names}
    if not values[names[1]]:
        return Process(connect_timeout=connect_timeout)
    try:
        count, index = int(values[names[1]]), int(values[names[2]])
        if not (count >= 1 and 0 <= index < count and values[names[0]]):
            raise ValueError
    except ValueError:
        raise ConfigError(
            ", ".join(f"{n}={values[n]}" for n in names) + ": give the "
            "coordinator's host:port, the number of processes and this "
            "process's index in [0, number); see README.md, Several machines"
        ) from None
    process = Process(index, count, values[names[0]], connect_timeout)
    if count == 1:
        return process
    import jax

    if not jax.distributed.is_initialized():  # once per Python process
        # Collectives between CPU processes go through gloo (JAX's default
        # since 0.4.34; named here so that it does not depend on the version).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        with _deadline(process):
            keras.distribution.initialize()
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("keras_ema: all processes joined")
    if jax.process_index() != index:
        raise ConfigError(f"KERAS_DISTRIBUTION_PROCESS_ID={index}: JAX runs as "
                          f"process {jax.process_index()} already")
    return process


# Run by `_deadline` in its own process: waits, then prints the message and
# ends the watched process, unless that one ended or cancelled it first.
_WATCHDOG = """
import os, shutil, signal, sys, time
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
end = time.monotonic() + seconds
while time.monotonic() < end:
    if os.getppid() != pid:
        sys.exit(0)
    time.sleep(0.2)
sys.stderr.write(message + "\\n")
sys.stderr.flush()
os.kill(pid, signal.SIGKILL)
for path in sys.argv[4:]:
    shutil.rmtree(path, ignore_errors=True)
"""


@contextlib.contextmanager
def _deadline(process):
    """Ends the process with one line if the block lasts past the timeout.

    The backends wait minutes (TensorFlow hours) for a missing peer, in C++
    that holds Python's lock, so no Python timer or signal handler runs: a
    small watchdog process prints the line and kills this one (exit status
    137 in a shell, `-9` for `subprocess`).
    """
    import subprocess

    message = (
        f"error: process {process.index} of {process.count} could not "
        f"reach the others ({process.peers}) within --connect_timeout="
        f"{process.connect_timeout:g} s; start every process with the "
        "same cluster addresses, check that the hosts and ports are "
        "reachable, and run the same command again.")
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()),
         str(process.connect_timeout), message, *_WORKER_TEMP_DIRS],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()


def make_strategy(distribution: str, process: Process | None = None):
    """The tf.distribute strategy of `--distribution`, or `None`.

    With several processes (`TF_CONFIG`), waits until all have joined, at
    most `process.connect_timeout` seconds.
    """
    if distribution not in ("mirrored", "multiworker"):
        return None
    import tensorflow as tf

    if distribution == "mirrored":
        return tf.distribute.MirroredStrategy()
    if process is None or process.count == 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    with _deadline(process):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        # A first all-reduce: returns once every worker has joined.
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
    return strategy


def check_same_flags(config: Config, process: Process, strategy=None):
    """Refuses a run whose processes were started with different flags.

    Every process hashes each line of its resolved flags (`Config.to_flags`,
    but `--output_dir`: the processes other than 0 write a temporary copy)
    and the processes gather these digests: a flag whose digests differ is
    named in one `ConfigError`, raised by every process before anything is
    written. Otherwise each would train with its own flags while sharing the
    gradients, and process 0 would record a run that did not happen.
    Collectives: `strategy.gather` (TensorFlow, the joined strategy) or
    `multihost_utils.process_allgather` (JAX).
    """
    if process.count == 1:
        return
    import hashlib

    import numpy as np

    lines = [line for line in config.to_flags().splitlines()
             if not line.startswith("--output_dir=")]
    # 31 bits per flag: exact in int32 (JAX) and float64 (TensorFlow).
    digests = np.array([int.from_bytes(hashlib.sha256(line.encode()).digest()[:4],
                                       "big") >> 1 for line in lines], np.int64)
    if strategy is not None:
        import tensorflow as tf

        gathered = strategy.gather(strategy.run(
            lambda: tf.constant(digests[None].astype(np.float64))), axis=0)
        table = np.asarray(gathered).astype(np.int64)
    else:
        from jax.experimental import multihost_utils

        table = np.asarray(multihost_utils.process_allgather(
            digests.astype(np.int32))).astype(np.int64)
    table = table.reshape(process.count, len(lines))
    differ = [line for line, column in zip(lines, table.T) if len(set(column)) > 1]
    if differ:
        names = ", ".join(line.partition("=")[0] for line in differ)
        raise ConfigError(
            f"the {process.count} processes of this run were started with "
            f"different {names} (process {process.index} has "
            f"{' '.join(differ)}); start every process with the same flags, "
            "then run the same commands again")


# The temporary directories of `worker_copy`, removed by `_deadline` too.
_WORKER_TEMP_DIRS = []


@contextlib.contextmanager
def worker_copy(run: str, process: Process):
    """Yields the temporary run directory a process other than 0 writes.

    Keras' convention for the checkpoints of non-chief workers. The
    temporary directory starts as a copy of what process 0's run directory
    `run` holds to resume from (flags, history, backup), so that every
    process resumes at the same epoch; it is removed at the end, also by the
    watchdog of `_deadline` if the process is killed.
    """
    import tempfile

    print_msg(f"Process {process.index} of {process.count}: process 0 writes "
              f"{run}; this one writes to a temporary directory removed at "
              "the end.")
    remove_stale_worker_dirs()
    # The pid in the name tells a later start whether its owner still runs.
    tmp = tempfile.mkdtemp(prefix=f"workertemp_{process.index}_{os.getpid()}_")
    _WORKER_TEMP_DIRS.append(tmp)
    try:
        copy = os.path.join(tmp, "run")
        _copy_resumable(run, copy)
        yield copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _WORKER_TEMP_DIRS.remove(tmp)


def remove_stale_worker_dirs():
    """Removes the `worker_copy` directories of processes that no longer run.

    A process killed, or ended by the backend when a peer stopped, cannot
    remove its own temporary directory; the next start on the host does.
    """
    import re
    import tempfile

    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        match = re.fullmatch(r"workertemp_\d+_(\d+)_\w+", name)
        if match and not _running(int(match.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


class PeerStopped(RuntimeError):
    """Another process of a multi-process run stopped responding."""


@contextlib.contextmanager
def peer_errors(process: Process):
    """Turns the backend's error for a peer that stopped into `PeerStopped`.

    TensorFlow raises `UnavailableError` (or `DeadlineExceededError`,
    `AbortedError`, `CancelledError`) from its collectives, with a traceback
    of about 60 lines; the message names the process instead. JAX raises
    nothing (it aborts natively a minute later): `zoo.run.watchdog` ends the
    process with that line at once.
    """
    with _watch_jax_peers(process):
        with _tf_peer_errors(process):
            yield


def _watch_jax_peers(process):
    if process.count > 1 and keras.backend.backend() == "jax":
        from zoo.run import watchdog

        return watchdog.watch_peers(process, stopped_message, _WORKER_TEMP_DIRS)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _tf_peer_errors(process):
    try:
        yield
    except Exception as error:
        kind = type(error).__name__
        if process.count > 1 and kind in (
                "UnavailableError", "DeadlineExceededError", "AbortedError",
                "CancelledError") and type(error).__module__.startswith("tensorflow"):
            raise PeerStopped(stopped_message(process, str(error))) from None
        raise


def stopped_message(process: Process, detail: str = "") -> str:
    """The line for a run whose peer stopped, naming it when known."""
    import re

    others = [i for i in range(process.count) if i != process.index]
    tasks = {int(t) for t in re.findall(r"task:(\d+)", detail)} - {process.index}
    if len(others) == 1:
        who = f"process {others[0]} of {process.count}"
    elif len(tasks) == 1:
        who = f"process {tasks.pop()} of {process.count}"
    else:
        who = f"another of the {process.count} processes"
    every = "both" if process.count == 2 else f"all {process.count}"
    return (f"{who} stopped responding; rerun {every} with the same command "
            "(the run resumes from its last finished epoch)")


def _copy_resumable(run, copy):
    """Copies the files of `run` a resumed run reads into the new `copy`."""
    if not os.path.isfile(os.path.join(run, "flags.cfg")):
        return
    os.makedirs(copy)
    for name in ("flags.cfg", "history.csv", "summary.json", "backup"):
        path = os.path.join(run, name)
        try:
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(copy, name), ignore=lambda d, names: [
                    n for n in names if run_dir.is_temp_name(n)])
            elif os.path.isfile(path):
                shutil.copy(path, os.path.join(copy, name))
        except FileNotFoundError:  # process 0 renamed it meanwhile
            continue


def build_from_local_batch(model: keras.Model, strategy):
    """Works around Keras 3.15.1's `fit` / `evaluate` under several workers:
    builds from the local replica's batch and reduces scalar metrics over
    the replicas (see `zoo._keras_private`)."""
    _keras_private.build_from_local_batch(model, strategy)
    _keras_private.reduce_scalars_across_workers()


__all__ = ["PeerStopped", "Process", "build_from_local_batch", "check_same_flags", "join_processes",
           "make_strategy", "worker_copy"]
