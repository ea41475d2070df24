"""Argument checks shared by the package and the experiment kit.

Each check returns the value as a plain Python number, or raises a one-line
`ValueError` in Keras' form, naming the argument and echoing what it got:
"Invalid value for argument `NAME`: expected ... Received: NAME=VALUE".
Booleans are refused wherever a number is expected (`True` is an `int` in
Python, but never a meaningful batch size or decay).

Public to the experiment kit (`zoo/` imports it), with a stable interface;
the module is to be renamed `keras_ema.checks` (RENAME.md).
"""

import math
import numbers

import numpy as np


def is_int(value) -> bool:
    """Whether `value` is an integer (Python or NumPy), and not a bool."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(
        value, numbers.Integral
    )


def is_real(value) -> bool:
    """Whether `value` is a real number (Python or NumPy), and not a bool."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(
        value, numbers.Real
    )


def as_float(value) -> float:
    """`float(value)` for a real number; NaN (which fails every range check)
    for anything else, bools and strings included."""
    return float(value) if is_real(value) else float("nan")


def check_int(
    name: str, value, minimum: int = 1, *, allow_none: bool = False, hint: str = ""
):
    """`int(value)` if `value` is an integer `>= minimum` (or None, if allowed).

    `hint` is appended to the message, e.g. "Pass a positive batch size.".
    """
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum:
        expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
        message = (
            f"Invalid value for argument `{name}`: expected {expected}. "
            f"Received: {name}={value!r}"
        )
        raise ValueError(f"{message}. {hint}" if hint else message)
    return int(value)


def check_fraction(
    name: str, value, *, low_open: bool = True, high_open: bool = True
) -> float:
    """`float(value)` if it is a finite real number in the unit interval.

    The ends are excluded unless `low_open`/`high_open` is False.
    """
    v = as_float(value)
    ok = math.isfinite(v) and (0.0 < v if low_open else 0.0 <= v) and (
        v < 1.0 if high_open else v <= 1.0
    )
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(
            f"Invalid value for argument `{name}`: expected a float in "
            f"{interval}. Received: {name}={value!r}"
        )
    return v


def numpy_if_tf(x):
    """`x` as a NumPy array if it is a TensorFlow tensor, else `x` unchanged.

    Lets batches from a `tf.data.Dataset` feed a JAX model without importing
    TensorFlow here.
    """
    if type(x).__module__.startswith("tensorflow"):
        return np.asarray(x)
    return x


# How far a row of probabilities may sum from 1: float32 softmax outputs over
# thousands of classes, or float16 ones, are a little off.
ROW_SUM_TOLERANCE = 1e-3


def is_probability_rows(values: np.ndarray) -> bool:
    """Whether every row of 2D `values` is a probability vector (2 classes or more)."""
    if values.shape[1] < 2 or values.min() < 0.0 or values.max() > 1.0:
        return False
    return bool(np.all(np.abs(values.sum(axis=1) - 1.0) <= ROW_SUM_TOLERANCE))


def check_probability_rows(name: str, values: np.ndarray):
    """Raises unless every row of 2D `values` holds probabilities.

    Entries must lie in [0, 1] (rounding may push a softmax output 1e-6
    outside) and each row must sum to 1 within `ROW_SUM_TOLERANCE`; the
    message names the argument `name` and asks for softmax outputs.
    """
    low, high = values.min(), values.max()
    if low < -1e-6:
        raise ValueError(
            f"Invalid value for argument `{name}`: expected non-negative "
            "probabilities in [0, 1] (pass softmax outputs, not logits). "
            f"Received values in [{low:.4g}, {high:.4g}]"
        )
    sums = values.sum(axis=1)
    off = np.abs(sums - 1.0) > ROW_SUM_TOLERANCE
    if np.any(off):
        raise ValueError(
            f"Invalid value for argument `{name}`: every row must sum to 1 "
            f"(within {ROW_SUM_TOLERANCE:g}); pass softmax outputs. "
            f"Received: row {int(np.argmax(off))} sums to "
            f"{sums[np.argmax(off)]:.6g}"
        )
    if high > 1 + 1e-6:
        raise ValueError(
            f"Invalid value for argument `{name}`: expected probabilities in "
            f"[0, 1] (pass softmax outputs, not logits). Received values in "
            f"[{low:.4g}, {high:.4g}]"
        )

