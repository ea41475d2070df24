"""Calibration: expected calibration error, temperature scaling, reliability diagrams.

Everything here is numpy on arrays of predictions; Keras, JAX or TensorFlow
tensors are accepted and converted with `np.asarray`.
"""

import os

import numpy as np
from scipy.special import log_softmax

from keras_ema.checks import as_float
from keras_ema.checks import check_int
from keras_ema.checks import check_probability_rows
from keras_ema.checks import is_probability_rows
from keras_ema.files import atomic_path

BINNINGS = ("equal_mass", "equal_width")

# Temperatures searched by `fit_temperature`: [1/100, 100].
_LOG_TEMPERATURE_BOUND = float(np.log(100.0))


def _check_probs_labels(probs, labels, name="probs"):
    """Float64 `probs` (or logits) and int64 labels, validated."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] < 1:
        raise ValueError(
            f"Invalid value for argument `{name}`: expected a 2D array "
            f"(samples, classes) with at least one of each. Received: "
            f"{name}.shape={probs.shape}"
        )
    if not np.all(np.isfinite(probs)):
        raise ValueError(
            f"Invalid value for argument `{name}`: it holds NaN or infinite "
            "values."
        )
    if name == "probs":
        check_probability_rows("probs", probs)
    if name == "logits" and is_probability_rows(probs):
        raise ValueError(
            "Invalid value for argument `logits`: every row lies in [0, 1] "
            "and sums to 1, so these are probabilities (softmax outputs); "
            "pass the logits (the model's outputs before softmax), e.g. from "
            "a model whose last layer has no softmax activation."
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != probs.shape[:1]:
        raise ValueError(
            "Invalid value for argument `labels`: expected one integer label "
            f"per row of `{name}`, shape ({probs.shape[0]},). Received: "
            f"labels.shape={labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not np.all(labels == np.round(labels)):
            raise ValueError(
                "Invalid value for argument `labels`: expected integer class "
                f"indices. Received dtype {labels.dtype}."
            )
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= probs.shape[1])
    if np.any(bad):
        raise ValueError(
            "Invalid value for argument `labels`: labels must lie in "
            f"[0, {probs.shape[1]}) for {probs.shape[1]} classes. Received: "
            f"label {labels[bad][0]}"
        )
    return probs, labels


def _check_num_bins(num_bins):
    return check_int("num_bins", num_bins)


def _check_binning(binning):
    if binning not in BINNINGS:
        raise ValueError(
            f"Invalid value for argument `binning`: expected one of {BINNINGS}. "
            f"Received: binning={binning!r}"
        )
    return binning


def _bins(confidence, num_bins, binning):
    """The bin index of every sample."""
    n = confidence.shape[0]
    if binning == "equal_width":
        # Bin b is [b / B, (b + 1) / B); the last one also holds 1.0.
        # `floor(c * B)` can be one off at an edge (0.57 * 100 is
        # 56.99999999999999): move it to the bin whose edges `b / B` hold c.
        index = np.clip(
            np.floor(confidence * num_bins).astype(np.int64), 0, num_bins - 1
        )
        index = index - (confidence < index / num_bins)
        index = index + (confidence >= (index + 1) / num_bins)
        return np.clip(index, 0, num_bins - 1)
    order = np.argsort(confidence, kind="stable")
    index = np.empty(n, dtype=np.int64)
    for b, members in enumerate(np.array_split(order, num_bins)):
        index[members] = b
    return index


def calibration_bins(
    probs, labels, num_bins: int = 100, binning: str = "equal_mass"
) -> tuple:
    """Per-bin counts, accuracies and mean confidences of top-1 predictions.

    Args:
        probs: array `(samples, classes)` of predicted probabilities.
        labels: array `(samples,)` of integer class labels.
        num_bins: int >= 1. The number of bins. Defaults to `100`.
        binning: str. `"equal_mass"` or `"equal_width"`, as in
            `expected_calibration_error`. Defaults to `"equal_mass"`.

    Returns:
        A tuple `(counts, accuracy, confidence)` of arrays of length
        `num_bins`; empty bins have count 0, accuracy and confidence NaN.
    """
    probs, labels = _check_probs_labels(probs, labels)
    num_bins = _check_num_bins(num_bins)
    binning = _check_binning(binning)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    index = _bins(confidence, num_bins, binning)
    counts = np.bincount(index, minlength=num_bins)
    correct_sums = np.bincount(index, weights=correct, minlength=num_bins)
    confidence_sums = np.bincount(index, weights=confidence, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts, correct_sums / counts, confidence_sums / counts


def expected_calibration_error(
    probs, labels, num_bins: int = 100, binning: str = "equal_mass"
) -> float:
    """Expected calibration error (ECE) of the top-1 predictions, a fraction.

    The confidence of a sample is its largest probability, its prediction
    that class (the first one on ties, as `argmax`). Samples are grouped in
    bins by confidence and

    ```
    ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|
    ```

    with `n_b` the samples in bin `b`, `accuracy_b` the fraction of them
    predicted correctly and `confidence_b` their mean confidence. Empty bins
    contribute nothing.

    - `"equal_mass"` (Nixon et al., 2019, the paper's metric with 100 bins):
      the samples sorted by confidence (a stable sort: ties keep their input
      order) are split into `num_bins` consecutive groups as
      `np.array_split` does: with `N = q * num_bins + r`, the first `r` bins
      hold `q + 1` samples and the others `q`. With fewer samples than bins,
      every sample has its own bin and the remaining bins are empty.
    - `"equal_width"`: bin `b` holds the confidences in
      `[b / num_bins, (b + 1) / num_bins)`; the last bin also holds 1.0. A
      confidence `c` goes to bin `min(floor(c * num_bins), num_bins - 1)`.

    Args:
        probs: array `(samples, classes)` of predicted probabilities (softmax
            outputs, not logits): in [0, 1], each row summing to 1 within
            1e-3.
        labels: array `(samples,)` of integer class labels in
            `[0, classes)`.
        num_bins: int >= 1. The number of bins. Defaults to `100`.
        binning: str. `"equal_mass"` or `"equal_width"`. Defaults to
            `"equal_mass"`.

    Returns:
        The ECE as a float in [0, 1]; multiply by 100 for percent.

    Example:

    ```python
    probs = keras.ops.softmax(model.predict(x_test))
    ece = keras_ema.expected_calibration_error(probs, y_test)
    ```
    """
    counts, accuracy, confidence = calibration_bins(
        probs, labels, num_bins, binning
    )
    full = counts > 0
    weights = counts[full] / counts.sum()
    return float(np.sum(weights * np.abs(accuracy[full] - confidence[full])))


def _check_temperature(temperature):
    t = as_float(temperature)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(
            "Invalid value for argument `temperature`: expected a finite "
            f"float > 0. Received: temperature={temperature!r}"
        )
    return t


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Probabilities `softmax(logits / temperature)`, computed stably.

    Args:
        logits: array `(samples, classes)` of logits.
        temperature: float > 0. Above 1 softens the predictions, below 1
            sharpens them; the top-1 class is unchanged.

    Returns:
        A float64 array of the shape of `logits` whose rows sum to 1.

    Example:

    ```python
    t = keras_ema.fit_temperature(model.predict(x_val), y_val)
    probs = keras_ema.apply_temperature(model.predict(x_test), t)
    ```
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(
            "Invalid value for argument `logits`: expected a 2D array "
            "(samples, classes) with at least one class. Received: "
            f"logits.shape={logits.shape}"
        )
    if not np.all(np.isfinite(logits)):
        raise ValueError(
            "Invalid value for argument `logits`: it holds NaN or infinite "
            "values."
        )
    t = _check_temperature(temperature)
    return np.exp(log_softmax(logits / t, axis=1))


def fit_temperature(logits, labels) -> float:
    """The temperature that minimizes the negative log-likelihood (NLL).

    Temperature scaling (Guo et al., 2017) divides the logits by one scalar
    `T > 0` fitted on held-out data; accuracy is unchanged. The mean NLL of
    `softmax(logits / T)` is minimized over `log T` with scipy's bounded
    Brent method, for `T` in [0.01, 100]; the NLL is a convex function of
    `1 / T`, so the minimum found is the global one in that range (a bound is
    returned when the data pushes `T` beyond it, e.g. perfectly separated
    logits).

    Probabilities are refused: a `ValueError` is raised when every row lies
    in [0, 1] and sums to 1, since the temperature fitted to softmax outputs
    means nothing.

    Args:
        logits: array `(samples, classes)` of logits on held-out data (not
            softmax outputs).
        labels: array `(samples,)` of integer class labels.

    Returns:
        The temperature as a float.

    Example:

    ```python
    t = keras_ema.fit_temperature(model.predict(x_val), y_val)
    ece = keras_ema.expected_calibration_error(
        keras_ema.apply_temperature(model.predict(x_test), t), y_test)
    ```
    """
    from scipy import optimize

    logits, labels = _check_probs_labels(logits, labels, name="logits")
    rows = np.arange(labels.shape[0])

    def nll(log_t):
        return -np.mean(log_softmax(logits / np.exp(log_t), axis=1)[rows, labels])

    result = optimize.minimize_scalar(
        nll,
        bounds=(-_LOG_TEMPERATURE_BOUND, _LOG_TEMPERATURE_BOUND),
        method="bounded",
        options={"xatol": 1e-7},
    )
    return float(np.exp(result.x))


def reliability_diagram(
    probs,
    labels,
    path: str,
    num_bins: int = 15,
    binning: str = "equal_width",
    title: str | None = None,
) -> str:
    """Writes a reliability diagram (accuracy against confidence) as a PNG.

    One bar per non-empty bin, spanning the bin (`"equal_width"`) or the
    confidences it holds (`"equal_mass"`), as high as the bin's accuracy; a
    dot marks the bin's mean confidence. A calibrated model's bars reach the
    diagonal. Under it, a histogram on a log scale shows how many
    predictions each bin holds, so a bar far from the diagonal can be told
    from one that holds a handful of samples. The legend, below the plots,
    gives the ECE as `expected_calibration_error` computes it by default
    (100 equal-mass bins, the number the evaluation tables report), whatever
    bins are drawn. The file is written under a temporary name in the same
    directory and renamed, so `path` never holds a partial image.

    Args:
        probs: array `(samples, classes)` of predicted probabilities.
        labels: array `(samples,)` of integer class labels.
        path: str. The PNG file to write; its directory is created.
        num_bins: int >= 1. The number of bins drawn. Defaults to `15`.
        binning: str. `"equal_width"` or `"equal_mass"`, the bins drawn.
            Defaults to `"equal_width"`.
        title: str or `None`. The figure title; name the model and seed.
            Defaults to `None` ("Reliability diagram").

    Returns:
        `path`.

    Example:

    ```python
    keras_ema.reliability_diagram(probs, y_test, "runs/ema_0.998_reliability.png",
                                  title="EMA 0.998, seed 0")
    ```
    """
    fig = reliability_figure(probs, labels, num_bins, binning, title)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def reliability_figure(
    probs,
    labels,
    num_bins: int = 15,
    binning: str = "equal_width",
    title: str | None = None,
):
    """The `matplotlib.figure.Figure` that `reliability_diagram` writes.

    Its first axes hold the bars of accuracy per bin, its second the
    histogram of predictions per bin; the legend (a figure legend, below
    both) gives the ECE with 100 equal-mass bins.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "reliability_diagram draws with matplotlib, which is not "
            "installed: pip install matplotlib (or keras-ema[zoo])."
        ) from None

    probs, labels = _check_probs_labels(probs, labels)
    num_bins = _check_num_bins(num_bins)
    binning = _check_binning(binning)
    counts, accuracy, confidence = calibration_bins(
        probs, labels, num_bins, binning
    )
    ece = expected_calibration_error(probs, labels)
    full = counts > 0
    if binning == "equal_width":
        left = np.arange(num_bins) / num_bins
        right = left + 1.0 / num_bins
    else:
        conf = probs.max(axis=1)
        index = _bins(conf, num_bins, binning)
        left = np.array([conf[index == b].min() if c else 0 for b, c in
                         enumerate(counts)])
        right = np.array([conf[index == b].max() if c else 0 for b, c in
                          enumerate(counts)])
    width = np.maximum(right - left, 0.004)
    drawn = f"{num_bins} {binning.replace('_', '-')} bins"

    fig = Figure(figsize=(5, 6.6))
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax = fig.add_subplot(grid[0])
    hist = fig.add_subplot(grid[1], sharex=ax)
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1,
            label="perfect calibration")
    ax.bar(left[full], accuracy[full], width=width[full], align="edge",
           color="tab:blue", edgecolor="black", linewidth=0.5, alpha=0.8,
           label=f"accuracy per bin ({drawn})")
    ax.plot(confidence[full], accuracy[full], "o", color="tab:red",
            markersize=3, label="mean confidence per bin")
    ax.plot([], [], " ", label=f"ECE {100 * ece:.2f}% (100 equal-mass bins)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.tick_params(labelbottom=False)
    ax.set_title(title or "Reliability diagram")
    hist.bar(left[full], counts[full], width=width[full], align="edge",
             color="0.6", edgecolor="black", linewidth=0.5)
    hist.set_yscale("log")
    hist.set_ylim(0.7, counts.max() * 2.0)
    hist.set_ylabel("predictions\n(log scale)")
    hist.set_xlabel("confidence (top-1 probability)")
    handles, names = ax.get_legend_handles_labels()
    # Column by column: the ECE and the bars, then the two references.
    order = [names.index(n) for n in sorted(
        names, key=lambda n: ("ECE" not in n, "accuracy" not in n, "perfect" not in n))]
    handles, names = [handles[i] for i in order], [names[i] for i in order]
    fig.legend(handles, names, loc="upper center", fontsize="small",
               bbox_to_anchor=(0.5, 0.02), ncol=2, frameon=False)
    return fig
