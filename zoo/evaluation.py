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

import numpy as np

from zoo.run import run_dir
from zoo.datasets import ArrayLoader
from zoo.datasets import load_dataset
from zoo.run.config import Config

EVALS = ("generalization", "calibration", "churn", "transfer", "label_noise",
         "posthoc")
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


@dataclasses.dataclass
class Run:
    """A finished run: its directory, configuration and summary."""

    path: str
    config: Config
    summary: dict
    flags: dict

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))


def load_runs(paths) -> list:
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
        runs.append(Run(path, Config.from_flags(loaded["flags"]).resolved(),
                        loaded["summary"], loaded["flags"]))
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
    if diverged:
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


def parse_decay(text) -> "str | float":
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


def select_ema(summary, criterion, decay="largest"):
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


def accuracy_and_loss(logits, labels):
    """Top-1 accuracy and mean softmax cross-entropy of `logits`."""
    from scipy.special import log_softmax

    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    loss = float(-np.mean(log_softmax(logits, axis=1)[np.arange(len(labels)), labels]))
    return accuracy, loss


def softmax(logits):
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
        log: a function printing one line of progress.
    """

    def __init__(self, runs, bn_recompute=True, decay="largest", log=print):
        self.runs = runs
        self.bn_recompute = bn_recompute
        self.decay = parse_decay(decay)
        self.early_stopping = all(_has_selection(r) for r in runs)
        self.log = log
        self._data = {}
        self._models = {}
        self._logits = {}

    def data(self, run):
        """The run's dataset, as training loaded it (split, noise, statistics)."""
        c = run.config
        key = (c.dataset, c.data_dir, c.val_fraction, c.seed, c.label_noise,
               c.image_size)
        if key not in self._data:
            self._data[key] = load_dataset(
                c.dataset, data_dir=c.data_dir or None,
                val_fraction=c.val_fraction, seed=c.seed,
                label_noise=c.label_noise or None,
                image_size=c.image_size or None,
            )
        return self._data[key]

    def models(self, wanted):
        """`wanted` models, or without chosen epochs their last-epoch stand-ins."""
        if self.early_stopping:
            return tuple(wanted)
        out = []
        for which in wanted:
            which = WITHOUT_SELECTION.get(which, which)
            if which and which not in out:
                out.append(which)
        return tuple(out)

    def selection(self, run, model):
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

    def name(self, which):
        """The table row of model `which`, named for what its weights hold."""
        averaging = self.runs[0].config.averaging
        return TRAINED_MODEL_NAMES.get(averaging, {}).get(which, MODEL_NAMES[which])

    def model(self, run, which):
        """The keras model `which` of `run`, weights loaded (cached)."""
        import keras

        import zoo.models
        from keras_ema.batch_norm import batch_norm_layers
        from keras_ema.batch_norm import recompute_batch_norm_statistics

        key = (run.path, which)
        if key in self._models:
            return self._models[key]
        data = self.data(run)
        c = run.config
        previous = keras.mixed_precision.global_policy()
        if c.mixed_precision:
            keras.mixed_precision.set_global_policy(c.mixed_precision)
        try:
            model = zoo.models.get_model(c.model, num_classes=data.num_classes,
                                  input_shape=data.image_shape, width=c.width,
                                  weight_decay=c.weight_decay)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        chosen = self.selection(run, which)
        path = os.path.join(run.path, chosen["weights"])
        if not os.path.exists(path):
            raise EvaluationError(
                f"{path} is missing; the run directory is incomplete: rerun "
                "its training or remove it."
            )
        run_dir.load_weights(model, path, remedy=(
            "restore it from a copy, or retrain the run with --flagfile="
            f"{os.path.join(run.path, 'flags.cfg')} --output_dir=NEW"))
        if which.startswith("ema") and self.bn_recompute and batch_norm_layers(model):
            recompute_batch_norm_statistics(
                model,
                ArrayLoader(data.x_train, None, c.batch_size, data.mean, data.std),
            )
        self._models = {k: v for k, v in self._models.items() if k[0] == run.path}
        self._models[key] = model
        return model

    def logits(self, run, which, split="test"):
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

    def labels(self, run, split="test"):
        data = self.data(run)
        return data.y_test if split == "test" else data.y_val


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


def mean_std(values):
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
            if isinstance(per_run[0][model][metric], (int, float))
        }
    return out


# The generalization tables also show SGD early-stopped at its best epoch.
GENERALIZATION_MODELS = ("baseline", "sgd_best_accuracy", "ema_accuracy", "ema_loss")


def evaluate_generalization(ev, runs, models=GENERALIZATION_MODELS):
    models = ev.models(models)
    per_run = []
    for run in runs:
        row = {}
        for which in models:
            acc, loss = accuracy_and_loss(ev.logits(run, which), ev.labels(run))
            row[which] = {"accuracy": 100 * acc, "loss": loss}
        per_run.append(row)
    return {"per_run": per_run, "table": _aggregate(per_run)}


def _check_label_noise(runs):
    if not runs[0].config.label_noise:
        raise EvaluationError(
            f"--evals=label_noise needs runs trained with --label_noise; "
            f"{runs[0].path} has clean labels."
        )


def _check_churn(runs):
    if len(runs) < 2:
        raise EvaluationError(
            f"--evals=churn compares seeds: it needs at least two runs, got "
            f"{len(runs)} ({runs[0].path})."
        )


def evaluate_label_noise(ev, runs):
    _check_label_noise(runs)
    noise = runs[0].config.label_noise
    result = evaluate_generalization(ev, runs)
    result["label_noise"] = noise
    return result


def evaluate_calibration(ev, runs, figures, models=("baseline", "ema_loss")):
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


def evaluate_churn(ev, runs, models=("baseline", "ema_loss")):
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


def evaluate_transfer(ev, runs, dataset, data_dir=None, epochs=50, seed=0):
    from keras_ema.linear_probe import linear_probe

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


# === Notes for a puzzled reader ===


def run_facts(ev, run, decay) -> dict:
    """The sizes and lengths of `run` that explain its results (see `notes`)."""
    import math

    data = ev.data(run)
    c = run.config
    steps_per_epoch = math.ceil(len(data.x_train) / c.batch_size)
    return {
        "train_size": int(len(data.x_train)),
        "val_size": 0 if data.x_val is None else int(len(data.x_val)),
        "test_size": int(len(data.x_test)),
        "epochs": int(c.epochs),
        "steps_per_epoch": int(steps_per_epoch),
        "steps": int(c.epochs * steps_per_epoch),
        "decay": None if decay is None else float(decay),
        "period": int(c.ema_period),
        "warmup": bool(c.ema_warmup),
        "label_noise": c.label_noise or None,
    }


def _no_gain_reasons(facts):
    """Why an EMA may not beat the last SGD iterate in this run."""
    from keras_ema.multi_ema import warmup_end_step

    reasons = []
    decay, steps = facts["decay"], facts["steps"]
    if decay is not None:
        window = facts["period"] / (1.0 - decay)
        end = warmup_end_step(decay)
        if facts["warmup"] and end >= steps:
            reasons.append(
                f"the run's {steps} optimizer steps end before the warm-up of "
                f"decay {decay} (step {end}), so the EMA averaged with a "
                "smaller decay throughout")
        elif window < facts["steps_per_epoch"]:
            reasons.append(
                f"the EMA's window (period / (1 - decay) = {window:.0f} "
                f"optimizer steps) is shorter than one epoch "
                f"({facts['steps_per_epoch']} steps): window too short, the "
                "EMA stays close to the last iterate")
        elif window > steps / 2:
            reasons.append(
                f"the EMA's window ({window:.0f} optimizer steps) spans over "
                f"half of the run's {steps} steps, so it still holds early, "
                "worse weights")
    if facts["train_size"] < 10000:
        reasons.append(f"small data ({facts['train_size']} training images)")
    if facts["epochs"] < 30:
        reasons.append(f"few epochs ({facts['epochs']})")
    reasons.append(
        "the learning rate decays to 0 by the last epoch, which removes most "
        "of the noise the EMA averages out (the EMA study finds the gains "
        "largest at a high learning rate and with noisy labels)")
    return reasons


def generalization_notes(table, facts, names=MODEL_NAMES) -> list:
    """A line when no EMA row beats the baseline's test accuracy, with why."""
    if "baseline" not in table:
        return []
    emas = {m: t["accuracy"]["mean"] for m, t in table.items()
            if m.startswith("ema_")}
    if not emas:
        return []
    best = max(emas, key=emas.get)
    base = table["baseline"]["accuracy"]["mean"]
    if emas[best] > base:
        return []
    images = (base - emas[best]) * facts["test_size"] / 100.0
    return [
        f"Note: the EMA does not beat the baseline here ({names[best]} "
        f"{emas[best]:.2f}% against {names['baseline']} {base:.2f}% test "
        f"accuracy, {images:.1f} of {facts['test_size']} test images on "
        "average). Likely: " + "; ".join(_no_gain_reasons(facts)) + "."
    ]


def calibration_notes(table, facts, names=MODEL_NAMES) -> list:
    """A line per model whose ECE temperature scaling raises, with why."""
    lines = []
    for m, t in table.items():
        if "ece_ts" not in t or t["ece_ts"]["mean"] <= t["ece"]["mean"]:
            continue
        reasons = ["the temperature minimizes the NLL, not the ECE"]
        if facts["val_size"] < 5000:
            reasons.append(
                f"it is fitted on {facts['val_size']} validation images "
                "(small data), too few to pin it down")
        if t["ece"]["mean"] < 3.0:
            reasons.append(
                f"the model is already calibrated within {t['ece']['mean']:.2f}%, "
                "where the NLL's optimum can lie on either side of the ECE's")
        lines.append(
            f"Note: temperature scaling raises the ECE of {names[m]} "
            f"({t['ece']['mean']:.2f}% to {t['ece_ts']['mean']:.2f}%). "
            "Likely: " + "; ".join(reasons) + ".")
    return lines


# === Output ===


def _fmt(stat, digits):
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_markdown(results) -> str:
    """The tables of `results` (see `evaluate`) as Markdown."""
    setup = results["setup"]
    names = setup.get("model_names", MODEL_NAMES)
    lines = [
        f"# {setup['model']} (width {setup['width']:g}) on {setup['dataset']}",
        "",
        f"{setup['seeds']} seed(s) ({', '.join(map(str, setup['seed_values']))}); "
        f"averaging {setup['averaging']}; label noise "
        f"{setup['label_noise'] or 'none'}; {setup['selection_text']}; EMA "
        f"decay: {setup['decay_text']}; BN statistics of the EMA models "
        f"{'recomputed' if setup['bn_recompute'] else 'as averaged'}. "
        "Mean ± sample std over seeds (over pairs for churn).",
    ]
    notes = results.get("notes", {})
    chosen = results.get("selection", {})
    if chosen:
        def where(c):
            by = c.get("chosen_by")
            return "last epoch" if by is None else f"chosen on {by['run']} {by['split']}"

        lines += ["", "Evaluated weights: " + "; ".join(
            f"{run}: " + ", ".join(
                f"{names[m]} " + (f"{c['decay']} " if c["decay"] else "")
                + f"@ epoch {c['epoch']} ({where(c)})" for m, c in models.items())
            for run, models in chosen.items()),
            "", "Epochs count from 0 as in history.csv; Keras's progress bar "
            "shows epoch e as e+1."]
    evals = results["evals"]
    if "generalization" in evals:
        t = evals["generalization"]["table"]
        lines += ["", "## Generalization (Table 1)", "",
                  _table(["Model", "Test accuracy (%)", "Test loss"],
                         [[names[m], _fmt(t[m]["accuracy"], 2),
                           _fmt(t[m]["loss"], 4)] for m in t])]
        lines += _note_lines(notes.get("generalization"))
    if "label_noise" in evals:
        e = evals["label_noise"]
        t = e["table"]
        lines += ["", f"## Label noise {e['label_noise']} (Table 2)", "",
                  _table(["Model", "Clean test accuracy (%)", "Test loss"],
                         [[names[m], _fmt(t[m]["accuracy"], 2),
                           _fmt(t[m]["loss"], 4)] for m in t])]
        lines += _note_lines(notes.get("label_noise"))
    if "churn" in evals:
        t = evals["churn"]["table"]
        lines += ["", "## Prediction disagreement between seeds (Table 3)", "",
                  _table(["Model", "Churn (%)", "JS divergence"],
                         [[names[m], _fmt(t[m]["churn"], 2),
                           _fmt(t[m]["jensen_shannon"], 4)] for m in t])]
    if "transfer" in evals:
        e = evals["transfer"]
        t = e["table"]
        lines += ["", f"## Linear probe on {e['transfer_dataset']} (Table 4)", "",
                  _table(["Model", "Test accuracy (%)"],
                         [[names[m], _fmt(t[m]["accuracy"], 2)] for m in t])]
    if "calibration" in evals:
        e = evals["calibration"]
        t = e["table"]
        rows = []
        for m in t:
            ts = _fmt(t[m]["ece_ts"], 2) if "ece_ts" in t[m] else "-"
            rows.append([names[m], _fmt(t[m]["accuracy"], 2),
                         _fmt(t[m]["ece"], 2), ts])
        lines += ["", "## Calibration (Table 5)", "",
                  _table(["Model", "Accuracy (%)", "ECE (%)", "ECE after TS (%)"], rows),
                  "", "ECE: 100 equal-mass bins on the top-1 confidence. "
                  + ("Temperature fitted by NLL on each run's validation split."
                     if e["temperature_tuned_on"] else
                     "No validation split (--val_fraction=0): no temperature scaling."),
                  *_note_lines(notes.get("calibration")),
                  "", f"Reliability diagrams of seed {e['figure_seed']} on test "
                  "(the bars: 15 equal-width bins; under them, the predictions "
                  "per bin; the legend's ECE: 100 equal-mass bins, as the table):"
                  if "figure_seed" in e else "Reliability diagrams on test:",
                  "", "  ".join(f"![{names[m]}](reliability_{m}.png)" for m in t)]
    if "posthoc" in evals:
        from zoo.posthoc_sweep import format_markdown as posthoc_markdown

        lines += posthoc_markdown(evals["posthoc"])
    return "\n".join(lines) + "\n"


def _note_lines(notes):
    return [line for note in notes or () for line in ("", note)]


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


def evaluate(runs, evals, bn_recompute=True, decay="largest", transfer_dataset=None,
             transfer_data_dir=None, probe_epochs=50, log=print):
    """Runs `evals` on `runs`; returns `(results dict, figures)`.

    `decay`: `"largest"` (default), `"best_on_validation"` or a float; see
    `select_ema`.

    `figures` maps PNG file names to `(probs, labels, title)` of reliability
    diagrams; nothing is written here (see `write_results`).
    """
    unknown = [e for e in evals if e not in EVALS]
    if unknown or not evals:
        raise EvaluationError(
            f"--evals={','.join(evals)}: unknown evaluation "
            f"{unknown[0] if unknown else '(none)'}; use some of {','.join(EVALS)}."
        )
    if "churn" in evals:
        _check_churn(runs)
    if "transfer" in evals and not transfer_dataset:
        raise EvaluationError(
            "--evals=transfer needs --transfer_dataset (e.g. digits, cifar10, "
            "folder:PATH) with images of the runs' size."
        )
    if "label_noise" in evals:
        _check_label_noise(runs)
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
        if name == "generalization":
            results["evals"][name] = evaluate_generalization(ev, runs)
        elif name == "label_noise":
            results["evals"][name] = evaluate_label_noise(ev, runs)
        elif name == "calibration":
            results["evals"][name] = evaluate_calibration(ev, runs, figures)
        elif name == "churn":
            results["evals"][name] = evaluate_churn(ev, runs)
        elif name == "transfer":
            results["evals"][name] = evaluate_transfer(
                ev, runs, transfer_dataset, transfer_data_dir, probe_epochs)
        elif name == "posthoc":  # zoo/posthoc_sweep.py
            from zoo.posthoc_sweep import evaluate_posthoc

            results["evals"][name] = evaluate_posthoc(ev, runs, figures)
    results["notes"] = _notes(ev, runs, results, models)
    return results, figures


def _notes(ev, runs, results, models):
    """`{eval: [line]}`: what a reader would otherwise be puzzled by."""
    ema = next((m for m in models if m.startswith("ema_")), None)
    decay = ev.selection(runs[0], ema)["decay"] if ema else None
    facts = run_facts(ev, runs[0], decay)
    names = results["setup"]["model_names"]
    evals = results["evals"]
    notes = {}
    for name in ("generalization", "label_noise"):
        if name in evals:
            notes[name] = generalization_notes(evals[name]["table"], facts, names)
    if "calibration" in evals:
        notes["calibration"] = calibration_notes(
            evals["calibration"]["table"], facts, names)
    return {k: v for k, v in notes.items() if v}


def write_results(results, figures, output_dir):
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
                       format_markdown(results))
    return os.path.join(output_dir, "results.md")
