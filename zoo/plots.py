"""Figures of a run: validation curves of SGD and of every EMA."""

import math
import os

from zoo.run import run_dir

EPOCH_LABEL = "epoch (from 0, as in history.csv)"


def ema_columns(row: dict, metric: str = "val_accuracy") -> dict:
    """`{decay: column}` for the `ema_<decay>_<metric>` columns of a history row."""
    out = {}
    for key in row:
        if key.startswith("ema_") and key.endswith("_" + metric):
            decay = key[len("ema_"):-len("_" + metric)]
            try:
                out[float(decay)] = key
            except ValueError:
                continue
    return dict(sorted(out.items()))


def zoom_limits(curves: list, start: int,
                upper: "float | None" = None) -> "tuple | None":
    """The y-limits that show where the curves differ.

    The limits span every finite value of every curve from index `start` on
    (the first epochs, where all curves climb from chance, lie below or above
    them), widened by 8% of that span on each side.

    Args:
        curves: list of lists of floats, one per curve, indexed by epoch.
        start: int, the first index the limits must cover.
        upper: float or `None`, a value the upper limit does not exceed
            (100 for an accuracy in %). Defaults to `None`.

    Returns:
        `(low, high)`, or `None` when no curve has a finite value there.
    """
    values = [v for c in curves for v in c[start:] if math.isfinite(v)]
    if not values:
        return None
    low, high = min(values), max(values)
    margin = 0.08 * (high - low) or 0.05 * abs(high) or 1.0
    low, high = low - margin, high + margin
    if upper is not None and high > upper:
        high = max(upper, max(values)) + 0.2 * margin
    return low, high


def plot_curves(history: list, path: str, title: "str | None" = None) -> None:
    """Writes `curves_figure(history, title)` to `path` (PNG), atomically.

    Args:
        history: list of dicts, the rows of `history.csv`.
        path: str, the PNG to write.
        title: str or `None`, the figure title. Defaults to `None`.
    """
    fig = curves_figure(history, title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with run_dir.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def curves_figure(history: list, title: "str | None" = None):
    """The validation curves of one run, a matplotlib `Figure`.

    Left: validation accuracy, right: validation loss, each for SGD (black)
    and every EMA decay (one color each), with the learning rate (gray,
    dashed, right axis). The epochs are counted from 0, as in
    `history.csv`. The y-axes are zoomed to the last two thirds of the
    epochs, where the curves differ: the first epochs, where every model
    climbs from chance, start below (accuracy) or above (loss) the frame.
    The legend is below the panels.

    Args:
        history: list of dicts, the rows of `history.csv`.
        title: str or `None`, the figure title. Defaults to `None`.

    Returns:
        A `matplotlib.figure.Figure` (no pyplot state): `fig.axes[0]` and
        `fig.axes[1]` hold accuracy and loss.
    """
    from matplotlib.figure import Figure

    epochs = [int(r["epoch"]) for r in history]
    start = len(history) // 3
    fig = Figure(figsize=(11, 4.6))
    panels = fig.subplots(1, 2)
    colors = _ema_colors(len(ema_columns(history[0]) if history else {}))
    for axis, metric, name, scale in (
        (panels[0], "accuracy", "validation accuracy (%)", 100.0),
        (panels[1], "loss", "validation loss", 1.0),
    ):
        curves = []
        sgd = f"val_{metric}"
        if history and sgd in history[0]:
            curve = [scale * r[sgd] for r in history]
            axis.plot(epochs, curve, color="black", linewidth=1.6, label="SGD")
            curves.append(curve)
        columns = ema_columns(history[0], f"val_{metric}") if history else {}
        for color, (decay, column) in zip(colors, columns.items()):
            curve = [scale * r[column] for r in history]
            axis.plot(epochs, curve, color=color, linewidth=1.3,
                      label=f"EMA {decay:g}")
            curves.append(curve)
        limits = zoom_limits(curves, start, upper=100.0 if scale == 100.0 else None)
        if limits is not None:
            axis.set_ylim(*limits)
        if len(epochs) > 1:  # one epoch: matplotlib's default, a point in the middle
            axis.set_xlim(epochs[0], epochs[-1])
        axis.set_xlabel(EPOCH_LABEL)
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        if history and "lr" in history[0]:
            lr_axis = axis.twinx()
            lr_axis.plot(epochs, [r["lr"] for r in history], color="gray",
                         linestyle="--", linewidth=1, label="learning rate")
            lr_axis.set_ylim(0, 1.05 * max(r["lr"] for r in history) or 1)
            lr_axis.set_ylabel("learning rate", color="gray")
            lr_axis.tick_params(axis="y", colors="gray")
    handles, labels = panels[0].get_legend_handles_labels()
    if history and "lr" in history[0]:
        lr_handles = fig.axes[-1].get_legend_handles_labels()
        handles, labels = handles + lr_handles[0], labels + lr_handles[1]
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles),
                   frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def _ema_colors(count):
    """`count` colors from light to dark red-orange: longer memory, darker."""
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    if count <= 1:
        return [cmap(0.35)] * count
    return [cmap(0.75 - 0.6 * i / (count - 1)) for i in range(count)]
