"""Wide ResNet WRN-d-k (Zagoruyko & Komodakis, 2016) for 32x32 images.

The layout follows the reference PyTorch port (xternalz/WideResNet-pytorch):
a 3x3 conv to 16 channels, three groups of `n = (d - 4) / 6` pre-activation
basic blocks with 16k, 32k and 64k channels (strides 1, 2, 2), a final
BN + ReLU, global average pooling and a dense layer with bias. Convs have no
bias; a 1x1 conv shortcut (no BN) is used where the channel count changes,
and it reads the pre-activated input as in the reference code. WRN-28-10 with
10 classes has 36,479,194 parameters counted as PyTorch's `parameters()`
does (BN gamma and beta included, BN moving mean/variance not).
"""

import keras
from keras import layers

from keras_ema.checks import as_float
from keras_ema.checks import is_int
from zoo import layers as blocks

VARIANTS = {
    "wrn28_10": {
        "config": {"depth": 28, "widen_factor": 10},
        # 10 classes; + 17,952 BN moving mean/variance values in Keras'
        # `count_params()`.
        "params": 36_479_194,
        "description": "WRN-28-10: 4 blocks per group, widths 160/320/640.",
    },
}


@keras.saving.register_keras_serializable(package="zoo")
class WideResNet(keras.Model):
    """Wide ResNet WRN-`depth`-`widen_factor` with pre-activation blocks.

    Widening a shallow residual network trains faster and generalizes better
    on CIFAR than deepening a thin one; the paper uses WRN-28-10 on CIFAR-100
    as its largest model (weight decay 5e-4, learning rate 0.1).

    Each block is BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut.
    The model outputs logits (no softmax); train it with `from_logits=True`.
    The classifier is the `Dense` layer named `"classifier"`, its input the
    global average pooling layer named `"pool"`. Under a mixed-precision
    policy the classifier computes in float32.

    The model carries no regularizer: weight decay is the optimizer's
    (`zoo.regularization.PyTorchSGD(weight_decay=...)`, PyTorch's coupled
    decay on conv and dense kernels), so the model's losses are its
    cross-entropy alone.

    BatchNormalization uses `momentum=0.9` and `epsilon=1e-5` (PyTorch's
    defaults); conv kernels start from He-normal with fan-out, as in the
    reference code.

    Args:
        depth: int. Total depth `6 * n + 4`, e.g. 16, 22, 28, 40.
            Defaults to `28`.
        widen_factor: int. The width factor `k`: groups have 16k, 32k and 64k
            channels. Defaults to `10`.
        dropout: float. Dropout rate between the two convs of each block
            (the WRN paper uses 0.3 in some runs; the EMA paper none).
            Defaults to `0.0`.
        num_classes: int. The number of output logits. Defaults to `10`.
        input_shape: tuple of 3 ints. `(height, width, channels)` of the
            images. Defaults to `(32, 32, 3)`.
        width: float. Multiplies every filter count, stem included (rounded,
            at least 1), on top of `widen_factor`; for narrow test copies.
            Defaults to `1.0`.
        name: str. The model name. Defaults to `"wide_resnet"`.

    Example:

    ```python
    model = zoo.models.WideResNet(depth=28, widen_factor=10, num_classes=100)
    logits = model(np.zeros((2, 32, 32, 3), "float32"))  # (2, 100)
    ```
    """

    def __init__(
        self,
        depth=28,
        widen_factor=10,
        dropout=0.0,
        num_classes=10,
        input_shape=(32, 32, 3),
        width=1.0,
        name="wide_resnet",
        **kwargs,
    ):
        blocks.check_model_kwargs(kwargs)
        if not is_int(depth) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                "Invalid value for argument `depth`: it must be 6 * n + 4 "
                f"with n >= 1 (10, 16, 22, 28, ...). Received: depth={depth}"
            )
        if not is_int(widen_factor) or widen_factor < 1:
            raise ValueError(
                "Invalid value for argument `widen_factor`: it must be a "
                f"positive int. Received: widen_factor={widen_factor}"
            )
        if not 0.0 <= as_float(dropout) < 1.0:
            raise ValueError(
                "Invalid value for argument `dropout`: it must be in [0, 1). "
                f"Received: dropout={dropout}"
            )
        width = blocks.validate_width(width)
        input_shape = blocks.validate_input_shape(input_shape)
        blocks_per_group = (depth - 4) // 6
        stem_filters = blocks.scale_filters(16, width)
        group_filters = [
            blocks.scale_filters(16 * widen_factor * 2**i, width) for i in range(3)
        ]

        # === Functional Model ===
        inputs = keras.Input(shape=input_shape, name="images")
        x = blocks.conv(
            inputs, stem_filters, 3, name="stem"
        )
        for group_index, filters in enumerate(group_filters):
            for block_index in range(blocks_per_group):
                x = apply_wide_basic_block(
                    x,
                    filters,
                    stride=2 if group_index > 0 and block_index == 0 else 1,
                    dropout=dropout,
                    name=f"group{group_index}_block{block_index}",
                )
        x = blocks.bn_relu(x, "post")
        outputs = blocks.classifier(x, num_classes)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        # === Config ===
        self.depth = int(depth)
        self.widen_factor = int(widen_factor)
        self.dropout = float(dropout)
        self.num_classes = num_classes
        self.image_shape = input_shape
        self.width = width

    def get_config(self):
        return {
            "depth": self.depth,
            "widen_factor": self.widen_factor,
            "dropout": self.dropout,
            "num_classes": self.num_classes,
            "input_shape": self.image_shape,
            "width": self.width,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**blocks.model_arguments(config))


def apply_wide_basic_block(
    x, filters, stride=1, dropout=0.0, name=None
):
    """Applies a pre-activation wide basic block.

    BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, added to the input, or
    to a 1x1 conv (same stride, no BN) of the pre-activated input when the
    channel count changes; a strided shortcut is `zoo.layers.subsample` then
    a stride-1 1x1 conv (see there why).

    Args:
        x: Tensor. The block input, channels last.
        filters: int. The output channels.
        stride: int. The stride of the first conv and of the shortcut.
            Defaults to `1`.
        dropout: float. Dropout rate before the second conv; `0.0` adds no
            layer. Defaults to `0.0`.
        name: str. The prefix of every layer name in the block.

    Returns:
        The block output tensor.
    """
    in_filters = x.shape[-1]
    preact = blocks.bn_relu(x, f"{name}_1")
    if in_filters == filters and stride == 1:
        shortcut = x
    else:
        shortcut = blocks.conv(
            preact,
            filters,
            1,
            strides=stride,
            name=f"{name}_0",
        )
    y = blocks.conv(
        preact,
        filters,
        3,
        strides=stride,
        name=f"{name}_1",
    )
    y = blocks.bn_relu(y, f"{name}_2")
    if dropout > 0.0:
        y = layers.Dropout(dropout, name=f"{name}_dropout")(y)
    y = blocks.conv(y, filters, 3, name=f"{name}_2")
    return layers.Add(name=f"{name}_out")([shortcut, y])
