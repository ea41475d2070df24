"""Image-classification data for the experiments, held in memory as numpy.

`load_dataset(name, ...)` returns a `Dataset` of uint8 NHWC images and int32
labels, split into train / validation / test, with optional label noise on the
training labels. `zoo.data.loader.ArrayLoader` feeds such arrays to
`model.fit`.

One module per source: `noise` (label noise), `tfds` (the CIFAR datasets),
`folders` (image folders, Tiny-ImageNet), `loader` (feeding arrays to Keras).
Importing `zoo.data` imports neither TensorFlow nor TFDS.

Datasets (`name`):

- `digits`: scikit-learn's bundled handwritten digits (1797 images, no
  download). The 8x8 images with values 0..16 become uint8 32x32x3 images:
  each value `v` is mapped to `round(v * 255 / 16)`, every pixel is repeated
  into a 4x4 block (nearest-neighbour upsampling, `np.repeat`) and the gray
  image is copied onto 3 channels. The test set is fixed: the last 360
  images in scikit-learn's order (20%); the seed only changes the
  train/validation split of the first 1437.
- `cifar10`, `cifar100`: TensorFlow Datasets, official train/test splits.
- `cifar10n`, `cifar100n`: CIFAR-10N / CIFAR-100N (Wei et al., 2022), the TFDS
  `cifar10_n` / `cifar100_n` builders, whose human labels need a manual
  download. `label_noise` names the training label set: `aggre`, `worse`
  (the default, used in the paper's Table 2), `random1`, `random2`, `random3`
  for CIFAR-10N; `noise` (the default and only one) for CIFAR-100N. The test
  labels are the clean CIFAR labels.
- `tiny_imagenet`: Tiny-ImageNet-200 in its original folder layout under
  `data_dir` (`train/<wnid>/images/*.JPEG`, `val/images/*.JPEG`,
  `val/val_annotations.txt`). The official validation set is the test set,
  since the official test set has no labels.
- `folder:PATH`: any folder with `train/<class>/*` and `test/<class>/*`.
  Every class folder must hold images. Images become 8-bit
  RGB; 16-bit grayscale is scaled by 255 / 65535, not clipped.

Only the training labels (after the train/validation split) receive noise;
validation and test labels stay clean, also for CIFAR-N, whose clean labels
ship with the noisy ones. `Dataset.noise_mask` marks the training examples whose
label differs from the clean one.

A dataset that would have to be downloaded without a network fails within
seconds with one line naming the dataset and how to provide it (`DatasetError`).
"""

import numpy as np

from keras_ema.checks import as_float
from keras_ema.checks import is_int
from zoo.data.dataset import Dataset
from zoo.data.dataset import DatasetError
from zoo.data.folders import load_folder
from zoo.data.folders import load_tiny_imagenet
from zoo.data.noise import CIFAR_N_LABEL_SETS
from zoo.data.noise import add_symmetric_noise
from zoo.data.noise import parse_label_noise
from zoo.data.tfds import TFDS_DATASETS
from zoo.data.tfds import load_tfds

# Keeps the split independent of the label-noise and loader streams.
_SPLIT_STREAM = 0x73706C74

_DIGITS_TEST_SIZE = 360
KNOWN_DATASETS = ("digits", *TFDS_DATASETS, "tiny_imagenet", "folder:PATH")
_TINY_IMAGENET_NAMES = ("tiny_imagenet", "tiny-imagenet", "tinyimagenet")


def reads_data_dir(name: str) -> bool:
    """Whether dataset `name` reads `data_dir`: the TFDS datasets and tiny_imagenet.

    `digits` is bundled with scikit-learn and `folder:PATH` names its folder.
    """
    key = name.lower()
    return key in TFDS_DATASETS or key in _TINY_IMAGENET_NAMES


def load_dataset(
    name: str,
    data_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    label_noise: str | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> Dataset:
    """Loads a dataset into memory, split and optionally with noisy labels.

    The validation split is a seeded uniform random `val_fraction` of the
    training set (the paper's 80/20 protocol); `val_fraction=0` trains on
    all of it. Label noise is applied to the remaining training labels only.

    Args:
        name: str, one of `digits`, `cifar10`, `cifar100`, `cifar10n`,
            `cifar100n`, `tiny_imagenet`, or `folder:PATH` (see the module
            docstring).
        data_dir: str, the TFDS data directory for the CIFAR datasets (TFDS's
            default when `None`; the CIFAR-N manual files go to
            `<data_dir>/downloads/manual`), or the Tiny-ImageNet folder.
            Defaults to `None`.
        val_fraction: float in `[0, 1)`, the fraction of the training set held
            out for validation. Defaults to `0.2`.
        seed: int >= 0, seeds the validation split and the label noise.
            Defaults to `0`.
        label_noise: str, see `zoo.data.noise.parse_label_noise`. `"symmetric:R"` works for
            every dataset; CIFAR-N label-set names only for `cifar10n` /
            `cifar100n`, which default to `worse` / `noise`. Defaults to
            `None`.
        image_size: int or `(height, width)`, for `folder:` and
            `tiny_imagenet` only: every image is resized (bilinear) to it.
            When `None`, all images must have the size of the first one.
            Defaults to `None`.

    Returns:
        A `Dataset`.

    Raises:
        DatasetError: unknown name, invalid argument, missing or malformed
            files, or a download that cannot happen.
    """
    if not isinstance(name, str) or not name:
        raise DatasetError(
            f"Invalid dataset name. Received: name={name!r}. Known: "
            f"{', '.join(KNOWN_DATASETS)}."
        )
    if not 0.0 <= as_float(val_fraction) < 1.0:
        raise DatasetError(
            "Invalid value for argument `val_fraction`: expected a number in "
            f"[0, 1). Received: val_fraction={val_fraction!r}. Use 0 to train "
            "on the whole training set."
        )
    if not is_int(seed) or seed < 0:
        raise DatasetError(
            "Invalid value for argument `seed`: expected an integer >= 0. "
            f"Received: seed={seed!r}."
        )
    noise = parse_label_noise(label_noise)
    key = name.lower()
    if noise is not None and noise[0] == "cifar_n":
        allowed = CIFAR_N_LABEL_SETS.get(key, {})
        if noise[1] not in allowed:
            owner = next(
                d for d, sets in CIFAR_N_LABEL_SETS.items() if noise[1] in sets
            )
            raise DatasetError(
                f"Label set {noise[1]!r} belongs to {owner}, not to {name!r}. "
                "Use 'symmetric:R' for synthetic noise on other datasets."
            )
    if image_size is not None:
        image_size = _check_image_size(image_size)
        if not (key == "tiny_imagenet" or name.startswith("folder:")):
            raise DatasetError(
                f"Argument `image_size` applies to folder: and tiny_imagenet "
                f"datasets only. Received: image_size={image_size} for "
                f"{name!r}. Leave it unset."
            )

    if data_dir is not None and not reads_data_dir(name):
        raise DatasetError(
            f"Argument `data_dir` applies to the TFDS datasets and tiny_imagenet "
            f"only; {name!r} reads none. Received: data_dir={data_dir!r}. Leave "
            "it unset."
        )

    clean_train = None  # Clean training labels when the source is noisy.
    if key == "digits":
        x, y, x_test, y_test, class_names = _load_digits()
    elif key in TFDS_DATASETS:
        label_key = "label"
        if key in CIFAR_N_LABEL_SETS:
            sets = CIFAR_N_LABEL_SETS[key]
            if noise is None:
                noise = ("cifar_n", next(iter(sets)))
            if noise[0] == "cifar_n":
                label_key = sets[noise[1]]
        x, y, clean_train, x_test, y_test, class_names = load_tfds(
            key, data_dir, label_key
        )
    elif key in _TINY_IMAGENET_NAMES:
        x, y, x_test, y_test, class_names = load_tiny_imagenet(
            data_dir, image_size
        )
    elif name.startswith("folder:"):
        x, y, x_test, y_test, class_names = load_folder(
            name[len("folder:") :], image_size
        )
    else:
        raise DatasetError(
            f"Unknown dataset {name!r}. Known: {', '.join(KNOWN_DATASETS)}."
        )

    num_classes = len(class_names)
    train_idx, val_idx = _split_indices(len(x), val_fraction, seed)
    x_val = y_val = None
    if val_idx is not None:
        x_val = x[val_idx]
        y_val = (y if clean_train is None else clean_train)[val_idx]
        x, y = x[train_idx], y[train_idx]
        if clean_train is not None:
            clean_train = clean_train[train_idx]

    noise_mask = None
    noise_text = None
    if noise is not None and noise[0] == "symmetric":
        y, noise_mask = add_symmetric_noise(y, noise[1], num_classes, seed)
        noise_text = f"symmetric:{noise[1]:g}"
    elif noise is not None:
        noise_mask = y != clean_train
        noise_text = f"cifar_n:{noise[1]}"

    mean, std = channel_stats(x)
    return Dataset(
        name=name,
        x_train=x,
        y_train=y.astype(np.int32, copy=False),
        x_val=x_val,
        y_val=None if y_val is None else y_val.astype(np.int32, copy=False),
        x_test=x_test,
        y_test=y_test.astype(np.int32, copy=False),
        num_classes=num_classes,
        class_names=list(class_names),
        noise_mask=noise_mask,
        mean=mean,
        std=std,
        label_noise=noise_text,
    )


def _split_indices(n, val_fraction, seed):
    """Sorted (train, val) indices of a seeded uniform split; val None if 0."""
    if val_fraction == 0:
        return None, None
    num_val = min(max(1, int(round(val_fraction * n))), n - 1)
    if num_val < 1:
        raise DatasetError(
            f"Cannot hold out a validation split from {n} training example(s). "
            "Use val_fraction=0."
        )
    perm = np.random.default_rng([_SPLIT_STREAM, seed]).permutation(n)
    return np.sort(perm[num_val:]), np.sort(perm[:num_val])


def channel_stats(
    x: np.ndarray, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of `x / 255` in float32, in chunks.

    Chunks keep the float64 temporaries small (CIFAR's 40000 images would
    otherwise need about 1 GB). A channel with zero spread gets std 1 so that
    normalizing never divides by zero.
    """
    channels = x.shape[-1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].reshape(-1, channels).astype(np.float64)
        total += part.sum(axis=0)
        total_sq += np.square(part).sum(axis=0)
        count += len(part)
    mean = total / max(count, 1)
    var = np.maximum(total_sq / max(count, 1) - mean**2, 0.0)
    std = np.sqrt(var)
    std[std == 0] = 255.0
    return (mean / 255).astype(np.float32), (std / 255).astype(np.float32)


def _check_image_size(image_size):
    if is_int(image_size):
        size = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(is_int(s) for s in image_size)
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        size = None
    if size is None or min(size) < 1:
        raise DatasetError(
            "Invalid value for argument `image_size`: expected a positive int "
            f"or (height, width). Received: image_size={image_size!r}."
        )
    return size


def _load_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    gray = gray.repeat(4, axis=1).repeat(4, axis=2)
    images = np.repeat(gray[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int32)
    cut = len(images) - _DIGITS_TEST_SIZE
    names = [str(d) for d in range(10)]
    return images[:cut], labels[:cut], images[cut:], labels[cut:], names


__all__ = [
    "KNOWN_DATASETS",
    "Dataset",
    "DatasetError",
    "channel_stats",
    "load_dataset",
]
