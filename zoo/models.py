"""The paper's models by name: `get_model("resnet18", ...)`.

`MODELS` maps each name to its class and variant; `get_model` builds one, with
BatchNorm statistics over the global batch of a `tf.distribute` strategy on
request (`synchronized_bn`).
"""

import functools

import keras

from keras_ema._keras_private import flatten_layers
from zoo import resnet as _resnet
from zoo import vgg as _vgg
from zoo import wide_resnet as _wide_resnet
from zoo.resnet import ResNet
from zoo.vgg import VGG
from zoo.wide_resnet import WideResNet

# name -> (class, its entry in the module's VARIANTS dict)
MODELS = {
    "resnet18": (ResNet, _resnet.VARIANTS["resnet18"]),
    "resnet34": (ResNet, _resnet.VARIANTS["resnet34"]),
    "wrn28_10": (WideResNet, _wide_resnet.VARIANTS["wrn28_10"]),
    "vgg16": (VGG, _vgg.VARIANTS["vgg16"]),
}


def get_model(
    name: str,
    num_classes: int = 10,
    input_shape: tuple = (32, 32, 3),
    synchronized_bn: bool = False,
    **overrides,
) -> keras.Model:
    """Builds a named model of the paper: logits out, classifier `"classifier"`.

    Args:
        name: str. One of `"resnet18"`, `"resnet34"`, `"wrn28_10"`, `"vgg16"`.
        num_classes: int. The number of output logits. Defaults to `10`.
        input_shape: tuple of 3 ints. `(height, width, channels)`; ResNets
            switch to their 64x64 stem from 64 pixels on. Defaults to
            `(32, 32, 3)`.
        **overrides: constructor arguments of the model class, e.g. `width`,
            `dropout` (WRN), `batch_norm` (VGG), `stem` (ResNet), `name`.
        synchronized_bn: bool. Whether every `BatchNormalization` layer
            computes its batch statistics over the global batch of a
            `tf.distribute` strategy (`synchronized=True`), so that training
            on several devices or processes computes what one does.
            TensorFlow only: JAX's `keras.distribution.DataParallel` already
            computes them over the global batch. The variance is all-reduced
            in two passes (the mean first, then the squared deviations from
            it) instead of Keras' `E[x^2] - E[x]^2`, whose cancellation in
            float32 made 2 processes' first gradients differ by ~1e-2 from
            one process's. Defaults to `False`.

    Returns:
        A `zoo.resnet.ResNet`, `zoo.wide_resnet.WideResNet` or
        `zoo.vgg.VGG` instance.

    Example:

    ```python
    from zoo.models import get_model

    model = get_model("resnet18", num_classes=100)
    tiny = get_model("resnet18", 200, (64, 64, 3), width=0.25)
    ```
    """
    if name not in MODELS:
        raise ValueError(
            f"Unknown model name {name!r}. Known: {', '.join(MODELS)}"
        )
    cls, variant = MODELS[name]
    kwargs = dict(variant["config"])
    kwargs.update(num_classes=num_classes, input_shape=input_shape, name=name)
    kwargs.update(overrides)
    if synchronized_bn and keras.backend.backend() != "tensorflow":
        raise ValueError(
            "Invalid value for argument `synchronized_bn`: True needs the "
            f"TensorFlow backend (the backend is {keras.backend.backend()}); "
            "JAX's DataParallel computes BatchNorm statistics over the global "
            "batch already. Received: synchronized_bn=True."
        )
    model = cls(**kwargs)
    if synchronized_bn:
        _synchronize_batch_norm(model)
    return model


def _synchronize_batch_norm(model):
    """Makes every BatchNormalization of `model` use `_global_moments`.

    Keras private APIs, read from Keras 3.15.1: `Layer._flatten_layers`
    (through `keras_ema._keras_private`) and `BatchNormalization._moments` (read at call time, so the built layers
    all-reduce their moments), `_reduction_axes` in `_global_moments`.
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


__all__ = ["MODELS", "ResNet", "VGG", "WideResNet", "get_model"]
