"""The numbers the evaluations share: accuracy and loss of logits, and the
mean ± sample std of a value over seeds."""

import numpy as np

from keras_ema.checks import is_real


def accuracy_and_loss(logits, labels) -> tuple:
    """Top-1 accuracy and mean softmax cross-entropy of `logits`."""
    from scipy.special import log_softmax

    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    loss = float(-np.mean(log_softmax(logits, axis=1)[np.arange(len(labels)), labels]))
    return accuracy, loss


def softmax(logits) -> np.ndarray:
    from scipy.special import softmax as _softmax

    return _softmax(np.asarray(logits, np.float64), axis=1)


def mean_std(values) -> dict:
    """`{"mean", "std", "n", "values"}`; std is the sample std (ddof=1), 0 for one value."""
    values = [float(v) for v in values]
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def aggregate(per_run: list) -> dict:
    """Per-run `{model: {metric: value}}` dicts to `{model: {metric: mean_std}}`."""
    out = {}
    for model in per_run[0]:
        out[model] = {
            metric: mean_std([r[model][metric] for r in per_run])
            for metric in per_run[0][model]
            if is_real(per_run[0][model][metric])
        }
    return out
