"""Learning-rate schedules for the training protocol.

The paper's protocol (App. F of "Exponential Moving Average of Weights in Deep
Learning: Dynamics and Benefits") uses a linear warm-up over the first 5 epochs
followed by cosine annealing to zero. `WarmupCosine` implements it per
optimizer step with `keras.ops`, so the same object runs inside compiled train
steps on TensorFlow and JAX.
"""

import math

import keras
from keras import ops

from keras_ema.checks import as_float
from keras_ema.checks import check_int


@keras.saving.register_keras_serializable(package="zoo")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to a peak learning rate, then cosine annealing to zero.

    The value at optimizer step `step` (0-based, the optimizer's
    `iterations` counter) is:

    ```
    step < warmup_steps:
        lr = peak_learning_rate * (step + 1) / warmup_steps
    warmup_steps <= step < total_steps:
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        lr = peak_learning_rate * 0.5 * (1 + cos(pi * progress))
    step >= total_steps:
        lr = 0
    ```

    The warm-up starts at `peak / warmup_steps` rather than 0 so that the
    first step already moves the weights (as PyTorch's `LinearLR` with
    `start_factor=1 / warmup_steps`); the last warm-up step and the first
    cosine step both use the peak. With `warmup_steps=0` the schedule is a
    plain cosine decay. The schedule counts optimizer steps, not epochs: for
    the paper's protocol use `total_steps = epochs * steps_per_epoch` and
    `warmup_steps = 5 * steps_per_epoch`.

    Args:
        peak_learning_rate: float, the learning rate reached at the end of
            the warm-up. Must be positive.
        total_steps: int, the step at which the learning rate reaches 0.
            Must be positive.
        warmup_steps: int, the number of warm-up steps, in
            `[0, total_steps)`. Defaults to `0`.

    Example:

    >>> steps_per_epoch = 313  # 40000 CIFAR images, batch 128
    >>> schedule = WarmupCosine(
    ...     peak_learning_rate=0.8,
    ...     total_steps=200 * steps_per_epoch,
    ...     warmup_steps=5 * steps_per_epoch,
    ... )
    >>> optimizer = keras.optimizers.SGD(
    ...     learning_rate=schedule, momentum=0.9, nesterov=True
    ... )
    """

    def __init__(
        self, peak_learning_rate: float, total_steps: int, warmup_steps: int = 0
    ):
        super().__init__()
        peak = as_float(peak_learning_rate)
        if not (math.isfinite(peak) and peak > 0):
            raise ValueError(
                "Invalid value for argument `peak_learning_rate`: expected a "
                "positive finite number. Received: "
                f"peak_learning_rate={peak_learning_rate!r}."
            )
        total_steps = check_int(
            "total_steps", total_steps, 1, hint="Pass epochs * steps_per_epoch."
        )
        warmup_steps = check_int(
            "warmup_steps", warmup_steps, 0, hint="Pass 0 for no warm-up."
        )
        if warmup_steps >= total_steps:
            raise ValueError(
                "Invalid value for argument `warmup_steps`: it must be smaller "
                f"than `total_steps` (={total_steps}) so that the cosine "
                f"phase is not empty. Received: warmup_steps={warmup_steps}. "
                "Lower it or raise total_steps."
            )
        self.peak_learning_rate = peak
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = self.peak_learning_rate
        warmup = float(self.warmup_steps)
        total = float(self.total_steps)
        # `max(warmup, 1)` only guards the division; with warmup_steps=0 the
        # warm-up branch is never selected.
        warm = peak * (step + 1.0) / max(warmup, 1.0)
        progress = ops.clip((step - warmup) / (total - warmup), 0.0, 1.0)
        cosine = 0.5 * peak * (1.0 + ops.cos(math.pi * progress))
        # cos(pi) is not exactly -1 in float32: return an exact 0 at the end.
        cosine = ops.where(step >= total, 0.0, cosine)
        return ops.where(step < warmup, warm, cosine)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }
