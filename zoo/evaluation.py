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
number takes that decay (`zoo.selection.select_ema`).

With `bn_recompute` (the paper's protocol, on by default) the EMA models'
BatchNorm statistics are recomputed on one pass over the training split, in
batches of the training batch size, without augmentation
(`keras_ema.recompute_batch_norm_statistics`) before they are evaluated.

Where the parts are: `zoo.run.runs` loads and checks the runs, `zoo.evals`
holds the evaluations (one module each, by `--evals` name in
`zoo.evals.registry.EVALUATORS`) and the model cache (`zoo.evals.evaluator`),
`zoo.notes` the notes under the tables and `zoo.report` the Markdown. This
module runs them in order: `evaluate`, then `write_results`.
"""

import os
from typing import Callable

from zoo import notes
from zoo import report
from zoo.evals import EVALS
from zoo.evals import GENERALIZATION_MODELS
from zoo.evals import EvaluationError
from zoo.evals.evaluator import Evaluator
from zoo.evals.evaluator import log_info
from zoo.evals.registry import EVALUATORS
from zoo.evals.registry import Evaluation  # noqa: F401 (the registry's entries)
from zoo.evals.registry import Options
from zoo.run import run_dir
from zoo.run.runs import Run  # noqa: F401 (what load_runs returns)
from zoo.run.runs import load_runs  # noqa: F401 (evaluate.py's first step)
from zoo.selection import parse_decay  # noqa: F401 (--decay)
from zoo.selection import select_ema


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
    diagrams, or to a function of the path that draws a figure; nothing is
    written here (see `write_results`).
    """
    log = log or log_info
    options = Options(transfer_dataset, transfer_data_dir, probe_epochs)
    _check(runs, evals, options)
    ev = Evaluator(runs, bn_recompute=bn_recompute, decay=decay, log=log)
    if not ev.early_stopping and ev.decay == "best_on_validation":
        select_ema(runs[0].summary, "last", ev.decay)  # raises: nothing to choose on
    models = ev.models(GENERALIZATION_MODELS)
    setup = _setup(ev, models)
    log(f"Selection: {setup['selection_text']}.")
    log(f"EMA decay: {setup['decay_text']}.")
    results = {
        "setup": setup,
        "selection": {r.name: {m: ev.selection(r, m) for m in models} for r in runs},
        "evals": {},
    }
    figures = {}
    for name in evals:
        log(f"{name}:")
        results["evals"][name] = EVALUATORS[name].run(ev, runs, figures, options)
    results["notes"] = notes.notes_of(ev, runs, results, models)
    return results, figures


def _check(runs, evals, options):
    """Refuses unknown names, then runs every evaluation's check."""
    unknown = [e for e in evals if e not in EVALUATORS]
    if unknown or not evals:
        raise EvaluationError(
            f"--evals={','.join(evals)}: unknown evaluation "
            f"{unknown[0] if unknown else '(none)'}; use some of {','.join(EVALS)}."
        )
    for name in evals:
        if EVALUATORS[name].check is not None:
            EVALUATORS[name].check(runs, options)


def _setup(ev, models):
    """`results["setup"]`: what was evaluated, and how the weights were chosen."""
    runs = ev.runs
    first = runs[0].config
    return {
        "dataset": first.dataset, "model": first.model, "width": first.width,
        "averaging": first.averaging, "label_noise": first.label_noise or None,
        "seeds": len(runs), "seed_values": [r.config.seed for r in runs],
        "runs": [r.path for r in runs], "bn_recompute": ev.bn_recompute,
        "selection_split": runs[0].summary.get("selection_split"),
        "early_stopping": ev.early_stopping,
        "selection_text": _selection_text(runs, ev.early_stopping),
        "decay": ev.decay, "decay_text": _decay_text(runs, ev.decay),
        "model_names": {m: ev.name(m) for m in models},
    }


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
