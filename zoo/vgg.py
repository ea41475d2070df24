"""VGG-16 for 32x32 images, without BatchNorm unless asked.

Thirteen 3x3 convs with bias in five stacks (64, 64, M, 128, 128, M,
256 x 3, M, 512 x 3, M, 512 x 3, M; M = 2x2 max-pool) and, as in the common
CIFAR VGG (kuangliu/pytorch-cifar), a single linear classifier on the 512
features instead of ImageNet's three 4096-wide layers. The paper relies on its
VGG-16 having no BN (EMA then needs no BN-statistics recompute), so
`batch_norm=False` is the default.
"""

import keras
from keras import layers

from zoo import layers as blocks

VARIANTS = {
    "vgg16": {
        "config": {
            "stackwise_num_filters": [64, 128, 256, 512, 512],
            "stackwise_num_repeats": [2, 2, 3, 3, 3],
        },
        # 10 classes: 14,714,688 conv weights and biases + Linear(512, 10)
        # 5,130. With `batch_norm=True`: 14,728,266 (+ 8,448 gamma/beta, and
        # 8,448 moving mean/variance values in Keras' `count_params()`).
        "params": 14_719_818,
        "description": "VGG-16 (config D), no BN, one linear classifier.",
    },
}


@keras.saving.register_keras_serializable(package="zoo")
class VGG(keras.Model):
    """VGG network for small images with a single linear classifier.

    VGG (Simonyan & Zisserman, 2014) stacks 3x3 convs and 2x2 max-pools. On
    32x32 inputs the five pools leave a 1x1x512 map, so the usual CIFAR head
    is one `Dense(num_classes)` on those 512 features. Here the map is reduced
    by global average pooling (the layer named `"pool"`), identical to
    flattening at 32x32 and still 512 features for larger inputs.

    The model outputs logits (no softmax); train it with `from_logits=True`.
    The classifier is the `Dense` layer named `"classifier"`. Under a
    mixed-precision policy the classifier computes in float32.

    The model carries no regularizer: weight decay is the optimizer's
    (`zoo.regularization.PyTorchSGD(weight_decay=...)`, PyTorch's coupled
    decay on conv and dense kernels), so the model's losses are its
    cross-entropy alone.

    With `batch_norm=True` each conv (its bias kept, as in torchvision's
    `vgg16_bn`) is followed by BatchNormalization with `momentum=0.9` and
    `epsilon=1e-5` (PyTorch's defaults). Conv kernels start from He-normal
    with fan-out, as in torchvision.

    Args:
        stackwise_num_filters: list of ints. The filters of each stack before
            `width` scaling. Defaults to `[64, 128, 256, 512, 512]`.
        stackwise_num_repeats: list of ints. The number of convs in each
            stack; each stack ends with a 2x2 max-pool. Defaults to
            `[2, 2, 3, 3, 3]` (VGG-16).
        num_classes: int. The number of output logits. Defaults to `10`.
        input_shape: tuple of 3 ints. `(height, width, channels)` of the
            images; height and width must be multiples of 32 for the five
            pools. Defaults to `(32, 32, 3)`.
        width: float. Multiplies every filter count (rounded, at least 1).
            Defaults to `1.0`.
        batch_norm: bool. Whether a BatchNormalization follows every conv.
            Defaults to `False`.
        name: str. The model name. Defaults to `"vgg"`.

    Example:

    ```python
    model = zoo.models.VGG(num_classes=100)
    model.count_params()  # 14,765,988 for 100 classes
    ```
    """

    def __init__(
        self,
        stackwise_num_filters=(64, 128, 256, 512, 512),
        stackwise_num_repeats=(2, 2, 3, 3, 3),
        num_classes=10,
        input_shape=(32, 32, 3),
        width=1.0,
        batch_norm=False,
        name="vgg",
        **kwargs,
    ):
        blocks.check_model_kwargs(kwargs)
        stacks = blocks.validate_stacks(
            stackwise_num_filters=stackwise_num_filters,
            stackwise_num_repeats=stackwise_num_repeats,
        )
        stackwise_num_filters = stacks["stackwise_num_filters"]
        stackwise_num_repeats = stacks["stackwise_num_repeats"]
        if not isinstance(batch_norm, bool):
            raise ValueError(
                "Invalid value for argument `batch_norm`: expected a bool. "
                f"Received: batch_norm={batch_norm!r}"
            )
        width = blocks.validate_width(width)
        input_shape = blocks.validate_input_shape(input_shape)
        filters = [blocks.scale_filters(f, width) for f in stackwise_num_filters]

        # === Functional Model ===
        inputs = keras.Input(shape=input_shape, name="images")
        x = inputs
        for stack_index, (stack_filters, repeats) in enumerate(
            zip(filters, stackwise_num_repeats)
        ):
            x = apply_vgg_stack(
                x,
                stack_filters,
                repeats,
                batch_norm=batch_norm,
                name=f"stack{stack_index}",
            )
        outputs = blocks.classifier(x, num_classes)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        # === Config ===
        self.stackwise_num_filters = stackwise_num_filters
        self.stackwise_num_repeats = stackwise_num_repeats
        self.num_classes = num_classes
        self.image_shape = input_shape
        self.width = width
        self.batch_norm = batch_norm

    def get_config(self):
        return {
            "stackwise_num_filters": self.stackwise_num_filters,
            "stackwise_num_repeats": self.stackwise_num_repeats,
            "num_classes": self.num_classes,
            "input_shape": self.image_shape,
            "width": self.width,
            "batch_norm": self.batch_norm,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**blocks.model_arguments(config))


def apply_vgg_stack(
    x, filters, repeats, batch_norm=False, name=None
):
    """Applies `repeats` x (conv3x3 [+ BN] + ReLU), then a 2x2 max-pool.

    Args:
        x: Tensor. The stack input, channels last.
        filters: int. The output channels of every conv.
        repeats: int. The number of convs.
        batch_norm: bool. Whether BN follows each conv. Defaults to `False`.
        name: str. The prefix of every layer name in the stack.

    Returns:
        The stack output tensor, at half the input resolution.
    """
    for conv_index in range(repeats):
        x = blocks.conv_bn(
            x,
            filters,
            3,
            use_bias=True,
            bn=batch_norm,
            activation=True,
            name=f"{name}_{conv_index}",
        )
    return layers.MaxPooling2D(2, strides=2, name=f"{name}_pool")(x)
