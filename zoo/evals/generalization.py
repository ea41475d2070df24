"""`generalization` (Table 1): test accuracy and loss of SGD and the EMAs."""

from zoo.evals import GENERALIZATION_MODELS
from zoo.evals.metrics import accuracy_and_loss
from zoo.evals.metrics import aggregate

check = None  # every finished run has a test split


def accuracy_table(ev, runs: list, models) -> dict:
    """Test accuracy (%) and loss of `models` of every run, and their mean ± std."""
    models = ev.models(models)
    per_run = []
    for run in runs:
        row = {}
        for which in models:
            acc, loss = accuracy_and_loss(ev.logits(run, which), ev.labels(run))
            row[which] = {"accuracy": 100 * acc, "loss": loss}
        per_run.append(row)
    return {"per_run": per_run, "table": aggregate(per_run)}


def run(ev, runs: list, figures: dict, options) -> dict:
    """Table 1: test accuracy and loss of SGD and the EMAs."""
    return accuracy_table(ev, runs, GENERALIZATION_MODELS)
