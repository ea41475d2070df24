"""Recomputing BatchNorm statistics: the exact average over one pass of data."""

import itertools
import warnings

import keras
import numpy as np

from keras_ema import _backend
from keras_ema import _keras_private
from keras_ema.checks import check_int
from keras_ema.checks import is_int
from keras_ema.checks import numpy_if_tf

DEFAULT_BATCH_SIZE = 128


def batch_norm_layers(model) -> list:
    """Every `keras.layers.BatchNormalization` layer in `model`, nested ones too."""
    return [
        layer
        for layer in _keras_private.flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def batch_norm_statistics(model) -> list:
    """The moving mean and variance of every built BatchNorm in `model`."""
    return _statistics(batch_norm_layers(model))


def recompute_batch_norm_statistics(
    model: keras.Model,
    data,
    batch_size: int | None = None,
    steps: int | None = None,
    verbose: int = 0,
) -> keras.Model:
    """Sets every BatchNorm's moving statistics to their average over `data`.

    After training, and above all after averaging weights (an EMA), the
    moving statistics of BatchNorm need not match the weights they sit
    among. This makes them match: one pass over `data` runs the model in
    training mode, where each BatchNorm normalizes with the statistics of the
    current batch (so later layers see what they see in training), and every
    BatchNorm's `moving_mean` and `moving_variance` become the plain average
    of its batch means and batch variances:

    ```
    moving_mean     = (1 / n) * sum_i mean_i
    moving_variance = (1 / n) * sum_i var_i
    ```

    over the `n` batches, each batch weighing the same whatever its size (a
    last, smaller batch counts as much as a full one). This is PyTorch's
    `torch.optim.swa_utils.update_bn`, i.e. BatchNorm with `momentum=None`,
    except for the variance: `var_i` is the biased batch variance
    (`mean((x - mean_i) ** 2)`), the one Keras' BatchNorm normalizes with and
    stores, where PyTorch stores the unbiased one. The averages are summed in
    float64 and cast to the variables' dtype once.

    Nothing else changes: other weights, non-trainable state such as dropout
    seeds, and each BatchNorm's `momentum` are restored, also when an error
    interrupts the pass. The data is used as given: no augmentation is added.
    BatchNorm layers with `trainable=False` normalize with their moving
    statistics even in training mode (Keras' fine-tuning behaviour), compute
    no batch statistics and are left as they are; so is a BatchNorm the
    forward pass does not reach. A BatchNorm called more than once in one
    forward pass (one layer shared by two branches, or applied twice) raises
    a `ValueError`: it would keep the statistics of its last call only, and
    no single pair of statistics serves both calls.

    Args:
        model: `keras.Model`. Functional, `Sequential` or subclassed; called
            as `model(x, training=True)`.
        data: the inputs, one of: a numpy array (or tensor) `x`; a tuple
            `(x,)`, `(x, y)` or `(x, y, sample_weight)` of arrays, batched with
            `batch_size` (only `x` is used); a `tf.data.Dataset`, a
            `keras.utils.PyDataset` or any iterable of batches, each `x` or a
            tuple `(x, y)` / `(x, y, sample_weight)`.
        batch_size: int or `None`. The batch size for array inputs; iterables
            bring their own batches. Defaults to `None` (128).
        steps: int or `None`. Use at most this many batches; needed for an
            endless iterable. Defaults to `None` (one full pass).
        verbose: int. 1 shows a progress bar. Defaults to `0`.

    Returns:
        The model, with its BatchNorm statistics recomputed. A model without
        BatchNorm is returned unchanged, with a warning.

    Example:

    ```python
    with ema.swapped_in(0.998) as model:
        keras_ema.recompute_batch_norm_statistics(model, x_train[:10000])
        model.evaluate(x_test, y_test)
    ```
    """
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
    batch_size = check_int("batch_size", batch_size, allow_none=True)
    steps = check_int("steps", steps, allow_none=True)
    every = batch_norm_layers(model)
    if not every:
        warnings.warn(
            f"Model {model.name} has no BatchNormalization layer; its weights "
            "are left unchanged.",
            stacklevel=2,
        )
        return model
    for layer in every:
        if layer.renorm:
            raise ValueError(
                f"BatchNormalization layer {layer.name} uses batch "
                "renormalization (renorm=True), whose statistics cannot be "
                "recomputed this way. Recompute a model without renorm."
            )
    layers = [layer for layer in every if layer.trainable]
    if len(layers) < len(every):
        frozen = [layer.name for layer in every if not layer.trainable]
        warnings.warn(
            f"BatchNormalization layers {frozen} are frozen (trainable=False) "
            "and keep their moving statistics.",
            stacklevel=2,
        )
    if not layers:
        return model

    momenta = [layer.momentum for layer in layers]
    originals = {}  # id(variable) -> (variable, value) for the moving stats
    kept, kept_values = [], []
    try:
        for layer in layers:
            # With momentum 0 the update `moving * m + batch * (1 - m)` writes
            # the batch statistics exactly: they are then read, not inferred.
            layer.momentum = 0.0
        stats = _statistics(layers)
        ids = {id(v) for v in stats}
        kept = [v for v in model.variables if id(v) not in ids]
        kept_values = _backend.snapshot(kept)
        for v, value in zip(stats, _backend.snapshot(stats)):
            originals[id(v)] = (v, value)
        _make_finite(layers)
        progress = None
        if verbose:
            progress = keras.utils.Progbar(_num_batches(data, batch_size, steps))
        sums = None
        count = 0
        for x in _batches(data, batch_size, steps):
            if count == 0:
                _first_call(model, x, layers)
            else:
                model(x, training=True)
            # Read after the call: an unbuilt model builds its layers there.
            stats = _statistics(layers)
            if sums is None:
                sums = [0.0] * len(stats)
            for i, v in enumerate(stats):
                sums[i] = sums[i] + keras.ops.convert_to_numpy(v).astype(
                    np.float64
                )
            count += 1
            if progress is not None:
                progress.update(count)
        if progress is not None and progress.target is None:
            progress.update(count, finalize=True)  # an iterable of unknown size
        if sums is None:
            raise ValueError(
                "Received no batches in `data`: recomputing BatchNorm "
                "statistics needs at least one batch of inputs."
            )
        for v, total in zip(_statistics(layers), sums):
            v.assign(keras.ops.cast(total / count, v.dtype))
        originals = {}
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for v, value in zip(kept, kept_values):
            v.assign(value)
        for v, value in originals.values():
            v.assign(value)
    return model


def _first_call(model, x, layers):
    """`model(x, training=True)`, refusing BatchNorm layers called twice.

    Such a layer (shared between two branches, or applied twice) keeps
    only its last call's batch statistics, so the average would be wrong.
    """
    with _keras_private.counting_calls(layers) as counts:
        model(x, training=True)
    shared = [f"{layer.name} ({counts[id(layer)]} calls)" for layer in layers
              if counts[id(layer)] > 1]
    if shared:
        raise ValueError(
            f"BatchNormalization layers {shared} are called more than once in "
            "one forward pass, so their statistics cannot be recomputed "
            "(each call sees different activations). Give each call its own "
            "BatchNormalization layer."
        )


def _statistics(layers):
    stats = []
    for layer in layers:
        if layer.built:
            stats += [layer.moving_mean, layer.moving_variance]
    return stats


def _make_finite(layers):
    # `moving * 0` is NaN for an infinite or NaN statistic (a diverged model):
    # start such layers from zeros and ones, which `* 0` then erases.
    for layer in layers:
        if not layer.built:
            continue
        for v, fill in ((layer.moving_mean, 0.0), (layer.moving_variance, 1.0)):
            value = keras.ops.convert_to_numpy(v)
            if not np.all(np.isfinite(value)):
                v.assign(keras.ops.cast(np.full(value.shape, fill), v.dtype))


def _is_array(x):
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _unpack(data):
    """`x` of a tuple `(x,)`, `(x, y)` or `(x, y, sample_weight)`; else `data`."""
    if isinstance(data, tuple):
        if not 1 <= len(data) <= 3:
            raise ValueError(
                "Invalid value for argument `data`: a tuple must be (x,), "
                f"(x, y) or (x, y, sample_weight). Received a tuple of "
                f"{len(data)} elements."
            )
        return data[0]
    return data


def _num_batches(data, batch_size, steps):
    data = _unpack(data)
    if _is_array(data) or isinstance(data, dict):
        total = -(-_num_samples(data) // batch_size)
    else:
        total = getattr(data, "num_batches", None)  # a keras.utils.PyDataset
        if not is_int(total):
            try:
                total = len(data)
            except TypeError:
                total = None
    if steps is not None:
        total = steps if total is None else min(total, steps)
    return total


def _num_samples(x):
    leaves = keras.tree.flatten(x)
    if not leaves or not _is_array(leaves[0]) or len(leaves[0].shape) < 1:
        raise ValueError(
            "Invalid value for argument `data`: expected arrays with a leading "
            f"batch dimension. Received: {type(x).__name__} of shape "
            f"{getattr(leaves[0], 'shape', None) if leaves else None}"
        )
    return int(leaves[0].shape[0])


def _batches(data, batch_size, steps):
    """Yields the model inputs `x` of each batch of `data`."""
    data = _unpack(data)
    # tf.data (and TensorFlow tensors) yield TensorFlow tensors, which other
    # backends refuse.
    convert = _backend.backend_name() != "tensorflow"
    if _is_array(data) or isinstance(data, dict):
        n = _num_samples(data)
        for i, start in enumerate(range(0, n, batch_size)):
            if steps is not None and i >= steps:
                return
            x = keras.tree.map_structure(
                lambda a: a[start:start + batch_size], data
            )
            if convert:
                x = keras.tree.map_structure(numpy_if_tf, x)
            yield x
        return
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(
            "Invalid value for argument `data`: expected an array, a tuple "
            "(x, y), a tf.data.Dataset, a keras.utils.PyDataset or an iterable "
            f"of batches. Received: {type(data).__name__}"
        ) from None
    if steps is not None:
        iterator = itertools.islice(iterator, steps)
    for batch in iterator:
        x = batch[0] if isinstance(batch, tuple) else batch
        if convert:
            x = keras.tree.map_structure(numpy_if_tf, x)
        yield x
