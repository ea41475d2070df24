"""What a finished run's `summary.json` must hold, checked once when it is loaded.

`zoo.run.log.summarize` writes the file; evaluate.py and `--selection_from`
read it through `zoo.run.run_dir.load_run`, which calls `summary_problem`
first: a file that parses but is wrong (an epoch `"two"`, an `"ema": {}`, a
weights name `"../../../../etc/passwd"`, a `NaN` written by hand) is then
reported in one line naming the key, instead of failing later inside the
evaluation or opening a file outside the run.

The schema (keys not listed are not read, and pass):

- `completed`: a bool; `epochs_done`: an int >= 0; `diverged`: `null` or
  `{"epoch": int, "step": int}`.
- `selection_split`, `selection_from`, `dataset`, `model`, `averaging`:
  strings (or `null`) where present.
- `sgd`: an object; `sgd.last` and `sgd.best_accuracy`, where present,
  records.
- `ema`: an object, one entry per decay of the run's `--ema_decays` (the
  key is the decay as flags.cfg writes it, e.g. `"0.998"`), each an object
  whose `best_accuracy`, `best_loss` and `last`, where present, are records
  with a `weights` name.
- A record: `epoch`, an int in `[0, epochs_done)`; `value`, `val_accuracy`,
  `val_loss`: `null` or finite numbers (accuracies in [0, 1], losses >= 0);
  `weights`: the plain name of a file in the run directory (no `/`, `\\`,
  `..` or absolute path); `chosen_by`: `null` or an object.
"""

import math
import os

from keras_ema.checks import is_int
from keras_ema.checks import is_real

RECORDS = ("best_accuracy", "best_loss", "last")
STRINGS = ("selection_split", "selection_from", "dataset", "model", "averaging")


class _Problem(Exception):
    """The first problem found: `key` (a subscript path) and what is wrong."""

    def __init__(self, key, what):
        super().__init__(f"{key} {what}")


def summary_problem(summary, run: str, decays=None) -> str:
    """The first problem of `summary` (a parsed summary.json of run `run`).

    Args:
        summary: the parsed JSON.
        run: str. The run directory, where the named weights files must be.
        decays: sequence of floats or `None`. The run's `--ema_decays`; the
            `ema` entries must be exactly these. `None`: not compared.

    Returns:
        `""` when the summary follows the schema (see the module docstring),
        else one line: the key as a subscript path and what is wrong, e.g.
        `ema["0.9"]["best_loss"]["epoch"] is 'two', not an integer`.
    """
    try:
        _check(summary, run, decays)
    except _Problem as problem:
        return str(problem)
    return ""


def _name(path):
    """`ema["0.9"]["last"]`: the first key bare, the others subscripted."""
    return path[0] + "".join(f'["{p}"]' for p in path[1:])


def _fail(path, what):
    raise _Problem(_name(path), what)


def _object(value, path):
    if not isinstance(value, dict):
        _fail(path, f"is {value!r}, not an object")
    return value


def _int(value, path, low, high=None):
    if not is_int(value):
        _fail(path, f"is {value!r}, not an integer")
    if value < low or (high is not None and value >= high):
        where = f">= {low}" if high is None else f"in [{low}, {high})"
        _fail(path, f"is {value}, not {where}")
    return value


def _number(value, path, low=None, high=None):
    """`None`, or a finite real number in `[low, high]`."""
    if value is None:
        return
    if not is_real(value):
        _fail(path, f"is {value!r}, not a number")
    if not math.isfinite(value):
        _fail(path, f"is {value}, not a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        what = f">= {low}" if high is None else f"in [{low}, {high}]"
        _fail(path, f"is {value}, not {what}")


def is_plain_name(name) -> bool:
    """Whether `name` is a file name without any directory part."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(sep in name for sep in ("/", "\\", os.sep, "\0"))
            and (os.altsep is None or os.altsep not in name))


def _record(record, path, run, epochs, criterion):
    _object(record, path)
    if "epoch" not in record:
        _fail(path, "has no epoch")
    _int(record["epoch"], path + ["epoch"], 0, epochs)
    for key in ("val_accuracy", "val_loss", "value"):
        if key in record:
            kind = criterion if key == "value" else key[len("val_"):]
            if kind == "accuracy":
                _number(record[key], path + [key], 0.0, 1.0)
            else:
                _number(record[key], path + [key], 0.0)
    if "chosen_by" in record and record["chosen_by"] is not None:
        _object(record["chosen_by"], path + ["chosen_by"])
    if "weights" in record:
        name = record["weights"]
        if not is_plain_name(name):
            _fail(path + ["weights"], f"is {name!r}, not the name of a file in "
                  "the run directory (a plain name: no /, \\, .. or absolute path)")
        if not os.path.isfile(os.path.join(run, name)):
            _fail(path + ["weights"], f"names {name}, which is not a file in {run}")


def _check(summary, run, decays):
    _object(summary, ["summary"])
    if "completed" in summary and not isinstance(summary["completed"], bool):
        _fail(["completed"], f"is {summary['completed']!r}, not true or false")
    epochs = _int(summary.get("epochs_done"), ["epochs_done"], 0)
    for key in STRINGS:
        if summary.get(key) is not None and not isinstance(summary[key], str):
            _fail([key], f"is {summary[key]!r}, not a string")
    if summary.get("diverged") is not None:
        diverged = _object(summary["diverged"], ["diverged"])
        for key in ("epoch", "step"):
            _int(diverged.get(key), ["diverged", key], 0)
    sgd = _object(summary.get("sgd"), ["sgd"])
    for key, criterion in (("last", None), ("best_accuracy", "accuracy")):
        if key in sgd:
            _record(sgd[key], ["sgd", key], run, epochs, criterion)
    emas = _object(summary.get("ema"), ["ema"])
    if not emas:
        _fail(["ema"], "records no EMA" + (
            f"; flags.cfg has --ema_decays={','.join(map(str, decays))}"
            if decays else ""))
    for name, entry in emas.items():
        try:
            decay = float(name)
        except ValueError:
            decay = math.nan
        if not 0 < decay < 1:
            _fail(["ema", name], "is not a decay in (0, 1)")
        if decays is not None and decay not in decays:
            _fail(["ema", name], "is not one of flags.cfg's --ema_decays="
                  + ",".join(map(str, decays)))
        _object(entry, ["ema", name])
        for key in RECORDS:
            if key in entry:
                criterion = key[len("best_"):] if key.startswith("best_") else None
                _record(entry[key], ["ema", name, key], run, epochs, criterion)
    if decays is not None:
        missing = [d for d in decays if d not in {float(n) for n in emas}]
        if missing:
            _fail(["ema"], f"has no entry for the decay {missing[0]} of "
                  "flags.cfg's --ema_decays")


__all__ = ["is_plain_name", "summary_problem"]
