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
- `.lock`: locked by the process that trains the run (see `lock_run_dir`).

Every file is written to a temporary name in the same directory and renamed
(`os.replace` is atomic on POSIX), so a reader or a resumed run sees either
the old file or the new one.
"""

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil

LAYOUT_VERSION = 1
REQUIRED_FILES = ("flags.cfg", "history.csv", "summary.json", "sgd_last.weights.h5")
LOCK_FILE = ".lock"
# Temporary names: `atomic_path`'s `.<stem>.tmp<pid>.<ext>`, and `<name>.tmp.*`
# or `<name>.tmp<pid>.*` of writers that rename their own files.
_TEMP_NAME = re.compile(r"\.tmp(\d*)(\.|$)")


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
    """Writes strict JSON: NaN and infinities become `null`."""
    text = json.dumps(finite_json(data), indent=2, sort_keys=True, allow_nan=False)
    write_text(path, text + "\n")


def finite_json(value):
    """`value` with every non-finite float, also nested, replaced by `None`.

    Strict JSON has no NaN or infinity; `None` is written as `null`.
    """
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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


class RunInUseError(RunDirError):
    """Another live process trains in the run directory."""


class RunLock:
    """An exclusive lock on a run directory, held until `release` or exit.

    `fcntl.flock` on `RUN/.lock`: the operating system drops it when the
    process ends, however it ends, so a killed run never leaves a stale
    lock. The file holds the pid of the holder. On systems without `fcntl`
    no lock is taken.
    """

    def __init__(self, run):
        self.path = os.path.join(run, LOCK_FILE)
        self._fd = None

    def acquire(self):
        """Takes the lock; raises RunInUseError naming the holder's pid."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        run = os.path.dirname(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError(
                f"--output_dir={run} cannot be written ({error.strerror}); "
                "make it writable or choose another --output_dir."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunInUseError(
                f"--output_dir={run} is in use by process {holder}; wait for "
                "it to finish or choose another --output_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self):
        """Drops the lock (the file stays: removing it would race)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def lock_run_dir(run) -> RunLock:
    """Locks the existing directory `run` for this process; see `RunLock`.

    Raises:
        RunInUseError: another process holds the lock.
    """
    return RunLock(run).acquire()


def is_temp_name(name) -> bool:
    """Whether `name` is a temporary file name of a writer in a run directory."""
    return bool(_TEMP_NAME.search(name))


def remove_stale_temp_files(run):
    """Removes the temporary files and folders other processes left in `run`.

    Call it holding the run's lock: then no other process writes there, and
    every temporary name not of this process is a leftover of a killed one.
    Looks in `run` and its `backup/` folder.
    """
    mine = f".tmp{os.getpid()}"
    for folder in (run, os.path.join(run, "backup")):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if not is_temp_name(name) or mine in name:
                continue
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


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
