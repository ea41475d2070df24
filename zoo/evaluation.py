"""The paper's evaluations of finished training runs (what `evaluate.py` prints).

A group of run directories, one per seed of one configuration, is evaluated
on the test split of their dataset. Each run contributes three models:

- `baseline`: the last iterate of the model that trains (`sgd_last.weights.h5`):
  plain SGD, or for `--averaging=sema` / `belay` the trained model before the
  last switch / with its coupling (the rows are named so);
- `ema_accuracy`: the EMA at its epoch of best validation accuracy;
- `ema_loss`: the EMA at its epoch of lowest validation loss.

The generalization tables add `sgd_best_accuracy`, SGD at its epoch of best
validation accuracy, for comparison.

The epochs are chosen on a validation split, never on test (`zoo.selection`):
the run's own (`--val_fraction` > 0) or that of the tuning run a full run
names with `--selection_from`. A full run without one chose nothing: it is
evaluated without early stopping, at its last epoch only (`baseline` and
`ema_last`, the final EMA), and the tables say so.

The EMA's decay is by default the largest the runs track, as in the paper's
tables (`decay="largest"`); `decay="best_on_validation"` takes for each
criterion the decay whose chosen value on the validation split is best, and a
number takes that decay.

Each evaluation is registered in `EVALUATORS` under its `--evals` name
(`register`); `evaluate` looks the names up. `zoo.report` writes the results
as Markdown, `zoo.notes` the notes under its tables, and `zoo.trained_model`
rebuilds each model from its run.

With `bn_recompute` (the paper's protocol, on by default) the EMA models'
BatchNorm statistics are recomputed on one pass over the training split, in
batches of the training batch size, without augmentation
(`keras_ema.recompute_batch_norm_statistics`) before they are evaluated.

The evaluations (paper, shared seed 003):

- `generalization` (Table 1): test accuracy and loss of the three models.
- `calibration` (Table 5): accuracy, ECE (100 equal-mass bins, %) and ECE
  after temperature scaling, the temperature fitted by NLL on the run's
  validation split; baseline and EMA at lowest loss; reliability diagrams.
- `churn` (Table 3): pairwise churn (%) and Jensen-Shannon divergence of the
  test predictions of every pair of seeds; baseline and EMA at lowest loss.
- `transfer` (Table 4): linear-probe test accuracy of each model's frozen
  features on another dataset.
- `label_noise` (Table 2 row): clean test accuracy of the three models of
  runs trained with noisy labels.

Numbers are the mean and sample standard deviation (ddof=1) over seeds, or
over pairs of seeds for churn.
"""

import contextlib
import dataclasses
import itertools
import logging
import os
from typing import Callable

import numpy as np

from keras_ema._checks import is_real
from zoo import notes
from zoo import report
from zoo.run import run_dir
from zoo.data.loader import ArrayLoader
from zoo.data import load_dataset
from zoo.data.dataset import fingerprint_change
from zoo.run.config import Config

MODELS = ("baseline", "ema_accuracy", "ema_loss")
MODEL_NAMES = {
    "baseline": "Baseline (SGD last)",
    "sgd_best_accuracy": "SGD (best accuracy)",
    "ema_accuracy": "EMA (best accuracy)",
    "ema_loss": "EMA (lowest loss)",
    "ema_last": "EMA (last epoch)",
}
# The model that trains, where it is not plain SGD: its files hold it as the
# history's SGD columns describe it (for SEMA: before the epoch end's switch).
TRAINED_MODEL_NAMES = {
    "sema": {"baseline": "SEMA model (last, before the switch)",
             "sgd_best_accuracy": "SEMA model (best accuracy, before the switch)"},
    "belay": {"baseline": "BELAY model (last)",
              "sgd_best_accuracy": "BELAY model (best accuracy)"},
}
# Without a chosen epoch (no validation split, no --selection_from) the
# models are replaced by the last epoch, or dropped.
WITHOUT_SELECTION = {"sgd_best_accuracy": None, "ema_accuracy": "ema_last",
                     "ema_loss": "ema_last"}
DECAY_CHOICES = ("largest", "best_on_validation")
# Settings that may differ between the runs of one group.
PER_RUN_FLAGS = ("seed", "output_dir", "distribution", "selection_from")


class EvaluationError(ValueError):
    """Runs cannot be evaluated as asked; the message says which and why."""


# === The evaluations, by name (as big_vision's evaluators) ===


@dataclasses.dataclass(frozen=True)
class Options:
    """The settings of `evaluate` that single evaluations read."""

    transfer_dataset: "str | None" = None
    transfer_data_dir: "str | None" = None
    probe_epochs: int = 50


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """An entry of `EVALUATORS`.

    Attributes:
        name: str. What `--evals` calls it; its key in `results["evals"]`.
        help: str. What it computes, in a line of `evaluate.py --help`.
        run: `(Evaluator, runs, figures, Options) -> dict`. Computes the
            result, adding reliability diagrams or plots to `figures`.
        check: `(runs, Options) -> None` or `None`. Raises
            `EvaluationError` when the runs or options cannot give this
            evaluation, before any model is built.
    """

    name: str
    help: str
    run: "Callable[[Evaluator, list, dict, Options], dict]"
    check: "Callable[[list, Options], None] | None" = None


EVALUATORS: "dict[str, Evaluation]" = {}


def register(name: str, help: str, check: "Callable | None" = None) -> Callable:
    """Registers the decorated function as evaluation `name` of `EVALUATORS`.

    Args:
        name: str. The `--evals` name.
        help: str. What it computes, for `evaluate.py --help`.
        check: `(runs, Options) -> None` or `None`. See `Evaluation`.
            Defaults to `None`.

    Returns:
        A decorator that returns the function unchanged.
    """
    def decorator(function):
        EVALUATORS[name] = Evaluation(name, help, function, check)
        return function

    return decorator


@dataclasses.dataclass
class Run:
    """A finished run: its directory, configuration and summary."""

    path: str
    config: Config
    summary: dict
    flags: dict

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


def load_runs(paths: "list[str]") -> list:
    """The finished runs in `paths`, checked to be seeds of one configuration.

    Raises:
        EvaluationError: no run, a missing or unfinished run directory,
            runs on different datasets or with other differing flags, or two
            runs with the same seed.
    """
    if not paths:
        raise EvaluationError(
            "No run directories given; pass the --output_dir of finished "
            "train.py runs, e.g. evaluate.py runs/demo_s0 runs/demo_s1."
        )
    runs = []
    for path in paths:
        _check_not_diverged(path)
        try:
            loaded = run_dir.load_run(path)
        except run_dir.RunDirError as error:
            raise EvaluationError(str(error)) from None
        try:
            config = Config.from_flags(loaded["flags"]).resolved()
        except ValueError as error:  # ConfigError too: it parses but is wrong
            raise EvaluationError(str(run_dir.DamagedFileError(
                os.path.join(path, "flags.cfg"), error,
                "restore it from a copy, or retrain the run"))) from None
        runs.append(Run(path, config, loaded["summary"], loaded["flags"]))
    first = runs[0]
    for run in runs[1:]:
        if run.config.dataset != first.config.dataset:
            raise EvaluationError(
                f"Runs on different datasets: {first.path} is "
                f"{first.config.dataset}, {run.path} is {run.config.dataset}; "
                "evaluate the runs of one dataset at a time."
            )
        differ = [k for k in sorted(set(first.flags) | set(run.flags))
                  if k not in PER_RUN_FLAGS
                  and first.flags.get(k) != run.flags.get(k)]
        if differ:
            k = differ[0]
            raise EvaluationError(
                f"Runs of different configurations: {first.path} has "
                f"--{k}={first.flags.get(k)}, {run.path} has "
                f"--{k}={run.flags.get(k)}; pass the seeds of one configuration."
            )
    for a, b in itertools.combinations(runs, 2):
        if a.config.seed == b.config.seed:
            raise EvaluationError(
                f"{a.path} and {b.path} have the same --seed={a.config.seed}; "
                "pass each seed's run once."
            )
    for run in runs:
        _check_selection(run)
    for run in runs[1:]:
        if _has_selection(run) != _has_selection(first):
            raise EvaluationError(
                f"{first.path} has chosen epochs ({first.summary['selection_split']}), "
                f"{run.path} has none ({run.summary['selection_split']}); "
                "pass full runs that all use --selection_from, or none does."
            )
    return runs


def _check_not_diverged(path):
    """Raises EvaluationError if the run in `path` stopped on a non-finite loss."""
    summary_path = os.path.join(path, "summary.json")
    if not os.path.isfile(summary_path):
        return
    try:
        diverged = run_dir.read_json(summary_path).get("diverged")
    except (OSError, ValueError, AttributeError):
        return  # load_run reports an unreadable summary
    if isinstance(diverged, dict) and diverged:  # else load_run checks it
        raise EvaluationError(
            f"{path} diverged at epoch {diverged.get('epoch')}: its training "
            "loss became NaN or infinite, so it has no result to evaluate; "
            "train it again with a lower --lr, or leave it out."
        )


def _has_selection(run):
    return run.summary.get("selection_split") in ("validation", "tuning_run")


def _check_selection(run):
    """Refuses runs written before the selection rules of `zoo.selection`."""
    split = run.summary.get("selection_split")
    if split not in ("validation", "tuning_run", "none"):
        raise EvaluationError(
            f"{run.path} chose its epochs on the {split} split (an older "
            "train.py): retrain it, with --selection_from=TUNE_RUN for a "
            "--val_fraction=0 run, so that nothing is chosen on test."
        )
    if "weights" not in run.summary.get("sgd", {}).get("last", {}):
        raise EvaluationError(
            f"{run.path} was written by an older train.py, whose SEMA runs saved "
            "the EMA in the sgd_* files: retrain it with this version."
        )


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
    """
    decay = parse_decay(decay)
    emas = summary.get("ema", {})
    key = criterion if criterion == "last" else f"best_{criterion}"
    candidates = {d: e[key] for d, e in emas.items() if key in e}
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


def accuracy_and_loss(logits, labels) -> tuple:
    """Top-1 accuracy and mean softmax cross-entropy of `logits`."""
    from scipy.special import log_softmax

    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    loss = float(-np.mean(log_softmax(logits, axis=1)[np.arange(len(labels)), labels]))
    return accuracy, loss


def softmax(logits) -> np.ndarray:
    from scipy.special import softmax as _softmax

    return _softmax(np.asarray(logits, np.float64), axis=1)


class Evaluator:
    """Builds each run's three models once and caches their logits.

    Args:
        runs: list of `Run` (see `load_runs`).
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
        self.early_stopping = all(_has_selection(r) for r in runs)
        self.log = log or _log_info
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


def _log_info(line):
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


def mean_std(values) -> dict:
    """`{"mean", "std", "n", "values"}`; std is the sample std (ddof=1), 0 for one value."""
    values = [float(v) for v in values]
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def _aggregate(per_run):
    """Per-run `{model: {metric: value}}` dicts to `{model: {metric: mean_std}}`."""
    out = {}
    for model in per_run[0]:
        out[model] = {
            metric: mean_std([r[model][metric] for r in per_run])
            for metric in per_run[0][model]
            if is_real(per_run[0][model][metric])
        }
    return out


# The generalization tables also show SGD early-stopped at its best epoch.
GENERALIZATION_MODELS = ("baseline", "sgd_best_accuracy", "ema_accuracy", "ema_loss")


def _accuracy_table(ev, runs, models):
    """Test accuracy (%) and loss of `models` of every run, and their mean ± std."""
    models = ev.models(models)
    per_run = []
    for run in runs:
        row = {}
        for which in models:
            acc, loss = accuracy_and_loss(ev.logits(run, which), ev.labels(run))
            row[which] = {"accuracy": 100 * acc, "loss": loss}
        per_run.append(row)
    return {"per_run": per_run, "table": _aggregate(per_run)}


@register("generalization", "test accuracy and loss (Table 1)")
def evaluate_generalization(ev, runs, figures, options) -> dict:
    """Table 1: test accuracy and loss of SGD and the EMAs."""
    return _accuracy_table(ev, runs, GENERALIZATION_MODELS)


def _check_label_noise(runs, options=None):
    if not runs[0].config.label_noise:
        raise EvaluationError(
            f"--evals=label_noise needs runs trained with --label_noise; "
            f"{runs[0].path} has clean labels."
        )


def _check_churn(runs, options=None):
    if len(runs) < 2:
        raise EvaluationError(
            f"--evals=churn compares seeds: it needs at least two runs, got "
            f"{len(runs)} ({runs[0].path})."
        )


def _check_transfer(runs, options):
    if not options.transfer_dataset:
        raise EvaluationError(
            "--evals=transfer needs --transfer_dataset (e.g. digits, cifar10, "
            "folder:PATH) with images of the runs' size."
        )


@register("label_noise", "clean test accuracy of --label_noise runs (Table 2)",
          check=_check_label_noise)
def evaluate_label_noise(ev, runs, figures, options) -> dict:
    """Table 2: clean test accuracy of runs trained with noisy labels."""
    _check_label_noise(runs)
    result = _accuracy_table(ev, runs, GENERALIZATION_MODELS)
    result["label_noise"] = runs[0].config.label_noise
    return result


@register("calibration", "ECE before and after temperature scaling (Table 5)")
def evaluate_calibration(ev, runs, figures, options,
                         models=("baseline", "ema_loss")) -> dict:
    """Table 5: accuracy, ECE and ECE after temperature scaling; diagrams."""
    from keras_ema.calibration import apply_temperature
    from keras_ema.calibration import expected_calibration_error
    from keras_ema.calibration import fit_temperature

    models = ev.models(models)
    per_run = []
    tuned_on = "validation"
    for run in runs:
        row = {}
        labels = ev.labels(run)
        has_val = ev.data(run).x_val is not None
        for which in models:
            logits = ev.logits(run, which)
            probs = softmax(logits)
            entry = {
                "accuracy": 100 * float(np.mean(probs.argmax(1) == labels)),
                "ece": 100 * expected_calibration_error(probs, labels, 100),
            }
            if has_val:
                temperature = fit_temperature(ev.logits(run, which, "val"),
                                              ev.labels(run, "val"))
                scaled = apply_temperature(logits, temperature)
                entry["temperature"] = temperature
                entry["ece_ts"] = 100 * expected_calibration_error(scaled, labels, 100)
            row[which] = entry
        if not has_val:
            tuned_on = None
        per_run.append(row)
    first = min(runs, key=lambda r: r.config.seed)
    for which in models:
        figures[f"reliability_{which}.png"] = (
            softmax(ev.logits(first, which)), ev.labels(first),
            f"{ev.name(which)}, seed {first.config.seed}",
        )
    return {"per_run": per_run, "table": _aggregate(per_run),
            "temperature_tuned_on": tuned_on, "figure_seed": first.config.seed}


@register("churn", ("disagreement between seeds; needs two or more runs, skipped "
          "by default with one (Table 3)"), check=_check_churn)
def evaluate_churn(ev, runs, figures, options,
                   models=("baseline", "ema_loss")) -> dict:
    """Table 3: churn and Jensen-Shannon divergence between pairs of seeds."""
    from keras_ema.disagreement import churn
    from keras_ema.disagreement import jensen_shannon

    _check_churn(runs)
    models = ev.models(models)
    per_pair = []
    for a, b in itertools.combinations(runs, 2):
        row = {"pair": [a.name, b.name]}
        for which in models:
            pa, pb = softmax(ev.logits(a, which)), softmax(ev.logits(b, which))
            row[which] = {"churn": 100 * churn(pa, pb),
                          "jensen_shannon": jensen_shannon(pa, pb)}
        per_pair.append(row)
    table = {
        which: {metric: mean_std([p[which][metric] for p in per_pair])
                for metric in ("churn", "jensen_shannon")}
        for which in models
    }
    return {"per_pair": per_pair, "table": table}


@register("transfer", "linear probe on --transfer_dataset (Table 4)",
          check=_check_transfer)
def evaluate_transfer(ev, runs, figures, options, seed=0) -> dict:
    """Table 4: linear-probe accuracy of the frozen features on another dataset."""
    from keras_ema.linear_probe import linear_probe

    dataset = options.transfer_dataset
    data_dir = options.transfer_data_dir
    epochs = options.probe_epochs

    per_run = []
    for run in runs:
        source = ev.data(run)
        height, width = source.image_shape[:2]
        try:
            target = load_dataset(dataset, data_dir=data_dir, val_fraction=0.0,
                                  seed=seed, image_size=(height, width)
                                  if dataset.startswith("folder:")
                                  or dataset == "tiny_imagenet" else None)
        except ValueError as error:
            raise EvaluationError(f"--transfer_dataset={dataset}: {error}") from None
        if target.image_shape != source.image_shape:
            raise EvaluationError(
                f"--transfer_dataset={dataset} has images of shape "
                f"{target.image_shape}, the backbone takes {source.image_shape}; "
                "choose a dataset of the same image size."
            )
        # The backbone sees inputs normalized as in its own training.
        train = (_normalized(target.x_train, source), target.y_train)
        test = (_normalized(target.x_test, source), target.y_test)
        row = {}
        for which in ev.models(MODELS):
            ev.log(f"  {run.name}: linear probe of {ev.name(which)} on {dataset}")
            row[which] = {"accuracy": 100 * linear_probe(
                ev.model(run, which), train, test, epochs=epochs, seed=seed)}
        per_run.append(row)
    return {"per_run": per_run, "table": _aggregate(per_run),
            "transfer_dataset": dataset, "probe_epochs": epochs}


def _normalized(x, data):
    return ((x.astype(np.float32) / 255.0 - data.mean) / data.std).astype(np.float32)


@register("posthoc", "post-hoc EMA sweep; needs train.py --snapshot_every")
def evaluate_posthoc(ev, runs, figures, options) -> dict:
    """The post-hoc EMA sweep over each run's snapshots (`zoo.posthoc_sweep`)."""
    from zoo import posthoc_sweep

    return posthoc_sweep.evaluate_posthoc(ev, runs, figures)


# The names `--evals` accepts, in the order of the registry.
EVALS = tuple(EVALUATORS)


def _selection_text(runs, early_stopping):
    split = runs[0].summary.get("selection_split")
    if not early_stopping:
        return ("no early stopping: the runs have no validation split "
                "(--val_fraction=0) and no --selection_from, so only the last "
                "epoch of each model is reported")
    if split == "tuning_run":
        tuners = sorted({r.summary.get("selection_from") for r in runs})
        return (f"epochs chosen on the validation split of the tuning run(s) "
                f"{', '.join(tuners)} (--selection_from), not on test")
    return "epochs chosen on each run's validation split"


def _decay_text(runs, decay):
    decays = sorted({float(d) for r in runs for d in r.summary.get("ema", {})})
    if decay == "largest":
        return f"the largest tracked, {max(decays)} (the paper's tables)"
    if decay == "best_on_validation":
        return "per criterion, the one best on the validation split"
    return f"{decay} (--decay)"


def evaluate(runs: list, evals: "list[str]", bn_recompute: bool = True,
             decay: "str | float" = "largest",
             transfer_dataset: "str | None" = None,
             transfer_data_dir: "str | None" = None, probe_epochs: int = 50,
             log: "Callable[[str], None] | None" = None) -> tuple:
    """Runs `evals` on `runs`; returns `(results dict, figures)`.

    Each name of `evals` is looked up in `EVALUATORS`; their checks all run
    before the first model is built.

    `decay`: `"largest"` (default), `"best_on_validation"` or a float; see
    `select_ema`. `log`: a function of one line of progress; `None` logs
    through absl at INFO.

    `figures` maps PNG file names to `(probs, labels, title)` of reliability
    diagrams; nothing is written here (see `write_results`).
    """
    log = log or _log_info
    unknown = [e for e in evals if e not in EVALUATORS]
    if unknown or not evals:
        raise EvaluationError(
            f"--evals={','.join(evals)}: unknown evaluation "
            f"{unknown[0] if unknown else '(none)'}; use some of {','.join(EVALS)}."
        )
    options = Options(transfer_dataset, transfer_data_dir, probe_epochs)
    for name in evals:
        if EVALUATORS[name].check is not None:
            EVALUATORS[name].check(runs, options)
    ev = Evaluator(runs, bn_recompute=bn_recompute, decay=decay, log=log)
    if not ev.early_stopping and ev.decay == "best_on_validation":
        select_ema(runs[0].summary, "last", ev.decay)  # raises: nothing to choose on
    models = ev.models(GENERALIZATION_MODELS)
    selection_text = _selection_text(runs, ev.early_stopping)
    decay_text = _decay_text(runs, ev.decay)
    log(f"Selection: {selection_text}.")
    log(f"EMA decay: {decay_text}.")
    first = runs[0].config
    results = {
        "setup": {
            "dataset": first.dataset, "model": first.model, "width": first.width,
            "averaging": first.averaging, "label_noise": first.label_noise or None,
            "seeds": len(runs), "seed_values": [r.config.seed for r in runs],
            "runs": [r.path for r in runs], "bn_recompute": bn_recompute,
            "selection_split": runs[0].summary.get("selection_split"),
            "early_stopping": ev.early_stopping,
            "selection_text": selection_text,
            "decay": ev.decay, "decay_text": decay_text,
            "model_names": {m: ev.name(m) for m in models},
        },
        "selection": {r.name: {m: ev.selection(r, m) for m in models} for r in runs},
        "evals": {},
    }
    figures = {}
    for name in evals:
        log(f"{name}:")
        results["evals"][name] = EVALUATORS[name].run(ev, runs, figures, options)
    results["notes"] = notes.notes_of(ev, runs, results, models)
    return results, figures


def write_results(results: dict, figures: dict, output_dir: str) -> str:
    """Writes the PNGs, `results.json` and `results.md`, each atomically."""
    from keras_ema.calibration import reliability_diagram

    run_dir.check_output_dir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    for name, figure in figures.items():
        if callable(figure):  # draws itself (posthoc_sweep)
            figure(os.path.join(output_dir, name))
            continue
        probs, labels, title = figure
        reliability_diagram(probs, labels, os.path.join(output_dir, name),
                            title=title)
    run_dir.write_json(os.path.join(output_dir, "results.json"), results)
    run_dir.write_text(os.path.join(output_dir, "results.md"),
                       report.format_markdown(results))
    return os.path.join(output_dir, "results.md")
