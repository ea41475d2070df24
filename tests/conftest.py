"""Shared test set-up: quiet logs, the backend under test, fresh seeds.

Also the tiny digits run of the end-to-end tests (`tiny_config`) and runs
trained once per session and shared: tests that change a run work on a copy
(`shutil.copytree` into their `tmp_path`).
"""

import csv
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402


def _import_keras_quietly():
    """`import keras` with file descriptor 2 sent to /dev/null meanwhile.

    TensorFlow writes its C++ start-up lines (oneDNN, CUDA probing) before it
    reads TF_CPP_MIN_LOG_LEVEL; pytest-xdist's workers would pass them on.
    """
    import sys

    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import keras
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    return keras


keras = _import_keras_quietly()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


def tiny_config(output_dir, **overrides):
    """train.py's protocol on the digits data with a tiny ResNet, 3 epochs."""
    from zoo.run import experiment

    settings = dict(
        output_dir=str(output_dir),
        dataset="digits",
        model="resnet18",
        width=0.0625,
        epochs=3,
        batch_size=128,
        lr=0.05,
        warmup_epochs=1,
        ema_decays=(0.5, 0.8),
        ema_period=2,
        seed=3,
    )
    settings.update(overrides)
    return experiment.Config(**settings)


class Interrupt(keras.callbacks.Callback):
    """Raises at the start of epoch `epoch`, as a kill would stop the run."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt(f"interrupted at epoch {epoch}")


def read_history(run):
    with open(os.path.join(run, "history.csv")) as f:
        return list(csv.DictReader(f))


def read_h5(path):
    """`{dataset path: array}` of every dataset in an HDF5 file."""
    import h5py
    import numpy as np

    values = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: values.__setitem__(name, np.array(obj))
                     if isinstance(obj, h5py.Dataset) else None)
    return values


def read_summary(run):
    with open(os.path.join(run, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The finished `tiny_config` run: (directory, summary). Read it only."""
    from zoo.run import experiment

    run = tmp_path_factory.mktemp("runs") / "clean"
    keras.backend.clear_session()
    summary = experiment.train(tiny_config(run), verbose=0)
    return str(run), summary


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory):
    """The `tiny_config` run stopped at the start of epoch 2 of 0..2.

    Read it only: resume a copy.
    """
    from zoo.run import experiment

    run = tmp_path_factory.mktemp("runs") / "stopped"
    keras.backend.clear_session()
    with pytest.raises(KeyboardInterrupt):
        experiment.train(tiny_config(run), verbose=0, callbacks=[Interrupt(2)])
    return str(run)


@pytest.fixture(scope="session")
def noisy_run(tmp_path_factory):
    """A 1-epoch `tiny_config` run on 40% symmetric label noise, exported.

    The export holds the largest decay's lowest-loss weights. Read it only.
    """
    from zoo.run import experiment

    run = tmp_path_factory.mktemp("runs") / "noisy"
    keras.backend.clear_session()
    summary = experiment.train(
        tiny_config(run, epochs=1, warmup_epochs=0, label_noise="symmetric:0.4",
                    export=True, export_from="best_loss"),
        verbose=0,
    )
    return str(run), summary
