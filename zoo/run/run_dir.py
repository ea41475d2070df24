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
- `noise_mask.npy` with label noise; `selection.json` with `--selection_from`
  (the tuning run's choices, copied at the start); `curves.png`; `backup/` while training;
  `export/` with `--export`.
- `.lock`: locked by the process that trains the run (see `locked`).

Every file is written to a temporary name in the same directory,
`.NAME.tmpPID.EXT`, and renamed (`os.replace` is atomic on POSIX), so a reader
or a resumed run sees either the old file or the new one. A full disk stops
the writer with `DiskFullError` naming the file, its temporary file removed.
Files damaged by something else (a disk error, a careless edit) are detected
when read: `DamagedFileError` names the file and what to do.
"""

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import warnings

from keras_ema import files
from keras_ema import writer
from keras_ema.files import is_disk_full
from zoo.run.config import RESUMABLE_CHANGES
from zoo.run.config import Config
from zoo.run.config import read_flags
from zoo.run.config import read_flags_text
from zoo.run.errors import DamagedFileError
from zoo.run.errors import DiskFullError
from zoo.run.errors import RunDirError
from zoo.run.errors import RunInUseError
from zoo.run.lock import LOCK_FILE
from zoo.run.lock import RunLock
from zoo.run.lock import lock_run_dir
from zoo.run.summary_schema import summary_problem

LAYOUT_VERSION = 1
REQUIRED_FILES = ("flags.cfg", "history.csv", "summary.json", "sgd_last.weights.h5")
# Any temporary name: `TEMP_NAME` (`atomic_path`'s), and `<name>.tmp.*` or
# `<name>.tmp<pid>.*` of writers that rename their own files.
_ANY_TEMP_NAME = re.compile(r"\.tmp(\d*)(\.|$)")


# `.NAME.tmpPID.EXT`: the temporary file of a writer with process id PID.
TEMP_NAME = files.TEMP_NAME


def _final_path(path):
    """`path` with a temporary name `.NAME.tmpPID.EXT` turned back into NAME.EXT."""
    directory, base = os.path.split(path)
    parsed = files.parse_temp_name(base)
    return path if parsed is None else os.path.join(directory, parsed[0])


@contextlib.contextmanager
def disk_errors(default_path: str = "the run directory"):
    """Turns a full disk (`OSError` ENOSPC or a library's wrapper) into `DiskFullError`.

    The file named is the one the error names (a temporary name turned back
    into the file's own), else `default_path`.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        path = getattr(error, "filename", None)
        if not path:
            match = re.search(r"filename = '([^']+)'", str(error))
            path = match.group(1) if match else default_path
        raise DiskFullError(_final_path(str(path))) from None


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside `path`; renames it onto `path` on success.

    `keras_ema.files.atomic_path` (the temporary file or folder removed on
    every exit) with the kit's error: a full disk raises `DiskFullError`
    naming `path`.
    """
    with disk_errors(path), files.atomic_path(path) as tmp:
        yield tmp


def write_bytes(path: str, data: bytes):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str, text: str):
    write_bytes(path, text.encode("utf-8"))


def save_weights(model, path: str, include_optimizer: bool = True):
    """`model.save_weights(path)`, atomically; a full disk raises `DiskFullError`.

    The file is built in memory first: h5py writing to a full disk crashes
    the process. `include_optimizer=False` leaves out the optimizer's
    variables (see `keras_ema.files.write_weights`). While a
    `keras_ema.writer.BackgroundWriter` is open (during a run's `fit`), a
    host copy is taken now and the writer writes the file, in order.
    """
    writer.save_weights(model, path, include_optimizer, atomic_path=atomic_path)


def load_weights(model, path: str, remedy: str = ""):
    """`model.load_weights(path)`; a file that does not load raises `DamagedFileError`.

    A weights-only file (EMA and best files) leaves the optimizer as it is,
    without Keras' warning that it skips the optimizer's variables.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Skipping variable loading for optimizer")
            model.load_weights(path)
    except Exception as error:  # h5py and Keras raise many kinds
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise DamagedFileError(path, reason[:200], remedy) from None


def check_writable(path: str):
    """Raises RunDirError unless a file can be created in directory `path`.

    `os.access` is not enough: it says yes for root on some read-only
    mounts. A temporary file is created and removed.
    """
    probe = os.path.join(path, f".write_check.tmp{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise RunDirError(
            f"{path} is not writable ({os.strerror(error.errno or 0)}); make it "
            "writable, or copy the run to a writable place and rerun with "
            "--output_dir=COPY."
        ) from None


def write_json(path: str, data):
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


def read_json(path: str, remedy: str = ""):
    """The JSON in `path`; raises `DamagedFileError` (with `remedy`) if it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFileError(path, f"not JSON: {error}", remedy) from None


def write_csv(path: str, rows: list):
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


def read_csv(path: str) -> list:
    """Rows of a CSV file as dicts of floats (empty cells are dropped).

    The `epoch` column is read back as an int, as it was written. A cell
    that is not a number raises `DamagedFileError`; `read_history` checks a
    history whole.
    """
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [
                {k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)
            ]
    except (UnicodeDecodeError, csv.Error, ValueError, TypeError) as error:
        raise DamagedFileError(path, f"not a CSV of numbers: {error}") from None
    for row in rows:
        if "epoch" in row:
            row["epoch"] = int(row["epoch"])
    return rows


def read_history(path: str, epochs: int | None = None, remedy: str = "") -> list:
    """The rows of a `history.csv`, checked whole: epochs 0, 1, ... in order.

    Every row must have a number in every column (a blank cell, a stray
    byte, a row cut short is damage) and the file must end with a line end
    (a number cut in half at the end, `0.9` of `0.9375`, still parses).

    Args:
        path: str, the file.
        epochs: int or `None`. Check and return only the first `epochs` rows
            (those a resumed run keeps); `None`: every row. Defaults to `None`.
        remedy: str, what to do, appended to the error. Defaults to `""`.

    Raises:
        DamagedFileError: naming the file, the first bad row and `remedy`.
    """
    def damaged(reason):
        return DamagedFileError(path, reason, remedy)

    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise damaged("missing") from None
    except UnicodeDecodeError as error:
        raise damaged(f"not text: {error}") from None
    if "\0" in text or "\r" in text:
        raise damaged("stray bytes")
    complete = text.endswith("\n")
    lines = text.split("\n")
    lines = lines[:-1] if complete else lines
    try:
        table = list(csv.reader(lines))
    except csv.Error as error:
        raise damaged(f"not CSV: {error}") from None
    if not table or "epoch" not in table[0]:
        raise damaged("no header line with an epoch column")
    header, body = table[0], table[1:]
    wanted = len(body) if epochs is None else epochs
    if len(body) < wanted:
        raise damaged(f"{len(body)} rows, the resumed run needs {wanted}")
    cut_short = len(body) - 1 if not complete else None
    return [_history_row(header, cells, i, i == cut_short, damaged)
            for i, cells in enumerate(body[:wanted])]


def _history_row(header, cells, i, cut_short, damaged):
    """Row `i` of a history as a dict of floats; raises `damaged(reason)` if bad."""
    if cut_short:
        raise damaged(f"the row of epoch {i} is cut short (no line end)")
    if len(cells) != len(header):
        raise damaged(f"the row of epoch {i} has {len(cells)} cells, the "
                      f"header {len(header)}")
    row = {}
    for column, cell in zip(header, cells):
        try:
            row[column] = float(cell)
        except ValueError:
            raise damaged(f"the row of epoch {i} has {column}={cell!r}, "
                          "not a number") from None
    if row["epoch"] != i:
        raise damaged(f"row {i + 1} has epoch {row['epoch']:g}, "
                      f"expected {i}")
    row["epoch"] = i
    return row


def run_state(config: Config) -> str:
    """Whether `config.output_dir` is `"new"`, to `"resume"`, or `"done"`.

    Raises:
        RunDirError: the directory holds something else: files of no run,
            a run of another layout version, or a run with other flags.
    """
    run = config.output_dir
    check_output_dir(run)
    flags_path = os.path.join(run, "flags.cfg")
    if not os.path.exists(flags_path):
        # The lock and leftovers of a killed start are the kit's own files.
        if os.path.isdir(run) and [
            n for n in os.listdir(run)
            if n != LOCK_FILE and not is_temp_name(n)
        ]:
            raise RunDirError(
                f"--output_dir={run} exists, is not empty and holds no "
                "flags.cfg; choose a new or empty directory."
            )
        return "new"
    summary_path = os.path.join(run, "summary.json")
    if os.path.exists(summary_path):
        version = read_json(summary_path).get("layout_version")
        if version != LAYOUT_VERSION:
            raise RunDirError(
                f"--output_dir={run} holds a run of layout version {version}; "
                f"this version writes {LAYOUT_VERSION}: choose another "
                "--output_dir."
            )
    old = read_flags(flags_path)
    new = read_flags_text(config.to_flags())
    differ = [k for k in sorted(set(old) | set(new))
              if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
    if differ:
        changes = ", ".join(f"--{k}={old.get(k)} -> {new.get(k)}" for k in differ[:3])
        raise RunDirError(
            f"--output_dir={run} holds a run with other flags ({changes}); "
            f"rerun it with --flagfile={flags_path} or choose another --output_dir."
        )
    summary_path = os.path.join(run, "summary.json")
    if os.path.exists(summary_path) and read_json(summary_path).get("completed"):
        return "done"
    return "resume"



def check_output_dir(path: str):
    """Raises RunDirError unless `path` is a directory or can become one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(
            f"--output_dir={path} is a file, not a directory; choose another "
            "--output_dir."
        )
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunDirError(
            f"--output_dir={path} cannot be created: {parent} is a file, not a "
            "directory; choose another --output_dir."
        )
    if not os.access(parent, os.W_OK):
        raise RunDirError(
            f"--output_dir={path} cannot be created: {parent} is not writable."
        )


class LockedRun:
    """The run directory of a `Config` while `locked` holds it.

    Attributes:
        run: str. The directory, `config.output_dir`.
        state: str. `"new"`, `"resume"` or `"done"` (see `run_state`); read
            again under the lock once the lock is taken.
        held: bool. Whether this process holds the directory's lock.
    """

    def __init__(self, config: Config, state: str):
        self.config = config
        self.run = config.output_dir
        self.state = state
        self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def hold(self) -> "LockedRun":
        """Takes the lock (creating the directory) and reads the state under it.

        Another process may have trained in the directory since the state
        was first read. A no-op once the lock is held.

        Raises:
            RunInUseError: another process holds the lock.
        """
        if self._lock is None:
            os.makedirs(self.run, exist_ok=True)
            self._lock = lock_run_dir(self.run)
            self.state = run_state(self.config)
        return self

    def release(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None


@contextlib.contextmanager
def locked(config: Config):
    """Holds the lock of `config.output_dir` for the run; yields a `LockedRun`.

    Before the lock, `check_resumable` and `run_state` refuse a read-only or
    damaged run, a directory of files of no run, and a run with other flags
    (writing nothing, but for an unfinished run's damaged `summary.json`,
    removed). Then an existing directory is locked and its state read
    again under the lock; a finished run on a read-only directory is yielded
    unlocked (reporting it writes nothing). An absent directory is created
    and locked only by `LockedRun.hold`: a run whose data fails to load
    leaves nothing behind. The lock is released on exit.

    Raises:
        RunDirError: as `check_resumable` and `run_state`.
        RunInUseError: another process holds the lock.
    """
    run = config.output_dir
    check_resumable(run)
    locked_run = LockedRun(config, run_state(config))
    read_only_done = (locked_run.state == "done"
                      and not os.access(run, os.W_OK))
    try:
        if os.path.isdir(run) and not read_only_done:
            locked_run.hold()
        yield locked_run
    finally:
        locked_run.release()


def is_temp_name(name: str) -> bool:
    """Whether `name` is a temporary file name of a writer in a run directory."""
    return bool(_ANY_TEMP_NAME.search(name))


def remove_stale_temp_files(run: str):
    """Removes the temporary files and folders other processes left in `run`.

    Call it holding the run's lock: then no other process writes there, and
    every temporary name not of this process is a leftover of a killed one.
    Looks in `run` and its `backup/` and `snapshots/` folders.
    """
    mine = f".tmp{os.getpid()}"
    for folder in (run, os.path.join(run, "backup"),
                   os.path.join(run, "snapshots")):
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


def load_run(path: str) -> dict:
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
    summary = read_json(os.path.join(path, "summary.json"), _rewrite_remedy(path))
    if not isinstance(summary, dict):
        raise DamagedFileError(os.path.join(path, "summary.json"),
                               "not a JSON object", _rewrite_remedy(path))
    version = summary.get("layout_version")
    if version != LAYOUT_VERSION:
        raise RunDirError(
            f"Run directory {path} has layout version {version}, this version "
            f"reads {LAYOUT_VERSION}; rerun its training with this version."
        )
    if summary.get("completed") in (False, None):
        raise RunDirError(
            f"Run directory {path} holds an unfinished run; rerun its train.py "
            "command to finish it."
        )
    flags = read_flags(os.path.join(path, "flags.cfg"))
    # Checked once here, so that readers may trust every key they read.
    problem = summary_problem(summary, path, _decays_of(flags))
    if problem:
        raise DamagedFileError(os.path.join(path, "summary.json"), problem,
                               _rewrite_remedy(path))
    return {
        "path": path,
        "flags": flags,
        "summary": summary,
        "history": read_history(
            os.path.join(path, "history.csv"),
            remedy="restore it from a copy, or retrain the run with "
                   f"--flagfile={os.path.join(path, 'flags.cfg')} "
                   "--output_dir=NEW",
        ),
    }


def _decays_of(flags):
    """The `--ema_decays` of a flag file's dict, or `None` if they do not parse."""
    try:
        decays = tuple(float(d) for d in flags.get("ema_decays", "").split(",") if d)
    except ValueError:
        return None
    return decays or None


def _rewrite_remedy(run):
    """What to do about a damaged summary.json of `run`."""
    if os.path.isdir(os.path.join(run, "backup")):
        return "rerun the run's train.py command to rewrite it"
    return ("the run has finished and its backup is gone, so it cannot be "
            "rewritten: restore it from a copy, or retrain the run with "
            f"--flagfile={os.path.join(run, 'flags.cfg')} --output_dir=NEW")


def check_resumable(run: str):
    """Checks an existing run directory before a run resumes in it.

    Raises RunDirError (one line naming the file and what to do) if `run` or
    `run/backup` is not writable (a read-only mount), or if `flags.cfg` or a
    finished run's `summary.json` is damaged. An unfinished run's damaged
    `summary.json` is removed: training rewrites it from `history.csv` at
    the next epoch end. A new (absent or empty) directory and a completed
    run (nothing is written) pass.
    """
    if not os.path.isfile(os.path.join(run, "flags.cfg")):
        return
    read_flags(os.path.join(run, "flags.cfg"))
    summary = os.path.join(run, "summary.json")
    backup = os.path.join(run, "backup")
    damaged = None
    if os.path.exists(summary):
        remedy = _rewrite_remedy(run)
        try:
            content = read_json(summary, remedy)
            if not isinstance(content, dict):
                damaged = DamagedFileError(summary, "not a JSON object", remedy)
            elif content.get("completed"):
                return
        except DamagedFileError as error:
            damaged = error
    if damaged is not None and not os.path.isdir(backup):
        raise damaged
    check_writable(run)
    if os.path.isdir(backup):
        check_writable(backup)
    if damaged is not None:
        os.remove(summary)
        from keras_ema.messages import print_msg

        print_msg(f"{summary} was damaged ({damaged.reason}); it is rewritten "
                  "from history.csv at the next epoch end.")
