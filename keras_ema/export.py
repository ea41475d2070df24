"""Shipping an EMA: a TensorFlow SavedModel and a `.keras` file of one decay."""

import contextlib
import os

import keras
import numpy as np

from keras_ema import messages
from keras_ema.files import atomic_path
from keras_ema.batch_norm import batch_norm_statistics
from keras_ema.batch_norm import recompute_batch_norm_statistics


def _check_finite(model, when=""):
    """Raises if a float weight of `model` holds a NaN or an infinity."""
    for v in model.weights:
        if "float" not in str(v.dtype):
            continue
        value = np.asarray(keras.ops.convert_to_numpy(v))
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"Cannot export model {model.name}: variable {v.path} holds "
                f"NaN or infinite values{when}. Nothing was written; export "
                "weights from before the divergence (e.g. an EMA or a "
                "checkpoint)."
            )


def export_ema(
    ema, decay: float, directory: str, batch_norm_data=None, verbose: int = 1
) -> keras.Model:
    """Writes the EMA model of `decay` as a SavedModel and a `.keras` file.

    The EMA weights go into an independent copy of the model
    (`MultiEMA.ema_model`), so the live training weights are never touched;
    then `export_model` writes it. Non-trainable variables that are not
    averaged (see `MultiEMA`) take their live values. Non-finite weights, and
    an EMA that was never updated (it would ship the initial weights), are
    refused with a `ValueError` and nothing is written.

    Args:
        ema: a built `MultiEMA` (or subclass).
        decay: float, one of `ema.decays`.
        directory: str, created if needed; existing outputs are replaced.
        batch_norm_data: data for `recompute_batch_norm_statistics`, or `None`.
            Defaults to `None`.
        verbose: int, 1 prints what is written. Defaults to `1`.

    Returns:
        The exported `keras.Model` (the EMA copy).

    Example:

    ```python
    model.fit(x, y, epochs=100, callbacks=[ema])
    export_ema(ema, 0.998, "export/", batch_norm_data=x)
    served = tf.saved_model.load("export/saved_model")
    ```
    """
    ema._require_built()
    if not ema.num_updates:
        raise ValueError(
            f"Cannot export the EMA with decay {decay}: it was never updated "
            f"(no update in {ema.step} optimizer steps, one every "
            f"{ema.period}), so it still equals the initial weights. Nothing "
            "was written; train for more than `period` steps first."
        )
    model = ema.ema_model(decay)
    export_model(model, directory, batch_norm_data=batch_norm_data,
                 verbose=verbose)
    if verbose:
        messages.print_msg(f"(the EMA with decay {decay})")
    return model


def export_model(
    model: keras.Model, directory: str, batch_norm_data=None, verbose: int = 1
) -> keras.Model:
    """Writes `model` as a TensorFlow SavedModel and a `.keras` file.

    With `batch_norm_data`, the model's BatchNorm statistics are first
    recomputed on it (`recompute_batch_norm_statistics`); a model without
    BatchNorm ignores it. Each output is written under a temporary name in
    `directory` and renamed, so it appears whole or not at all:

    - `<directory>/saved_model/`: `tf.saved_model.load(path).serve(images)`
      returns the model's outputs (needs TensorFlow, on any Keras backend).
    - `<directory>/model.keras`: `keras.saving.load_model(path)`.

    A model whose weights hold a NaN or an infinity (also after the
    BatchNorm recompute) is refused with a `ValueError` naming the variable,
    and nothing is written.

    Args:
        model: a built `keras.Model`.
        directory: str, created if needed; existing outputs are replaced.
        batch_norm_data: data for `recompute_batch_norm_statistics`, or `None`.
            Defaults to `None`.
        verbose: int, 1 prints what is written. Defaults to `1`.

    Returns:
        `model`.

    Raises:
        ImportError: TensorFlow is not installed (before anything is written).
        ValueError: `directory` is a file, or a weight is not finite.
    """
    _require_tensorflow()
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"Cannot export to {directory!r}: it is a file, not a directory. "
            "Pass a new or existing directory."
        )
    _check_finite(model)
    if batch_norm_data is not None and batch_norm_statistics(model):
        recompute_batch_norm_statistics(model, batch_norm_data)
        _check_finite(model, " after recomputing its BatchNorm statistics")
    os.makedirs(directory, exist_ok=True)
    saved_model = os.path.join(directory, "saved_model")
    with atomic_path(saved_model) as tmp_saved_model:
        with _tensorflow_warnings_only():
            model.export(tmp_saved_model, format="tf_saved_model", verbose=False)
    keras_file = os.path.join(directory, "model.keras")
    with atomic_path(keras_file) as tmp_keras:
        model.save(tmp_keras)
    if verbose:
        messages.print_msg(
            f"Exported {saved_model} (SavedModel) and {keras_file}"
        )
    return model


def _require_tensorflow():
    """An `ImportError` saying what to install, unless TensorFlow imports."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise ImportError(
            "export_model writes a TensorFlow SavedModel, which needs "
            "TensorFlow: pip install \"keras-ema[tensorflow]\" (the model "
            "itself may be trained on JAX)."
        ) from None


@contextlib.contextmanager
def _tensorflow_warnings_only():
    """Hides TensorFlow's INFO log lines (SavedModel's `signature_serialization`).

    They describe TensorFlow's internals and ask nothing of the user;
    warnings and errors still show. The `tensorflow` logger is the one
    TensorFlow's Python code writes to (shown through absl's handler under
    `absl.app`, or TensorFlow's own in a notebook).
    """
    import logging

    logger = logging.getLogger("tensorflow")
    previous = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)
