"""Image folders (`folder:PATH`) and Tiny-ImageNet in its original layout.

Images are decoded with Pillow into one uint8 `(N, H, W, 3)` array: they
become 8-bit RGB, 16-bit grayscale scaled by 255 / 65535 (not clipped;
32-bit integer grayscale is refused), and all must share the first image's
size unless `image_size` resizes them. Every
bad file or folder is named in a one-line `DatasetError`.
"""

import os
import pathlib

import numpy as np

from zoo.data.dataset import DatasetError


def _list_images(folder):
    """Sorted visible files of a class folder."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
    )


# Integer grayscale modes Pillow gives 16-bit PNGs and TIFFs: 0..65535.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _bits_per_sample(img):
    """Bits per pixel a mode-"I" image was stored with: 16 or 32 (or more)."""
    if img.format == "PNG":
        return 16  # PNG grayscale has at most 16 bits
    tags = getattr(img, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None  # TIFF BitsPerSample
    if isinstance(bits, (tuple, list)):
        bits = bits[0] if bits else None
    return int(bits) if bits else 32


def _to_rgb(img, Image, path):
    """An 8-bit RGB copy of a Pillow image.

    Pillow's `convert("RGB")` clips 16-bit grayscale to 255, which turns most
    pixels white; such images are scaled by 255 / 65535 instead. Pillow
    reads 32-bit integer grayscale as mode "I" too, but such a file has no
    white level to scale by (its values may span 0..255, 0..65535 or
    anything else), so it is refused rather than guessed.
    """
    if img.mode in _WIDE_GRAY_MODES:
        if img.mode == "I" and _bits_per_sample(img) > 16:
            raise DatasetError(
                f"Image {path} is 32-bit integer grayscale (Pillow mode I), "
                "whose white level is unknown; save it as 8-bit (mode L) or "
                "16-bit grayscale."
            )
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
                img = _to_rgb(img, Image, path)
                if image_size is not None and img.size != image_size[::-1]:
                    img = img.resize(image_size[::-1], Image.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except DatasetError:
            raise
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


def load_folder(path: str, image_size: tuple[int, int] | None) -> tuple:
    """The train and test images of `PATH/{train,test}/<class>/*`.

    Args:
        path: str, the folder holding `train/` and `test/`.
        image_size: `(height, width)` to resize every image to, or `None`
            to require that all images have the first one's size.

    Returns:
        `(x_train, y_train, x_test, y_test, class_names)`, classes sorted by
        folder name.
    """
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


def load_tiny_imagenet(
    data_dir: str | None, image_size: tuple[int, int] | None
) -> tuple:
    """Tiny-ImageNet-200 from its original folder layout.

    The official validation set (labelled by `val/val_annotations.txt`) is
    returned as the test set, since the official test set has no labels.

    Args:
        data_dir: str, `tiny-imagenet-200/` or the folder holding it.
        image_size: `(height, width)` to resize every image to, or `None`.

    Returns:
        `(x_train, y_train, x_test, y_test, wnids)`, classes sorted by wnid.
    """
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
