"""Weight decay and SGD for the zoo models, following PyTorch's `torch.optim.SGD`.

The paper trains with SGD and a fixed `weight_decay` (1e-4 for ResNet, 5e-4 for
WRN and VGG). PyTorch's `SGD(weight_decay=wd)` adds `wd * w` to every gradient
before the momentum update: the decay is coupled to the gradient and lives in
the optimizer, not in the loss. `PyTorchSGD` below does the same, so every
loss Keras logs (training, validation, each EMA's) is the cross-entropy the
paper reports, and a model carries no regularizer. (An L2 loss term
`(wd / 2) * ||w||^2` has the same gradient, but Keras adds it to every logged
loss: `train.py --flagfile=configs/demo.cfg --epochs=3 --warmup_epochs=1
--width=0.0625 --weight_decay=0.05` logged a last validation loss of 2.81
where the cross-entropy was 2.03.)

The momentum is another matter. `keras.optimizers.SGD` folds the learning rate
into its velocity (`m <- mu * m - lr * g`), PyTorch keeps a buffer of raw
gradients (`b <- mu * b + g`) and multiplies by the current learning rate
afterwards. The two agree while the learning rate is constant and differ
whenever it changes: during the warm-up the Keras velocity carries the small
learning rates of past steps. The paper's recipe changes the learning rate at
every step, so `PyTorchSGD` implements PyTorch's update and `train.py` uses it;
`tests/test_regularization.py` checks it against a NumPy transcription of
`torch.optim.SGD` under the warm-up-cosine schedule and measures how far
`keras.optimizers.SGD` drifts from it.

One difference from `torch.optim.SGD`'s default, which decays every parameter:
only conv and dense kernels (the variables of rank >= 2) are decayed; BatchNorm
scale/offset and biases (vectors) are not. This is common practice (Goyal et
al. 2017, "no bias decay"; timm decays no parameter of rank 1): a BN layer makes
the preceding kernel's scale irrelevant to the output, so decaying gamma/beta
or biases only shrinks them without regularizing the function.
"""

import math

import keras
from keras import ops

from keras_ema.checks import as_float
from zoo import _keras_private


def check_weight_decay(weight_decay) -> float:
    """`float(weight_decay)` if it is a finite number `>= 0`; `None` is `0.0`.

    Raises:
        ValueError: anything else (negative, NaN, infinite, a bool, a string).
    """
    if weight_decay is None:
        return 0.0
    decay = as_float(weight_decay)
    if not (math.isfinite(decay) and decay >= 0.0):
        raise ValueError(
            "Invalid value for argument `weight_decay`: expected a finite "
            f"number >= 0. Received: weight_decay={weight_decay!r}"
        )
    return decay


@keras.saving.register_keras_serializable(package="zoo")
class PyTorchSGD(_keras_private.CoupledDecaySGD):
    """SGD with momentum and weight decay as `torch.optim.SGD` computes them.

    With gradient `g` of the loss, weight decay `wd`, momentum `mu` (no
    dampening) and the current learning rate `lr`:

    ```
    g <- g + wd * w                          # decayed variables only
    b <- mu * b + g                          # b starts at 0, so b_1 = g
    w <- w - lr * (g + mu * b)               # nesterov=True
    w <- w - lr * b                          # nesterov=False
    ```

    `keras.optimizers.SGD` keeps `m = -lr * b` instead, which is the same
    trajectory only while `lr` is constant. With a learning-rate schedule
    (warm-up, cosine decay) the two differ; this class follows PyTorch, the
    framework the paper's recipe was written for.

    `weight_decay` is PyTorch's coupled decay, added to the gradient before
    the momentum, and not Keras's (`keras.optimizers.SGD(weight_decay=...)`
    shrinks the weights by `lr * wd * w` apart from the gradient, as AdamW
    does). It applies to the variables of rank >= 2, the kernels of conv
    and dense layers; biases and BatchNorm gamma/beta are not decayed (see
    the module docstring). `exclude_from_weight_decay` excludes more. The
    loss is left alone, so the logged losses are the model's loss alone
    (for the zoo, the cross-entropy). Under mixed precision the decay is
    added to the unscaled float32 gradient (`keras.optimizers.
    LossScaleOptimizer` unscales before calling this optimizer). The decay
    keeps no state: checkpoints hold the same variables with and without it.

    All other arguments are those of `keras.optimizers.SGD`.

    Keras's own decoupled decay is turned off (the decay is coupled in
    `update_step` instead) by its base, `zoo._keras_private.CoupledDecaySGD`.

    Args:
        learning_rate: float or a `keras.optimizers.schedules.LearningRateSchedule`.
            Defaults to `0.01`.
        momentum: float in [0, 1]. Defaults to `0.0`.
        nesterov: bool. Defaults to `False`.
        weight_decay: float >= 0, finite, or `None` (no decay). PyTorch's
            coupled weight decay on the kernels. Defaults to `0.0`.
        **kwargs: the other arguments of `keras.optimizers.SGD`.

    Example:

    >>> optimizer = PyTorchSGD(learning_rate=0.1, momentum=0.9, nesterov=True,
    ...                        weight_decay=5e-4)
    >>> optimizer.weight_decay
    0.0005
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=check_weight_decay(weight_decay),
            **kwargs,
        )

    def decays(self, variable) -> bool:
        """Whether `variable` is weight-decayed: a kernel (rank >= 2), not excluded.

        Args:
            variable: a variable this optimizer updates.

        Returns:
            `True` for the kernels of conv and dense layers unless
            `exclude_from_weight_decay` names them; `False` for biases,
            BatchNorm gamma/beta, and for every variable when
            `weight_decay` is 0.
        """
        return (
            self.weight_decay > 0
            and len(variable.shape) >= 2
            and self.uses_weight_decay(variable)
        )

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if self.decays(variable):
            decay = ops.cast(self.weight_decay, variable.dtype)
            gradient = ops.add(gradient, ops.multiply(variable, decay))
        if self.momentum == 0:
            self.assign_sub(variable, ops.multiply(gradient, learning_rate))
            return
        b = self.momentums[self.variable_index(variable)]
        momentum = ops.cast(self.momentum, variable.dtype)
        self.assign(b, ops.add(ops.multiply(b, momentum), gradient))
        if self.nesterov:
            step = ops.add(gradient, ops.multiply(b, momentum))
        else:
            step = b
        self.assign_sub(variable, ops.multiply(step, learning_rate))
