"""`Evaluator`: each run's data, models and logits, built once and cached.

The evaluations ask it for a model of a run by key (`baseline`,
`sgd_best_accuracy`, `ema_accuracy`, `ema_loss`, `ema_last`; see
`zoo.evaluation`); it chooses the weights (`selection`, with
`zoo.selection.select_ema` for the EMAs), rebuilds the model
(`zoo.trained_model`) and keeps one run's models at a time.
"""

import contextlib
import logging
import os

import numpy as np

from zoo.data import load_dataset
from zoo.data.dataset import fingerprint_change
from zoo.data.loader import ArrayLoader
from zoo.evals import MODEL_NAMES
from zoo.evals import TRAINED_MODEL_NAMES
from zoo.evals import WITHOUT_SELECTION
from zoo.evals import EvaluationError
from zoo.run.runs import Run
from zoo.run.runs import has_selection
from zoo.selection import parse_decay
from zoo.selection import select_ema


class Evaluator:
    """Builds each run's three models once and caches their logits.

    Args:
        runs: list of `zoo.run.runs.Run` (see `load_runs`).
        bn_recompute: bool, recompute the EMA models' BatchNorm statistics
            on the training split first.
        decay: `"largest"`, `"best_on_validation"` or a float, see
            `select_ema`; `None` is `"largest"`.
        log: a function of one line of progress, or `None` to log it
            through absl at INFO. Defaults to `None`.
    """

    def __init__(self, runs, bn_recompute: bool = True,
                 decay: "str | float" = "largest", log=None):
        self.runs = runs
        self.bn_recompute = bn_recompute
        self.decay = parse_decay(decay)
        self.early_stopping = all(has_selection(r) for r in runs)
        self.log = log or log_info
        self._data = {}
        self._models = {}
        self._logits = {}

    def data(self, run: Run):
        """The run's dataset, as training loaded it (split, noise, statistics).

        Raises `EvaluationError` when it differs from the data the run
        recorded at training (`Dataset.fingerprint`).
        """
        c = run.config
        key = (c.dataset, c.data_dir, c.val_fraction, c.seed, c.label_noise,
               c.image_size)
        if key not in self._data:
            data = load_dataset(
                c.dataset, data_dir=c.data_dir or None,
                val_fraction=c.val_fraction, seed=c.seed,
                label_noise=c.label_noise or None,
                image_size=c.image_size or None,
            )
            self._data[key] = (data, data.fingerprint())
        data, fingerprint = self._data[key]
        change = fingerprint_change(run.summary.get("data_fingerprint"), fingerprint)
        if change:
            raise EvaluationError(
                f"{run.path} was trained on other data than {c.dataset} holds "
                f"now ({change}); evaluate it on the data it was trained on, "
                "or train it again."
            )
        return data

    def models(self, wanted) -> tuple:
        """`wanted` models, or without chosen epochs their last-epoch stand-ins."""
        if self.early_stopping:
            return tuple(wanted)
        out = []
        for which in wanted:
            which = WITHOUT_SELECTION.get(which, which)
            if which and which not in out:
                out.append(which)
        return tuple(out)

    def selection(self, run: Run, model: str) -> dict:
        """`{"weights", "decay", "epoch", "chosen_by"}` of a model of `run`.

        `chosen_by` names the run and split that chose the epoch
        (`{"run", "split", "criterion"}`), or is `None` for a last epoch.
        """
        if model == "baseline":
            record = run.summary["sgd"]["last"]
            return {"weights": "sgd_last.weights.h5", "decay": None,
                    "epoch": record["epoch"], "chosen_by": None}
        if model == "sgd_best_accuracy":
            record = run.summary["sgd"]["best_accuracy"]
            return {"weights": "sgd_best_accuracy.weights.h5", "decay": None,
                    "epoch": record["epoch"], "chosen_by": _chooser(run, record)}
        criterion = model.split("_", 1)[1]
        decay, epoch, weights = select_ema(run.summary, criterion, self.decay)
        record = run.summary["ema"][next(
            d for d in run.summary["ema"] if float(d) == decay)]
        key = criterion if criterion == "last" else f"best_{criterion}"
        return {"weights": weights, "decay": decay, "epoch": epoch,
                "chosen_by": _chooser(run, record[key])}

    def name(self, which: str) -> str:
        """The table row of model `which`, named for what its weights hold."""
        averaging = self.runs[0].config.averaging
        return TRAINED_MODEL_NAMES.get(averaging, {}).get(which, MODEL_NAMES[which])

    def model(self, run: Run, which: str):
        """The keras model `which` of `run`, weights loaded (cached)."""
        from zoo.trained_model import trained_model

        key = (run.path, which)
        if key in self._models:
            return self._models[key]
        chosen = self.selection(run, which)
        path = os.path.join(run.path, chosen["weights"])
        if not os.path.exists(path):
            raise EvaluationError(
                f"{path} is missing; the run directory is incomplete: rerun "
                "its training or remove it."
            )
        model = trained_model(
            run.config, self.data(run), path,
            bn_recompute=which.startswith("ema") and self.bn_recompute,
            remedy=("restore it from a copy, or retrain the run with --flagfile="
                    f"{os.path.join(run.path, 'flags.cfg')} --output_dir=NEW"))
        self._models = {k: v for k, v in self._models.items() if k[0] == run.path}
        self._models[key] = model
        return model

    def logits(self, run: Run, which: str, split: str = "test") -> np.ndarray:
        """float64 logits of model `which` of `run` on `split` (test or val)."""
        key = (run.path, which, split)
        if key not in self._logits:
            data = self.data(run)
            x = data.x_test if split == "test" else data.x_val
            self.log(f"  {run.name}: {self.name(which)} on {split}")
            with _no_retracing_warning():
                model = self.model(run, which)
                loader = ArrayLoader(x, None, 256, data.mean, data.std)
                self._logits[key] = np.asarray(model.predict(loader, verbose=0),
                                               np.float64)
        return self._logits[key]

    def labels(self, run: Run, split: str = "test") -> np.ndarray:
        data = self.data(run)
        return data.y_test if split == "test" else data.y_val


def log_info(line: str) -> None:
    """Logs a progress line through absl (the zoo's logger) at INFO."""
    from absl import logging as absl_logging

    absl_logging.info("%s", line)


class _RetracingFilter(logging.Filter):
    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def _no_retracing_warning():
    """Hides TensorFlow's "N out of the last N calls ... retracing" warning.

    Every evaluated model is a new Keras model with its own predict
    function, traced once; TensorFlow counts those first traces of the same
    Python function as retracing and advises changes that do not apply.
    """
    logger = logging.getLogger("tensorflow")
    quiet = _RetracingFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _chooser(run, record):
    """`chosen_by` of a summary record, "." (the run itself) as its path."""
    by = record.get("chosen_by")
    if by and by.get("run") == ".":
        by = {**by, "run": run.path}
    return by
