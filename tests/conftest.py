"""Shared test set-up: quiet logs, the backend under test, fresh seeds.

Also the tiny digits run of the end-to-end tests (`tiny_config`) and runs
trained once per session, by one pytest-xdist worker for all: tests that
change a run work on a copy (`shutil.copytree` into their `tmp_path`).
"""

import csv
import gc
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

# JAX's compilation cache, one folder for the whole session: each test and
# each train.py the tests start builds the same few tiny models, and XLA's
# compilation was most of a JAX process's CPU time (a 2-epoch JAX run here:
# 89 s of CPU, 28 s with the cache filled). The same compiled programs run;
# nothing a test checks changes. `dev.py test` gives both passes one folder;
# a plain `pytest` gets one here (pytest-xdist's workers and every
# subprocess inherit the environment), removed when the session ends.
JAX_CACHE = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    # A size bound makes JAX lock the folder (`filelock`) around each read
    # and write: processes compiling the same program at once, as the
    # multi-process tests' do, never read a half-written entry.
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),
}
_OWN_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and not os.environ.get(
        "PYTEST_XDIST_WORKER"):
    import tempfile

    _OWN_JAX_CACHE = tempfile.mkdtemp(prefix="keras-ema-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_JAX_CACHE
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    import importlib.util

    if importlib.util.find_spec("filelock") is None:  # JAX would refuse the size
        os.environ.pop("JAX_COMPILATION_CACHE_DIR")
    for _name, _value in JAX_CACHE.items():
        os.environ.setdefault(_name, _value)


def pytest_unconfigure(config):
    if _OWN_JAX_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_JAX_CACHE, ignore_errors=True)


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


# The test files that take longest (minutes each, mostly in subprocesses),
# longest first: collected first, so pytest-xdist's workers (--dist loadfile
# hands out whole files in collection order) start them first and the
# suite does not end with one of them running alone. Within a file, and
# for the other files, the order is unchanged.
# Ranked by CPU seconds (their own and their subprocesses'), measured on
# the TensorFlow pass: 420 for test_damaged_files.py down to 60.
LONGEST_FIRST = (
    "test_damaged_files.py", "test_multiprocess.py", "test_multiprocess_jax.py",
    "test_float64_equivalence.py", "test_evaluate.py", "test_kill_resume.py",
    "test_zoo.py", "test_experiment.py", "test_keras_hub.py", "test_multi_ema.py",
    "test_posthoc_sweep.py", "test_distribution.py", "test_shadow_placement.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    # Without its garbage collection (`free_memory`): with TensorFlow or JAX
    # loaded a full collection takes about 0.3 s of CPU, and twice per test
    # it was most of the time of the suite's many small tests. The garbage
    # is collected once per test file instead.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session(free_memory=False)


@pytest.fixture(autouse=True, scope="module")
def _collect_garbage():
    yield
    gc.collect()


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


def _shared_run(tmp_path_factory, name, train):
    """The run `name`, trained once for the session by `train(directory)`.

    pytest-xdist's workers share the parent of their temporary directories:
    the first worker that asks trains the run there, under a lock, and the
    others wait for it. Each worker gets its own copy, whose flags.cfg names
    the copy as its --output_dir, as a run trained there would: a test that
    locks or resumes its run disturbs no other worker. Returns (directory,
    what `train` returned, stored as JSON).
    """
    import fcntl
    import shutil

    mine = tmp_path_factory.mktemp("runs") / name
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return str(mine), train(mine)
    shared = tmp_path_factory.getbasetemp().parent / "shared_runs"
    shared.mkdir(exist_ok=True)
    source, result = shared / name, shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            shutil.rmtree(source, ignore_errors=True)  # a failed try
            returned = train(source)
            result.write_text(json.dumps(returned))
    shutil.copytree(source, mine)
    flags = mine / "flags.cfg"
    text = flags.read_text()
    assert text.count(f"--output_dir={source}\n") == 1, text
    flags.write_text(text.replace(f"--output_dir={source}\n", f"--output_dir={mine}\n"))
    return str(mine), json.loads(result.read_text())


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The finished `tiny_config` run: (directory, summary). Read it only."""
    from zoo.run import experiment

    def train(run):
        keras.backend.clear_session()
        return experiment.train(tiny_config(run), verbose=0)

    return _shared_run(tmp_path_factory, "clean", train)


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory):
    """The `tiny_config` run stopped at the start of epoch 2 of 0..2.

    Read it only: resume a copy.
    """
    from zoo.run import experiment

    def train(run):
        keras.backend.clear_session()
        with pytest.raises(KeyboardInterrupt):
            experiment.train(tiny_config(run), verbose=0, callbacks=[Interrupt(2)])

    return _shared_run(tmp_path_factory, "stopped", train)[0]


@pytest.fixture(scope="session")
def noisy_run(tmp_path_factory):
    """A 1-epoch `tiny_config` run on 40% symmetric label noise, exported.

    The export holds the largest decay's lowest-loss weights. Read it only.
    """
    from zoo.run import experiment

    def train(run):
        keras.backend.clear_session()
        return experiment.train(
            tiny_config(run, epochs=1, warmup_epochs=0, label_noise="symmetric:0.4",
                        export=True, export_from="best_loss"),
            verbose=0,
        )

    return _shared_run(tmp_path_factory, "noisy", train)
