"""The validation data of `MultiEMA`: checked before training, evaluated per EMA."""

import keras
import numpy as np


def first_batch(data, batch_size):
    """`(x, y)` of the first batch of `data`, or `None` if it cannot be read
    without consuming it (a generator or an iterator)."""
    if isinstance(data, (tuple, list)):
        n = batch_size or 32
        x, y = data[0], data[1]
        return (
            keras.tree.map_structure(lambda a: a[:n], x),
            None if y is None else keras.tree.map_structure(lambda a: a[:n], y),
        )
    if isinstance(data, keras.utils.PyDataset):
        batch = data[0]
    elif type(data).__module__.startswith("tensorflow") and hasattr(data, "take"):
        batch = next(iter(data.take(1)), None)
        if batch is None:
            raise ValueError(
                "Invalid `validation_data` for MultiEMA: the dataset is empty."
            )
    else:
        return None
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            "Invalid `validation_data` for MultiEMA: its batches must be "
            "`(x, y)` or `(x, y, sample_weight)` to evaluate the EMAs. "
            f"Received a batch of type {type(batch).__name__}."
        )
    return batch[0], batch[1]


def check_labels(model, y, where):
    """Class-index labels must lie in `[0, number of outputs)`."""
    outputs = getattr(model, "outputs", None)
    if y is None or not outputs or len(outputs) != 1:
        return
    out_shape = tuple(outputs[0].shape)
    if not hasattr(y, "shape"):
        return
    y = np.asarray(keras.ops.convert_to_numpy(y))
    classes = out_shape[-1] if out_shape else None
    if not classes or classes < 2 or y.size == 0:
        return
    sparse = y.ndim == len(out_shape) - 1 or (
        y.ndim == len(out_shape) and y.shape[-1] == 1
    )
    if not sparse or not np.issubdtype(y.dtype, np.number):
        return
    low, high = y.min(), y.max()
    if low < 0 or high >= classes or not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError(
            f"Invalid `validation_data` for MultiEMA: {where} labels range "
            f"over [{low}, {high}], but the model has {classes} outputs, so "
            f"class labels must be integers in [0, {classes - 1}]. Check the "
            "labels or the model's number of classes."
        )


def check_validation_data(model, data, batch_size):
    """Fails fast on validation data the EMAs could not be evaluated on.

    Checks the labels of `(x, y)` arrays in full and of a dataset's first
    batch, then evaluates one batch, so that a mismatch is reported before
    training instead of after the first epoch.
    """
    if isinstance(data, (tuple, list)) and len(data) >= 2:
        check_labels(model, data[1], "the")
    elif isinstance(data, (tuple, list)):
        raise ValueError(
            "Invalid `validation_data` for MultiEMA: expected `(x, y)` or "
            f"`(x, y, sample_weight)`. Received a {type(data).__name__} of "
            f"length {len(data)}."
        )
    batch = first_batch(data, batch_size)
    if batch is None:
        return
    x, y = batch
    if not isinstance(data, (tuple, list)):
        check_labels(model, y, "the first batch's")
    try:
        model.evaluate(x, y, batch_size=batch_size or 32, verbose=0)
    except Exception as e:  # report it in one line, before training
        lines = [line for line in str(e).splitlines() if line.strip()]
        detail = lines[0][:300] if lines else type(e).__name__
        raise ValueError(
            "Invalid `validation_data` for MultiEMA: the model cannot be "
            f"evaluated on its first batch ({type(e).__name__}: {detail}). "
            "Check the shapes of x and y against the model."
        ) from None


def evaluate(model, data, batch_size) -> dict:
    """`model.evaluate(data)` as a dict, `data` an `(x, y[, w])` tuple or a dataset."""
    if isinstance(data, (tuple, list)):
        x, y = data[0], data[1]
        sample_weight = data[2] if len(data) > 2 else None
        return model.evaluate(
            x, y, sample_weight=sample_weight, batch_size=batch_size,
            verbose=0, return_dict=True,
        )
    return model.evaluate(data, verbose=0, return_dict=True)
