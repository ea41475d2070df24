"""Which epochs' weights a training run keeps, and which split chose them.

The paper (Sec. 4.1) chooses the hyperparameters and the EMA's early-stopping
epoch on an 80/20 split of the training set; the final run trains on all of
the training data with those choices and is evaluated on test: "early stopping
is not tuned again on the test set". A run's `summary.json` says in
`selection_split` which of three cases it is:

- `"validation"` (`--val_fraction` > 0): the run chooses on its own held-out
  split: the SGD model at its best validation accuracy, each EMA at its best
  validation accuracy and at its lowest validation loss.
- `"tuning_run"` (`--val_fraction=0 --selection_from=TUNE_RUN`): the run keeps
  the SGD and EMA weights at the epochs that TUNE_RUN's validation split chose,
  under the same file names, and records where each epoch came from. The
  choices are copied into the run (`selection.json`) when it starts, and a
  resumed run reads only that copy.
- `"none"` (`--val_fraction=0` alone): the run logs test metrics per epoch for
  its curves but chooses nothing; only its last epoch is kept and evaluated.

Every run also keeps its last epoch: `sgd_last.weights.h5` and
`ema_<decay>_last.weights.h5`. The `sgd_*` files hold the model that the
history's SGD columns (`val_accuracy`, `val_loss`) describe, saved before the
averaging callback's epoch end: for `--averaging=sema` that is the trained
model before SwitchEMA copies the EMA into it.

The tuning run must be a finished run of the same configuration with a
validation split. Its seed may differ (the paper tunes once and reuses the
choices for every seed of the final runs), and so may the flags that do not
change training: where the run and its data are, the device layout and the
export.
"""

import os

import keras

from keras_ema.best import BestTracker
from zoo.evals import EvaluationError
from zoo.run import run_dir
from zoo.run.config import Config
from zoo.run.config import ConfigError
from zoo.run.config import read_flags_text

# Flags in which a final run may differ from the tuning run it takes epochs from.
MAY_DIFFER = ("output_dir", "val_fraction", "seed", "data_dir", "distribution",
              "export", "export_decay", "export_from", "selection_from")
CRITERIA = ("accuracy", "loss")
# A final run's copy of the tuning run's choices, made when it starts.
CHOICES_FILE = "selection.json"


def selection_split(config: Config) -> str:
    """`"validation"`, `"tuning_run"` or `"none"`: see the module docstring."""
    if config.val_fraction > 0:
        return "validation"
    return "tuning_run" if config.selection_from else "none"


def chosen_by(run: str, criterion: str) -> dict:
    """The record of a choice: the run whose validation split made it, and how.

    `run` is `"."` for the run itself (its directory may move), else the
    `--selection_from` path as given.
    """
    return {"run": run, "split": "validation", "criterion": criterion}


def check_selection(config: Config) -> dict | None:
    """Checks `config`'s selection flags; returns the tuning run's choices.

    Args:
        config: a resolved `zoo.run.config.Config`.

    Returns:
        `None` without `--selection_from`; otherwise
        `{"run": TUNE_RUN, "seed": int, "sgd": {"best_accuracy": record},
        "ema": {decay: {"best_accuracy": record, "best_loss": record}}}`
        with `record = {"epoch": int, "value": float}`, the value on the
        tuning run's validation split.

    Raises:
        zoo.run.config.ConfigError: `--selection_from` is not a finished
            tuning run of the same configuration, or `--export_from` asks
            for a chosen epoch that no split chooses.
    """
    path = config.selection_from

    def fail(what):
        raise ConfigError(f"--selection_from={path}: {what}")

    if not path:
        if config.val_fraction == 0 and config.export_from != "final":
            raise ConfigError(
                f"--export_from={config.export_from}: with --val_fraction=0 no "
                "epoch is chosen; pass --selection_from=TUNE_RUN or use "
                "--export_from=final"
            )
        return None
    if config.val_fraction > 0:
        fail(f"takes the epochs of a tuning run for a full run with "
             f"--val_fraction=0; this run has --val_fraction={config.val_fraction} "
             "and chooses on its own split")
    try:
        tuned = run_dir.load_run(path)
    except run_dir.RunDirError as error:
        fail(str(error))
    except (OSError, ValueError) as error:
        fail(f"cannot read the run ({error}); pass a finished train.py run")
    flags = tuned["flags"]
    tune_config = Config.from_flags(flags)
    if not tune_config.val_fraction > 0:
        fail(f"that run has --val_fraction={tune_config.val_fraction}: it has no "
             "validation split to choose on; tune with --val_fraction>0 (the "
             "_tune.cfg configs)")
    ours = read_flags_text(config.to_flags())
    differ = [k for k in sorted(set(flags) | set(ours))
              if k not in MAY_DIFFER and flags.get(k) != ours.get(k)]
    if differ:
        changes = ", ".join(f"--{k}={flags.get(k)} there, {ours.get(k)} here"
                            for k in differ[:3])
        fail(f"a tuning run of another configuration ({changes}); only "
             f"{', '.join('--' + k for k in MAY_DIFFER)} may differ")
    summary = tuned["summary"]
    if summary.get("selection_split", "validation") != "validation":
        fail(f"that run chose nothing on validation (selection_split "
             f"{summary.get('selection_split')}); pass a tuning run")
    choices = {"run": path, "seed": tune_config.seed, "sgd": {}, "ema": {}}
    record = summary.get("sgd", {}).get("best_accuracy")
    if record:
        choices["sgd"]["best_accuracy"] = _record(record, config, fail)
    for decay in config.ema_decays:
        entry = summary.get("ema", {}).get(str(decay), {})
        chosen = {}
        for criterion in CRITERIA:
            record = entry.get(f"best_{criterion}")
            if not record:
                fail(f"its summary.json records no best_{criterion} epoch for "
                     f"decay {decay} (did its validation diverge?); retrain it")
            chosen[f"best_{criterion}"] = _record(record, config, fail)
        choices["ema"][str(decay)] = chosen
    return choices


def run_choices(config: Config, run: str) -> dict | None:
    """The choices the run in `run` uses: its own copy once it has one.

    A final run copies the tuning run's choices into `RUN/selection.json`
    when it starts (`save_choices`) and from then on reads only that copy:
    a tuning run changed, moved or removed between a kill and the resume
    cannot change the epochs a half-trained run keeps. Without a copy (a
    new run) the tuning run is read and checked (`check_selection`).

    Raises:
        zoo.run.config.ConfigError: see `check_selection`.
        zoo.run.run_dir.DamagedFileError: the copy does not read back.
    """
    copy = os.path.join(run, CHOICES_FILE)
    if not config.selection_from or not os.path.exists(copy):
        return check_selection(config)
    remedy = (f"remove it to take the choices from --selection_from="
              f"{config.selection_from} again")
    choices = run_dir.read_json(copy, remedy)
    try:
        for decay in config.ema_decays:
            for criterion in CRITERIA:
                int(choices["ema"][str(decay)][f"best_{criterion}"]["epoch"])
        for record in choices["sgd"].values():
            int(record["epoch"])
        str(choices["run"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise run_dir.DamagedFileError(
            copy, f"no choice {error} for this run's flags", remedy) from None
    return choices


def save_choices(run: str, choices: dict | None):
    """Writes `choices` to `RUN/selection.json` unless it is there already."""
    copy = os.path.join(run, CHOICES_FILE)
    if choices is not None and not os.path.exists(copy):
        run_dir.write_json(copy, choices)


def _record(record, config, fail):
    epoch = int(record["epoch"])
    if not 0 <= epoch < config.epochs:
        fail(f"its chosen epoch {epoch} is outside this run's --epochs="
             f"{config.epochs}; train as many epochs as the tuning run")
    return {"epoch": epoch, "value": record.get("value")}


class ChosenWeights(keras.callbacks.Callback):
    """Saves the SGD and EMA weights at the chosen epochs and at the last one.

    - `sgd_best_accuracy.weights.h5`: with a validation split, at each new
      best `val_accuracy`; with a tuning run, at the epoch it chose.
    - `ema_<decay>_best_accuracy.weights.h5`, `ema_<decay>_best_loss.weights.h5`:
      with a tuning run, at the epochs it chose (with a validation split the
      averaging callback itself writes them).
    - `sgd_last.weights.h5`, `ema_<decay>_last.weights.h5`: at the last epoch.

    Place it before the averaging callback: at the epoch end the model then
    still holds the weights that `fit`'s `val_*` logs describe (SwitchEMA
    copies the EMA in later), and the EMAs are final for the epoch (they are
    updated at batch ends). A resumed run reads the best validation accuracy
    so far from `history.csv`; files of past epochs are already on disk.

    Args:
        run: str. The run directory.
        averager: the run's `keras_ema.MultiEMA` (or subclass).
        epochs: int. The run's number of epochs.
        split: str. `selection_split` of the run.
        tuned: dict or `None`. The choices of `check_selection`.
    """

    def __init__(self, run: str, averager, epochs: int, split: str,
                 tuned: dict | None = None):
        super().__init__()
        self.run = run
        self.averager = averager
        self.epochs = epochs
        self.split = split
        self.tuned = tuned
        self._best_accuracy = None

    def _path(self, name):
        return os.path.join(self.run, name)

    def _save_sgd(self, name):
        # The last SGD weights keep the optimizer's state (training could go
        # on from them); a chosen epoch's weights are for evaluation only.
        run_dir.save_weights(self.model, self._path(name),
                             include_optimizer=name == "sgd_last.weights.h5")

    def _save_ema(self, decay, name):
        self.averager.save_weights(decay, self._path(name))  # atomic itself

    def on_epoch_begin(self, epoch, logs=None):
        if self._best_accuracy is None:
            rows = run_dir.read_csv(self._path("history.csv"))
            self._best_accuracy = BestTracker("val_accuracy", "max")
            for r in rows:
                if int(r["epoch"]) < epoch and "val_accuracy" in r:
                    self._best_accuracy.update(r["val_accuracy"], int(r["epoch"]))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.split == "validation":
            accuracy = logs.get("val_accuracy")
            if accuracy is not None and self._best_accuracy.update(accuracy, epoch):
                self._save_sgd("sgd_best_accuracy.weights.h5")
        elif self.split == "tuning_run":
            record = self.tuned["sgd"].get("best_accuracy")
            if record and record["epoch"] == epoch:
                self._save_sgd("sgd_best_accuracy.weights.h5")
            for decay in self.averager.decays:
                for key, record in self.tuned["ema"][str(decay)].items():
                    if record["epoch"] == epoch:
                        self._save_ema(decay, f"ema_{decay}_{key}.weights.h5")
        if epoch == self.epochs - 1:
            self._save_sgd("sgd_last.weights.h5")
            for decay in self.averager.decays:
                self._save_ema(decay, f"ema_{decay}_last.weights.h5")


# === The EMA decay that evaluate.py reports ===

DECAY_CHOICES = ("largest", "best_on_validation")


def parse_decay(text: "str | float | None") -> "str | float":
    """`--decay`'s value: `"largest"`, `"best_on_validation"` or a float."""
    if text is None:
        return "largest"
    if isinstance(text, str) and text.strip() in DECAY_CHOICES:
        return text.strip()
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not 0 < value < 1:
        raise EvaluationError(
            f"--decay={text}: use largest (the paper's tables), "
            "best_on_validation, or one of the runs' decays, e.g. 0.998."
        )
    return value


def select_ema(summary: dict, criterion: str,
               decay: "str | float" = "largest") -> tuple:
    """`(decay, epoch, weights file)` of the EMA chosen by `criterion`.

    Args:
        summary: a run's `summary.json`.
        criterion: `"accuracy"` (highest), `"loss"` (lowest) or `"last"`
            (the final EMA).
        decay: `"largest"` (the largest tracked decay, the paper's tables),
            `"best_on_validation"` (the decay whose chosen value on the
            validation split is best) or a float. Defaults to `"largest"`.

    Raises:
        zoo.evals.EvaluationError: no such decay or record, or
            `"best_on_validation"` for the last epoch.
    """
    decay = parse_decay(decay)
    key = criterion if criterion == "last" else f"best_{criterion}"
    candidates = {d: e[key] for d, e in summary.get("ema", {}).items() if key in e}
    if not candidates:
        raise EvaluationError(f"The run's summary.json records no EMA {key}.")
    if decay == "largest":
        name = max(candidates, key=float)
    elif decay == "best_on_validation":
        if criterion == "last":
            raise EvaluationError(
                "--decay=best_on_validation: these runs have no validation "
                "split and no --selection_from; use largest or a decay.")
        sign = 1.0 if criterion == "accuracy" else -1.0
        name = max(candidates, key=lambda d: (sign * candidates[d]["value"], float(d)))
    else:
        name = next((d for d in candidates if float(d) == decay), None)
        if name is None:
            raise EvaluationError(
                f"--decay={decay}: not one of the runs' decays "
                f"{', '.join(sorted(candidates))}."
            )
    record = candidates[name]
    return float(name), int(record["epoch"]), record["weights"]
