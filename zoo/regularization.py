"""Weight decay and SGD for the zoo models, following PyTorch's `torch.optim.SGD`.

The paper trains with SGD and a fixed `weight_decay` (1e-4 for ResNet, 5e-4 for
WRN and VGG). PyTorch's `SGD(weight_decay=wd)` adds `wd * w` to every gradient
before the momentum update. An L2 loss term `(wd / 2) * sum(w ** 2)` has exactly
that gradient, so the zoo puts `keras.regularizers.L2(wd / 2)` on conv and dense
kernels.

The momentum is another matter. `keras.optimizers.SGD` folds the learning rate
into its velocity (`m <- mu * m - lr * g`), PyTorch keeps a buffer of raw
gradients (`b <- mu * b + g`) and multiplies by the current learning rate
afterwards. The two agree while the learning rate is constant and differ
whenever it changes: during the warm-up the Keras velocity carries the small
learning rates of past steps. The paper's recipe changes the learning rate at
every step, so `PyTorchSGD` below implements PyTorch's update and `train.py`
uses it; `tests/test_regularization.py` checks it against a NumPy transcription
of `torch.optim.SGD` under the warm-up-cosine schedule and measures how far
`keras.optimizers.SGD` drifts from it.

Two differences from `torch.optim.SGD`'s default, which decays every parameter:

- BatchNorm scale/offset and all biases are not decayed. This is common practice
  (Goyal et al. 2017, "no bias decay"): a BN layer makes the preceding kernel's
  scale irrelevant to the output, so decaying gamma/beta or biases only shrinks
  them without regularizing the function.
- The penalty appears in the logged loss (`model.losses`), so a Keras training
  loss is larger than the PyTorch one by `(wd / 2) * ||w||^2`.
"""

import math

import keras
from keras import ops

from keras_ema._checks import as_float


def weight_decay_regularizer(weight_decay: float) -> keras.regularizers.L2 | None:
    """Returns the kernel regularizer that applies coupled SGD weight decay.

    The returned `keras.regularizers.L2(weight_decay / 2)` adds
    `weight_decay * w` to the gradient of each kernel it is attached to, which
    is what `torch.optim.SGD(..., weight_decay=weight_decay)` does.

    Args:
        weight_decay: float. The decay coefficient, as passed to PyTorch's SGD:
            finite and `>= 0`. `0.0` returns `None` (no regularizer, no extra
            loss term).

    Returns:
        A `keras.regularizers.L2` instance, or `None` when `weight_decay == 0`.

    Example:

    >>> weight_decay_regularizer(5e-4).l2
    0.00025
    """
    decay = as_float(weight_decay)
    if not (math.isfinite(decay) and decay >= 0.0):
        raise ValueError(
            "Invalid value for argument `weight_decay`: expected a finite "
            f"number >= 0. Received: weight_decay={weight_decay!r}"
        )
    if decay == 0.0:
        return None
    return keras.regularizers.L2(decay / 2.0)


@keras.saving.register_keras_serializable(package="zoo")
class PyTorchSGD(keras.optimizers.SGD):
    """SGD with momentum as `torch.optim.SGD` computes it (no dampening).

    With gradient `g`, momentum `mu` and the current learning rate `lr`:

    ```
    b <- mu * b + g                          # b starts at 0, so b_1 = g
    w <- w - lr * (g + mu * b)               # nesterov=True
    w <- w - lr * b                          # nesterov=False
    ```

    `keras.optimizers.SGD` keeps `m = -lr * b` instead, which is the same
    trajectory only while `lr` is constant. With a learning-rate schedule
    (warm-up, cosine decay) the two differ; this class follows PyTorch, the
    framework the paper's recipe was written for. Coupled weight decay comes
    from the L2 regularizer of `weight_decay_regularizer`, as in PyTorch's
    `weight_decay`. All other arguments are those of `keras.optimizers.SGD`.

    Args:
        learning_rate: float or a `keras.optimizers.schedules.LearningRateSchedule`.
            Defaults to `0.01`.
        momentum: float in [0, 1]. Defaults to `0.0`.
        nesterov: bool. Defaults to `False`.
        **kwargs: the other arguments of `keras.optimizers.SGD`.

    Example:

    >>> optimizer = PyTorchSGD(learning_rate=0.1, momentum=0.9, nesterov=True)
    >>> optimizer.momentum
    0.9
    """

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if self.momentum == 0:
            self.assign_sub(variable, ops.multiply(gradient, learning_rate))
            return
        b = self.momentums[self._get_variable_index(variable)]
        momentum = ops.cast(self.momentum, variable.dtype)
        self.assign(b, ops.add(ops.multiply(b, momentum), gradient))
        if self.nesterov:
            step = ops.add(gradient, ops.multiply(b, momentum))
        else:
            step = b
        self.assign_sub(variable, ops.multiply(step, learning_rate))
