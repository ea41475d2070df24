"""Tests for zoo.data.folders: image folders and Tiny-ImageNet, written into tmp_path."""

import os
import time

import numpy as np
import pytest

from zoo.data import DatasetError
from zoo.data import load_dataset


# === image folders ===


def _write_png(path, size=(6, 6), color=(255, 0, 0), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    value = color if mode == "RGB" else color[0]
    Image.new(mode, size[::-1], value).save(path)


def _make_folder(root, classes=("cat", "dog"), n_train=3, n_test=2, size=(6, 6)):
    for k, name in enumerate(classes):
        for split, count in (("train", n_train), ("test", n_test)):
            for i in range(count):
                _write_png(root / split / name / f"{i}.png", size, (k * 100, i, 7))
    return root


def test_folder_dataset(tmp_path):
    root = _make_folder(tmp_path / "pets", classes=("dog", "cat", "bird"))
    _write_png(root / "train" / "cat" / "x.png", mode="L", color=(9,))
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0junk")
    data = load_dataset(f"folder:{root}", val_fraction=0)
    assert data.class_names == ["bird", "cat", "dog"]
    assert data.x_train.shape == (10, 6, 6, 3) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (6, 6, 6, 3)
    np.testing.assert_array_equal(np.bincount(data.y_train), [3, 4, 3])
    np.testing.assert_array_equal(data.y_test, [0, 0, 1, 1, 2, 2])
    # bird = class 0 was written with red 200, dog = 2 with red 0.
    assert data.x_test[0, 0, 0, 0] == 200 and data.x_test[-1, 0, 0, 0] == 0
    # The grayscale image became 3 equal channels.
    gray = data.x_train[data.y_train == 1][-1]
    np.testing.assert_array_equal(gray, 9)
    split = load_dataset(f"folder:{root}", val_fraction=0.3, seed=0)
    assert len(split.x_train) + len(split.x_val) == 10


def test_folder_sizes_must_match_unless_resized(tmp_path):
    root = _make_folder(tmp_path / "f")
    odd = root / "test" / "dog" / "big.png"
    _write_png(odd, size=(9, 7))
    with pytest.raises(DatasetError, match="big.png.*--image_size=64 to train.py"):
        load_dataset(f"folder:{root}")
    data = load_dataset(f"folder:{root}", image_size=(5, 4), val_fraction=0)
    assert data.x_train.shape[1:] == (5, 4, 3)
    assert data.x_test.shape == (5, 5, 4, 3)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    one = _make_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(DatasetError, match="single class"):
        load_dataset(f"folder:{one}")
    no_test = _make_folder(tmp_path / "no_test")
    for p in (no_test / "test").rglob("*.png"):
        p.unlink()
    with pytest.raises(DatasetError, match="no image files"):
        load_dataset(f"folder:{no_test}")
    hollow = _make_folder(tmp_path / "hollow")
    (hollow / "train" / "emu").mkdir()
    with pytest.raises(DatasetError, match="emu is empty"):
        load_dataset(f"folder:{hollow}")


def test_folder_corrupt_file_is_named(tmp_path):
    root = _make_folder(tmp_path / "f")
    (root / "train" / "dog" / "broken.png").write_bytes(b"not an image at all")
    start = time.monotonic()
    with pytest.raises(DatasetError, match=r"broken\.png") as info:
        load_dataset(f"folder:{root}")
    assert time.monotonic() - start < 5
    assert "\n" not in str(info.value)


def test_folder_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    from PIL import Image

    root = _make_folder(tmp_path / "f", size=(2, 3))
    wide = np.array([[0, 257, 32768], [40000, 65278, 65535]], np.uint16)
    path = root / "train" / "cat" / "0.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    data = load_dataset(f"folder:{root}", val_fraction=0)
    image = data.x_train[0]
    # 255 / 65535 = 1 / 257: 32768 / 257 = 127.5 -> 128, 40000 / 257 = 155.6.
    expected = np.array([[0, 1, 128], [156, 254, 255]], np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], expected)


def test_folder_decompression_bomb_is_named(tmp_path, monkeypatch):
    from PIL import Image

    root = _make_folder(tmp_path / "f")
    # Pillow refuses images above twice this many pixels; 6x6 = 36 > 2 * 10.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DatasetError, match=r"^Image .*0\.png is too large to decode "
                       r"safely \(.*\)\. Remove the file or shrink it\.$"):
        load_dataset(f"folder:{root}")


def test_folder_class_symlink_loops_are_named(tmp_path):
    ancestor = _make_folder(tmp_path / "ancestor")
    os.symlink("..", ancestor / "train" / "loop")
    with pytest.raises(DatasetError, match=r"train/loop is a symlink loop: it points "
                       r"to \.\., which contains it\."):
        load_dataset(f"folder:{ancestor}")
    itself = _make_folder(tmp_path / "itself")
    os.symlink("self", itself / "test" / "self")
    with pytest.raises(DatasetError, match=r"test/self is a symlink to self that "
                       r"loops or points nowhere\."):
        load_dataset(f"folder:{itself}")
    fine = _make_folder(tmp_path / "fine")
    os.symlink(ancestor / "train" / "cat", fine / "train" / "lion")
    os.symlink(ancestor / "test" / "cat", fine / "test" / "lion")
    assert load_dataset(f"folder:{fine}").class_names == ["cat", "dog", "lion"]


def test_folder_empty_test_class_is_refused(tmp_path):
    root = _make_folder(tmp_path / "f")
    for p in (root / "test" / "dog").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"^Class folder .*test/dog is empty\. "
                       r"Add images or remove the folder\.$"):
        load_dataset(f"folder:{root}")


# === Tiny-ImageNet layout ===


def _make_tiny_imagenet(root, wnids=("n02", "n01", "n03"), size=(8, 8)):
    for k, wnid in enumerate(wnids):
        for i in range(2):
            _write_png(
                root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG",
                size,
                (k * 100, 0, 0),
            )
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n01"]):
        name = f"val_{i}.JPEG"
        _write_png(root / "val" / "images" / name, size)
        lines.append(f"{name}\t{wnid}\t0\t0\t7\t7")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_layout(tmp_path):
    root = _make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    data = load_dataset("tiny_imagenet", data_dir=str(root), val_fraction=0)
    assert data.class_names == ["n01", "n02", "n03"]
    assert data.x_train.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(data.y_train, [0, 0, 1, 1, 2, 2])
    # n01 was written with red 100, n02 with 0.
    assert data.x_train[0, 0, 0, 0] == 100 and data.x_train[2, 0, 0, 0] == 0
    # The official validation set is the test set.
    np.testing.assert_array_equal(data.y_test, [2, 0, 0])
    # The parent folder works too; image_size resizes.
    resized = load_dataset(
        "tiny_imagenet", data_dir=str(tmp_path), val_fraction=0.5, image_size=4
    )
    assert resized.x_train.shape == (3, 4, 4, 3)
    assert resized.x_test.shape == (3, 4, 4, 3)


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(DatasetError, match="--data_dir"):
        load_dataset("tiny_imagenet")
    with pytest.raises(DatasetError, match="no train/ folder"):
        load_dataset("tiny_imagenet", data_dir=str(tmp_path))
    root = _make_tiny_imagenet(tmp_path / "t")
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DatasetError, match="val_annotations.txt is missing"):
        load_dataset("tiny_imagenet", data_dir=str(root))


def test_folder_thirty_two_bit_gray_tiff_is_refused(tmp_path):
    # Pillow reads 32-bit integer grayscale as mode "I", like 16-bit data; scaled
    # by 255 / 65535, values 0..255 became all zeros. Such a file has no white
    # level, so it is refused in one line naming it.
    from PIL import Image

    root = _make_folder(tmp_path / "f", size=(2, 3))
    path = root / "train" / "cat" / "0.tif"
    (root / "train" / "cat" / "0.png").unlink()
    Image.fromarray(np.array([[0, 100, 200], [50, 150, 255]], np.int32)).save(path)
    assert Image.open(path).mode == "I"
    with pytest.raises(DatasetError, match=r"^Image .*0\.tif is 32-bit integer "
                       r"grayscale \(Pillow mode I\), whose white level is unknown; "
                       r"save it as 8-bit \(mode L\) or 16-bit grayscale\.$"):
        load_dataset(f"folder:{root}")


def test_folder_sixteen_bit_tiff_is_scaled_to_eight_bits(tmp_path):
    from PIL import Image

    root = _make_folder(tmp_path / "f", size=(2, 3))
    (root / "train" / "cat" / "0.png").unlink()
    wide = np.array([[0, 257, 32768], [40000, 65278, 65535]], np.uint16)
    Image.fromarray(wide).save(root / "train" / "cat" / "0.tif")
    data = load_dataset(f"folder:{root}", val_fraction=0)
    expected = np.array([[0, 1, 128], [156, 254, 255]], np.uint8)
    image = data.x_train[0]  # cat/0.tif sorts first
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], expected)
