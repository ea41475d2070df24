"""The files of a training run, written so that a kill never leaves half a file.

A run directory holds:

- `flags.cfg`: the resolved flags; `train.py --flagfile=RUN/flags.cfg` replays it.
- `history.csv`: one row per epoch (learning rate, SGD train and validation
  metrics, every EMA's validation metrics).
- `summary.json`: the last SGD iterate and, per decay, the epochs of best
  validation accuracy and lowest validation loss; `"completed": true` once
  training ended.
- `sgd_last.weights.h5`, `ema_<decay>_best_accuracy.weights.h5`,
  `ema_<decay>_best_loss.weights.h5`: weights to evaluate.
- `noise_mask.npy` with label noise; `curves.png`; `backup/` while training;
  `export/` with `--export`.

Every file is written to a temporary name in the same directory and renamed
(`os.replace` is atomic on POSIX), so a reader or a resumed run sees either
the old file or the new one.
"""

import contextlib
import csv
import io
import json
import os
import shutil

LAYOUT_VERSION = 1
REQUIRED_FILES = ("flags.cfg", "history.csv", "summary.json", "sgd_last.weights.h5")


class RunDirError(ValueError):
    """A run directory is missing, incomplete or of another layout."""


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it onto `path` on success.

    The temporary name keeps the extension (`.weights.h5`, `.keras`) that
    some writers insist on. On an exception the temporary file is removed.
    """
    directory, base = os.path.split(os.path.abspath(path))
    stem, dot, ext = base.partition(".")
    tmp = os.path.join(directory, f".{stem}.tmp{os.getpid()}{dot}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_csv(path, rows):
    """Writes a list of dicts; the columns are the union of their keys, in order."""
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text(path, buffer.getvalue())


def read_csv(path):
    """Rows of a CSV file as dicts of floats (empty cells are dropped).

    The `epoch` column is read back as an int, as it was written.
    """
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]
    for row in rows:
        if "epoch" in row:
            row["epoch"] = int(row["epoch"])
    return rows


def read_flags(path):
    """`--name=value` lines of a flag file as a dict of strings."""
    with open(path) as f:
        return read_flags_text(f.read())


def read_flags_text(text):
    """`--name=value` lines of a flag file's text as a dict of strings."""
    flags = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("--") and "=" in line:
            name, _, value = line[2:].partition("=")
            flags[name] = value
        elif line.startswith("--no") and line[4:]:
            flags[line[4:]] = "false"
        elif line.startswith("--"):
            flags[line[2:]] = "true"
    return flags


def check_output_dir(path):
    """Raises RunDirError unless `path` is a directory or can become one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(
            f"--output_dir={path} is a file, not a directory; choose another "
            "--output_dir."
        )
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise RunDirError(
            f"--output_dir={path} cannot be created: {parent} is not writable."
        )


def load_run(path):
    """Reads a finished run directory: `{"flags", "summary", "history", "path"}`.

    Raises:
        RunDirError: the directory is missing, lacks a file, is unfinished,
            or was written by a different layout version.
    """
    if not os.path.isdir(path):
        raise RunDirError(f"Run directory {path} does not exist; pass the "
                          "--output_dir of a finished train.py run.")
    missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise RunDirError(
            f"Run directory {path} is incomplete: {', '.join(missing)} missing. "
            "Finish the run (rerun its train.py command) or remove it."
        )
    summary = read_json(os.path.join(path, "summary.json"))
    version = summary.get("layout_version")
    if version != LAYOUT_VERSION:
        raise RunDirError(
            f"Run directory {path} has layout version {version}, this version "
            f"reads {LAYOUT_VERSION}; rerun its training with this version."
        )
    if not summary.get("completed"):
        raise RunDirError(
            f"Run directory {path} holds an unfinished run; rerun its train.py "
            "command to finish it."
        )
    return {
        "path": path,
        "flags": read_flags(os.path.join(path, "flags.cfg")),
        "summary": summary,
        "history": read_csv(os.path.join(path, "history.csv")),
    }
