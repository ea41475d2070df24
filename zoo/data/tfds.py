"""CIFAR-10/100 and CIFAR-10N/100N through TensorFlow Datasets.

`tensorflow_datasets` is imported only when one of these datasets is loaded.
A dataset that is not prepared is downloaded, unless that cannot happen: a
CIFAR-N manual file is missing, or the download host does not answer a quick
TCP probe (no network). Either fails within seconds with one line naming the
dataset and how to provide it.
"""

import os
import pathlib
import socket
import threading

import numpy as np

from zoo.data.dataset import DatasetError

_TFDS_CHUNK = 8192
_PROBE_TIMEOUT_S = 3.0

# CLI name -> (TFDS builder, host its download_and_prepare fetches from).
TFDS_DATASETS = {
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


def load_tfds(name: str, data_dir: str | None, label_key: str) -> tuple:
    """The train and test arrays of a TFDS CIFAR dataset, prepared if needed.

    Args:
        name: str, a key of `TFDS_DATASETS`.
        data_dir: str, the TFDS data directory, or `None` for TFDS's default.
        label_key: str, the feature holding the training labels: `"label"`,
            or a CIFAR-N label set's feature (e.g. `"worse_label"`).

    Returns:
        `(x_train, y_train, clean_train, x_test, y_test, class_names)`, where
        `clean_train` holds the clean training labels, or is `None` when
        `label_key` is `"label"`.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DatasetError(
            f"{name} is read through tensorflow-datasets, which is not "
            f"installed ({err}). Install tensorflow and tensorflow-datasets, "
            "or use digits / folder:PATH."
        ) from None
    tfds_name, host = TFDS_DATASETS[name]
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
