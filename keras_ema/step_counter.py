"""Optimizer steps taken, as a callback sees them at each batch end.

Counting batches costs nothing, but a batch is not always an optimizer step:
a `keras.optimizers.LossScaleOptimizer` skips the steps whose gradients
overflow, an optimizer with `gradient_accumulation_steps=n` steps once every
`n` batches, and with `steps_per_execution > 1` a callback runs only after
each block of batches.
"""

import keras

from keras_ema import _keras_private


def to_int(value) -> int:
    """A scalar tensor or variable as a Python int."""
    return int(keras.ops.convert_to_numpy(value))


def accumulation_steps(optimizer) -> int:
    """Batches per optimizer step: `gradient_accumulation_steps`, or 1."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return int(getattr(optimizer, "gradient_accumulation_steps", None) or 1)


def optimizer_step(model) -> int:
    """Optimizer steps taken (a LossScaleOptimizer's skips excluded)."""
    return to_int(model.optimizer.iterations)


class StepCounter:
    """The optimizer step at each batch end of one epoch.

    A LossScaleOptimizer leaves its `iterations` put on a skipped step: with
    one, the optimizer is asked at every batch end, at the cost of a device
    sync. Otherwise batches are counted. An optimizer that accumulates
    gradients over `n` batches counts every batch in its raw counter and
    steps after the batch that brings it to a multiple of `n` (`iterations`
    is that counter // n): batches are counted in the raw counter, read once
    at the epoch's start, so a resumed run whose counter is not a multiple
    of `n` stays exact.
    """

    def __init__(self):
        self.count_batches = True
        self.accumulation = 1
        self.epoch_start_batch = 0

    def start_epoch(self, optimizer, step: int):
        """Reads how to count this epoch; `step` is the optimizer's step now."""
        self.count_batches = not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        )
        self.accumulation = accumulation_steps(optimizer)
        self.epoch_start_batch = step * self.accumulation
        if self.count_batches and self.accumulation > 1:
            self.epoch_start_batch = to_int(_keras_private.raw_iterations(optimizer))

    def step_at_batch_end(self, model, batch: int, steps: int | None) -> int:
        """The optimizer step after the epoch's batch `batch` (0-based).

        Keras passes the index of the last batch of the execution, which for
        a final partial execution (steps_per_execution > 1) lies past the
        epoch's end: it is clamped to `steps`, the batches per epoch; when
        that is unknown, the optimizer is asked.
        """
        if steps and self.count_batches:
            batches = self.epoch_start_batch + min(batch + 1, steps)
            return batches // self.accumulation
        return optimizer_step(model)
