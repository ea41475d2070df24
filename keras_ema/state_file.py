"""MultiEMA state files: `multi_ema_step<step>.npz`, one per saved step.

A state file holds the `MultiEMA.get_state()` dict: the shadows as arrays
`s0, s1, ...`, the live LoRA factors (if any) as `lora0, lora1, ...`, and
everything else as JSON in `meta`. It is written under a
temporary name with the pid and renamed, so a crash leaves no partial file.
"""

import glob
import json
import os
import zipfile

import numpy as np

from keras_ema._files import atomic_path

STATE_PREFIX = "multi_ema_step"


def state_path(directory: str, step: int) -> str:
    """The state file of optimizer step `step` in `directory`."""
    return os.path.join(directory, f"{STATE_PREFIX}{int(step):012d}.npz")


def state_files(directory: str) -> list:
    """The state files in `directory`, oldest step first."""
    return sorted(glob.glob(os.path.join(directory, f"{STATE_PREFIX}*.npz")))


def file_steps(files) -> list:
    """The optimizer steps named by state files `files`, sorted."""
    steps = []
    for f in files:
        digits = os.path.basename(f)[len(STATE_PREFIX):-len(".npz")]
        if digits.isdigit():
            steps.append(int(digits))
    return sorted(steps)


def _one_line(error):
    return " ".join(f"{type(error).__name__}: {error}".split())


def write_state_file(directory: str, state: dict, keep: int = 2) -> str:
    """Writes `state` as the file of its step, keeping the `keep` newest files.

    Returns the path written.
    """
    state = dict(state)
    shadows = state.pop("shadows")
    lora_factors = state.pop("lora_factors", None) or []
    os.makedirs(directory, exist_ok=True)
    path = state_path(directory, state["step"])
    with atomic_path(path) as tmp:
        np.savez(
            tmp,
            meta=np.asarray(json.dumps(state)),
            **{f"s{i}": s for i, s in enumerate(shadows)},
            **{f"lora{i}": f for i, f in enumerate(lora_factors)},
        )
    for old in state_files(directory)[:-keep]:
        os.remove(old)
    return path


def read_state_file(path: str) -> dict:
    """The MultiEMA state saved in `path` (a `multi_ema_step<step>.npz`).

    Raises:
        ValueError: one line naming the file if it does not read back whole.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            state = json.loads(str(data["meta"]))
            n = len([k for k in data.files if k.startswith("s")])
            state["shadows"] = [np.asarray(data[f"s{i}"]) for i in range(n)]
            n = len([k for k in data.files if k.startswith("lora")])
            if n:
                state["lora_factors"] = [np.asarray(data[f"lora{i}"])
                                         for i in range(n)]
        if not isinstance(state, dict) or not all(
            k in state for k in ("decays", "step", "attempted", "best")
        ):
            raise ValueError("its metadata lacks the MultiEMA fields")
    except (OSError, ValueError, KeyError, EOFError, TypeError,
            zipfile.BadZipFile) as error:
        raise ValueError(
            f"MultiEMA state file {path} is damaged ({_one_line(error)})."
        ) from None
    return state


def backup_steps(directory: str) -> list:
    """Optimizer steps whose MultiEMA state files in `directory` read back whole."""
    steps = []
    for step in file_steps(state_files(directory)):
        try:
            read_state_file(state_path(directory, step))
        except ValueError:
            continue
        steps.append(step)
    return steps
