"""Prediction disagreement between two models: churn and Jensen-Shannon divergence.

Both take the predicted probabilities of two models on the same samples, in
the same order; Keras, JAX or TensorFlow tensors are converted with
`np.asarray`.
"""

import numpy as np

# How far a row may sum from 1 (float32 or float16 softmax outputs).
_ROW_SUM_TOLERANCE = 1e-3


def _check_pair(probs_a, probs_b):
    probs_a = np.asarray(probs_a, dtype=np.float64)
    probs_b = np.asarray(probs_b, dtype=np.float64)
    if probs_a.ndim != 2 or probs_a.shape[0] < 1 or probs_a.shape[1] < 1:
        raise ValueError(
            "Invalid value for argument `probs_a`: expected a 2D array "
            "(samples, classes) with at least one of each. Received: "
            f"probs_a.shape={probs_a.shape}"
        )
    if probs_b.shape != probs_a.shape:
        raise ValueError(
            "`probs_a` and `probs_b` must have the same shape (the same "
            f"samples and classes). Received: probs_a.shape={probs_a.shape}, "
            f"probs_b.shape={probs_b.shape}"
        )
    for name, p in (("probs_a", probs_a), ("probs_b", probs_b)):
        if not np.all(np.isfinite(p)):
            raise ValueError(
                f"Invalid value for argument `{name}`: it holds NaN or "
                "infinite values."
            )
    return probs_a, probs_b


def churn(probs_a, probs_b) -> float:
    """Fraction of samples whose top-1 predictions differ between two models.

    The top-1 class is the `argmax` of a row (the first one on ties), so
    logits give the same result as probabilities.

    Args:
        probs_a: array `(samples, classes)`, the first model's predictions.
        probs_b: array `(samples, classes)`, the second model's predictions.

    Returns:
        The churn as a float in [0, 1]; multiply by 100 for percent.

    Example:

    ```python
    keras_ema.churn(model_seed0.predict(x_test), model_seed1.predict(x_test))
    ```
    """
    probs_a, probs_b = _check_pair(probs_a, probs_b)
    return float(np.mean(probs_a.argmax(axis=1) != probs_b.argmax(axis=1)))


def jensen_shannon(probs_a, probs_b) -> float:
    """Mean Jensen-Shannon divergence (natural log) between two models' predictions.

    For each sample, with `p` and `q` the two predicted distributions and
    `m = (p + q) / 2`,

    ```
    JS(p, q) = 0.5 * KL(p || m) + 0.5 * KL(q || m),  KL(p || m) = sum p log(p / m)
    ```

    with `0 log 0 = 0`; the result is the mean over samples, in nats, between
    0 (identical predictions) and `ln 2`. Rows must sum to 1 within 1e-3;
    they are used as given, not renormalized.

    Args:
        probs_a: array `(samples, classes)` of probabilities, rows summing to 1.
        probs_b: array `(samples, classes)` of probabilities, rows summing to 1.

    Returns:
        The mean divergence as a float.

    Example:

    ```python
    p = keras.ops.softmax(model_seed0.predict(x_test))
    q = keras.ops.softmax(model_seed1.predict(x_test))
    keras_ema.jensen_shannon(p, q)
    ```
    """
    p, q = _check_pair(probs_a, probs_b)
    if p.min() < 0 or q.min() < 0:
        raise ValueError(
            "`probs_a` and `probs_b` must be probabilities (non-negative); "
            "pass softmax outputs, not logits."
        )
    for name, probs in (("probs_a", p), ("probs_b", q)):
        sums = probs.sum(axis=1)
        off = np.abs(sums - 1.0) > _ROW_SUM_TOLERANCE
        if np.any(off):
            raise ValueError(
                f"Invalid value for argument `{name}`: every row must sum to 1 "
                f"(within {_ROW_SUM_TOLERANCE:g}); pass softmax outputs. "
                f"Received: row {int(np.argmax(off))} sums to "
                f"{sums[np.argmax(off)]:.6g}"
            )
    m = 0.5 * (p + q)
    return float(np.mean(0.5 * _kl_rows(p, m) + 0.5 * _kl_rows(q, m)))


def _kl_rows(p, m):
    # Where p > 0, m >= p / 2 > 0, so the ratio is finite.
    positive = p > 0
    terms = np.zeros_like(p)
    terms[positive] = p[positive] * np.log(p[positive] / m[positive])
    return terms.sum(axis=1)
