"""The in-memory `Dataset` record and `DatasetError`, shared by every loader.

They live apart from `load_dataset` (in `zoo/data/__init__.py`) because the
per-source modules (`noise`, `tfds`, `folders`) raise `DatasetError` and
`load_dataset` imports them: defined in `__init__.py`, it would make a
circular import.
"""

import dataclasses

import numpy as np


class DatasetError(ValueError):
    """A dataset cannot be loaded; the message is one line saying why and what to do."""


@dataclasses.dataclass
class Dataset:
    """Arrays of one dataset, split, with the statistics used to normalize it.

    Images are uint8 NHWC, labels int32. `mean` and `std` are per-channel
    float32 statistics of `x_train / 255`.

    Attributes:
        name: str, the name given to `load_dataset`.
        x_train, y_train: the training split (after the validation split).
        x_val, y_val: the validation split, `None` when `val_fraction=0`.
        x_test, y_test: the test split; its labels are always clean.
        num_classes: int.
        class_names: list of str, or `None`.
        noise_mask: bool array over the training split, `True` where the label
            differs from the clean one; `None` without label noise.
        mean, std: float32 arrays of shape `(channels,)`.
        label_noise: str, the label noise applied (`"symmetric:0.4"`,
            `"cifar_n:worse"`), or `None`.
    """

    name: str
    x_train: np.ndarray = dataclasses.field(repr=False)
    y_train: np.ndarray = dataclasses.field(repr=False)
    x_val: np.ndarray | None = dataclasses.field(repr=False)
    y_val: np.ndarray | None = dataclasses.field(repr=False)
    x_test: np.ndarray = dataclasses.field(repr=False)
    y_test: np.ndarray = dataclasses.field(repr=False)
    num_classes: int
    class_names: list | None = dataclasses.field(default=None, repr=False)
    noise_mask: np.ndarray | None = dataclasses.field(default=None, repr=False)
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    label_noise: str | None = None

    @property
    def image_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    def summary(self) -> str:
        """One line: split sizes, image shape, classes and label noise."""
        n_val = 0 if self.x_val is None else len(self.x_val)
        shape = "x".join(str(d) for d in self.image_shape)
        text = (
            f"{self.name}: train {len(self.x_train)}, val {n_val}, "
            f"test {len(self.x_test)}, images {shape}, "
            f"{self.num_classes} classes"
        )
        if self.label_noise:
            changed = int(self.noise_mask.sum())
            text += (
                f", label noise {self.label_noise} "
                f"({changed}/{len(self.y_train)} training labels changed)"
            )
        return text
