"""`label_noise` (Table 2 row): clean test accuracy of runs trained with noisy labels."""

from zoo.evals import GENERALIZATION_MODELS
from zoo.evals import EvaluationError
from zoo.evals.generalization import accuracy_table


def check(runs: list, options) -> None:
    if not runs[0].config.label_noise:
        raise EvaluationError(
            f"--evals=label_noise needs runs trained with --label_noise; "
            f"{runs[0].path} has clean labels."
        )


def run(ev, runs: list, figures: dict, options) -> dict:
    """Table 2: clean test accuracy of runs trained with noisy labels."""
    result = accuracy_table(ev, runs, GENERALIZATION_MODELS)
    result["label_noise"] = runs[0].config.label_noise
    return result
