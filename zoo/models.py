"""The paper's models by name: `get_model("resnet18", ...)`.

`MODELS` maps each name to its class and variant; `get_model` builds one, with
BatchNorm statistics over the global batch of a `tf.distribute` strategy on
request (`synchronized_bn`).
"""

import keras

from zoo import _keras_private
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
        _keras_private.synchronize_batch_norm(model)
    return model


__all__ = ["MODELS", "ResNet", "VGG", "WideResNet", "get_model"]
