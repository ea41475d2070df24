"""The package's `.npz` state files: one format, one writer, one reader.

MultiEMA's state files (`multi_ema_step<step>.npz`, one per saved step in a
backup directory) and post-hoc snapshots (`snapshot_<step>.npz`,
`keras_ema.posthoc_snapshots`) are one format, a NumPy `.npz` archive of

- `meta`: a JSON object, what the file holds;
- JSON entries of their own, read apart from `meta` (a snapshot's `log`,
  so that reading what a snapshot holds does not parse its log);
- numbered arrays `<name>0, <name>1, ...` per list of arrays (`s`: the
  shadows; `lora`: the live LoRA factors).

`write_npz` writes one under a temporary name with the pid and renames it
(`files.atomic_path`), so a crash leaves no partial file. `open_npz`,
`read_json` and `read_arrays` read one back, raising what NumPy, zipfile and
json raise on a damaged file; each kind of file turns that into its own
one-line message.

A MultiEMA state file holds the `MultiEMA.get_state()` dict: the shadows as
`s0, s1, ...`, the live LoRA factors (if any) as `lora0, lora1, ...`, and
everything else in `meta`.
"""

import glob
import json
import os
import re
import zipfile

import numpy as np

from keras_ema.files import atomic_path

STATE_PREFIX = "multi_ema_step"


# === The format ===


def write_npz(path: str, meta: dict, entries: dict | None = None,
              arrays: dict | None = None) -> str:
    """Writes one file atomically (temporary file with the pid, renamed).

    Args:
        path: str. The file, in an existing directory.
        meta: dict. JSON-able, stored as the entry `meta`.
        entries: dict or `None`. Further JSON-able entries, by name.
        arrays: dict or `None`. `{name: list of arrays}`, each list stored
            as `name0, name1, ...`.

    Returns:
        `path`.
    """
    content = {"meta": np.asarray(json.dumps(meta))}
    for key, value in (entries or {}).items():
        content[key] = np.asarray(json.dumps(value))
    for name, values in (arrays or {}).items():
        content.update({f"{name}{i}": v for i, v in enumerate(values)})
    # The temporary name (`.NAME.tmpPID.npz`) is hidden from the listings.
    with atomic_path(path) as tmp:
        np.savez(tmp, **content)
    return path


def open_npz(path: str):
    """The archive at `path`, to use in a `with`; its entries are read lazily."""
    return np.load(path, allow_pickle=False)


def read_json(data, key: str, missing_ok: bool = False):
    """JSON entry `key` of an open archive `data`.

    Returns `None` for a missing entry when `missing_ok`; else a missing
    entry raises `KeyError`.
    """
    if missing_ok and key not in data.files:
        return None
    return json.loads(str(data[key]))


def read_array(data, name: str, i: int) -> np.ndarray:
    """Array `i` of the list `name` of an open archive `data`."""
    return data[f"{name}{i}"]


def read_arrays(data, name: str) -> list:
    """Every array of the list `name` of an open archive `data`, in order."""
    numbered = re.compile(rf"^{re.escape(name)}\d+$")
    n = len([k for k in data.files if numbered.match(k)])
    return [np.asarray(read_array(data, name, i)) for i in range(n)]


# === MultiEMA state files ===


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
    path = write_npz(state_path(directory, state["step"]), state,
                     arrays={"s": shadows, "lora": lora_factors})
    for old in state_files(directory)[:-keep]:
        os.remove(old)
    return path


def read_state_file(path: str) -> dict:
    """The MultiEMA state saved in `path` (a `multi_ema_step<step>.npz`).

    Raises:
        ValueError: one line naming the file if it does not read back whole.
    """
    try:
        with open_npz(path) as data:
            state = read_json(data, "meta")
            state["shadows"] = read_arrays(data, "s")
            lora_factors = read_arrays(data, "lora")
            if lora_factors:
                state["lora_factors"] = lora_factors
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
