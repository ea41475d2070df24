"""Every use of a private Keras API by the experiment kit, one function each.

The kit's counterpart of `keras_ema/_keras_private.py`: Keras does not
promise these names; each function (or class) says which Keras version it
was read from. When Keras moves one of them, only this file changes.
"""

import functools

import keras

from keras_ema._keras_private import flatten_layers


# -- BatchNormalization over the global batch ---------------------------------


def synchronize_batch_norm(model):
    """Makes every BatchNormalization of `model` use `_global_moments`.

    Keras private APIs, read from Keras 3.15.1: `Layer._flatten_layers`
    (through `keras_ema._keras_private`) and `BatchNormalization._moments`
    (read at call time, so the built layers all-reduce their moments),
    `_reduction_axes` in `_global_moments`.
    """
    for layer in flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
            layer._moments = functools.partial(
                _global_moments, layer, layer._moments)


def _global_moments(layer, local_moments, inputs, mask):
    """`BatchNormalization._moments` over the global batch, in two passes.

    Keras' synchronized moments all-reduce `sum(x)` and `sum(x^2)` and take
    `E[x^2] - E[x]^2`: in float32 the difference loses most digits where
    `|E[x]|` is large against the spread (image backgrounds), and how the
    sum is split between replicas then changes the variance and, more, its
    gradient. Here the sum of `(x - mean)^2` is all-reduced after the mean.
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if mask is not None or context is None or not layer.synchronized:
        return local_moments(inputs, mask)
    axes = layer._reduction_axes

    def total(value):
        return context.all_reduce(
            "SUM", tf.reduce_sum(value, axis=axes, keepdims=True))

    count = total(tf.ones_like(inputs))
    mean = tf.math.divide_no_nan(total(inputs), count)
    variance = tf.math.divide_no_nan(total(tf.square(inputs - mean)), count)
    return tf.squeeze(mean, axes), tf.squeeze(variance, axes)


# -- fit and evaluate under several TensorFlow workers ------------------------


def build_from_local_batch(model: keras.Model, strategy):
    """Works around Keras 3.15.1's `fit` / `evaluate` under several workers.

    Before its first step Keras builds the metrics and optimizer from a
    batch it gets with `strategy.reduce("MEAN", batch)` of the whole
    `(x, y)` structure, which `MultiWorkerMirroredStrategy` with one device
    per worker cannot reduce ("Attempt to convert a value (PerReplica...")
    . The build needs only the shapes: this gives it the local replica's
    batch instead, by replacing `model._maybe_symbolic_build` (Keras 3.15.1,
    `keras/src/backend/tensorflow/trainer.py`) on the instance.
    """
    build = model._maybe_symbolic_build

    def local_build(iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0],
                    next(batches))
                break
        return build(data_batch=data_batch)

    model._maybe_symbolic_build = local_build


def reduce_scalars_across_workers():
    """Works around Keras 3.15.1's metric reduction under several workers.

    Each train and test step reduces the replicas' metrics with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on their scalars
    ("Invalid reduction dimension 0 for input with 0 dimensions") when
    `MultiWorkerMirroredStrategy` spans several workers; scalars are
    averaged over the replicas here instead (`axis=None`). Replaces
    `reduce_per_replica` of `keras/src/backend/tensorflow/trainer.py`
    (Keras 3.15.1) for the whole process, once.
    """
    from keras.src.backend.tensorflow import trainer

    reduce = trainer.reduce_per_replica
    if getattr(reduce, "scalars_fixed", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not (
                trainer._collective_all_reduce_multi_worker(strategy)):
            return reduce(values, strategy, reduction)

        def one(value):
            scalar = all(v.shape.rank == 0
                         for v in strategy.experimental_local_results(value))
            if scalar:
                return strategy.reduce("MEAN", value, axis=None)
            return reduce(value, strategy, reduction)

        return keras.tree.map_structure(one, values)

    reduce_per_replica.scalars_fixed = True
    trainer.reduce_per_replica = reduce_per_replica


# -- BackupAndRestore ---------------------------------------------------------


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` with its private parts named.

    Read from Keras 3.15.1 (`keras/src/callbacks/backup_and_restore.py`):
    the callback restores in `_load_model` (called by `on_train_begin`) and
    backs up in `_save_model` (called by `on_epoch_end`, or every
    `save_freq` batches); they call `load_backup()` and `save_backup()`
    here, which a subclass overrides. `metadata_path` is its
    `_training_metadata_path`, `current_epoch` its `_current_epoch` (the
    number of epochs finished when `_save_model` runs).
    """

    def _load_model(self):
        self.load_backup()

    def _save_model(self):
        self.save_backup()

    def load_backup(self):
        super()._load_model()

    def save_backup(self):
        super()._save_model()

    @property
    def metadata_path(self) -> str:
        return self._training_metadata_path

    @property
    def current_epoch(self) -> int:
        return self._current_epoch


def resume_at(model, epoch):
    """Makes `model.fit` start at `epoch`: Keras 3.15.1 starts `fit` at the
    private `model._initial_epoch` when it is set (`BackupAndRestore` sets it)."""
    model._initial_epoch = epoch


# -- SGD with a coupled weight decay ------------------------------------------


class CoupledDecaySGD(keras.optimizers.SGD):
    """`keras.optimizers.SGD` without its decoupled weight decay, its private parts named.

    Read from Keras 3.15.1 (`keras/src/optimizers/base_optimizer.py`):
    `Optimizer.apply` calls `_apply_weight_decay` (w -= lr * wd * w), which
    does nothing here, for a subclass that couples the decay into its
    gradient; `uses_weight_decay(variable)` is `_use_weight_decay` (which
    holds `exclude_from_weight_decay`'s choices) and `variable_index` is
    `_get_variable_index` (a variable's index in the slot lists, such as
    `momentums`).
    """

    def _apply_weight_decay(self, variables):
        return

    def uses_weight_decay(self, variable) -> bool:
        return self._use_weight_decay(variable)

    def variable_index(self, variable) -> int:
        return self._get_variable_index(variable)
