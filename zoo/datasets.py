"""Image-classification data for the experiments, held in memory as numpy.

`load_dataset(name, ...)` returns a `Dataset` of uint8 NHWC images and int32
labels, split into train / validation / test, with optional label noise on the
training labels. `ArrayLoader` feeds such arrays to `model.fit` as a
`keras.utils.PyDataset`, normalized, shuffled and augmented in numpy so that
every batch depends only on `(seed, epoch, batch index)`: the training loop
needs neither TensorFlow nor `tf.data`, and a resumed run sees the same batches
as an uninterrupted one on every backend.

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

import dataclasses
import os
import pathlib
import socket
import threading

import keras
import numpy as np

# Stream tags keep the split and the label-noise draws independent of each
# other and of the `ArrayLoader` streams, which are keyed by (seed, epoch).
_SPLIT_STREAM = 0x73706C74
_NOISE_STREAM = 0x6E6F6973

_DIGITS_TEST_SIZE = 360
_TFDS_CHUNK = 8192
_PROBE_TIMEOUT_S = 3.0

# CLI name -> (TFDS builder, host its download_and_prepare fetches from).
_TFDS_DATASETS = {
    "cifar10": ("cifar10", "www.cs.toronto.edu"),
    "cifar100": ("cifar100", "www.cs.toronto.edu"),
    "cifar10n": ("cifar10_n", "www.cs.toronto.edu"),
    "cifar100n": ("cifar100_n", "www.cs.toronto.edu"),
}
# Files the TFDS cifar10_n / cifar100_n builders read from the manual dir.
_MANUAL_FILES = {
    "cifar10_n": (
        "CIFAR-10_human_annotations.csv",
        "side_info_cifar10N.csv",
        "image_order_c10.npy",
    ),
    "cifar100_n": (
        "CIFAR-100_human_annotations.csv",
        "side_info_cifar100N.csv",
        "image_order_c100.npy",
    ),
}
# Label-set name -> TFDS feature, per CIFAR-N dataset; the first is the default.
_CIFAR_N_LABEL_SETS = {
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
    name for sets in _CIFAR_N_LABEL_SETS.values() for name in sets
)
KNOWN_DATASETS = ("digits", *_TFDS_DATASETS, "tiny_imagenet", "folder:PATH")


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


# === Label noise ===


def parse_label_noise(spec):
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


def add_symmetric_noise(labels, rate, num_classes, seed=0):
    """Replaces a fraction of the labels by a different, uniformly drawn class.

    Exactly `round(rate * len(labels))` labels are changed (Python rounding);
    each changed label is drawn uniformly among the `num_classes - 1` other
    classes.

    Args:
        labels: int array of clean labels.
        rate: float in `[0, 1)`.
        num_classes: int, at least 2.
        seed: int, seeds the choice of examples and of the new classes.

    Returns:
        A tuple `(noisy_labels, mask)`: int32 labels and the bool array of
        changed positions.
    """
    labels = np.asarray(labels)
    if not 0.0 <= rate < 1.0:
        raise DatasetError(
            f"Invalid symmetric noise rate. Received: rate={rate!r}. "
            "Use a number in [0, 1)."
        )
    if num_classes < 2:
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


# === Loading ===


def load_dataset(
    name: str,
    data_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    label_noise: str | None = None,
    image_size=None,
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
        label_noise: str, see `parse_label_noise`. `"symmetric:R"` works for
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
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0.0 <= val_fraction < 1.0
    ):
        raise DatasetError(
            "Invalid value for argument `val_fraction`: expected a number in "
            f"[0, 1). Received: val_fraction={val_fraction!r}. Use 0 to train "
            "on the whole training set."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(
            "Invalid value for argument `seed`: expected an integer >= 0. "
            f"Received: seed={seed!r}."
        )
    noise = parse_label_noise(label_noise)
    key = name.lower()
    if noise is not None and noise[0] == "cifar_n":
        allowed = _CIFAR_N_LABEL_SETS.get(key, {})
        if noise[1] not in allowed:
            owner = next(
                d for d, sets in _CIFAR_N_LABEL_SETS.items() if noise[1] in sets
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

    clean_train = None  # Clean training labels when the source is noisy.
    if key == "digits":
        x, y, x_test, y_test, class_names = _load_digits()
    elif key in _TFDS_DATASETS:
        label_key = "label"
        if key in _CIFAR_N_LABEL_SETS:
            sets = _CIFAR_N_LABEL_SETS[key]
            if noise is None:
                noise = ("cifar_n", next(iter(sets)))
            if noise[0] == "cifar_n":
                label_key = sets[noise[1]]
        x, y, clean_train, x_test, y_test, class_names = _load_tfds(
            key, data_dir, label_key
        )
    elif key in ("tiny_imagenet", "tiny-imagenet", "tinyimagenet"):
        x, y, x_test, y_test, class_names = _load_tiny_imagenet(
            data_dir, image_size
        )
    elif name.startswith("folder:"):
        x, y, x_test, y_test, class_names = _load_folder(
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


def channel_stats(x, chunk=4096):
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
    if isinstance(image_size, (int, np.integer)) and not isinstance(
        image_size, bool
    ):
        size = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(s, (int, np.integer)) for s in image_size)
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


# --- TensorFlow Datasets ---


def _host_reachable(host, port=443, timeout=_PROBE_TIMEOUT_S):
    """Whether a TCP connection to `host:port` opens within `timeout` seconds.

    Runs in a daemon thread because name resolution has no timeout of its own
    and can hang far longer than `timeout` on a machine without a network.
    """
    result = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _ensure_prepared(builder, name, tfds_name, host):
    """Prepares a TFDS dataset, or fails fast when that needs the impossible."""
    if builder.is_prepared():
        return
    root = pathlib.Path(os.fspath(builder.data_dir_root))
    if tfds_name in _MANUAL_FILES:
        manual_dir = root / "downloads" / "manual"
        missing = [
            f for f in _MANUAL_FILES[tfds_name] if not (manual_dir / f).exists()
        ]
        if missing:
            raise DatasetError(
                f"{name}: TFDS {tfds_name} is not prepared in {root} and needs "
                f"files that must be downloaded by hand: put {', '.join(missing)} "
                f"in {manual_dir} (sources and the .npy -> .csv conversion: "
                f"tfds.builder('{tfds_name}').MANUAL_DOWNLOAD_INSTRUCTIONS), "
                "or pass --data_dir pointing to a TFDS folder where it is "
                "prepared."
            )
    if not _host_reachable(host):
        raise DatasetError(
            f"{name}: TFDS {tfds_name} is not prepared in {root} and its "
            f"download host {host}:443 cannot be reached (no network?). "
            f"Prepare it where there is a network (tfds.builder('{tfds_name}', "
            "data_dir=DIR).download_and_prepare()) and pass DIR as --data_dir."
        )
    builder.download_and_prepare()


def _tfds_arrays(builder, split, keys):
    """Numpy arrays of `keys` for a whole split, read in chunks."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=split, shuffle_files=False, batch_size=_TFDS_CHUNK)
    ds = ds.map(lambda ex: {k: ex[k] for k in keys})
    chunks = list(tfds.as_numpy(ds))
    if not chunks:
        raise DatasetError(
            f"TFDS {builder.name} split {split!r} is empty in "
            f"{builder.data_dir}. Prepare it again."
        )
    return {k: np.concatenate([c[k] for c in chunks]) for k in keys}


def _load_tfds(name, data_dir, label_key):
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DatasetError(
            f"{name} is read through tensorflow-datasets, which is not "
            f"installed ({err}). Install tensorflow and tensorflow-datasets, "
            "or use digits / folder:PATH."
        ) from None
    tfds_name, host = _TFDS_DATASETS[name]
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    _ensure_prepared(builder, name, tfds_name, host)
    keys = ("image", "label") if label_key == "label" else ("image", "label", label_key)
    train = _tfds_arrays(builder, "train", keys)
    test = _tfds_arrays(builder, "test", ("image", "label"))
    clean = train["label"].astype(np.int32)
    y = train[label_key].astype(np.int32)
    class_names = list(builder.info.features["label"].names)
    return (
        train["image"],
        y,
        None if label_key == "label" else clean,
        test["image"],
        test["label"].astype(np.int32),
        class_names,
    )


# --- Image folders ---


def _list_images(folder):
    """Sorted visible files of a class folder."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
    )


# Integer grayscale modes Pillow gives 16-bit PNGs and TIFFs: 0..65535.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(img, Image):
    """An 8-bit RGB copy of a Pillow image.

    Pillow's `convert("RGB")` clips 16-bit grayscale to 255, which turns most
    pixels white; such images are scaled by 255 / 65535 instead.
    """
    if img.mode in _WIDE_GRAY_MODES:
        wide = np.asarray(img).astype(np.float64)
        eight = np.clip(np.round(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        img = Image.fromarray(eight, "L")
    return img.convert("RGB")


def _read_images(paths, image_size):
    """Decodes files into one uint8 (N, H, W, 3) array, naming any bad file."""
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError(
            "Reading image folders needs Pillow: pip install pillow."
        ) from None
    images = None
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img = _to_rgb(img, Image)
                if image_size is not None and img.size != image_size[::-1]:
                    img = img.resize(image_size[::-1], Image.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except Image.DecompressionBombError as err:
            raise DatasetError(
                f"Image {path} is too large to decode safely ({err}). Remove "
                "the file or shrink it."
            ) from None
        except (OSError, ValueError, SyntaxError) as err:
            raise DatasetError(
                f"Cannot decode {path} as an image ({type(err).__name__}: "
                f"{err}). Remove or replace the file."
            ) from None
        if images is None:
            images = np.empty((len(paths),) + array.shape, dtype=np.uint8)
        elif array.shape != images.shape[1:]:
            raise DatasetError(
                f"Image {path} is {array.shape[1]}x{array.shape[0]} but "
                f"{paths[0]} is {images.shape[2]}x{images.shape[1]}. Pass "
                "--image_size=64 to train.py (image_size=64 to load_dataset) "
                "to resize all images."
            )
        images[i] = array
    return images


def _check_class_link(entry, split_dir):
    """Raises DatasetError when a class folder is a broken or looping symlink."""
    if not entry.is_symlink():
        return
    target = os.readlink(entry)
    try:
        resolved = entry.resolve(strict=True)
    except (OSError, RuntimeError):
        raise DatasetError(
            f"Class folder {entry} is a symlink to {target} that loops or "
            "points nowhere. Point it at a folder of images or remove it."
        ) from None
    home = split_dir.resolve()
    if resolved.is_dir() and resolved in (home, *home.parents):
        raise DatasetError(
            f"Class folder {entry} is a symlink loop: it points to {target}, "
            f"which contains it. Point it at a folder of images or remove it."
        )


def _load_folder(path, image_size):
    root = pathlib.Path(path).expanduser()
    if not path or not root.is_dir():
        raise DatasetError(
            f"Image folder {path!r} does not exist. Expected "
            "folder:PATH with PATH/train/<class>/* and PATH/test/<class>/*."
        )
    splits = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(
                f"Image folder {root} has no {split}/ folder. Expected "
                f"{root}/{split}/<class>/* image files."
            )
        entries = [d for d in split_dir.iterdir() if not d.name.startswith(".")]
        for d in entries:
            _check_class_link(d, split_dir)
        classes = sorted(d.name for d in entries if d.is_dir())
        if not classes:
            raise DatasetError(
                f"Folder {split_dir} has no class folders. Expected "
                f"{split_dir}/<class>/* image files."
            )
        splits[split] = (split_dir, classes)
    class_names = splits["train"][1]
    if len(class_names) < 2:
        raise DatasetError(
            f"Folder {splits['train'][0]} has a single class "
            f"({class_names[0]!r}); classification needs at least 2 class "
            "folders."
        )
    unknown = sorted(set(splits["test"][1]) - set(class_names))
    if unknown:
        raise DatasetError(
            f"Test classes {unknown} of {root} have no train/ folder. Use the "
            "same class folder names in train/ and test/."
        )
    label_of = {c: i for i, c in enumerate(class_names)}
    paths, labels, counts = [], [], []
    for split in ("train", "test"):
        split_dir, classes = splits[split]
        files = {c: _list_images(split_dir / c) for c in classes}
        if not any(files.values()):
            raise DatasetError(
                f"Folder {split_dir} holds no image files. Expected "
                f"{split_dir}/<class>/* image files."
            )
        for c in classes:
            if not files[c]:
                raise DatasetError(
                    f"Class folder {split_dir / c} is empty. Add images or "
                    "remove the folder."
                )
            paths += files[c]
            labels += [label_of[c]] * len(files[c])
        counts.append(sum(len(f) for f in files.values()))
    # One array for both splits: without image_size, test images must match
    # the first training image like every other image.
    images = _read_images(paths, image_size)
    labels = np.asarray(labels, np.int32)
    n = counts[0]
    return images[:n], labels[:n], images[n:], labels[n:], class_names


def _load_tiny_imagenet(data_dir, image_size):
    if data_dir is None:
        raise DatasetError(
            "tiny_imagenet is read from its original folder: pass --data_dir "
            "pointing to tiny-imagenet-200/ (from "
            "http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzipped)."
        )
    root = pathlib.Path(data_dir).expanduser()
    if not (root / "train").is_dir() and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(
            f"tiny_imagenet: {root} has no train/ folder. Pass --data_dir "
            "pointing to the unzipped tiny-imagenet-200/ folder."
        )
    wnids = sorted(
        d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if len(wnids) < 2:
        raise DatasetError(
            f"tiny_imagenet: {train_dir} holds {len(wnids)} class folder(s); "
            "expected 200 train/<wnid>/images/ folders."
        )
    label_of = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for w in wnids:
        image_dir = train_dir / w / "images"
        files = _list_images(image_dir) if image_dir.is_dir() else []
        if not files:
            raise DatasetError(
                f"tiny_imagenet: {train_dir / w / 'images'} has no images. "
                "Re-extract the archive."
            )
        paths += files
        labels += [label_of[w]] * len(files)
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetError(
            f"tiny_imagenet: {annotations} is missing; it maps the validation "
            "images (the test set here) to classes. Re-extract the archive."
        )
    test_paths, test_labels = [], []
    for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise DatasetError(
                f"tiny_imagenet: line {line_no} of {annotations} does not map "
                f"a file to a known class: {line!r}. Re-extract the archive."
            )
        test_paths.append(root / "val" / "images" / fields[0])
        test_labels.append(label_of[fields[1]])
    if not test_paths:
        raise DatasetError(
            f"tiny_imagenet: {annotations} is empty. Re-extract the archive."
        )
    for p in test_paths:
        if not p.is_file():
            raise DatasetError(
                f"tiny_imagenet: {p}, listed in {annotations}, is missing. "
                "Re-extract the archive."
            )
    images = _read_images(paths + test_paths, image_size)
    n = len(paths)
    return (
        images[:n],
        np.asarray(labels, np.int32),
        images[n:],
        np.asarray(test_labels, np.int32),
        wnids,
    )


# === Feeding arrays to Keras ===


class ArrayLoader(keras.utils.PyDataset):
    """Batches of in-memory images, normalized, shuffled and augmented in numpy.

    Each batch is a pure function of `(seed, epoch, batch index)`:

    - Normalization: `(x / 255 - mean) / std`, per channel, in float32.
    - `shuffle=True`: the order of epoch `e` is
      `np.random.default_rng([seed, e]).permutation(n)`; batch `i` is slice
      `i` of it. Without shuffling the order is the array order.
    - `augment=True`: random crop with 4 pixels of zero padding (black, before
      normalization, as torchvision's `RandomCrop(padding=4)`) and random
      horizontal flip, drawn from `np.random.default_rng([seed, e, i])`.

    The augmentation is written in numpy rather than with
    `keras.layers.RandomCrop` / `RandomFlip` so that the batches depend only on
    `(seed, epoch, batch)`: a resumed run reproduces them exactly, on every
    backend, with any number of workers.

    The epoch: `set_epoch(e)` is authoritative. Keras calls
    `on_epoch_begin` / `on_epoch_end` around each pass, but also around
    passes that are not training epochs (Keras 3.15 calls `on_epoch_end` once
    before the first epoch on TensorFlow, and runs a one-batch pass on JAX),
    so without `set_epoch` the loader only advances after a pass that served
    its last batch, which is right for a fresh `fit` but not for a resumed
    one. Training scripts must therefore pass `EpochSetter(loader)` as a
    callback, which calls `loader.set_epoch(epoch)` at the start of every
    epoch, `initial_epoch` included, and `shuffle=False` to `fit` (Keras
    would otherwise reorder the batches of a `PyDataset` with Python's
    `random`, which a resumed run does not reproduce).

    Args:
        x: uint8 array `(n, height, width, channels)`.
        y: int array `(n,)`, or `None` to yield images only.
        batch_size: int.
        mean: float or per-channel floats, in 0..1 units.
        std: float or per-channel floats, in 0..1 units, positive.
        shuffle: bool, reshuffle every epoch. Defaults to `False`.
        augment: bool, random crop (pad 4) and horizontal flip. Defaults to
            `False`.
        seed: int >= 0. Defaults to `0`.
        drop_remainder: bool, drop the last incomplete batch. Defaults to
            `False`.
        shard: `(index, count)`: yield only the `index`-th of `count` equal
            contiguous slices of every batch, for process `index` of a
            multi-process run whose processes feed their own share of the
            global batch (JAX's `keras.distribution`). The batch is made
            whole first (order and augmentation as without a shard), then
            sliced; an incomplete last batch loses its last `len % count`
            examples so that the slices stay equal. `None` yields whole
            batches. Defaults to `None`.
        **kwargs: `workers`, `use_multiprocessing`, `max_queue_size` of
            `keras.utils.PyDataset`.

    Example:

    ```python
    data = load_dataset("digits")
    train = ArrayLoader(data.x_train, data.y_train, 128, data.mean, data.std,
                        shuffle=True, augment=True, seed=0)
    val = ArrayLoader(data.x_val, data.y_val, 256, data.mean, data.std)
    model.fit(train, validation_data=val, epochs=10, shuffle=False,
              callbacks=[EpochSetter(train)])
    ```
    """

    PAD = 4

    def __init__(
        self,
        x,
        y,
        batch_size,
        mean,
        std,
        shuffle=False,
        augment=False,
        seed=0,
        drop_remainder=False,
        shard=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if shard is not None:
            try:
                index, count = (int(v) for v in shard)
                if not 0 <= index < count or count > batch_size:
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(
                    "Invalid value for argument `shard`: expected `(index, "
                    "count)` with 0 <= index < count <= batch_size. Received: "
                    f"shard={shard!r}, batch_size={batch_size!r}."
                ) from None
            shard = (index, count)
        self.shard = shard
        x = np.asarray(x)
        if x.ndim != 4 or x.dtype != np.uint8:
            raise ValueError(
                "Invalid value for argument `x`: expected uint8 images of shape "
                "(n, height, width, channels). Received: x with shape "
                f"{x.shape} and dtype {x.dtype}."
            )
        if y is not None:
            y = np.asarray(y)
            if y.shape != (len(x),):
                raise ValueError(
                    "Invalid value for argument `y`: expected shape "
                    f"({len(x)},) to match x. Received: y with shape {y.shape}."
                )
            y = y.astype(np.int32, copy=False)
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1
        ):
            raise ValueError(
                "Invalid value for argument `batch_size`: expected a positive "
                f"integer. Received: batch_size={batch_size!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(
                "Invalid value for argument `seed`: expected an integer >= 0. "
                f"Received: seed={seed!r}."
            )
        channels = x.shape[-1]
        mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,))
        std = np.broadcast_to(np.asarray(std, np.float32), (channels,))
        if not np.all(std > 0) or not np.all(np.isfinite(mean)):
            raise ValueError(
                "Invalid value for argument `std` or `mean`: std must be "
                f"positive and both finite. Received: mean={mean.tolist()}, "
                f"std={std.tolist()}."
            )
        num_batches = (
            len(x) // batch_size if drop_remainder else -(-len(x) // batch_size)
        )
        if num_batches == 0:
            raise ValueError(
                f"ArrayLoader would yield no batch: {len(x)} example(s) with "
                f"batch_size={batch_size} and drop_remainder={drop_remainder}. "
                "Use a smaller batch_size or drop_remainder=False."
            )
        self.x = x
        self.y = y
        self.batch_size = int(batch_size)
        self.mean = mean.copy()
        self.std = std.copy()
        self.shuffle = shuffle
        self.augment = augment
        self.seed = int(seed)
        self.drop_remainder = drop_remainder
        # (x / 255 - mean) / std == x * scale - shift, one pass fewer.
        self._scale = (1.0 / (255.0 * self.std)).astype(np.float32)
        self._shift = (self.mean / self.std).astype(np.float32)
        self._num_batches = num_batches
        self._epoch = 0
        self._in_pass = False
        self._served_last = False
        self._order_cache = (None, None)

    @property
    def epoch(self) -> int:
        """The epoch whose order and augmentation `__getitem__` uses."""
        return self._epoch

    def set_epoch(self, epoch: int):
        """Selects the epoch of the next batches; see the class docstring."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(
                "Invalid value for argument `epoch`: expected an integer >= 0. "
                f"Received: epoch={epoch!r}."
            )
        self._epoch = int(epoch)
        self._in_pass = False
        self._served_last = False

    def on_epoch_begin(self):
        self._in_pass = True
        self._served_last = False

    def on_epoch_end(self):
        if self._in_pass and self._served_last:
            self._epoch += 1
        self._in_pass = False
        self._served_last = False

    def __len__(self):
        return self._num_batches

    def _order(self, epoch):
        cached_epoch, order = self._order_cache  # One read: thread-safe.
        if cached_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.x)
            )
            self._order_cache = (epoch, order)
        return order

    def __getitem__(self, index):
        if not 0 <= index < self._num_batches:
            raise IndexError(
                f"Batch index {index} out of range for {self._num_batches} "
                "batches."
            )
        epoch = self._epoch
        start = index * self.batch_size
        stop = min(start + self.batch_size, len(self.x))
        if self.shuffle:
            rows = self._order(epoch)[start:stop]
            x = self.x[rows]
            y = None if self.y is None else self.y[rows]
        else:
            x = self.x[start:stop]
            y = None if self.y is None else self.y[start:stop]
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, index])
            x = crop_and_flip(x, rng, self.PAD)
        x = x.astype(np.float32)
        x *= self._scale
        x -= self._shift
        if self.shard is not None:
            part, count = self.shard
            size = len(x) // count
            x = x[part * size:(part + 1) * size]
            y = None if y is None else y[part * size:(part + 1) * size]
        if index == self._num_batches - 1:
            self._served_last = True
        return x if y is None else (x, y)


def crop_and_flip(images, rng, pad=4):
    """Random crop from a zero-padded image plus random horizontal flip.

    For each image, draws in this order from `rng`: the vertical offsets
    (`rng.integers(0, 2 * pad + 1, n)`), the horizontal offsets (same), and
    the flips (`rng.random(n) < 0.5`). An offset of `pad` is the original
    position.

    Args:
        images: uint8 array `(n, height, width, channels)`.
        rng: a `numpy.random.Generator`.
        pad: int, the zero padding on each side. Defaults to `4`.

    Returns:
        A new array of the same shape and dtype.
    """
    n, height, width, _ = images.shape
    top = rng.integers(0, 2 * pad + 1, size=n)
    left = rng.integers(0, 2 * pad + 1, size=n)
    flip = rng.random(n) < 0.5
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = top[:, None] + np.arange(height)  # (n, height)
    cols = left[:, None] + np.arange(width)  # (n, width)
    # Flipping = reading the crop's columns right to left.
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[
        np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]
    ]


class EpochSetter(keras.callbacks.Callback):
    """Tells `ArrayLoader`s which epoch `fit` is starting.

    Calls `loader.set_epoch(epoch)` in `on_epoch_begin`, so the data order and
    augmentation of epoch `e` are the same in a fresh run and in a run resumed
    at `e` (`initial_epoch`, `keras.callbacks.BackupAndRestore`).

    Args:
        *loaders: the `ArrayLoader`s to drive.

    Example:

    ```python
    model.fit(train, epochs=200, shuffle=False,
              callbacks=[EpochSetter(train), keras.callbacks.BackupAndRestore(d)])
    ```
    """

    def __init__(self, *loaders):
        super().__init__()
        for loader in loaders:
            if not hasattr(loader, "set_epoch"):
                raise ValueError(
                    "Invalid argument for EpochSetter: expected objects with "
                    f"a `set_epoch` method such as ArrayLoader. Received: "
                    f"{loader!r}."
                )
        self.loaders = loaders

    def on_epoch_begin(self, epoch, logs=None):
        for loader in self.loaders:
            loader.set_epoch(epoch)
