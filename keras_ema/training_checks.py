"""Checks and warnings about how a MultiEMA is used and what its updates meet.

At the start of training: a run shorter than a decay's warm-up, updates that
`steps_per_execution` makes late, variables that became trainable after the
EMAs were made, callbacks placed where they miss the EMA logs, monitors of
EMA keys that cannot work, validation data the model cannot evaluate.
During training: no update applied by an epoch's end, updates skipped on
non-finite weights.
"""

import itertools
import math
import warnings

from keras_ema import _keras_private
from keras_ema import _monitors
from keras_ema import _validation_data
from keras_ema.decay import warmup_end_step
from keras_ema.shadows import averaged_variables
from keras_ema.step_counter import accumulation_steps

# Keras callbacks that read every key of the epoch's logs (History, CSVLogger,
# TensorBoard, RemoteMonitor) or one named by `monitor` (the others).
_LOG_RECORDERS = ("History", "CSVLogger", "TensorBoard", "RemoteMonitor")
_LOG_MONITORS = ("ModelCheckpoint", "EarlyStopping", "ReduceLROnPlateau")


def warn_short_run(ema, total_steps):
    """Warns when a decay's warm-up outlasts the run's `total_steps`."""
    if not ema.warmup or not total_steps:
        return
    late = [d for d in ema.decays if warmup_end_step(d) >= total_steps]
    if not late:
        return
    name = type(ema).__name__
    if len(late) == 1:
        text = (
            f"the warm-up of decay {late[0]} ends at optimizer step "
            f"{warmup_end_step(late[0])}, after the run's {total_steps} "
            "steps: the EMA uses the smaller warm-up decay (t + 1) / "
            f"(t + 10) throughout and averages a shorter window than "
            f"{late[0]} says. Use a smaller decay or a longer run."
        )
    else:
        ends = ", ".join(str(warmup_end_step(d)) for d in late)
        text = (
            f"the warm-ups of decays {late} end at optimizer steps "
            f"{ends}, after the run's {total_steps} steps: those EMAs "
            "use the same warm-up decay (t + 1) / (t + 10) throughout "
            "and stay identical to each other. Use smaller decays or a "
            "longer run."
        )
    warnings.warn(f"{name}: {text}", stacklevel=3)


def warn_callback_order(ema, callbacks):
    """Warns when a callback reading the logs runs before `ema`.

    `callbacks` are fit's, in order (`None` when unknown). Callbacks run in
    list order, so one placed before `ema` has
    handled the epoch's logs before the `ema_<decay>_val_*` keys are
    added: a CSVLogger silently writes no EMA column, a ModelCheckpoint
    monitoring an EMA key never finds it.
    """
    if ema.validation_data is None or not callbacks:
        return
    before = itertools.takewhile(lambda c: c is not ema, callbacks)
    late = []
    for c in before:
        name = type(c).__name__
        kinds = [k.__name__ for k in type(c).__mro__]
        monitor = str(getattr(c, "monitor", "") or "")
        if (getattr(c, "_reads_ema_logs", False)
                and getattr(c, "ema", None) is ema) or any(
            k in _LOG_RECORDERS for k in kinds
        ) or (any(k in _LOG_MONITORS for k in kinds)
              and monitor.startswith("ema_")):
            late.append(name)
    if late:
        name = type(ema).__name__
        who = (f"{late[0]} comes" if len(late) == 1
               else f"{', '.join(late)} come")
        warnings.warn(
            f"{name}: {who} before {name} in the callback list, so at "
            "each epoch end it runs before the `ema_<decay>_val_*` keys "
            "are added and never sees them (a CSVLogger writes no EMA "
            f"column). Put {name} first: callbacks=[{name.lower()}, ...].",
            stacklevel=3,
        )


def warn_changed_variables(ema):
    """Warns when another fit() trains variables the EMAs do not hold."""
    if ema._owner is not ema.model:
        return
    kept = {id(v) for v in ema._variables}
    new = [v.path for v in averaged_variables(ema.model, ema.average_batch_norm)
           if id(v) not in kept]
    if new:
        warnings.warn(
            f"MultiEMA: variables {new} became trainable after the EMAs "
            "were created; they are not averaged (the EMA model takes "
            "their live values). Call `reset()` before this fit() to "
            "average them too.",
            stacklevel=3,
        )


def warn_late_updates(ema, steps, accumulation):
    """Warns when updates fall inside a `steps_per_execution` block."""
    execution = int(getattr(ema.model, "steps_per_execution", 1) or 1)
    if execution <= 1:
        return
    # Updates are due every `period * accumulation` batches; a callback
    # runs only after each block of `execution` batches.
    unit = execution // math.gcd(execution, accumulation)
    aligned = (ema.period * accumulation) % execution == 0
    if aligned and (not steps or steps % execution == 0):
        return
    advice = []
    if not aligned:
        suggestion = -(-ema.period // unit) * unit
        what = "a multiple of steps_per_execution"
        if accumulation > 1:
            what = ("period * gradient_accumulation_steps a multiple of "
                    "steps_per_execution")
        advice.append(f"use period={suggestion} ({what})")
    if steps and steps % execution:
        advice.append(
            f"make the batches per epoch ({steps}) a multiple of "
            f"steps_per_execution={execution}"
        )
    warnings.warn(
        f"MultiEMA: with steps_per_execution={execution} the callback sees "
        f"the weights only every {execution} batches, so an update due "
        f"inside an execution is applied with the weights at its end (up "
        f"to {execution - 1} batches late). For exact updates, "
        + " and ".join(advice) + ".",
        stacklevel=3,
    )


def warn_never_updated(ema, epoch):
    """Warns at an epoch end when no update has been applied yet.

    The EMAs then still equal the weights training started from: their
    metrics are the initial model's, whatever the decay.
    """
    if ema.num_updates:
        return
    name = type(ema).__name__
    skipped = (f" ({len(ema.skipped_steps)} skipped on non-finite "
               "weights)" if ema.skipped_steps else "")
    warnings.warn(
        f"{name}: epoch {epoch} ended after {ema._step} optimizer steps "
        f"with no EMA update yet{skipped} (one every {ema.period} steps): "
        "the EMAs still equal the initial weights, and their metrics are "
        "the initial model's. Use a period of at most the steps per "
        "epoch, or train longer.",
        stacklevel=2,
    )


def report_skipped(ema, steps):
    """Raises, or warns, about the updates skipped at `steps` (non-finite weights)."""
    if ema.raise_on_nonfinite:
        raise FloatingPointError(
            f"MultiEMA: the model weights are not finite at optimizer step "
            f"{steps[0]}. Lower the learning rate or check the data; pass "
            "raise_on_nonfinite=False to skip such updates instead."
        )
    warnings.warn(
        f"MultiEMA: skipped the EMA update at optimizer steps {steps} "
        "because the model weights held NaN or infinite values; the EMAs "
        "keep their last finite values.",
        stacklevel=3,
    )


def check_start_of_training(ema):
    """Every start-of-training check of `ema` (in `fit`, from its `on_train_begin`)."""
    model = ema.model
    epochs, steps = ema.params.get("epochs"), ema.params.get("steps")
    accumulation = accumulation_steps(model.optimizer)
    if epochs and steps:
        warn_short_run(ema, epochs * steps // accumulation)
    warn_late_updates(ema, steps, accumulation)
    warn_changed_variables(ema)
    callbacks = _keras_private.calling_callbacks(ema)
    warn_callback_order(ema, callbacks)
    _monitors.check_monitors(ema, callbacks)
    if ema.validation_data is not None:
        _validation_data.check_validation_data(
            model, ema.validation_data, ema.validation_batch_size
        )
