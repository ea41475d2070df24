"""`evaluate.py --evals=posthoc`: choose the averaging after training.

For each run trained with `--snapshot_every`, a grid of targets is
synthesized from `RUN/snapshots` (`keras_ema.posthoc`) at the last snapshot:
classic EMAs with half-lives from `HALF_LIVES_FRACTIONS` of the run's length
and EDM2 power EMAs with `SIGMA_RELS`. Each candidate is assigned into the
run's final model (non-averaged variables keep their final values), its
BatchNorm statistics are recomputed on the training split (with
`bn_recompute`), and it is evaluated on the validation split (the test split
with `--val_fraction=0`, which the results then say). The best candidate by
validation accuracy and by validation loss is reported. A candidate whose
error bound (`Report.error_bound`: profile error plus the snapshots' float32
rounding amplified by the coefficients, relative to the candidate's distance
from the live weights) is above `MAX_ERROR` is skipped, and the log and
results say which and why. With `--ema_period=P` the targets are defined on
the iterates the EMAs read (iterate 0 and the multiples of P). Then
`posthoc_<run>.png` plots validation accuracy and loss against the averaging
length (mean age of the averaged iterates, in optimizer steps, log axis),
the run's tracked decays marked.
"""

import os

import numpy as np

from zoo.evals import EvaluationError

# EMA half-lives as fractions of the run's optimizer steps, and power EMAs.
# With the warm-up min(a, (t+1)/(t+10)) an EMA's half-life at step N cannot
# exceed about 0.08 N: longer ones give the same profile and are dropped.
HALF_LIVES_FRACTIONS = (0.003, 0.006, 0.012, 0.025, 0.05, 0.1)
# Candidates whose error bound is above this are skipped: listed with the
# reason, neither evaluated, plotted nor chosen.
MAX_ERROR = 0.05
SIGMA_RELS = (0.03, 0.05, 0.08, 0.10, 0.15, 0.20, 0.28)


def targets(step: int, period: int, warmup: bool) -> list:
    """`[(label, kind, profile)]` of the sweep at target step `step`."""
    from keras_ema import posthoc

    out, seen = [], []
    for f in HALF_LIVES_FRACTIONS:
        half_life = max(f * step, 2.0 * period)
        decay = 0.5 ** (period / half_life)
        profile = posthoc.EMAProfile(decay, period=period, warmup=warmup)
        weights = profile.weights(step)
        if any(np.allclose(weights, w, rtol=1e-9, atol=1e-12) for w in seen):
            continue  # the warm-up caps it: same average as a shorter one
        seen.append(weights)
        out.append((f"EMA half-life {half_life:.0f} steps (decay {decay:.5f})",
                    "ema", profile))
    for s in SIGMA_RELS:
        out.append((f"power EMA sigma_rel {s:g}", "power", posthoc.PowerProfile(s)))
    return out


def evaluate_posthoc(ev, runs: list, figures: dict) -> dict:
    """The sweep for every run; fills `figures` with one plot per run."""
    per_run = {}
    for run in runs:
        per_run[run.name], figures[f"posthoc_{run.name}.png"] = _sweep(ev, run)
    return {"per_run": per_run}


def _sweep(ev, run):
    """`(result, plotter)` of the sweep of one run at its last snapshot."""
    from keras_ema import posthoc

    snap = os.path.join(run.path, "snapshots")
    snaps = posthoc.list_snapshots(snap) if os.path.isdir(snap) else []
    if not snaps:
        raise EvaluationError(
            f"--evals=posthoc: {run.path} has no snapshots; train it with "
            "--snapshot_every=N (optimizer steps) first."
        )
    c = run.config
    data = ev.data(run)
    split = "validation" if data.x_val is not None else "test"
    model = ev.model(run, "baseline")  # the final weights, cached
    step = _last_readable_step(snaps)
    rows = _candidates(ev, run, model, snap, step, split)
    tracked = {}
    for d in c.ema_decays:
        tracked[str(d)] = posthoc.EMAProfile(
            d, period=c.ema_period, warmup=c.ema_warmup).length(step)
    reachable = [r for r in rows if r["reachable"]]
    best_acc = max(reachable, key=lambda r: (r["accuracy"], -r["loss"]),
                   default=None)
    best_loss = min(reachable, key=lambda r: r["loss"], default=None)
    if not reachable:
        ev.log(f"  {run.name}: no candidate is matched within error bound "
               f"{MAX_ERROR}: snapshot more often (--snapshot_every) or track "
               "more decays (--ema_decays).")
    result = {
        "step": step, "split": split, "candidates": rows,
        "tracked_lengths": tracked,
        "best_accuracy": best_acc, "best_loss": best_loss,
    }
    return result, _plotter(
        reachable, tracked,
        f"{run.name}: post-hoc EMA at step {step}, {split} split, BN recomputed")


def _candidates(ev, run, model, snap, step, split):
    """A row per target: synthesized into the final model and evaluated on
    `split`, or skipped with the reason; the final weights are restored."""
    import keras

    from keras_ema import posthoc

    saved = [keras.ops.convert_to_numpy(v) for v in model.weights]
    c = run.config
    rows = []
    try:
        for label, kind, target in targets(step, c.ema_period, c.ema_warmup):
            try:
                report = posthoc.synthesize_into(model, snap, target, step,
                                                 max_error=MAX_ERROR)
            except posthoc.UnmatchedTargetError as e:
                rows.append({"target": label, "kind": kind,
                             "length": target.length(step), "reachable": False,
                             "skipped": str(e)})
                ev.log(f"  {run.name}: {label}: skipped: {e}")
                continue
            except ValueError as e:  # a damaged or foreign snapshot
                raise EvaluationError(f"--evals=posthoc: {run.path}: {e}") from None
            rows.append(_evaluated(ev, run, model, split, label, kind, report))
    finally:
        for v, value in zip(model.weights, saved):
            v.assign(value)
    return rows


def _evaluated(ev, run, model, split, label, kind, report):
    """The row of a synthesized candidate: BN recomputed, then evaluated on `split`."""
    from zoo.data.loader import ArrayLoader
    from zoo.evals.metrics import accuracy_and_loss
    from zoo.trained_model import recompute_bn

    data = ev.data(run)
    x = data.x_val if data.x_val is not None else data.x_test
    y = data.y_val if data.y_val is not None else data.y_test
    if ev.bn_recompute:
        recompute_bn(model, run.config, data)
    logits = model.predict(ArrayLoader(x, None, 256, data.mean, data.std),
                           verbose=0)
    accuracy, loss = accuracy_and_loss(logits, y)
    ev.log(f"  {run.name}: {label}: {split} accuracy "
           f"{100 * accuracy:.2f}%, loss {loss:.4f}, error bound "
           f"{report.error_bound:.2e} (profile error "
           f"{report.profile_error:.2e})")
    return {
        "target": label, "kind": kind,
        "length": report.length,
        "profile_error": report.profile_error,
        "error_bound": report.error_bound,
        "accuracy": 100 * accuracy, "loss": loss,
        "reachable": True,
    }


def _last_readable_step(snaps):
    """The step of the last snapshot that reads (a damaged one is left out
    with a warning by `keras_ema.posthoc`; if all are, it says so)."""
    from keras_ema import posthoc

    for step, path in reversed(snaps):
        try:
            posthoc.read_meta(path)
            return step
        except ValueError:
            continue
    return snaps[-1][0]


def _plotter(rows, tracked, title):
    def draw(path):
        plot_sweep(rows, tracked, path, title)
    return draw


def plot_sweep(rows: list, tracked: dict, path: str,
               title: "str | None" = None) -> None:
    """Accuracy and loss against averaging length (log x), written atomically."""
    from matplotlib.figure import Figure

    from zoo.run import run_dir

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    styles = {"ema": ("tab:blue", "o", "classic EMA"),
              "power": ("tab:orange", "s", "power EMA (EDM2)")}
    for ax, key, name in ((axes[0], "accuracy", "validation accuracy (%)"),
                          (axes[1], "loss", "validation loss")):
        for kind, (color, marker, label) in styles.items():
            pts = sorted((r["length"], r[key]) for r in rows if r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, label=label)
        if rows:
            best = (max if key == "accuracy" else min)(
                rows, key=lambda r: (r[key], -r["loss"]) if key == "accuracy" else r[key])
            ax.plot([best["length"]], [best[key]], marker="*", markersize=16,
                    color="tab:red", linestyle="none", label="best", zorder=5)
        for i, (decay, length) in enumerate(sorted(tracked.items(), key=lambda t: t[1])):
            ax.axvline(length, color="gray", linestyle="--", linewidth=1,
                       label="tracked decays" if i == 0 else None)
            ax.annotate(f"{decay} ", (length, 0.97), xycoords=("data", "axes fraction"),
                        rotation=90, fontsize=8, color="dimgray",
                        ha="right", va="top")
        if key == "accuracy" and rows:
            low = min(r["accuracy"] for r in rows)
            ax.set_ylim(max(0.0, low - 2.0), 100.5)
        ax.set_xscale("log")
        ax.set_xlabel("averaging length (mean age of averaged iterates, steps)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with run_dir.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
