"""A MultiEMA's state: checked whole before anything is restored, and its backups.

`MultiEMA.get_state` gives the state as numpy and Python data;
`check_state` reads one back for `MultiEMA.set_state`, raising `ValueError`
on any mismatch before anything is changed. `save_backup` and
`restore_backup_at` keep states in a `backup_dir` (`keras_ema.state_file`).
"""

import copy
import os
import threading
from typing import NamedTuple

import keras
import numpy as np

from keras_ema import writer
from keras_ema import lora
from keras_ema.shadows import reader as shadow_reader
from keras_ema import state_file
from keras_ema.update_log import UpdateLog

REQUIRED_KEYS = ("decays", "period", "warmup", "average_batch_norm", "step",
                 "attempted", "skipped_steps", "best", "shadows", "update_log")

# The arguments a state must share with the MultiEMA restoring it.
_ARGUMENTS = ("decays", "period", "warmup", "average_batch_norm")


class CheckedState(NamedTuple):
    """The values of a state `check_state` accepted, ready to assign."""

    shadows: list
    step: int
    attempted: int
    skipped_steps: list
    best: dict
    log: UpdateLog
    run_id: str | None
    lora_factors: object


# Set while `save_backup` asks for the state (`get_state`, with whatever a
# subclass adds): the shadows are then read and left on their device.
_FREEZING = threading.local()


def state_of(ema) -> dict:
    """The state of the built `ema` (its pending updates flushed).

    The shadows as numpy arrays; inside `save_backup`, read and left on
    their device (`keras_ema.shadows.reader`) for the writer thread to copy
    (`writer.to_host`).
    """
    frozen = getattr(_FREEZING, "active", False)
    return {
        "decays": list(ema.decays),
        "period": ema.period,
        "warmup": ema.warmup,
        "average_batch_norm": ema.average_batch_norm,
        "step": ema._step,
        "attempted": ema._attempted,
        "skipped_steps": list(ema.skipped_steps),
        # Copies: a later epoch updates the records in place, maybe before
        # the writer thread writes this state.
        "best": {repr(d): copy.deepcopy(v) for d, v in ema.best.items()},
        "paths": [v.path for v in ema._variables],
        "update_log": ema._log.as_dict(),
        "run_id": ema._run_id,
        "shadows": (shadow_reader(ema)() if frozen else
                    [keras.ops.convert_to_numpy(s) for s in ema._shadows]),
        "lora_factors": lora.live_factors(ema._owner),
    }


def check_state(ema, state) -> CheckedState:
    """The values of `state` for the built `ema`; `ValueError` on a mismatch.

    Checked: the keys, the arguments, the number, shapes and finiteness of
    the shadows, a step and counters not negative, the update log.
    """
    _check_keys(state)
    _check_arguments(ema, state)
    shadows = _check_shadows(ema, state["shadows"])
    try:
        step = int(state["step"])
        attempted = int(state["attempted"])
        skipped = [int(t) for t in state["skipped_steps"]]
        best = {float(d): dict(v) for d, v in state["best"].items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"Invalid MultiEMA state: bad step, attempted, skipped_steps "
            f"or best entry ({e}). Pass a dict from `get_state`."
        ) from None
    for key, value in (("step", step), ("attempted", attempted)):
        if value < 0:
            raise ValueError(
                f"Invalid MultiEMA state: {key}={value} is negative. Pass "
                "a dict from `get_state`."
            )
    log = UpdateLog.from_dict(state["update_log"], len(ema.decays))
    return CheckedState(shadows, step, attempted, skipped, best, log,
                        state.get("run_id"), state.get("lora_factors"))


def _check_keys(state):
    if not isinstance(state, dict):
        raise ValueError(
            "Invalid MultiEMA state: expected a dict from `get_state`. "
            f"Received: {type(state).__name__}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"Invalid MultiEMA state: missing keys {missing}. Pass a dict "
            "from `get_state`."
        )


def _check_arguments(ema, state):
    for key in _ARGUMENTS:
        mine = getattr(ema, key)
        theirs = state[key]
        if key == "decays":
            try:
                theirs = [float(d) for d in theirs]
            except (TypeError, ValueError):
                pass  # reported as a mismatch below
            mine = list(mine)
        if mine != theirs:
            raise ValueError(
                f"Cannot restore a MultiEMA state with {key}={theirs} into "
                f"a MultiEMA with {key}={mine}. Use the same arguments."
            )


def _check_shadows(ema, shadows):
    """The state's shadows as float32 arrays, one per averaged variable."""
    if len(shadows) != len(ema._shadows):
        raise ValueError(
            f"Cannot restore a MultiEMA state of {len(shadows)} "
            f"variables into a model with {len(ema._shadows)} averaged "
            "variables. Restore it into the model it was saved from."
        )
    values = []
    for i, (s, v, value) in enumerate(zip(ema._shadows, ema._variables, shadows)):
        value = np.asarray(value, np.float32)
        if tuple(value.shape) != tuple(s.shape):
            raise ValueError(
                f"Cannot restore a MultiEMA state: shadow {i} has shape "
                f"{tuple(value.shape)}, but variable {v.path} needs "
                f"{tuple(s.shape)}. Restore it into the model it was "
                "saved from."
            )
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"Cannot restore a MultiEMA state: shadow {i} (variable "
                f"{v.path}) holds NaN or infinite values. The state is "
                "corrupt; use an older one."
            )
        values.append(value)
    return values


def save_backup(ema):
    """Writes the state of `ema` to its `backup_dir`, keeping the two newest.

    A kill between this file and the model's own backup leaves the model one
    epoch behind, and that state is kept; a damaged newest file leaves the
    older one to resume from. Written by the run's background writer, if
    one is open (`keras_ema.writer`).
    """
    _FREEZING.active = True
    try:
        state = ema.get_state()  # a subclass's too (SwitchEMA, Belay)
    finally:
        _FREEZING.active = False

    def job():
        state["shadows"] = [writer.to_host(s) for s in state["shadows"]]
        state_file.write_state_file(ema.backup_dir, state, keep=2)

    writer.submit(job)


def restore_backup_at(ema, step: int) -> bool:
    """Restores into `ema` the state its `backup_dir` holds for `step`, if any.

    Returns `False` when `backup_dir` holds no state (a new run) or
    `step` is 0. Raises `ValueError` naming the file when the state of
    `step` is damaged, or when other steps are saved but not `step`: the
    EMAs never restart silently from the current weights.
    """
    directory = ema.backup_dir
    files = state_file.state_files(directory)
    path = state_file.state_path(directory, step)
    if not os.path.exists(path):
        if files and step > 0:
            steps = ", ".join(str(s) for s in state_file.file_steps(files))
            prefix = os.path.join(directory, state_file.STATE_PREFIX)
            raise ValueError(
                f"MultiEMA: no saved state at optimizer step {step} in "
                f"{directory} (it holds steps {steps}), so the EMAs "
                "cannot continue. Resume the model from one of those "
                f"steps, or remove {prefix}"
                "*.npz to restart the EMAs from the current weights."
            )
        return False
    ema.set_state(state_file.read_state_file(path))
    return True
