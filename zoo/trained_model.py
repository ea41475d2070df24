"""A trained model back from its run: rebuilt, weights loaded, BN recomputed.

Evaluation, the post-hoc sweep and the export each need a run's model in the
state training left it: the architecture of the run's flags (under its
mixed-precision policy), the weights of one saved file, and, for an average
of weights, BatchNorm statistics recomputed on the training split.
"""

import os

from zoo.run import run_dir


def build_model(config, data):
    """The untrained model of `config` for `data`, under its precision policy.

    The global dtype policy is set to `config.mixed_precision` only while the
    model is built, and restored afterwards.

    Args:
        config: `zoo.run.config.Config`. Its `model`, `width` and
            `mixed_precision`.
        data: `zoo.data.Dataset`. Its `num_classes` and `image_shape`.

    Returns:
        A `keras.Model`.
    """
    import keras

    import zoo.models

    previous = keras.mixed_precision.global_policy()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy(config.mixed_precision)
    try:
        return zoo.models.get_model(
            config.model,
            num_classes=data.num_classes,
            input_shape=data.image_shape,
            width=config.width,
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)


def recompute_bn(model, config, data) -> bool:
    """Recomputes `model`'s BatchNorm statistics on the training split.

    One pass over `data.x_train` in batches of `config.batch_size`, without
    augmentation, normalized as training normalized it
    (`keras_ema.recompute_batch_norm_statistics`). A model without
    BatchNorm is left as it is.

    Args:
        model: `keras.Model`. Changed in place.
        config: `zoo.run.config.Config`. Its `batch_size`.
        data: `zoo.data.Dataset`. Its training images, `mean` and `std`.

    Returns:
        Whether the model has BatchNorm layers (and so was recomputed).
    """
    from keras_ema.batch_norm import batch_norm_layers
    from keras_ema.batch_norm import recompute_batch_norm_statistics
    from zoo.data.loader import ArrayLoader

    if not batch_norm_layers(model):
        return False
    recompute_batch_norm_statistics(
        model,
        ArrayLoader(data.x_train, None, config.batch_size, data.mean, data.std),
    )
    return True


def trained_model(
    config,
    data,
    weights: "str | None" = None,
    *,
    model=None,
    bn_recompute: bool = True,
    remedy: str = "",
):
    """The model of a run with the weights of one file, BN recomputed.

    Args:
        config: `zoo.run.config.Config`. The run's configuration.
        data: `zoo.data.Dataset`. The run's dataset, as training loaded it.
        weights: str or `None`. A `.weights.h5` file to load; `None` keeps
            the model's weights. Defaults to `None`.
        model: `keras.Model` or `None`. The model to load into, e.g. an EMA
            copy that training holds; `None` builds it (`build_model`).
            Defaults to `None`.
        bn_recompute: bool. Whether to recompute the BatchNorm statistics
            (`recompute_bn`), as an average of weights needs. Defaults to
            `True`.
        remedy: str. What the user can do about a file that does not load,
            appended to `zoo.run.run_dir.DamagedFileError`'s message. Defaults to
            `""`.

    Returns:
        The `keras.Model`.

    Raises:
        zoo.run.run_dir.DamagedFileError: `weights` is missing or does not load.

    Example:

    ```python
    model = trained_model(run.config, data, "runs/demo_s0/sgd_last.weights.h5",
                          bn_recompute=False)
    ```
    """
    if model is None:
        model = build_model(config, data)
    if weights is not None:
        run_dir.load_weights(model, os.fspath(weights), remedy=remedy)
    if bn_recompute:
        recompute_bn(model, config, data)
    return model
