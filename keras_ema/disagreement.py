"""Prediction disagreement between two models: churn and Jensen-Shannon divergence.

Both take the predicted probabilities of two models on the same samples, in
the same order; Keras, JAX or TensorFlow tensors are converted with
`np.asarray`.
"""

import numpy as np
from scipy.special import rel_entr

from keras_ema.checks import check_probability_rows


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
    check_probability_rows("probs_a", p)
    check_probability_rows("probs_b", q)
    # Rounding may leave an entry a hair below 0, where `rel_entr` is infinite.
    p, q = np.maximum(p, 0.0), np.maximum(q, 0.0)
    m = 0.5 * (p + q)
    # rel_entr(p, m) = p log(p / m), 0 where p = 0; where p > 0, m >= p / 2.
    kl_p = rel_entr(p, m).sum(axis=1)
    kl_q = rel_entr(q, m).sum(axis=1)
    return float(np.mean(0.5 * kl_p + 0.5 * kl_q))
