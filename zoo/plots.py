"""Figures of a run: validation curves of SGD and of every EMA."""

import os

from zoo import run_dir


def ema_columns(row, metric="val_accuracy"):
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


def plot_curves(history, path, title=None):
    """Writes the paper's Fig. 1 layout for one run to `path` (PNG).

    Left: validation accuracy of SGD and of the best EMA at each epoch, with
    the learning rate on a second axis. Right: one curve per EMA decay.

    Args:
        history: list of dicts, the rows of `history.csv`.
        path: str, the PNG to write (atomically).
        title: str or `None`, the figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) + 1 for r in history]
    columns = ema_columns(history[0]) if history else {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if history and "val_accuracy" in history[0]:
        left.plot(epochs, [100 * r["val_accuracy"] for r in history],
                  label="SGD", color="tab:blue")
    if columns:
        best = [100 * max(r[c] for c in columns.values()) for r in history]
        left.plot(epochs, best, label="EMA (best decay per epoch)",
                  color="tab:red")
    left.set_xlabel("epoch")
    left.set_ylabel("validation accuracy (%)")
    left.legend(loc="lower right")
    if history and "lr" in history[0]:
        lr_axis = left.twinx()
        lr_axis.plot(epochs, [r["lr"] for r in history], color="gray",
                     linestyle="--", linewidth=1)
        lr_axis.set_ylabel("learning rate", color="gray")
    for decay, column in columns.items():
        right.plot(epochs, [100 * r[column] for r in history],
                   label=f"EMA {decay}")
    if history and "val_accuracy" in history[0]:
        right.plot(epochs, [100 * r["val_accuracy"] for r in history],
                   label="SGD", color="black", linewidth=1)
    right.set_xlabel("epoch")
    right.set_ylabel("validation accuracy (%)")
    right.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with run_dir.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
