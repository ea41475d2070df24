"""Weight decay for the zoo models, with the gradient of PyTorch's coupled SGD decay.

The paper trains with SGD and a fixed `weight_decay` (1e-4 for ResNet, 5e-4 for
WRN and VGG). PyTorch's `SGD(weight_decay=wd)` adds `wd * w` to every gradient
before the momentum update. An L2 loss term `(wd / 2) * sum(w ** 2)` has exactly
that gradient, so the zoo puts `keras.regularizers.L2(wd / 2)` on conv and dense
kernels and an unmodified `keras.optimizers.SGD` then follows the same
trajectory as the PyTorch recipe.

Two differences from `torch.optim.SGD`'s default, which decays every parameter:

- BatchNorm scale/offset and all biases are not decayed. This is common practice
  (Goyal et al. 2017, "no bias decay"): a BN layer makes the preceding kernel's
  scale irrelevant to the output, so decaying gamma/beta or biases only shrinks
  them without regularizing the function.
- The penalty appears in the logged loss (`model.losses`), so a Keras training
  loss is larger than the PyTorch one by `(wd / 2) * ||w||^2`.
"""

import keras


def weight_decay_regularizer(weight_decay: float):
    """Returns the kernel regularizer that applies coupled SGD weight decay.

    The returned `keras.regularizers.L2(weight_decay / 2)` adds
    `weight_decay * w` to the gradient of each kernel it is attached to, which
    is what `torch.optim.SGD(..., weight_decay=weight_decay)` does.

    Args:
        weight_decay: float. The decay coefficient, as passed to PyTorch's SGD.
            `0.0` returns `None` (no regularizer, no extra loss term).

    Returns:
        A `keras.regularizers.L2` instance, or `None` when `weight_decay == 0`.

    Example:

    >>> weight_decay_regularizer(5e-4).l2
    0.00025
    """
    weight_decay = float(weight_decay)
    if weight_decay < 0.0:
        raise ValueError(
            "Invalid value for argument `weight_decay`: it must be >= 0. "
            f"Received: weight_decay={weight_decay}"
        )
    if weight_decay == 0.0:
        return None
    return keras.regularizers.L2(weight_decay / 2.0)
