"""A run whose training loss becomes NaN or infinite: stopped, recorded, reported.

`StopOnNonFiniteLoss` ends `fit` at the first such batch by raising
`Diverged`; `zoo.run.experiment` then records the run as finished with a
`"diverged"` entry in its summary and raises `TrainingDiverged`, whose
message (`diverged_message`) a rerun repeats.
"""

import math
import os
import shutil

import keras

from zoo.plots import plot_curves
from zoo.run import run_dir
from zoo.run.config import read_flags


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the run stopped there.

    `summary` is the run's `summary.json`, whose `"diverged"` entry holds the
    epoch and optimizer step. Nothing was exported.
    """

    def __init__(self, message, summary):
        super().__init__(message)
        self.summary = summary


def diverged_message(run, summary):
    where = summary["diverged"]
    flags = read_flags(os.path.join(run, "flags.cfg"))
    return (
        f"the run in {run} diverged at epoch {where['epoch']} (optimizer step "
        f"{where['step']}): the training loss became NaN or infinite, so "
        "nothing was exported; train again in a new --output_dir with a lower "
        f"--lr (this run has --lr={flags.get('lr')})."
    )


class Diverged(Exception):
    """Raised by `StopOnNonFiniteLoss` out of `model.fit`."""

    def __init__(self, epoch, step):
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}")
        self.epoch = epoch
        self.step = step


class StopOnNonFiniteLoss(keras.callbacks.Callback):
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
            raise Diverged(self.epoch, step)


def finish_diverged(run, rows, summary_of, diverged, title):
    """Records a diverged run as finished; returns the `TrainingDiverged` to raise.

    Args:
        run: str. The run directory.
        rows: list or `None`. The history rows this attempt logged; `None`:
            read `history.csv`.
        summary_of: `(rows, completed)` -> the summary.json dict.
        diverged: the `Diverged` raised out of `fit`.
        title: str. The curves' title.
    """
    if rows is None:
        rows = run_dir.read_csv(os.path.join(run, "history.csv"))
    rows = [r for r in rows if int(r["epoch"]) < diverged.epoch]
    run_dir.write_csv(os.path.join(run, "history.csv"), rows)
    if rows:
        plot_curves(rows, os.path.join(run, "curves.png"),
                    title=title + " (diverged)")
    summary = summary_of(rows, True)
    summary["diverged"] = {"epoch": diverged.epoch, "step": diverged.step}
    run_dir.write_json(os.path.join(run, "summary.json"), summary)
    shutil.rmtree(os.path.join(run, "backup"), ignore_errors=True)
    return TrainingDiverged(diverged_message(run, summary), summary)
