"""The paper's training protocol as one function: `train(Config(...))`.

SGD with Nesterov momentum, linear warm-up then cosine decay per step, random
crop and flip, EMAs of the weights kept by `keras_ema.MultiEMA` (or SEMA /
BELAY), everything written to a run directory (see `zoo.run.run_dir`) that
a rerun of the same command resumes.
"""

import contextlib
import dataclasses
import os
import shutil
import sys
import time

import keras
import numpy as np

import keras_ema
from keras_ema import writer
from keras_ema import state_file
from keras_ema.messages import print_msg
from zoo.data.loader import ArrayLoader
from zoo.data.loader import EpochSetter
from zoo.data import DatasetError
from zoo.data import load_dataset
from zoo.data.dataset import fingerprint_change
from zoo.models import get_model
from zoo.plots import plot_curves
from zoo.regularization import PyTorchSGD
from zoo.run import processes
from zoo.run import run_dir
from zoo.run.backup import AtomicBackupAndRestore
from zoo.run.config import DEFAULT_CONNECT_TIMEOUT
from zoo.run.config import Config
from zoo.run.config import ConfigError
from zoo.run.divergence import Diverged
from zoo.run.divergence import StopOnNonFiniteLoss
from zoo.run.divergence import TrainingDiverged
from zoo.run.divergence import diverged_message
from zoo.run.divergence import finish_diverged
from zoo.run.log import RunLogger
from zoo.run.log import format_summary
from zoo.run.log import summarize
from zoo.schedules import WarmupCosine
from zoo.selection import ChosenWeights
from zoo.selection import run_choices
from zoo.selection import save_choices
from zoo.selection import selection_split


class ExportError(RuntimeError):
    """The weights to export are missing or not finite; nothing was exported."""


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
        raise TrainingDiverged(diverged_message(run, summary), summary)
    print_msg(f"{run} holds a completed run; nothing to do. Its summary: "
              f"{os.path.join(run, 'summary.json')}")
    return summary


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
    print_msg(f"\n=== {text} ===")


def train(config: Config, verbose: int | None = None, callbacks: tuple = (),
          connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> dict:
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
        zoo.run.run_dir.RunDirError: the output directory holds another run,
            or another process trains in it (`zoo.run.run_dir.RunInUseError`).
        In these cases nothing has been written.
        TrainingDiverged: the training loss became NaN or infinite (now or
            in the finished run found in the output directory).
        ExportError: the weights to export are missing or not finite.
        zoo.run.processes.PeerStopped: another process of a multi-process
            run stopped responding (TensorFlow); what was trained is kept.
    """
    config = config.resolved()
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    process = processes.join_processes(config, connect_timeout)
    if config.distribution == "data_parallel":
        processes.check_same_flags(config, process)
    with processes.peer_errors(process):
        if process.index != 0:
            # Writes only a temporary copy of the run directory; see worker_copy.
            with processes.worker_copy(config.output_dir, process) as copy:
                return _train_in(dataclasses.replace(config, output_dir=copy),
                                 verbose, callbacks, process)
        return _train_in(config, verbose, callbacks, process)


def _train_in(config, verbose, callbacks, process):
    """`train` in `config.output_dir`, which this process owns.

    Nothing is written before the data is loaded and checked: an existing
    run directory is locked first, a new one is created and locked after
    (see `zoo.run.run_dir.locked`).
    """
    run = config.output_dir
    with run_dir.locked(config) as lease:
        if lease.state != "done":
            tuned, strategy, data = _prepare(config, lease.state, process)
            lease.hold()  # a new directory: created and locked before any write
        if lease.state == "done":
            # Unlocked (read-only) it is only reported, nothing cleaned up.
            return _finished_run(run, clean_up=lease.held)
        _write_start(config, lease.state, tuned, data)
        _make_deterministic(config.seed)
        with _global_settings(config, process), run_dir.disk_errors():
            # A full disk: one line naming the file.
            return _fit(config, data, run, verbose, list(callbacks), strategy,
                        process)


def _prepare(config, state, process):
    """Reads the choices, makes the strategy and loads the data; writes nothing.

    Returns:
        `(tuned, strategy, data)`: `run_choices`, the distribution strategy
        (or `None`) and the `zoo.data.Dataset`.
    """
    tuned = run_choices(config, config.output_dir)  # before anything is written
    # MultiWorkerMirroredStrategy must be made before TensorFlow starts work.
    strategy = processes.make_strategy(config.distribution, process)
    if config.distribution == "multiworker":
        processes.check_same_flags(config, process, strategy)
    _banner("Data")
    data = load_dataset(
        config.dataset,
        data_dir=config.data_dir or None,
        val_fraction=config.val_fraction,
        seed=config.seed,
        label_noise=config.label_noise or None,
        image_size=config.image_size or None,
    )
    print_msg(data.summary())
    _check_period(config, data)
    if state == "resume":
        _check_same_data(config.output_dir, data.fingerprint())
    return tuned, strategy, data


def _write_start(config, state, tuned, data):
    """The files a run writes when it starts, holding the lock."""
    run = config.output_dir
    run_dir.remove_stale_temp_files(run)
    if state == "new":
        run_dir.write_text(os.path.join(run, "flags.cfg"), config.to_flags())
    else:
        print_msg(f"Resuming the run in {run}")
    # The tuning run's choices, copied: a resume reads only the copy.
    save_choices(run, tuned)
    if data.noise_mask is not None:
        with run_dir.atomic_path(os.path.join(run, "noise_mask.npy")) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, data.noise_mask)


@contextlib.contextmanager
def _global_settings(config, process):
    """Sets Keras' dtype policy and distribution for the run; restores them on exit."""
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
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        keras.distribution.set_distribution(previous_distribution)


def _check_same_data(run, fingerprint):
    """Refuses to resume a run on data other than it was trained on so far."""
    path = os.path.join(run, "summary.json")
    if not os.path.exists(path):
        return
    change = fingerprint_change(run_dir.read_json(path).get("data_fingerprint"),
                                fingerprint)
    if change:
        raise DatasetError(
            f"the data of the run in {run} changed since it was trained "
            f"({change}); restore the data, or train again in a new --output_dir."
        )


def _check_period(config, data):
    """Refuses an EMA period longer than the run: its EMAs would never update.

    They would stay the initial model, evaluated, chosen and exported as if
    they were averages. Checked before anything is written.
    """
    steps_per_epoch = -(-len(data.x_train) // config.batch_size)
    total = config.epochs * steps_per_epoch
    if config.ema_period > total:
        raise ConfigError(
            f"--ema_period={config.ema_period} is longer than the run "
            f"({config.epochs} epoch{'s' if config.epochs > 1 else ''} x "
            f"{steps_per_epoch} steps = {total} "
            "optimizer steps), so the EMAs would never be updated; use "
            f"--ema_period<={total} or more --epochs."
        )


def _fit(config, data, run, verbose, extra_callbacks, strategy=None,
         process=processes.Process()):
    """Builds the model, trains it with the run's callbacks, writes the results."""
    _banner("Model")
    model = _build_model(config, data, strategy, process)
    train_loader, validation = _loaders(config, data, process)
    _compile(model, config, len(train_loader), strategy)
    fit = _callbacks(config, data, run, train_loader, validation, extra_callbacks)
    _banner("Training")
    try:
        # The files of each epoch end are written by a background thread
        # while the next epoch trains, all of them before fit returns.
        with writer.BackgroundWriter():
            model.fit(
                train_loader,
                epochs=config.epochs,
                validation_data=validation,
                shuffle=False,
                verbose=verbose,
                callbacks=fit.callbacks,
            )
    except Diverged as diverged:
        raise finish_diverged(run, fit.logger.rows, fit.summary_of, diverged,
                              _curves_title(config))
    return _results(config, data, run, model, fit)


def _scope(strategy):
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def _build_model(config, data, strategy, process):
    with _scope(strategy):
        model = get_model(
            config.model,
            num_classes=data.num_classes,
            input_shape=data.image_shape,
            width=config.width,
            # BatchNorm statistics over the global batch, as on one device.
            synchronized_bn=strategy is not None,
        )
    if process.count > 1 and strategy is not None:
        processes.build_from_local_batch(model, strategy)
    return model


def _loaders(config, data, process):
    """The training loader and the validation one (on test without a split)."""
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
    return train_loader, validation


def _compile(model, config, steps_per_epoch, strategy):
    total_steps = config.epochs * steps_per_epoch
    schedule = WarmupCosine(config.lr, total_steps,
                            config.warmup_epochs * steps_per_epoch)
    with _scope(strategy):
        model.compile(
            optimizer=PyTorchSGD(
                learning_rate=schedule, momentum=config.momentum,
                nesterov=config.nesterov, weight_decay=config.weight_decay,
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=_jit_compile(),
        )
    print_msg(
        f"{config.model} (width {config.width:g}): {model.count_params():,} "
        f"parameters; {config.epochs} epochs x {steps_per_epoch} steps, "
        f"batch {config.batch_size}, peak lr {config.lr:g}, weight decay "
        f"{config.weight_decay:g}, averaging {config.averaging}"
    )


@dataclasses.dataclass
class _RunCallbacks:
    """What `_callbacks` makes: `fit`'s list and the parts the results read."""

    callbacks: list
    averager: keras.callbacks.Callback
    logger: RunLogger
    summary_of: object  # (rows, completed) -> the summary.json dict


def _callbacks(config, data, run, train_loader, validation, extra_callbacks):
    """The callbacks of the run's `fit`, in the order they must run.

    Keras calls the callbacks of each event in list order:

    1. `StopOnNonFiniteLoss`: a non-finite loss ends `fit` at that batch,
       before any other callback writes something of the diverged epoch.
    2. `EpochSetter`: the loader's epoch, so a resumed run sees the same
       batches.
    3. `ChosenWeights` before the averager: at the epoch end the model still
       holds the weights that `fit`'s `val_*` logs describe (SwitchEMA
       copies the EMA into it in the averager's epoch end).
    4. The averager (`MultiEMA`, `SwitchEMA` or `Belay`): adds the
       `ema_<decay>_val_*` logs and writes its state to `backup/`; it
       restores that state at the first epoch begin, after the backup's
       train begin restored the model and optimizer step.
    5. `RunLogger` after the averager: its rows hold the EMA logs.
    6. `AtomicBackupAndRestore` last: an epoch's backup names it only once
       the EMA state (`ema_state=True`: an epoch restores only with it) and
       `history.csv` of that epoch are on disk.
    7. `extra_callbacks`: see every log.
    """
    if config.snapshot_every and not state_file.backup_steps(os.path.join(run, "backup")):
        # The EMAs start afresh (a new run, or one killed before its first
        # backup): snapshots left by an earlier attempt belong to EMAs that
        # no longer exist, and MultiEMA would refuse them as another run's.
        shutil.rmtree(os.path.join(run, "snapshots"), ignore_errors=True)
    averager = _averaging_callback(config, validation, run)
    tuned = run_choices(config, run)  # the run's own copy
    chosen = ChosenWeights(run, averager, config.epochs, selection_split(config), tuned)
    summary_of = _summarizer(config, data, run, averager, tuned)
    logger = RunLogger(run, summary_of)
    backup = AtomicBackupAndRestore(os.path.join(run, "backup"),
                                    delete_checkpoint=False, ema_state=True,
                                    history_path=os.path.join(run, "history.csv"))
    callbacks = [StopOnNonFiniteLoss(), EpochSetter(train_loader), chosen,
                 averager, logger, backup] + extra_callbacks
    return _RunCallbacks(callbacks, averager, logger, summary_of)


def _summarizer(config, data, run, averager, tuned):
    """`summary_of(rows, completed)`: the run's summary.json; its clock starts now.

    `train_seconds` adds this attempt's time to that of the attempts before.
    """
    summary_path = os.path.join(run, "summary.json")
    previous = run_dir.read_json(summary_path) if os.path.exists(summary_path) else {}
    seconds_before = previous.get("train_seconds", 0.0)
    fingerprint = data.fingerprint()
    start = time.perf_counter()

    def summary_of(rows, completed):
        return summarize(config, data.summary(), rows, completed, averager,
                         seconds_before + time.perf_counter() - start, tuned,
                         fingerprint)

    return summary_of


def _results(config, data, run, model, fit):
    """The results phase: checks the named files, writes curves, export, summary."""
    _banner("Results")
    averager, summary_of = fit.averager, fit.summary_of
    rows = fit.logger.rows
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
    # Every weights file the finished run names must load before its backup
    # goes: a damaged one is rewritten if it holds the last epoch, else named.
    _check_named_files(config, data, run, summary_of(rows, True), model, averager)
    _write_results(config, run, model, averager, data, rows, summary_of)
    summary = summary_of(rows, True)
    # The summary marks the run completed only once everything is written;
    # the backup goes last (a rerun that finds it removes it).
    run_dir.write_json(os.path.join(run, "summary.json"), summary)
    shutil.rmtree(os.path.join(run, "backup"), ignore_errors=True)
    print_msg(format_summary(summary))
    print_msg(f"Run directory: {run}")
    return summary


def _check_named_files(config, data, run, summary, model, averager):
    """Loads every weights file `summary` names; rewrites or names a bad one.

    A file of the last epoch is rewritten from the trained state (the EMAs,
    and the model except after SwitchEMA's copy); a file of an earlier
    epoch, which no backup keeps, raises `DamagedFileError` naming it.
    """
    from zoo.trained_model import build_model

    checker = build_model(config, data)
    last = config.epochs - 1
    flags = os.path.join(run, "flags.cfg")
    records = [(None, r) for r in summary["sgd"].values()] + [
        (float(d), r) for d, entry in summary["ema"].items() for r in entry.values()]
    for decay, record in records:
        path = os.path.join(run, record["weights"])
        remedy = (f"it holds epoch {record['epoch']}, which the backup no "
                  "longer keeps: restore the file from a copy and rerun the "
                  f"same command, or retrain with --flagfile={flags} "
                  "--output_dir=NEW")
        try:
            run_dir.load_weights(checker, path, remedy)
            continue
        except run_dir.DamagedFileError:
            if record["epoch"] != last or (decay is None and config.averaging == "sema"):
                raise
        print_msg(f"{path} was damaged; rewritten from the last epoch's state.")
        if decay is None:
            run_dir.save_weights(model, path)
        else:
            averager.save_weights(decay, path)
        run_dir.load_weights(checker, path, remedy)


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


def _ema_to_export(config, averager, run):
    """The EMA model to export, its weights checked; raises `ExportError`."""
    decay = config.export_decay
    if not averager.num_updates:
        raise ExportError(
            f"the EMA {decay} was never updated (--ema_period="
            f"{config.ema_period}), so it holds the initial weights; nothing "
            "was exported. Train again with a smaller --ema_period in a new "
            "--output_dir."
        )
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
    return model


def _export(config, averager, data, run):
    """Exports the chosen EMA, its BN recomputed, taking images in 0..255.

    `model.keras` loads with `keras.saving.load_model` alone: no zoo class.
    """
    from keras_ema.export import export_model
    from zoo.trained_model import recompute_bn

    decay = config.export_decay
    model = _ema_to_export(config, averager, run)
    recompute_bn(model, config, data)
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
    with run_dir.atomic_path(os.path.join(run, "export")) as tmp:
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


__all__ = ["Config", "ConfigError", "ExportError", "TrainingDiverged", "train"]
