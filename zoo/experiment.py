"""The paper's training protocol as one function: `train(Config(...))`.

SGD with Nesterov momentum, linear warm-up then cosine decay per step, random
crop and flip, EMAs of the weights kept by `keras_ema.MultiEMA` (or SEMA /
BELAY), everything written to a run directory (see `zoo.run_dir`) that a
rerun of the same command resumes.
"""

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time

import keras
import numpy as np

import keras_ema
from zoo import run_dir
from zoo.backup import AtomicBackupAndRestore
from zoo.data.loader import ArrayLoader
from zoo.data.loader import EpochSetter
from zoo.data import load_dataset
from zoo.plots import plot_curves
from zoo.regularization import PyTorchSGD
from zoo.schedules import WarmupCosine
from zoo.selection import ChosenWeights
from zoo.selection import check_selection
from zoo.selection import chosen_by
from zoo.selection import selection_split

# The paper's weight decay per architecture (App. F).
DEFAULT_WEIGHT_DECAY = {"resnet": 1e-4, "wrn": 5e-4, "vgg": 5e-4}
AVERAGING = ("ema", "sema", "belay")
MIXED_PRECISION = ("", "mixed_float16", "mixed_bfloat16")
EXPORT_FROM = ("final", "best_accuracy", "best_loss")
DISTRIBUTION = ("none", "mirrored", "multiworker", "data_parallel")
# Wider copies of the paper's models do not fit in memory (ResNet-18 at 16x
# has 2.9 billion parameters); the bound turns a typo into a message.
MAX_WIDTH = 16
MAX_SEED = 2**32 - 1  # numpy.random.seed and keras.utils.set_random_seed
MAX_IMAGE_SIZE = 1024
# Flags added after run directories were first written: left out of flags.cfg
# at their default, so that older run directories still resume.
WRITTEN_ONLY_WHEN_SET = ("image_size", "snapshot_every", "selection_from")
# Flags a resumed run may change: where it is written and how it is spread.
RESUMABLE_CHANGES = ("output_dir", "distribution")
# Seconds a process waits for the others of a multi-process run to join.
DEFAULT_CONNECT_TIMEOUT = 120.0


class ConfigError(ValueError):
    """A training configuration is invalid; the message says which flag and why."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the run stopped there.

    `summary` is the run's `summary.json`, whose `"diverged"` entry holds the
    epoch and optimizer step. Nothing was exported.
    """

    def __init__(self, message, summary):
        super().__init__(message)
        self.summary = summary


class ExportError(RuntimeError):
    """The weights to export are missing or not finite; nothing was exported."""


@dataclasses.dataclass
class Config:
    """Every setting of a training run; the field names are `train.py`'s flags."""

    output_dir: str = ""
    dataset: str = "digits"
    data_dir: str = ""
    image_size: int = 0  # 0: the stored size; folder: and tiny_imagenet only
    model: str = "resnet18"
    width: float = 1.0
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = -1.0  # < 0: the paper's value for the model family
    momentum: float = 0.9
    nesterov: bool = True
    warmup_epochs: int = 5
    ema_decays: tuple = keras_ema.DEFAULT_DECAYS
    ema_period: int = 16
    ema_warmup: bool = True
    average_batch_norm: bool = True
    label_noise: str = ""
    val_fraction: float = 0.2
    seed: int = 0
    mixed_precision: str = ""
    distribution: str = "none"
    export: bool = False
    export_decay: float = 0.0  # 0: the largest of ema_decays
    export_from: str = "final"
    averaging: str = "ema"
    sema_every_epochs: int = 1
    sema_start_epoch: int = 0
    belay_coupling: float = 0.1
    selection_from: str = ""  # a tuning run whose validation chose the epochs
    snapshot_every: int = 0  # optimizer steps between post-hoc EMA snapshots; 0: off

    def resolved(self):
        """A copy with the model-dependent defaults filled in, validated."""
        config = dataclasses.replace(
            self, ema_decays=tuple(float(d) for d in self.ema_decays)
        )
        if config.weight_decay < 0:
            family = next(
                (f for f in DEFAULT_WEIGHT_DECAY if config.model.startswith(f)),
                "resnet",
            )
            config.weight_decay = DEFAULT_WEIGHT_DECAY[family]
        if not config.export_decay and config.ema_decays:
            config.export_decay = max(config.ema_decays)
        config.validate()
        return config

    def validate(self):
        """Raises ConfigError naming the first bad flag."""
        import zoo

        def fail(flag, value, what):
            raise ConfigError(f"--{flag}={value}: {what}")

        if not self.output_dir:
            fail("output_dir", "", "required; give the run directory to write")
        if self.model not in zoo.MODELS:
            fail("model", self.model, f"unknown model; use one of {', '.join(zoo.MODELS)}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(field.name, value, "must be a finite number")
            if isinstance(value, tuple):
                for v in value:
                    if not math.isfinite(v):
                        fail(field.name, ",".join(map(str, value)),
                             f"{v} is not a finite number")
        if not 0 < self.width <= MAX_WIDTH:
            fail("width", self.width,
                 f"must be in (0, {MAX_WIDTH}] (1 is the paper's width)")
        if not 0 <= self.image_size <= MAX_IMAGE_SIZE:
            fail("image_size", self.image_size,
                 f"must be in [0, {MAX_IMAGE_SIZE}]; 0 keeps the stored size")
        if self.image_size and not (self.dataset.startswith("folder:")
                                    or self.dataset.lower() == "tiny_imagenet"):
            fail("image_size", self.image_size, "resizes folder: and tiny_imagenet "
                 "images only; leave it 0 for this dataset")
        for flag in ("epochs", "batch_size"):
            if getattr(self, flag) < 1:
                fail(flag, getattr(self, flag), "must be >= 1")
        if not self.lr > 0:
            fail("lr", self.lr, "must be > 0")
        if self.weight_decay < 0:
            fail("weight_decay", self.weight_decay, "must be >= 0")
        if not 0 <= self.momentum < 1:
            fail("momentum", self.momentum, "must be in [0, 1)")
        if not 0 <= self.warmup_epochs < self.epochs:
            fail("warmup_epochs", self.warmup_epochs,
                 f"must be in [0, --epochs={self.epochs})")
        if not self.ema_decays:
            fail("ema_decays", "", "give at least one decay, e.g. 0.998")
        for d in self.ema_decays:
            if not 0 < d < 1:
                fail("ema_decays", ",".join(map(str, self.ema_decays)),
                     f"decay {d} is outside (0, 1)")
        if len(set(self.ema_decays)) != len(self.ema_decays):
            fail("ema_decays", ",".join(map(str, self.ema_decays)),
                 "decays must be distinct")
        if self.ema_period < 1:
            fail("ema_period", self.ema_period, "must be >= 1")
        if not 0 <= self.val_fraction < 1:
            fail("val_fraction", self.val_fraction,
                 "must be in [0, 1); 0 trains on all data and validates on test")
        if not 0 <= self.seed <= MAX_SEED:
            fail("seed", self.seed, f"must be in [0, {MAX_SEED}] (numpy's seed range)")
        if self.mixed_precision not in MIXED_PRECISION:
            fail("mixed_precision", self.mixed_precision,
                 "use mixed_float16, mixed_bfloat16 or leave it empty")
        if self.distribution not in DISTRIBUTION:
            fail("distribution", self.distribution,
                 f"use one of {', '.join(DISTRIBUTION)}")
        backend = keras.backend.backend()
        if self.distribution in ("mirrored", "multiworker") and backend != "tensorflow":
            fail("distribution", self.distribution,
                 f"needs KERAS_BACKEND=tensorflow (the backend is {backend}); "
                 "use data_parallel on JAX")
        if self.distribution == "data_parallel" and backend != "jax":
            fail("distribution", self.distribution,
                 f"needs KERAS_BACKEND=jax (the backend is {backend}); use "
                 "mirrored or multiworker on TensorFlow")
        if self.averaging not in AVERAGING:
            fail("averaging", self.averaging, f"use one of {', '.join(AVERAGING)}")
        if self.snapshot_every < 0:
            fail("snapshot_every", self.snapshot_every, "must be >= 0 (0: no snapshots)")
        if self.snapshot_every and self.averaging != "ema":
            fail("snapshot_every", self.snapshot_every,
                 f"post-hoc snapshots need --averaging=ema (not {self.averaging})")
        if self.averaging != "ema" and len(self.ema_decays) != 1:
            fail("ema_decays", ",".join(map(str, self.ema_decays)),
                 f"--averaging={self.averaging} keeps one EMA; give one decay")
        if self.export_decay not in self.ema_decays:
            fail("export_decay", self.export_decay,
                 f"not one of --ema_decays={','.join(map(str, self.ema_decays))}")
        if self.export_from not in EXPORT_FROM:
            fail("export_from", self.export_from, f"use one of {', '.join(EXPORT_FROM)}")
        if self.sema_every_epochs < 1:
            fail("sema_every_epochs", self.sema_every_epochs, "must be >= 1")
        if self.sema_start_epoch < 0:
            fail("sema_start_epoch", self.sema_start_epoch, "must be >= 0")
        if not 0 <= self.belay_coupling < 1:
            fail("belay_coupling", self.belay_coupling, "must be in [0, 1)")

    @classmethod
    def from_flags(cls, flags: dict) -> "Config":
        """The `Config` of a `flags.cfg` read by `zoo.run_dir.read_flags`.

        Unknown names are ignored; missing ones keep their defaults.
        """
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name not in flags:
                continue
            text = flags[field.name]
            default = field.default
            if isinstance(default, bool):
                value = text.lower() in ("true", "1", "yes")
            elif isinstance(default, tuple):
                value = tuple(float(v) for v in text.split(",") if v)
            elif isinstance(default, int):
                value = int(text)
            elif isinstance(default, float):
                value = float(text)
            else:
                value = text
            kwargs[field.name] = value
        return cls(**kwargs)

    def to_flags(self) -> str:
        """The flag file that replays this run (`--flagfile=RUN/flags.cfg`)."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in WRITTEN_ONLY_WHEN_SET and value == field.default:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, tuple):
                value = ",".join(repr(v) for v in value)
            elif isinstance(value, float):
                value = repr(value)
            lines.append(f"--{field.name}={value}")
        return "\n".join(lines) + "\n"


# === Logging a run ===


class RunLogger(keras.callbacks.Callback):
    """Writes `history.csv` and a partial `summary.json` at every epoch end.

    Rows from epochs at or after the epoch a resumed run restarts from are
    dropped first, so the file always matches the restored training state.

    Place it after the averaging callback so that its metrics are in `logs`.
    """

    def __init__(self, run, summarize):
        super().__init__()
        self.run = run
        self.summarize = summarize
        self.rows = None

    def _path(self, name):
        return os.path.join(self.run, name)

    def on_epoch_begin(self, epoch, logs=None):
        if self.rows is None:
            rows = run_dir.read_csv(self._path("history.csv"))
            self.rows = [r for r in rows if int(r["epoch"]) < epoch]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch, "lr": _current_learning_rate(self.model)}
        row.update({k: float(v) for k, v in logs.items() if k != "learning_rate"})
        self.rows.append(row)
        run_dir.write_csv(self._path("history.csv"), self.rows)
        run_dir.write_json(self._path("summary.json"), self.summarize(self.rows, False))


def _current_learning_rate(model):
    optimizer = model.optimizer
    lr = optimizer.learning_rate
    if callable(lr):
        lr = lr(optimizer.iterations)
    return float(keras.ops.convert_to_numpy(lr))


def _best(rows, column, sign):
    """`{"epoch", "value"}` of the first row maximizing `sign * row[column]`."""
    candidates = [r for r in rows if column in r and np.isfinite(r[column])]
    if not candidates:
        return None
    row = max(candidates, key=lambda r: (sign * r[column], -r["epoch"]))
    return {"epoch": int(row["epoch"]), "value": row[column]}


def _at(rows, epoch, columns):
    row = next((r for r in rows if int(r["epoch"]) == epoch), {})
    return {c: row.get(c) for c in columns}


def summarize(config, data_summary, rows, completed, averager, seconds, tuned=None):
    """The `summary.json` of a run from its history rows.

    `tuned` holds the choices of the `--selection_from` run
    (`zoo.selection.check_selection`); see `zoo.selection` for the three
    values of `selection_split`.
    """
    split = selection_split(config)
    summary = {
        "layout_version": run_dir.LAYOUT_VERSION,
        "epoch_numbering": "every epoch here counts from 0, as in "
                           "history.csv; Keras's progress bar shows epoch e "
                           "as e+1",
        "completed": completed,
        "epochs_done": len(rows),
        "dataset": config.dataset,
        "data": data_summary,
        "model": config.model,
        "width": config.width,
        "seed": config.seed,
        "label_noise": config.label_noise or None,
        "averaging": config.averaging,
        "selection_split": split,
        "selection_from": config.selection_from or None,
        # What the history's val_* columns were measured on.
        "validation_data": "validation" if config.val_fraction > 0 else "test",
        "train_seconds": round(seconds, 1),
    }
    sgd = {}
    last_epoch = int(rows[-1]["epoch"]) if rows else None
    if rows:
        sgd["last"] = {"epoch": last_epoch,
                       **_at(rows, last_epoch, ("val_accuracy", "val_loss")),
                       "weights": "sgd_last.weights.h5"}
    if split == "validation":
        best = _best(rows, "val_accuracy", 1.0)
        if best:
            sgd["best_accuracy"] = {**best, **_at(rows, best["epoch"], ("val_loss",)),
                                    "weights": "sgd_best_accuracy.weights.h5",
                                    "chosen_by": chosen_by(".", "accuracy")}
    elif split == "tuning_run" and "best_accuracy" in tuned["sgd"]:
        record = tuned["sgd"]["best_accuracy"]
        sgd["best_accuracy"] = {
            **record, **_at(rows, record["epoch"], ("val_accuracy", "val_loss")),
            "weights": "sgd_best_accuracy.weights.h5",
            "chosen_by": chosen_by(tuned["run"], "accuracy")}
    summary["sgd"] = sgd
    emas = {}
    for decay in config.ema_decays:
        entry = {}
        records = averager.best.get(decay, {})
        for criterion, other in (("accuracy", "loss"), ("loss", "accuracy")):
            weights = f"ema_{decay}_best_{criterion}.weights.h5"
            if split == "validation" and records.get(criterion):
                record = records[criterion]
                other_value = _at(rows, record["epoch"], (f"ema_{decay}_val_{other}",))
                entry[f"best_{criterion}"] = {
                    **record,
                    f"val_{other}": other_value[f"ema_{decay}_val_{other}"],
                    "weights": weights,
                    "chosen_by": chosen_by(".", criterion),
                }
            elif split == "tuning_run":
                record = tuned["ema"][str(decay)][f"best_{criterion}"]
                logged = _at(rows, record["epoch"], (f"ema_{decay}_val_accuracy",
                                                     f"ema_{decay}_val_loss"))
                entry[f"best_{criterion}"] = {
                    **record,
                    "val_accuracy": logged[f"ema_{decay}_val_accuracy"],
                    "val_loss": logged[f"ema_{decay}_val_loss"],
                    "weights": weights,
                    "chosen_by": chosen_by(tuned["run"], criterion),
                }
        if last_epoch is not None and last_epoch == config.epochs - 1:
            logged = _at(rows, last_epoch, (f"ema_{decay}_val_accuracy",
                                            f"ema_{decay}_val_loss"))
            entry["last"] = {"epoch": last_epoch,
                             "val_accuracy": logged[f"ema_{decay}_val_accuracy"],
                             "val_loss": logged[f"ema_{decay}_val_loss"],
                             "weights": f"ema_{decay}_last.weights.h5"}
        emas[str(decay)] = entry
    summary["ema"] = emas
    if config.averaging == "sema":
        summary["switch_epochs"] = list(getattr(averager, "switch_epochs", []))
    if config.averaging == "belay":
        summary["belay_coupling"] = config.belay_coupling
    return run_dir.finite_json(summary)


# === The protocol ===


def _averaging_callback(config, validation, run):
    common = dict(
        period=config.ema_period,
        warmup=config.ema_warmup,
        average_batch_norm=config.average_batch_norm,
        validation_data=validation,
        # Without a validation split the logged metrics are on test: keep no
        # "best" files chosen on them (zoo.selection keeps the chosen epochs).
        best_weights_dir=run if config.val_fraction > 0 else None,
        backup_dir=os.path.join(run, "backup"),
    )
    if config.averaging == "sema":
        return keras_ema.SwitchEMA(
            decay=config.ema_decays[0],
            every_epochs=config.sema_every_epochs,
            start_epoch=config.sema_start_epoch,
            **common,
        )
    if config.averaging == "belay":
        return keras_ema.Belay(
            decay=config.ema_decays[0], coupling=config.belay_coupling, **common
        )
    if config.snapshot_every:
        common.update(snapshot_dir=os.path.join(run, "snapshots"),
                      snapshot_every=config.snapshot_every)
    return keras_ema.MultiEMA(decays=config.ema_decays, **common)


def _check_run_dir(config):
    """Returns "new", "resume" or "done"; raises RunDirError on a foreign dir."""
    run = config.output_dir
    run_dir.check_output_dir(run)
    flags_path = os.path.join(run, "flags.cfg")
    if not os.path.exists(flags_path):
        # The lock and leftovers of a killed start are the kit's own files.
        if os.path.isdir(run) and [
            n for n in os.listdir(run)
            if n != run_dir.LOCK_FILE and not run_dir.is_temp_name(n)
        ]:
            raise run_dir.RunDirError(
                f"--output_dir={run} exists, is not empty and holds no "
                "flags.cfg; choose a new or empty directory."
            )
        return "new"
    summary_path = os.path.join(run, "summary.json")
    if os.path.exists(summary_path):
        version = run_dir.read_json(summary_path).get("layout_version")
        if version != run_dir.LAYOUT_VERSION:
            raise run_dir.RunDirError(
                f"--output_dir={run} holds a run of layout version {version}; "
                f"this version writes {run_dir.LAYOUT_VERSION}: choose another "
                "--output_dir."
            )
    old = run_dir.read_flags(flags_path)
    new = run_dir.read_flags_text(config.to_flags())
    differ = [k for k in sorted(set(old) | set(new))
              if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
    if differ:
        changes = ", ".join(f"--{k}={old.get(k)} -> {new.get(k)}" for k in differ[:3])
        raise run_dir.RunDirError(
            f"--output_dir={run} holds a run with other flags ({changes}); "
            f"rerun it with --flagfile={flags_path} or choose another --output_dir."
        )
    summary_path = os.path.join(run, "summary.json")
    if os.path.exists(summary_path) and run_dir.read_json(summary_path).get("completed"):
        return "done"
    return "resume"


def _finished_run(run, clean_up=True):
    """Reports the finished run in `run` and returns its summary.

    With `clean_up` (the run locked), finishes a clean-up a kill interrupted:
    the backup and temporary files.
    """
    if clean_up:
        run_dir.remove_stale_temp_files(run)
        shutil.rmtree(os.path.join(run, "backup"), ignore_errors=True)
    summary = run_dir.read_json(os.path.join(run, "summary.json"))
    if summary.get("diverged"):
        raise TrainingDiverged(_diverged_message(run, summary), summary)
    print(f"{run} holds a completed run; nothing to do. Its summary: "
          f"{os.path.join(run, 'summary.json')}", flush=True)
    return summary


def _diverged_message(run, summary):
    where = summary["diverged"]
    flags = run_dir.read_flags(os.path.join(run, "flags.cfg"))
    return (
        f"the run in {run} diverged at epoch {where['epoch']} (optimizer step "
        f"{where['step']}): the training loss became NaN or infinite, so "
        "nothing was exported; train again in a new --output_dir with a lower "
        f"--lr (this run has --lr={flags.get('lr')})."
    )


class _Diverged(Exception):
    """Raised by `_StopOnNonFiniteLoss` out of `model.fit`."""

    def __init__(self, epoch, step):
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}")
        self.epoch = epoch
        self.step = step


class _StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` at the first batch whose training loss is not finite.

    Unlike `keras.callbacks.TerminateOnNaN` it ends fit at once, before any
    epoch end, so no row, best weights or backup of the diverged epoch is
    written.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            raise _Diverged(self.epoch, step)


def _jit_compile():
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # XLA slows convolution training on CPU; it pays off on GPUs.
        return "auto" if tf.config.list_physical_devices("GPU") else False
    return "auto"


def _make_deterministic(seed):
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _banner(text):
    print(f"\n=== {text} ===", flush=True)


def train(config: Config, verbose=None, callbacks=(),
          connect_timeout: float = DEFAULT_CONNECT_TIMEOUT):
    """Runs (or resumes, or reports) the training run of `config`.

    Args:
        config: a `Config`.
        verbose: `model.fit`'s verbosity; `None` shows a progress bar on a
            terminal and one line per epoch otherwise.
        callbacks: more Keras callbacks, run after the run's own.
        connect_timeout: seconds a process of a multi-process run
            (`--distribution=multiworker` with `TF_CONFIG`, or
            `data_parallel` with `KERAS_DISTRIBUTION_NUM_PROCESSES`) waits
            for the others to join; past it the process prints one line
            and exits with status 1. Defaults to `DEFAULT_CONNECT_TIMEOUT`.

    Returns:
        The run's `summary.json` as a dict.

    Raises:
        ConfigError: an invalid setting.
        zoo.data.DatasetError: the data cannot be loaded.
        zoo.run_dir.RunDirError: the output directory holds another run, or
            another process trains in it (`zoo.run_dir.RunInUseError`).
        In these cases nothing has been written.
        TrainingDiverged: the training loss became NaN or infinite (now or
            in the finished run found in the output directory).
        ExportError: the weights to export are missing or not finite.
    """
    config = config.resolved()
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    process = _join_processes(config, connect_timeout)
    if process.index != 0:
        return _train_as_worker(config, verbose, callbacks, process)
    return _train_in(config, verbose, callbacks, process)


def _train_in(config, verbose, callbacks, process):
    """`train` in `config.output_dir`, which this process owns."""
    run = config.output_dir
    # Before anything is loaded: a read-only or damaged run directory stops
    # here with one line (damaged backups are handled by the backup callback).
    run_dir.check_resumable(run)
    locks = []  # the run directory's lock, once taken; held to the end
    try:
        state = _check_run_dir(config)
        if state == "done" and not os.access(run, os.W_OK):
            return _finished_run(run, clean_up=False)  # read-only: report it
        if os.path.isdir(run):
            locks.append(run_dir.lock_run_dir(run))
            # Again under the lock: another process may have written meanwhile.
            state = _check_run_dir(config)
        if state == "done":
            return _finished_run(run)
        return _start(config, state, verbose, callbacks, locks, process)
    finally:
        for lock in locks:
            lock.release()


def _start(config, state, verbose, callbacks, locks, process):
    """Loads the data, then trains holding the run directory's lock."""
    import zoo

    run = config.output_dir
    check_selection(config)  # before anything is written
    # MultiWorkerMirroredStrategy must be made before TensorFlow starts work.
    strategy = _make_strategy(config.distribution, process)
    _banner("Data")
    data = load_dataset(
        config.dataset,
        data_dir=config.data_dir or None,
        val_fraction=config.val_fraction,
        seed=config.seed,
        label_noise=config.label_noise or None,
        image_size=config.image_size or None,
    )
    print(data.summary(), flush=True)

    if not locks:  # a new directory: created now, locked before any write
        os.makedirs(run, exist_ok=True)
        locks.append(run_dir.lock_run_dir(run))
        state = _check_run_dir(config)
        if state == "done":
            return _finished_run(run)
    run_dir.remove_stale_temp_files(run)
    if state == "new":
        run_dir.write_text(os.path.join(run, "flags.cfg"), config.to_flags())
    else:
        print(f"Resuming the run in {run}", flush=True)
    if data.noise_mask is not None:
        with run_dir.atomic_path(os.path.join(run, "noise_mask.npy")) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, data.noise_mask)

    _make_deterministic(config.seed)
    previous_policy = keras.mixed_precision.global_policy()
    previous_distribution = keras.distribution.distribution()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy(config.mixed_precision)
    if config.distribution == "data_parallel":
        # With several processes each feeds its own share of every batch
        # (`ArrayLoader(shard=...)`), already split: no auto-sharding.
        keras.distribution.set_distribution(keras.distribution.DataParallel(
            auto_shard_dataset=process.count == 1))
    try:
        with run_dir.disk_errors():  # a full disk: one line naming the file
            return _fit(config, data, run, zoo, verbose, list(callbacks), strategy,
                        process)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        keras.distribution.set_distribution(previous_distribution)


def _make_strategy(distribution, process=None):
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


# === Several processes ===


@dataclasses.dataclass(frozen=True)
class _Process:
    """This process in a run of `count` processes; index 0 writes the run."""

    index: int = 0
    count: int = 1
    peers: str = ""  # the addresses, for messages
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT


def _join_processes(config, connect_timeout):
    """This process's `_Process`; on JAX, joins the others first.

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
    return _Process(connect_timeout=connect_timeout)


def _tf_config_process(connect_timeout):
    import json

    text = os.environ.get("TF_CONFIG", "")
    if not text:
        return _Process(connect_timeout=connect_timeout)
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
    return _Process(index, len(tasks), peers, connect_timeout)


def _jax_process(connect_timeout):
    names = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
             "KERAS_DISTRIBUTION_PROCESS_ID")
    values = {n: os.environ.get(n, "") for n in names}
    if not values[names[1]]:
        return _Process(connect_timeout=connect_timeout)
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
    process = _Process(index, count, values[names[0]], connect_timeout)
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


# The temporary directories of `_train_as_worker`, removed by `_deadline` too.
_WORKER_TEMP_DIRS = []


def _train_as_worker(config, verbose, callbacks, process):
    """Trains as a process other than 0: writes only in a temporary directory.

    Keras' convention for the checkpoints of non-chief workers. The
    temporary directory starts as a copy of what process 0's run directory
    holds to resume from (flags, history, backup), so that every process
    resumes at the same epoch; it is removed at the end.
    """
    import tempfile

    print(f"Process {process.index} of {process.count}: process 0 writes "
          f"{config.output_dir}; this one writes to a temporary directory "
          "removed at the end.", flush=True)
    tmp = tempfile.mkdtemp(prefix=f"workertemp_{process.index}_")
    _WORKER_TEMP_DIRS.append(tmp)
    try:
        copy = os.path.join(tmp, "run")
        _copy_resumable(config.output_dir, copy)
        return _train_in(dataclasses.replace(config, output_dir=copy), verbose,
                         callbacks, process)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _WORKER_TEMP_DIRS.remove(tmp)


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


def _build_from_local_batch(model, strategy):
    """Works around Keras 3.15's `fit` / `evaluate` under several workers.

    Before its first step Keras builds the metrics and optimizer from a
    batch it gets with `strategy.reduce("MEAN", batch)` of the whole
    `(x, y)` structure, which `MultiWorkerMirroredStrategy` with one device
    per worker cannot reduce ("Attempt to convert a value (PerReplica...")
    . The build needs only the shapes: this gives it the local replica's
    batch instead.
    """
    build = model._maybe_symbolic_build

    def local_build(iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0],
                    next(batches))
                break
        return build(data_batch=data_batch)

    model._maybe_symbolic_build = local_build
    _reduce_scalars_across_workers()


def _reduce_scalars_across_workers():
    """Works around Keras 3.15's metric reduction under several workers.

    Each train and test step reduces the replicas' metrics with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on their scalars
    ("Invalid reduction dimension 0 for input with 0 dimensions") when
    `MultiWorkerMirroredStrategy` spans several workers; scalars are
    averaged over the replicas here instead (`axis=None`).
    """
    from keras.src.backend.tensorflow import trainer

    reduce = trainer.reduce_per_replica
    if getattr(reduce, "scalars_fixed", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not (
                trainer._collective_all_reduce_multi_worker(strategy)):
            return reduce(values, strategy, reduction)

        def one(value):
            scalar = all(v.shape.rank == 0
                         for v in strategy.experimental_local_results(value))
            if scalar:
                return strategy.reduce("MEAN", value, axis=None)
            return reduce(value, strategy, reduction)

        return keras.tree.map_structure(one, values)

    reduce_per_replica.scalars_fixed = True
    trainer.reduce_per_replica = reduce_per_replica


def _fit(config, data, run, zoo, verbose, extra_callbacks, strategy=None,
         process=_Process()):
    _banner("Model")
    def scope():
        return strategy.scope() if strategy is not None else contextlib.nullcontext()

    with scope():
        model = zoo.get_model(
            config.model,
            num_classes=data.num_classes,
            input_shape=data.image_shape,
            width=config.width,
            weight_decay=config.weight_decay,
            # BatchNorm statistics over the global batch, as on one device.
            synchronized_bn=strategy is not None,
        )
    if process.count > 1 and strategy is not None:
        _build_from_local_batch(model, strategy)
    # On JAX each process feeds its share of every global batch.
    shard = dict(shard=(process.index, process.count)) if (
        config.distribution == "data_parallel" and process.count > 1) else {}
    train_loader = ArrayLoader(
        data.x_train, data.y_train, config.batch_size, data.mean, data.std,
        shuffle=True, augment=True, seed=config.seed, **shard,
    )
    if data.x_val is not None:
        validation = ArrayLoader(data.x_val, data.y_val, 2 * config.batch_size,
                                 data.mean, data.std, **shard)
    else:
        validation = ArrayLoader(data.x_test, data.y_test, 2 * config.batch_size,
                                 data.mean, data.std, **shard)
    steps_per_epoch = len(train_loader)
    total_steps = config.epochs * steps_per_epoch
    schedule = WarmupCosine(config.lr, total_steps,
                            config.warmup_epochs * steps_per_epoch)
    with scope():
        model.compile(
            optimizer=PyTorchSGD(
                learning_rate=schedule, momentum=config.momentum,
                nesterov=config.nesterov,
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=_jit_compile(),
        )
    print(
        f"{config.model} (width {config.width:g}): {model.count_params():,} "
        f"parameters; {config.epochs} epochs x {steps_per_epoch} steps, "
        f"batch {config.batch_size}, peak lr {config.lr:g}, weight decay "
        f"{config.weight_decay:g}, averaging {config.averaging}",
        flush=True,
    )

    averager = _averaging_callback(config, validation, run)
    tuned = check_selection(config)
    chosen = ChosenWeights(run, averager, config.epochs, selection_split(config), tuned)
    previous = run_dir.read_json(os.path.join(run, "summary.json")) if os.path.exists(
        os.path.join(run, "summary.json")) else {}
    seconds_before = previous.get("train_seconds", 0.0)
    start = time.perf_counter()

    def summary_of(rows, completed):
        return summarize(config, data.summary(), rows, completed, averager,
                         seconds_before + time.perf_counter() - start, tuned)

    logger = RunLogger(run, summary_of)
    backup = AtomicBackupAndRestore(os.path.join(run, "backup"),
                                    delete_checkpoint=False, ema_state=True,
                                    history_path=os.path.join(run, "history.csv"))
    _banner("Training")
    try:
        model.fit(
            train_loader,
            epochs=config.epochs,
            validation_data=validation,
            shuffle=False,
            verbose=verbose,
            callbacks=[_StopOnNonFiniteLoss(), EpochSetter(train_loader),
                       chosen, averager, logger, backup] + extra_callbacks,
        )
    except _Diverged as diverged:
        return _finish_diverged(config, run, logger, summary_of, diverged)

    _banner("Results")
    rows = logger.rows
    if rows is None:
        # Every epoch was done before: a kill cut the results phase. Redo it
        # from disk: `fit` loaded the last backup into the model, the history
        # and the EMAs come from their files.
        rows = run_dir.read_csv(os.path.join(run, "history.csv"))
        if not averager.restore_backup(model):
            raise run_dir.RunDirError(
                f"--output_dir={run} has every epoch trained but no EMA state "
                f"of the last epoch in {os.path.join(run, 'backup')}; remove "
                "the directory and train again."
            )
    _write_results(config, run, model, averager, data, rows, summary_of)
    summary = summary_of(rows, True)
    # The summary marks the run completed only once everything is written;
    # the backup goes last (a rerun that finds it removes it).
    run_dir.write_json(os.path.join(run, "summary.json"), summary)
    shutil.rmtree(os.path.join(run, "backup"), ignore_errors=True)
    print(format_summary(summary), flush=True)
    print(f"Run directory: {run}", flush=True)
    return summary


def _write_results(config, run, model, averager, data, rows, summary_of):
    """The files of a finished run: curves and export.

    The last SGD and EMA weights are written by `zoo.selection.ChosenWeights`
    at the last epoch's end, before SwitchEMA's copy.

    Each is written atomically from the trained state alone, so a kill at
    any point leaves a run that a rerun finishes the same way.
    """
    plot_curves(rows, os.path.join(run, "curves.png"), title=_curves_title(config))
    if config.export:
        _export(config, averager, data, run)


def _curves_title(config):
    noise = f", label noise {config.label_noise}" if config.label_noise else ""
    return f"{config.model} x{config.width:g} on {config.dataset}{noise}"


def _finish_diverged(config, run, logger, summary_of, diverged):
    """Records a diverged run as finished, exports nothing, raises."""
    rows = logger.rows
    if rows is None:
        rows = run_dir.read_csv(os.path.join(run, "history.csv"))
    rows = [r for r in rows if int(r["epoch"]) < diverged.epoch]
    run_dir.write_csv(os.path.join(run, "history.csv"), rows)
    if rows:
        plot_curves(rows, os.path.join(run, "curves.png"),
                    title=_curves_title(config) + " (diverged)")
    summary = summary_of(rows, True)
    summary["diverged"] = {"epoch": diverged.epoch, "step": diverged.step}
    run_dir.write_json(os.path.join(run, "summary.json"), summary)
    shutil.rmtree(os.path.join(run, "backup"), ignore_errors=True)
    raise TrainingDiverged(_diverged_message(run, summary), summary)


def _export(config, averager, data, run):
    """Exports the chosen EMA, its BN recomputed, taking images in 0..255.

    `model.keras` loads with `keras.saving.load_model` alone: no zoo class.
    """
    from keras_ema.batch_norm import batch_norm_layers
    from keras_ema.batch_norm import recompute_batch_norm_statistics
    from keras_ema.export import export_model

    decay = config.export_decay
    model = averager.ema_model(decay)
    if config.export_from != "final":
        path = os.path.join(run, f"ema_{decay}_{config.export_from}.weights.h5")
        if not os.path.exists(path):
            criterion = config.export_from.replace("best_", "validation ")
            raise ExportError(
                f"--export_from={config.export_from}: no epoch of the EMA "
                f"{decay} had a finite {criterion}, so there are no such "
                f"weights to export; retrain with --export_from=final in a new "
                "--output_dir."
            )
        model.load_weights(path)
    bad = [v.path for v in model.weights
           if not np.all(np.isfinite(keras.ops.convert_to_numpy(v)))]
    if bad:
        raise ExportError(
            f"the EMA {decay} to export has {len(bad)} non-finite weights "
            f"(e.g. {bad[0]}); nothing was exported. Train again with a lower "
            "--lr in a new --output_dir."
        )
    if batch_norm_layers(model):
        recompute_batch_norm_statistics(model, ArrayLoader(
            data.x_train, None, config.batch_size, data.mean, data.std))
    # A plain functional model over the same layers: the .keras file then
    # holds only Keras' own classes and no compile config (the optimizer's
    # WarmupCosine), so it loads with Keras alone, without `import zoo`.
    model = keras.Model(model.inputs, model.outputs, name=model.name)
    # The shipped model takes raw images and normalizes them as training did.
    images = keras.Input(data.image_shape, name="images")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(images)
    x = keras.layers.Normalization(mean=data.mean, variance=np.square(data.std),
                                   name="normalize")(x)
    shipped = keras.Model(images, model(x), name=f"{config.model}_ema_{decay}")
    # Written whole under a temporary name, then put in place of `export/`.
    tmp = os.path.join(run, f".export.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_model(shipped, tmp)
        run_dir.write_json(os.path.join(tmp, "export.json"), {
            "decay": decay, "weights": config.export_from,
            "input": "float32 images (batch, height, width, channels) in 0..255, "
                     "normalized inside the model",
            "input_shape": [None, *map(int, data.image_shape)],
            "input_dtype": "float32",
            "input_range": "raw pixel values 0..255, not normalized: the "
                           "model divides by 255 and normalizes with mean "
                           "and std itself",
            "output": "logits (batch, classes), not probabilities: apply "
                      "softmax for probabilities, argmax for the class",
            "output_shape": [None, int(shipped.outputs[0].shape[-1])],
            "signature": "serve",
            "mean": data.mean.tolist(), "std": data.std.tolist(),
        })
        _replace_dir(tmp, os.path.join(run, "export"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new, path):
    """Renames the folder `new` onto `path`, removing an older `path`."""
    if os.path.exists(path):
        old = f"{new}.old"
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)


def format_summary(summary) -> str:
    """A few lines: SGD last and best vs each EMA's chosen and last epochs."""
    on = "test" if summary.get("validation_data") == "test" else "val"
    lines = [f"{'':24s} {'epoch':>5s} {on + ' acc':>8s} {on + ' loss':>9s}"]

    def line(name, epoch, acc, loss):
        fmt = lambda v, p: "-" if v is None else f"{v:{p}}"  # noqa: E731
        lines.append(f"{name:24s} {epoch:>5} {fmt(acc, '8.4f'):>8s} "
                     f"{fmt(loss, '9.4f'):>9s}")

    # The model that trains: plain SGD, or SGD switched / pulled to its EMA.
    trained = {"sema": "SEMA model", "belay": "BELAY model"}.get(
        summary.get("averaging"), "SGD")
    sgd = summary.get("sgd", {})
    if "last" in sgd:
        last = sgd["last"]
        line(f"{trained} last", last["epoch"], last.get("val_accuracy"),
             last.get("val_loss"))
    if "best_accuracy" in sgd:
        b = sgd["best_accuracy"]
        line(f"{trained} best accuracy", b["epoch"], b.get("val_accuracy", b["value"]),
             b.get("val_loss"))
    for decay, entry in summary.get("ema", {}).items():
        if "best_accuracy" in entry:
            b = entry["best_accuracy"]
            line(f"EMA {decay} best accuracy", b["epoch"],
                 b.get("val_accuracy", b["value"]), b.get("val_loss"))
        if "best_loss" in entry:
            b = entry["best_loss"]
            line(f"EMA {decay} lowest loss", b["epoch"], b.get("val_accuracy"),
                 b.get("val_loss", b["value"]))
        if "last" in entry:
            b = entry["last"]
            line(f"EMA {decay} last", b["epoch"], b.get("val_accuracy"), b.get("val_loss"))
    lines.append("Epochs count from 0 as in history.csv; Keras's progress "
                 "bar shows epoch e as e+1.")
    split = summary.get("selection_split")
    if split == "tuning_run":
        lines.append(f"Best epochs chosen on the validation split of "
                     f"{summary.get('selection_from')}, not on test.")
    elif split == "none":
        lines.append("No validation split (--val_fraction=0) and no "
                     "--selection_from: no epoch chosen, only the last ones kept.")
    return "\n".join(lines)


def config_from_flags(flag_values) -> Config:
    """A `Config` from parsed absl flags named like its fields."""
    kwargs = {}
    for field in dataclasses.fields(Config):
        value = flag_values[field.name].value
        if field.name == "ema_decays":
            try:
                value = tuple(float(v) for v in value)
            except ValueError:
                raise ConfigError(
                    f"--ema_decays={','.join(value)}: give numbers in (0, 1), "
                    "e.g. 0.99,0.998"
                ) from None
        kwargs[field.name] = value if value is not None else field.default
    return Config(**kwargs)


__all__ = ["Config", "ConfigError", "ExportError", "RunLogger",
           "TrainingDiverged", "config_from_flags", "format_summary",
           "summarize", "train"]
