"""`calibration` (Table 5): accuracy, ECE and ECE after temperature scaling.

ECE with 100 equal-mass bins (%); the temperature is fitted by NLL on each
run's validation split (none without one); reliability diagrams of the
first seed's models.
"""

import numpy as np

from zoo.evals.metrics import aggregate
from zoo.evals.metrics import softmax

check = None  # every finished run has a test split


def run(ev, runs: list, figures: dict, options,
        models=("baseline", "ema_loss")) -> dict:
    """Table 5: accuracy, ECE and ECE after temperature scaling; diagrams."""
    models = ev.models(models)
    per_run = []
    tuned_on = "validation"
    for r in runs:
        has_val = ev.data(r).x_val is not None
        per_run.append({which: _entry(ev, r, which, has_val) for which in models})
        if not has_val:
            tuned_on = None
    first = min(runs, key=lambda r: r.config.seed)
    for which in models:
        figures[f"reliability_{which}.png"] = (
            softmax(ev.logits(first, which)), ev.labels(first),
            f"{ev.name(which)}, seed {first.config.seed}",
        )
    return {"per_run": per_run, "table": aggregate(per_run),
            "temperature_tuned_on": tuned_on, "figure_seed": first.config.seed}


def _entry(ev, run, which, has_val):
    """Accuracy, ECE and, with a validation split, the temperature and ECE after it."""
    from keras_ema.calibration import apply_temperature
    from keras_ema.calibration import expected_calibration_error
    from keras_ema.calibration import fit_temperature

    labels = ev.labels(run)
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
    return entry
