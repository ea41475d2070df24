"""ResNet-18/34 for small images (CIFAR 32x32, Tiny-ImageNet 64x64).

The architecture is the common PyTorch CIFAR ResNet (kuangliu/pytorch-cifar):
a 3x3 stride-1 stem without max-pool, four stacks of basic blocks, a 1x1
conv + BN projection shortcut wherever the shape changes, global average
pooling and one linear layer. ResNet-18 with 10 classes has 11,173,962
parameters counted as PyTorch's `parameters()` does (conv kernels, BN gamma and
beta, dense kernel and bias; not the BN moving mean/variance).

Stride-2 convolutions pad one pixel on each side explicitly, as PyTorch's
`padding=1` does; Keras' `padding="same"` would pad only bottom/right and
sample a different pixel grid.
"""

import keras
from keras import layers

from zoo import layers as blocks

VARIANTS = {
    "resnet18": {
        "config": {
            "stackwise_num_blocks": [2, 2, 2, 2],
            "stackwise_num_filters": [64, 128, 256, 512],
        },
        # 10 classes; + 9,600 BN moving mean/variance values in Keras'
        # `count_params()`.
        "params": 11_173_962,
        "description": "ResNet-18, basic blocks [2, 2, 2, 2], CIFAR stem.",
    },
    "resnet34": {
        "config": {
            "stackwise_num_blocks": [3, 4, 6, 3],
            "stackwise_num_filters": [64, 128, 256, 512],
        },
        # 10 classes; + 17,024 BN moving mean/variance values.
        "params": 21_282_122,
        "description": "ResNet-34, basic blocks [3, 4, 6, 3], CIFAR stem.",
    },
}

STEMS = ("auto", "cifar", "downsample")

# Inputs at least this large get the "downsample" stem under `stem="auto"`.
_DOWNSAMPLE_STEM_MIN_SIZE = 64


@keras.saving.register_keras_serializable(package="zoo")
class ResNet(keras.Model):
    """ResNet with basic blocks and a small-image stem; outputs logits.

    This is the ResNet of He et al. (2016) as used on CIFAR: a 3x3 stride-1
    stem instead of ImageNet's 7x7 stride-2 conv and max-pool, so a 32x32
    image keeps its resolution through the first stack (32, 16, 8, 4). The
    paper trains ResNet-18 on CIFAR-10/100 and Tiny-ImageNet and ResNet-34 on
    CIFAR-N; `VARIANTS` holds both.

    For 64x64 inputs (Tiny-ImageNet) `stem="auto"` picks the `"downsample"`
    stem: the same 3x3 stride-1 conv, BN and ReLU, then a 3x3 stride-2
    max-pool. The first conv still sees every pixel, the stacks then run at the
    CIFAR feature-map sizes, so a 64x64 image costs about as much as a 32x32
    one and the parameter count is unchanged. `stem="cifar"` keeps full
    resolution instead (8x8 final maps, about 4x the compute per image).

    The model outputs logits (no softmax); train it with
    `from_logits=True`. The classifier is the `Dense` layer named
    `"classifier"`; the features under it come from the global average
    pooling layer named `"pool"` (`model.get_layer("pool").output`).
    Under a mixed-precision policy the classifier computes in float32, so the
    logits are float32.

    The model carries no regularizer: weight decay is the optimizer's
    (`zoo.regularization.PyTorchSGD(weight_decay=...)`, PyTorch's coupled
    decay on conv and dense kernels), so the model's losses are its
    cross-entropy alone.

    BatchNormalization uses `momentum=0.9` and `epsilon=1e-5`, PyTorch's
    defaults (torch's momentum 0.1 is Keras' 0.9). Conv kernels start from
    He-normal with fan-out (as torchvision's ResNet); the classifier from
    Keras' default Glorot-uniform.

    Args:
        stackwise_num_blocks: list of ints. The number of basic blocks in each
            stack; `[2, 2, 2, 2]` is ResNet-18 and `[3, 4, 6, 3]` ResNet-34.
            Defaults to `[2, 2, 2, 2]`.
        stackwise_num_filters: list of ints. The filters of each stack before
            `width` scaling; the stem uses the first entry. Every stack after
            the first halves the resolution. Defaults to `[64, 128, 256, 512]`.
        num_classes: int. The number of output logits. Defaults to `10`.
        input_shape: tuple of 3 ints. `(height, width, channels)` of the
            images. Defaults to `(32, 32, 3)`.
        width: float. Multiplies every filter count (rounded, at least 1);
            `0.25` gives a narrow copy of the same architecture for CPU tests.
            Defaults to `1.0`.
        stem: str. `"cifar"` (3x3 stride-1 conv-BN-ReLU), `"downsample"` (the
            same followed by a 3x3 stride-2 max-pool) or `"auto"` (`"cifar"`
            below 64 pixels, `"downsample"` from 64 pixels on). Defaults to
            `"auto"`.
        name: str. The model name. Defaults to `"resnet"`.

    Example:

    ```python
    model = zoo.models.ResNet(**zoo.resnet.VARIANTS["resnet18"]["config"],
                       num_classes=100)
    model.compile(
        optimizer=zoo.regularization.PyTorchSGD(
            0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    features = keras.Model(model.input, model.get_layer("pool").output)
    ```
    """

    def __init__(
        self,
        stackwise_num_blocks=(2, 2, 2, 2),
        stackwise_num_filters=(64, 128, 256, 512),
        num_classes=10,
        input_shape=(32, 32, 3),
        width=1.0,
        stem="auto",
        name="resnet",
        **kwargs,
    ):
        blocks.check_model_kwargs(kwargs)
        stacks = blocks.validate_stacks(
            stackwise_num_blocks=stackwise_num_blocks,
            stackwise_num_filters=stackwise_num_filters,
        )
        stackwise_num_blocks = stacks["stackwise_num_blocks"]
        stackwise_num_filters = stacks["stackwise_num_filters"]
        if stem not in STEMS:
            raise ValueError(
                f"Invalid value for argument `stem`: expected one of {STEMS}. "
                f"Received: stem={stem!r}"
            )
        width = blocks.validate_width(width)
        input_shape = blocks.validate_input_shape(input_shape)
        resolved_stem = stem
        if stem == "auto":
            sides = [s for s in input_shape[:2] if s is not None]
            large = bool(sides) and min(sides) >= _DOWNSAMPLE_STEM_MIN_SIZE
            resolved_stem = "downsample" if large else "cifar"
        filters = [blocks.scale_filters(f, width) for f in stackwise_num_filters]

        # === Functional Model ===
        inputs = keras.Input(shape=input_shape, name="images")
        x = blocks.conv_bn(
            inputs,
            filters[0],
            3,
            activation=True,
            name="stem",
        )
        if resolved_stem == "downsample":
            # Zero padding before the max-pool is harmless after a ReLU and
            # matches torch's MaxPool2d(3, 2, padding=1).
            x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
            x = layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
        for stack_index, (num_blocks, stack_filters) in enumerate(
            zip(stackwise_num_blocks, filters)
        ):
            for block_index in range(num_blocks):
                x = apply_basic_block(
                    x,
                    stack_filters,
                    stride=2 if stack_index > 0 and block_index == 0 else 1,
                    name=f"stack{stack_index}_block{block_index}",
                )
        outputs = blocks.classifier(x, num_classes)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        # === Config ===
        self.stackwise_num_blocks = stackwise_num_blocks
        self.stackwise_num_filters = stackwise_num_filters
        self.num_classes = num_classes
        self.image_shape = input_shape
        self.width = width
        self.stem = stem
        self.resolved_stem = resolved_stem

    def get_config(self):
        return {
            "stackwise_num_blocks": self.stackwise_num_blocks,
            "stackwise_num_filters": self.stackwise_num_filters,
            "num_classes": self.num_classes,
            "input_shape": self.image_shape,
            "width": self.width,
            "stem": self.stem,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**blocks.model_arguments(config))


def apply_basic_block(x, filters, stride=1, name=None):
    """Applies a post-activation basic block: two 3x3 conv-BN, add, ReLU.

    The shortcut is the identity when shape is kept, else a 1x1 conv + BN
    with the block's stride (projection shortcut, option B of He et al.),
    computed as `zoo.layers.subsample` then a stride-1 1x1 conv.

    Args:
        x: Tensor. The block input, channels last.
        filters: int. The output channels.
        stride: int. The stride of the first conv and of the shortcut.
            Defaults to `1`.
        name: str. The prefix of every layer name in the block.

    Returns:
        The block output tensor.
    """
    in_filters = x.shape[-1]
    shortcut = x
    if stride != 1 or in_filters != filters:
        shortcut = blocks.conv_bn(
            x,
            filters,
            1,
            strides=stride,
            name=f"{name}_0",
        )
    x = blocks.conv_bn(
        x,
        filters,
        3,
        strides=stride,
        activation=True,
        name=f"{name}_1",
    )
    x = blocks.conv_bn(x, filters, 3, name=f"{name}_2")
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)
