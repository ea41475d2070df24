"""The run's curves.png: what a reader sees on each axis."""

import math

import numpy as np

from zoo import plots


def _history(epochs=12):
    """SGD climbs and zig-zags, the EMAs climb faster and stay above it."""
    rows = []
    for e in range(epochs):
        sgd = 0.1 + 0.8 * (1 - math.exp(-e / 3)) - (0.05 if e % 2 else 0.0)
        row = {"epoch": e, "lr": 0.1 * (1 - e / epochs), "val_accuracy": sgd,
               "val_loss": 2.5 - 2 * sgd}
        for i, decay in enumerate((0.9, 0.99)):
            ema = min(0.97, 0.15 + 0.85 * (1 - math.exp(-e / 2)) - 0.01 * i)
            row[f"ema_{decay}_val_accuracy"] = ema
            row[f"ema_{decay}_val_loss"] = 2.4 - 2 * ema
        rows.append(row)
    return rows


def test_curves_show_accuracy_and_loss_of_sgd_and_each_ema_from_epoch_0(tmp_path):
    history = _history()
    fig = plots.curves_figure(history, title="t")
    accuracy, loss = fig.axes[0], fig.axes[1]
    for axis, metric, scale in ((accuracy, "accuracy", 100), (loss, "loss", 1)):
        labels = [line.get_label() for line in axis.get_lines()]
        assert labels == ["SGD", "EMA 0.9", "EMA 0.99"]
        assert axis.get_xlabel() == "epoch (from 0, as in history.csv)"
        assert axis.get_xlim() == (0, 11)
        np.testing.assert_array_equal(axis.get_lines()[0].get_xdata(), range(12))
        # Zoomed: the limits cover every curve from epoch 12 // 3 = 4 on,
        # and no more than 8% of that span beyond it (a hand computation).
        later = [scale * r[k] for r in history[4:] for k in r
                 if k.endswith("val_" + metric)]
        low, high = axis.get_ylim()
        span = max(later) - min(later)
        assert low <= min(later) and high >= max(later)
        assert min(later) - low <= 0.081 * span and high - max(later) <= 0.081 * span
        # The first epoch lies outside: the zoom is where the curves differ.
        assert scale * history[0]["val_" + metric] < low or \
            scale * history[0]["val_" + metric] > high
        legend_axis = axis.get_legend()
        assert legend_axis is None  # the legend is below the panels
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "SGD", "EMA 0.9", "EMA 0.99", "learning rate"]
    # The learning rate on a second axis, full range.
    lr_axis = fig.axes[2]
    assert lr_axis.get_ylim()[0] == 0 and lr_axis.get_ylim()[1] >= 0.1
    plots.plot_curves(history, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_zoom_stops_near_100_percent():
    history = _history()
    for row in history:
        row["ema_0.9_val_accuracy"] = 1.0
    low, high = plots.curves_figure(history).axes[0].get_ylim()
    assert 100 <= high <= 101
