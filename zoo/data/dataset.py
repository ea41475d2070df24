"""The in-memory `Dataset` record and `DatasetError`, shared by every loader.

They live apart from `load_dataset` (in `zoo/data/__init__.py`) because the
per-source modules (`noise`, `tfds`, `folders`) raise `DatasetError` and
`load_dataset` imports them: defined in `__init__.py`, it would make a
circular import.
"""

import dataclasses
import zlib

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

    def fingerprint(self) -> dict:
        """Counts and a checksum of every split's images and labels.

        A run records it at training (`summary.json`, `"data_fingerprint"`);
        evaluation and a resume compare it with the data they load, so data
        changed since training is refused instead of giving other numbers.
        The checksum (CRC-32 over the arrays' shapes, dtypes and bytes)
        catches any accidental change and reads CIFAR-10's 184 MB in about
        half a second.
        """
        crc = 0
        for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            array = getattr(self, name)
            if array is None:
                crc = zlib.crc32(f"{name}:none;".encode(), crc)
                continue
            array = np.ascontiguousarray(array)
            crc = zlib.crc32(f"{name}:{array.dtype.str}{array.shape};".encode(), crc)
            crc = zlib.crc32(memoryview(array).cast("B"), crc)
        return {
            "train": len(self.x_train),
            "val": 0 if self.x_val is None else len(self.x_val),
            "test": len(self.x_test),
            "classes": int(self.num_classes),
            "crc32": f"{crc:08x}",
        }

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


def fingerprint_change(recorded: dict | None, now: dict) -> str | None:
    """How fingerprint `now` differs from `recorded` (`Dataset.fingerprint`), or `None`.

    `None` also when nothing was recorded (a run of an older train.py).
    """
    if not recorded:
        return None
    counts = [f"{k} {recorded.get(k)} -> {now[k]}"
              for k in ("train", "val", "test", "classes")
              if recorded.get(k) != now[k]]
    if counts:
        return ", ".join(counts)
    if recorded.get("crc32") != now["crc32"]:
        return (f"same counts, other content: checksum {recorded.get('crc32')} "
                f"-> {now['crc32']}")
    return None
