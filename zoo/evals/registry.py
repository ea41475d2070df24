"""The evaluations by `--evals` name (as big_vision's evaluators): `EVALUATORS`.

Each evaluation is a module of `zoo.evals` named after it, with its `check`
and `run`; its help line is in `zoo.evals.EVALS`, which gives the order.
To add one: a module with `check` and `run`, a line in `EVALS`, and an
entry in `_MODULES` below.
"""

import dataclasses
from typing import Callable

from zoo.evals import EVALS
from zoo.evals import calibration
from zoo.evals import churn
from zoo.evals import generalization
from zoo.evals import label_noise
from zoo.evals import posthoc
from zoo.evals import transfer


@dataclasses.dataclass(frozen=True)
class Options:
    """The settings of `zoo.evaluation.evaluate` that single evaluations read."""

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
            evaluation, before any model is built; `run` trusts it.
    """

    name: str
    help: str
    run: "Callable[[object, list, dict, Options], dict]"
    check: "Callable[[list, Options], None] | None" = None


_MODULES = {"generalization": generalization, "label_noise": label_noise,
            "calibration": calibration, "churn": churn, "transfer": transfer,
            "posthoc": posthoc}

EVALUATORS: "dict[str, Evaluation]" = {
    name: Evaluation(name, help, _MODULES[name].run, _MODULES[name].check)
    for name, help in EVALS.items()
}
