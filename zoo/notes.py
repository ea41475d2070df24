"""Notes under the tables of `results.md` for a puzzled reader.

When no EMA beats the baseline, or temperature scaling raises the ECE, the
report says so under the table with the likely reasons found in the run:
small data, a window shorter than an epoch, a run shorter than the EMA's
warm-up, few epochs. Each function takes the facts of the run (`run_facts`)
and an evaluation's table, and returns the lines.
"""

from zoo.evals import MODEL_NAMES


def notes_of(ev, runs: list, results: dict, models) -> dict:
    """`{eval: [line]}`: what a reader would otherwise be puzzled by.

    Args:
        ev: `zoo.evals.evaluator.Evaluator`. Gives the run's data and EMA.
        runs: list of `zoo.run.runs.Run`. The first one's facts are used.
        results: dict. `evaluate`'s results so far, with `"setup"` and
            `"evals"`.
        models: the evaluated model keys, e.g. `("baseline", "ema_loss")`.
    """
    ema = next((m for m in models if m.startswith("ema_")), None)
    decay = ev.selection(runs[0], ema)["decay"] if ema else None
    facts = run_facts(ev, runs[0], decay)
    names = results["setup"]["model_names"]
    evals = results["evals"]
    out = {}
    for name in ("generalization", "label_noise"):
        if name in evals:
            out[name] = generalization_notes(evals[name]["table"], facts, names)
    if "calibration" in evals:
        out["calibration"] = calibration_notes(
            evals["calibration"]["table"], facts, names)
    return {k: v for k, v in out.items() if v}


def run_facts(ev, run, decay: "float | None") -> dict:
    """The sizes and lengths of `run` that explain its results (see `notes_of`)."""
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
    from keras_ema.decay import warmup_end_step

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


def generalization_notes(table: dict, facts: dict,
                         names: "dict | None" = None) -> list:
    """A line when no EMA row beats the baseline's test accuracy, with why."""
    names = names or MODEL_NAMES
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


def calibration_notes(table: dict, facts: dict,
                      names: "dict | None" = None) -> list:
    """A line per model whose ECE temperature scaling raises, with why."""
    names = names or MODEL_NAMES
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
