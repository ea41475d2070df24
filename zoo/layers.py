"""The building blocks of the zoo's models: torch-like convs, BN, width rules.

ResNet, Wide ResNet and VGG are written with these functions, so that every
conv starts from the same initializer, pads a strided conv as PyTorch's
`padding=1` does, and every BatchNormalization uses PyTorch's defaults.
Each function names its layers from one prefix (`f"{name}_conv"`,
`f"{name}_bn"`, `f"{name}_relu"`, ...), which is what weights files are
matched by.
"""

import keras
from keras import layers

from keras_ema.checks import is_int
from keras_ema.checks import is_real

# PyTorch's BatchNorm2d defaults: torch's momentum 0.1 is Keras' 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def scale_filters(filters: int, width: float) -> int:
    """Scales a filter count by a width multiplier: `max(1, round(f * width))`."""
    return max(1, int(round(filters * width)))


def conv_kernel_initializer() -> keras.initializers.Initializer:
    """He-normal with fan-out, as torchvision and WRN's reference code use."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


def validate_width(width: float) -> float:
    """`float(width)` if `width` is a positive number (not a bool)."""
    if not is_real(width) or not width > 0:
        raise ValueError(
            "Invalid value for argument `width`: it must be a positive number. "
            f"Received: width={width}"
        )
    return float(width)


def validate_input_shape(input_shape) -> tuple:
    """`tuple(input_shape)` if it has 3 entries `(height, width, channels)`."""
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            "Invalid value for argument `input_shape`: expected "
            "(height, width, channels). "
            f"Received: input_shape={input_shape}"
        )
    return input_shape


def validate_stacks(**stacks) -> dict:
    """The lists of `stacks`, checked to be non-empty, of one length, positive.

    Args:
        **stacks: the per-stack arguments of a model by name, e.g.
            `stackwise_num_blocks=[2, 2, 2, 2]`.

    Returns:
        `{name: list}`.
    """
    stacks = {name: list(value) for name, value in stacks.items()}
    values = list(stacks.values())
    if (
        not values[0]
        or any(len(v) != len(values[0]) for v in values)
        or any(not is_int(n) or n < 1 for v in values for n in v)
    ):
        names = list(stacks)
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must be non-empty lists of "
            "positive ints of the same length. Received: "
            + ", ".join(f"{k}={v}" for k, v in stacks.items())
        )
    return stacks


def model_arguments(config: dict) -> dict:
    """A model's `get_config()` as constructor arguments, older files' included.

    Models saved before weight decay moved into the optimizer
    (`zoo.regularization.PyTorchSGD`) wrote a `weight_decay` key; it set an
    L2 regularizer for training and changes nothing the model computes, so
    it is dropped.
    """
    config = dict(config)
    config.pop("weight_decay", None)
    return config


def check_model_kwargs(kwargs: dict):
    """Refuses `weight_decay`, which `keras.Model` would drop without a word.

    The zoo's models took it when weight decay was their L2 regularizer; it
    is the optimizer's now, and a model silently built without it would
    train without decay.
    """
    if "weight_decay" in kwargs:
        raise ValueError(
            "Invalid argument `weight_decay`: weight decay is the optimizer's, "
            "not the model's; compile with zoo.regularization.PyTorchSGD("
            f"weight_decay=...). Received: weight_decay={kwargs['weight_decay']!r}"
        )


def subsample(x, stride: int, name: str):
    """Keeps every `stride`-th row and column: `x[:, ::stride, ::stride]`.

    A stride-2 1x1 conv is this subsampling followed by a stride-1 1x1 conv,
    with the same output (`ceil(n / 2)` pixels for odd sizes too), the same
    gradients and the same kernel. The projection shortcuts use the pair
    because TensorFlow 2.21's oneDNN backward pass of a strided 1x1 conv
    corrupts memory and aborts the process when the batch size is odd.
    `MaxPooling2D(1, strides)` does the subsampling as a built-in layer
    without weights, so checkpoints of the strided conv still load and saved
    models need no custom class. It costs nothing measurable: ResNet-18 at
    width 0.25, 32x32, batch 64, TensorFlow 2.21 on 2 CPU cores, one process
    alternating the two models, takes 142.8 ms of CPU time per training step
    against 143.0 with the strided conv (medians of 12 x 10 steps); turning
    oneDNN off for the whole process instead (`TF_ENABLE_ONEDNN_OPTS=0`)
    takes 309-312 ms, about twice as long.

    Args:
        x: Tensor. Channels last.
        stride: int. The step between kept rows and columns; `1` returns `x`.
        name: str. The layer name.

    Returns:
        The subsampled tensor.
    """
    if stride == 1:
        return x
    return layers.MaxPooling2D(1, strides=stride, name=name)(x)


def conv(
    x,
    filters: int,
    kernel_size: int,
    *,
    strides: int = 1,
    use_bias: bool = False,
    name: str,
):
    """Applies a square conv that samples the pixels PyTorch's conv samples.

    Stride 1 pads "same". A strided 3x3 conv pads one pixel on each side
    explicitly (layer `f"{name}_pad"`), as PyTorch's `padding=1` does; Keras'
    `padding="same"` would pad only bottom/right and sample a different pixel
    grid. A strided 1x1 conv is `subsample` (layer `f"{name}_subsample"`)
    then a stride-1 conv.

    Args:
        x: Tensor. Channels last.
        filters: int. The output channels.
        kernel_size: int. `1` or an odd size.
        strides: int. Defaults to `1`.
        use_bias: bool. Defaults to `False` (a BN follows).
        name: str. The prefix of the layer names; the conv is
            `f"{name}_conv"`.

    Returns:
        The output tensor.
    """
    padding = "same"
    if strides > 1 and kernel_size == 1:
        x = subsample(x, strides, name=f"{name}_subsample")
        strides = 1
    elif strides > 1:
        x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        kernel_initializer=conv_kernel_initializer(),
        name=f"{name}_conv",
    )(x)


def batch_norm(x, name: str):
    """Applies BatchNormalization with PyTorch's defaults, layer `f"{name}_bn"`."""
    return layers.BatchNormalization(
        axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn"
    )(x)


def relu(x, name: str):
    """Applies a ReLU, layer `f"{name}_relu"`."""
    return layers.Activation("relu", name=f"{name}_relu")(x)


def conv_bn(
    x,
    filters: int,
    kernel_size: int,
    *,
    strides: int = 1,
    use_bias: bool = False,
    bn: bool = True,
    activation: bool = False,
    name: str,
):
    """Applies `conv`, then BN (if `bn`), then a ReLU (if `activation`).

    The post-activation unit of ResNet and VGG; the layers are
    `f"{name}_conv"`, `f"{name}_bn"` and `f"{name}_relu"`.

    Args:
        x: Tensor. Channels last.
        filters: int. The output channels.
        kernel_size: int. See `conv`.
        strides: int. See `conv`. Defaults to `1`.
        use_bias: bool. Whether the conv has a bias. Defaults to `False`.
        bn: bool. Whether a BatchNormalization follows the conv.
            Defaults to `True`.
        activation: bool. Whether a ReLU ends the unit. Defaults to `False`.
        name: str. The prefix of the layer names.

    Returns:
        The output tensor.
    """
    x = conv(
        x,
        filters,
        kernel_size,
        strides=strides,
        use_bias=use_bias,
        name=name,
    )
    if bn:
        x = batch_norm(x, name)
    return relu(x, name) if activation else x


def bn_relu(x, name: str):
    """Applies BN then ReLU (a pre-activation), layers `f"{name}_bn"`, `f"{name}_relu"`."""
    return relu(batch_norm(x, name), name)


def classifier(x, num_classes: int):
    """Applies the `"pool"` global average pooling and the `"classifier"` Dense.

    The Dense computes in the policy's variable dtype, so the logits are
    float32 under a mixed-precision policy too (and float64 under float64).
    """
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return layers.Dense(
        num_classes,
        dtype=keras.mixed_precision.global_policy().variable_dtype,
        name="classifier",
    )(x)
