"""What a run reports: `history.csv`, `summary.json` and the printed summary.

`RunLogger` writes the history and a partial summary at every epoch end,
`summarize` builds `summary.json` from the history rows, `format_summary`
prints its table.
"""

import os

import keras
import numpy as np

from keras_ema import writer
from zoo.run import run_dir
from zoo.run.config import Config
from zoo.selection import chosen_by
from zoo.selection import selection_split


class RunLogger(keras.callbacks.Callback):
    """Writes `history.csv` and a partial `summary.json` at every epoch end.

    Rows from epochs at or after the epoch a resumed run restarts from are
    dropped first, so the file always matches the restored training state.

    Place it after the averaging callback so that its metrics are in `logs`.
    """

    def __init__(self, run: str, summarize):
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
        # By the run's background writer, if one is open (`keras_ema.writer`).
        writer.submit(_write_history, self._path("history.csv"), list(self.rows),
                       self._path("summary.json"), self.summarize(self.rows, False))


def _write_history(history_path, rows, summary_path, summary):
    run_dir.write_csv(history_path, rows)
    run_dir.write_json(summary_path, summary)


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


def summarize(config: Config, data_summary: dict, rows: list, completed: bool,
              averager, seconds: float, tuned: dict | None = None,
              data_fingerprint: dict | None = None) -> dict:
    """The `summary.json` of a run from its history rows.

    `tuned` holds the choices of the `--selection_from` run
    (`zoo.selection.check_selection`); see `zoo.selection` for the three
    values of `selection_split`. `data_fingerprint` is the data's
    `zoo.data.dataset.Dataset.fingerprint`, which evaluation compares.
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
        "data_fingerprint": data_fingerprint,
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



def format_summary(summary: dict) -> str:
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



__all__ = ["RunLogger", "format_summary", "summarize"]
