"""`results.md`: the results of `zoo.evaluation.evaluate` as Markdown tables.

Only formatting lives here: every number, name and note comes from the
results dict. One function per section of the report; `SECTIONS` gives
their order, which is not the order of `--evals`.
"""

from zoo.evals import MODEL_NAMES


def fmt(stat: dict, digits: int) -> str:
    """`"mean ± std"` of a `zoo.evals.metrics.mean_std` dict; the mean alone for one value."""
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def table(header: list, rows: list) -> str:
    """A Markdown table of `header` and `rows` (lists of cell strings)."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def note_lines(notes) -> list:
    """Each note as its own paragraph (an empty line before it)."""
    return [line for note in notes or () for line in ("", note)]


def _header(results, names):
    setup = results["setup"]
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
    return lines


def _generalization(e, names, notes):
    t = e["table"]
    return ["", "## Generalization (Table 1)", "",
            table(["Model", "Test accuracy (%)", "Test loss"],
                  [[names[m], fmt(t[m]["accuracy"], 2), fmt(t[m]["loss"], 4)]
                   for m in t]),
            *note_lines(notes)]


def _label_noise(e, names, notes):
    t = e["table"]
    return ["", f"## Label noise {e['label_noise']} (Table 2)", "",
            table(["Model", "Clean test accuracy (%)", "Test loss"],
                  [[names[m], fmt(t[m]["accuracy"], 2), fmt(t[m]["loss"], 4)]
                   for m in t]),
            *note_lines(notes)]


def _churn(e, names, notes):
    t = e["table"]
    return ["", "## Prediction disagreement between seeds (Table 3)", "",
            table(["Model", "Churn (%)", "JS divergence"],
                  [[names[m], fmt(t[m]["churn"], 2), fmt(t[m]["jensen_shannon"], 4)]
                   for m in t])]


def _transfer(e, names, notes):
    t = e["table"]
    return ["", f"## Linear probe on {e['transfer_dataset']} (Table 4)", "",
            table(["Model", "Test accuracy (%)"],
                  [[names[m], fmt(t[m]["accuracy"], 2)] for m in t])]


def _calibration(e, names, notes):
    t = e["table"]
    rows = []
    for m in t:
        ts = fmt(t[m]["ece_ts"], 2) if "ece_ts" in t[m] else "-"
        rows.append([names[m], fmt(t[m]["accuracy"], 2), fmt(t[m]["ece"], 2), ts])
    return ["", "## Calibration (Table 5)", "",
            table(["Model", "Accuracy (%)", "ECE (%)", "ECE after TS (%)"], rows),
            "", "ECE: 100 equal-mass bins on the top-1 confidence. "
            + ("Temperature fitted by NLL on each run's validation split."
               if e["temperature_tuned_on"] else
               "No validation split (--val_fraction=0): no temperature scaling."),
            *note_lines(notes),
            "", f"Reliability diagrams of seed {e['figure_seed']} on test "
            "(the bars: 15 equal-width bins; under them, the predictions "
            "per bin; the legend's ECE: 100 equal-mass bins, as the table):"
            if "figure_seed" in e else "Reliability diagrams on test:",
            "", "  ".join(f"![{names[m]}](reliability_{m}.png)" for m in t)]


def posthoc_markdown(result: dict) -> list:
    """Markdown lines of the post-hoc sweep's results (`zoo.posthoc_sweep`)."""
    lines = ["", "## Post-hoc EMA sweep", ""]
    for name, r in result["per_run"].items():
        lines += [f"{name}: step {r['step']}, metrics on the {r['split']} split, "
                  "BN statistics recomputed per candidate.", "",
                  "| Target | Length (steps) | Error bound | Accuracy (%) | Loss |",
                  "|---|---|---|---|---|"]
        skipped = []
        for c in r["candidates"]:
            if c.get("skipped"):
                skipped.append(f"- {c['target']}: {c['skipped']}")
                lines.append(f"| {c['target']} (skipped: not matched) | "
                             f"{c['length']:.0f} | - | - | - |")
                continue
            lines.append(f"| {c['target']} | {c['length']:.0f} | "
                         f"{c.get('error_bound', c['profile_error']):.1e} | "
                         f"{c['accuracy']:.2f} | {c['loss']:.4f} |")
        if skipped:
            lines += ["", "Skipped (the snapshots cannot match them within the "
                      "error bound accepted):", *skipped]
        if r["best_accuracy"] is None:
            lines += ["", "No candidate is matched: snapshot more often "
                      "(--snapshot_every) or track more decays (--ema_decays)."]
        else:
            lines += ["", f"Best by accuracy: {r['best_accuracy']['target']} "
                      f"({r['best_accuracy']['accuracy']:.2f}%); best by loss: "
                      f"{r['best_loss']['target']} ({r['best_loss']['loss']:.4f})."]
        lines += ["", f"![post-hoc sweep](posthoc_{name}.png)"]
    return lines


def _posthoc(e, names, notes):
    return posthoc_markdown(e)


# `(evaluation, section)` in the order of the report; a section is
# `(result, model names, notes) -> lines`.
SECTIONS = (
    ("generalization", _generalization),
    ("label_noise", _label_noise),
    ("churn", _churn),
    ("transfer", _transfer),
    ("calibration", _calibration),
    ("posthoc", _posthoc),
)


def format_markdown(results: dict) -> str:
    """The tables of `results` (see `zoo.evaluation.evaluate`) as Markdown."""
    names = results["setup"].get("model_names", MODEL_NAMES)
    notes = results.get("notes", {})
    lines = _header(results, names)
    for name, section in SECTIONS:
        if name in results["evals"]:
            lines += section(results["evals"][name], names, notes.get(name))
    return "\n".join(lines) + "\n"
