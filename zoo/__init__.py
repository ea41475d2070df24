"""zoo: the models and data the paper's experiments need.

Importing `zoo` needs only Keras (any backend) and numpy; TensorFlow and TFDS
are imported inside the data functions that use them.
"""

from zoo import resnet as _resnet
from zoo import vgg as _vgg
from zoo import wide_resnet as _wide_resnet
from zoo.resnet import ResNet
from zoo.vgg import VGG
from zoo.wide_resnet import WideResNet

# === Data and schedules (zoo.datasets, zoo.schedules) ===

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
    **overrides,
):
    """Builds a named model of the paper: logits out, classifier `"classifier"`.

    Args:
        name: str. One of `"resnet18"`, `"resnet34"`, `"wrn28_10"`, `"vgg16"`.
        num_classes: int. The number of output logits. Defaults to `10`.
        input_shape: tuple of 3 ints. `(height, width, channels)`; ResNets
            switch to their 64x64 stem from 64 pixels on. Defaults to
            `(32, 32, 3)`.
        **overrides: constructor arguments of the model class, e.g. `width`,
            `weight_decay`, `dropout` (WRN), `batch_norm` (VGG), `stem`
            (ResNet), `name`.

    Returns:
        A `zoo.ResNet`, `zoo.WideResNet` or `zoo.VGG` instance.

    Example:

    ```python
    model = zoo.get_model("resnet18", num_classes=100, weight_decay=5e-4)
    tiny = zoo.get_model("resnet18", 200, (64, 64, 3), width=0.25)
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
    return cls(**kwargs)


__all__ = ["MODELS", "ResNet", "VGG", "WideResNet", "get_model"]
