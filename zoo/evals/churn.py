"""`churn` (Table 3): disagreement between the test predictions of seeds.

Pairwise churn (%) and Jensen-Shannon divergence for every pair of runs;
baseline and EMA at lowest loss.
"""

import itertools

from zoo.evals import EvaluationError
from zoo.evals.metrics import mean_std
from zoo.evals.metrics import softmax


def check(runs: list, options) -> None:
    if len(runs) < 2:
        raise EvaluationError(
            f"--evals=churn compares seeds: it needs at least two runs, got "
            f"{len(runs)} ({runs[0].path})."
        )


def run(ev, runs: list, figures: dict, options,
        models=("baseline", "ema_loss")) -> dict:
    """Table 3: churn and Jensen-Shannon divergence between pairs of seeds."""
    from keras_ema.disagreement import churn
    from keras_ema.disagreement import jensen_shannon

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
