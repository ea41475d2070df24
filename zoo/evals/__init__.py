"""The paper's evaluations of finished runs, one per file: names and help.

This file imports nothing (evaluate.py's `--help` reads `EVALS` without
Keras); the modules beside it hold the evaluations, each with its `check`
(raises `EvaluationError` before any model is built when the runs or
options cannot give it, or `None`) and its `run` (computes the result):

- `generalization` (Table 1): test accuracy and loss of the models.
- `label_noise` (Table 2 row): clean test accuracy of the models of runs
  trained with noisy labels.
- `calibration` (Table 5): accuracy, ECE (100 equal-mass bins, %) and ECE
  after temperature scaling, the temperature fitted by NLL on the run's
  validation split; baseline and EMA at lowest loss; reliability diagrams.
- `churn` (Table 3): pairwise churn (%) and Jensen-Shannon divergence of the
  test predictions of every pair of seeds; baseline and EMA at lowest loss.
- `transfer` (Table 4): linear-probe test accuracy of each model's frozen
  features on another dataset.
- `posthoc`: the post-hoc EMA sweep over each run's snapshots
  (`zoo.posthoc_sweep`).

`registry.EVALUATORS` joins each name to its module; `evaluator.Evaluator`
builds each run's models once and caches their logits; `metrics` holds
the numbers they share. Numbers are the mean and sample standard deviation
(ddof=1) over seeds, or over pairs of seeds for churn. See `zoo.evaluation`
for the models a run contributes and how their epochs and decay are chosen.
"""

# The `--evals` names and what each computes (a line of `evaluate.py
# --help`), in the order of the registry.
EVALS = {
    "generalization": "test accuracy and loss (Table 1)",
    "label_noise": "clean test accuracy of --label_noise runs (Table 2)",
    "calibration": "ECE before and after temperature scaling (Table 5)",
    "churn": "disagreement between seeds; needs two or more runs, skipped "
             "by default with one (Table 3)",
    "transfer": "linear probe on --transfer_dataset (Table 4)",
    "posthoc": "post-hoc EMA sweep; needs train.py --snapshot_every",
}

MODELS = ("baseline", "ema_accuracy", "ema_loss")
# The generalization tables also show SGD early-stopped at its best epoch.
GENERALIZATION_MODELS = ("baseline", "sgd_best_accuracy", "ema_accuracy", "ema_loss")
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


class EvaluationError(ValueError):
    """Runs cannot be evaluated as asked; the message says which and why."""
