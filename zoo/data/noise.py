"""Label noise: symmetric synthetic noise and the CIFAR-N human label sets.

Only the training labels (after the train/validation split) receive noise;
validation and test labels stay clean, also for CIFAR-N, whose clean labels
ship with the noisy ones.
"""

import numpy as np

from keras_ema.checks import as_float
from keras_ema.checks import is_int
from zoo.data.dataset import DatasetError

# Keeps the label-noise draws independent of the split and loader streams.
_NOISE_STREAM = 0x6E6F6973

# Label-set name -> TFDS feature, per CIFAR-N dataset; the first is the default.
CIFAR_N_LABEL_SETS = {
    "cifar10n": {
        "worse": "worse_label",
        "aggre": "aggre_label",
        "random1": "random_label1",
        "random2": "random_label2",
        "random3": "random_label3",
    },
    "cifar100n": {"noise": "noise_label"},
}
_LABEL_SET_NAMES = tuple(
    name for sets in CIFAR_N_LABEL_SETS.values() for name in sets
)


def parse_label_noise(spec: str | None) -> tuple | None:
    """Parses a label-noise specification.

    Args:
        spec: `None`, `""` or `"none"` for clean labels; `"symmetric:R"` with
            `0 <= R < 1` for synthetic symmetric noise (any dataset); or a
            CIFAR-N label set: `aggre`, `worse`, `random1`, `random2`,
            `random3` (CIFAR-10N), `noise` (CIFAR-100N).

    Returns:
        `None`, `("symmetric", R)` or `("cifar_n", label_set)`.

    Raises:
        DatasetError: the specification is not one of the above.
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise DatasetError(
            "Invalid value for argument `label_noise`: expected a string "
            f"such as 'symmetric:0.4'. Received: label_noise={spec!r}."
        )
    text = spec.strip().lower()
    if text in ("", "none"):
        return None
    if text in _LABEL_SET_NAMES:
        return ("cifar_n", text)
    kind, sep, value = text.partition(":")
    if kind == "symmetric" and sep:
        try:
            rate = float(value)
        except ValueError:
            rate = None
        if rate is not None and 0.0 <= rate < 1.0:
            return ("symmetric", rate)
        raise DatasetError(
            "Invalid value for argument `label_noise`: the symmetric noise "
            f"rate must be a number in [0, 1). Received: label_noise={spec!r}. "
            "Use e.g. 'symmetric:0.4'."
        )
    raise DatasetError(
        f"Invalid value for argument `label_noise`. Received: "
        f"label_noise={spec!r}. Expected 'symmetric:R' with 0 <= R < 1, or a "
        f"CIFAR-N label set ({', '.join(_LABEL_SET_NAMES)})."
    )


def add_symmetric_noise(
    labels: np.ndarray, rate: float, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Replaces a fraction of the labels by a different, uniformly drawn class.

    Exactly `round(rate * len(labels))` labels are changed (Python rounding);
    each changed label is drawn uniformly among the `num_classes - 1` other
    classes.

    Args:
        labels: int array of clean labels.
        rate: float in `[0, 1)`.
        num_classes: int, at least 2.
        seed: int, seeds the choice of examples and of the new classes.
            Defaults to `0`.

    Returns:
        A tuple `(noisy_labels, mask)`: int32 labels and the bool array of
        changed positions.
    """
    labels = np.asarray(labels)
    if not 0.0 <= as_float(rate) < 1.0:
        raise DatasetError(
            f"Invalid symmetric noise rate. Received: rate={rate!r}. "
            "Use a number in [0, 1)."
        )
    if not is_int(num_classes) or num_classes < 2:
        raise DatasetError(
            "Symmetric label noise needs at least 2 classes. Received: "
            f"num_classes={num_classes}."
        )
    rng = np.random.default_rng([_NOISE_STREAM, seed])
    n = len(labels)
    num_changed = int(round(rate * n))
    changed = rng.choice(n, size=num_changed, replace=False)
    # Adding 1..C-1 modulo C reaches every other class with equal chance.
    shift = rng.integers(1, num_classes, size=num_changed)
    noisy = labels.astype(np.int32, copy=True)
    noisy[changed] = (noisy[changed] + shift) % num_classes
    mask = np.zeros(n, dtype=bool)
    mask[changed] = True
    return noisy, mask
