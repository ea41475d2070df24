"""Post-hoc EMA snapshots: the files `MultiEMA(snapshot_every=N)` writes.

`snapshot_<step>.npz` holds every EMA at one optimizer step, in the
package's one state-file format (`keras_ema.state_file`): `meta` (the run
that wrote it, its decays, period, warm-up, the variables' `paths`, the
step and dtype), the update log as its own JSON entry `log`, and the EMAs
of variable `j` as array `s<j>`. The run id stamped on every snapshot
keeps the snapshots of two runs apart: `check_snapshot_dir` refuses a
directory holding another run's, and `Snapshots` (the set a synthesis
reads) refuses a mixed one and leaves damaged files out.
"""

import contextlib
import os
import re
import warnings
import zipfile

import numpy as np

from keras_ema import state_file

SNAPSHOT_PREFIX = "snapshot_"
_SNAPSHOT_RE = re.compile(r"^snapshot_(\d{12})\.npz$")
SHADOWS = "s"  # the arrays' name: the EMAs of variable j are `s<j>`


def snapshot_path(snapshot_dir: str, step: int) -> str:
    """The snapshot of optimizer step `step` in `snapshot_dir`."""
    return os.path.join(snapshot_dir, f"{SNAPSHOT_PREFIX}{int(step):012d}.npz")


def write_snapshot(
    snapshot_dir: str, step: int, shadows: list, meta: dict, dtype: str = "float32"
) -> str:
    """Writes one snapshot atomically (temporary file with the pid, renamed).

    `shadows[j]` is the `(num_emas,) + shape` array of variable `j`; `meta`
    a JSON-able dict: `run_id` (the run that wrote it: snapshots of two runs
    are never combined), decays, period, warmup, `paths` (the variables) and
    `log` (the update log). The log is stored as its own entry, so that
    reading what a snapshot holds does not parse the log.
    """
    os.makedirs(snapshot_dir, exist_ok=True)
    meta = dict(meta, step=int(step), dtype=str(dtype))
    log = meta.pop("log")
    return state_file.write_npz(
        snapshot_path(snapshot_dir, step), meta, entries={"log": log},
        arrays={SHADOWS: [np.asarray(s).astype(dtype) for s in shadows]},
    )


def list_snapshots(snapshot_dir: str) -> list:
    """`[(step, path)]` of the snapshots in `snapshot_dir`, by step."""
    if not os.path.isdir(snapshot_dir):
        raise ValueError(
            f"Invalid snapshot_dir={snapshot_dir!r}: not a directory. Pass the "
            "`snapshot_dir` given to MultiEMA (or the run's `snapshots/`)."
        )
    found = []
    for name in os.listdir(snapshot_dir):
        m = _SNAPSHOT_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(snapshot_dir, name)))
    return sorted(found)


class DamagedSnapshot(Exception):
    """A snapshot that does not read back (internal: the basis drops it)."""

    def __init__(self, path, error):
        super().__init__(path)
        self.path = path
        self.reason = f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def open_snapshot(path: str):
    """The snapshot at `path`, open to read (`state_file.open_npz`).

    Any failure opening it or inside the block raises `DamagedSnapshot`: a
    damaged file fails in many ways (zero length: EOFError; bit flips:
    zipfile.BadZipFile, Bad CRC-32; truncation, garbage: OSError,
    ValueError, KeyError), and any of them means the file is unusable.
    """
    try:
        with state_file.open_npz(path) as data:
            yield data
    except DamagedSnapshot:
        raise
    except Exception as e:  # noqa: BLE001 (see above)
        raise DamagedSnapshot(path, e) from None


def _read_json(path, key):
    with open_snapshot(path) as data:
        return state_file.read_json(data, key, missing_ok=True)


def _damaged_message(path, reason):
    return (f"Snapshot {path} is damaged ({reason}). Delete it (post-hoc EMA "
            "then uses the other snapshots) or restore it from a copy.")


def read_meta(path: str) -> dict:
    """What a snapshot holds (run, decays, variables...), without its log."""
    try:
        meta = _read_json(path, "meta")
        if not isinstance(meta, dict):
            raise DamagedSnapshot(path, ValueError("no description"))
    except DamagedSnapshot as e:
        raise ValueError(_damaged_message(e.path, e.reason)) from None
    return meta


def read_log(path: str) -> dict:
    """The update log a snapshot stores (`start`, `steps`, `decays`)."""
    try:
        return snapshot_log(path)
    except DamagedSnapshot as e:
        raise ValueError(_damaged_message(e.path, e.reason)) from None


def snapshot_log(path: str) -> dict:
    """`read_log`, raising `DamagedSnapshot` for a file that does not read back."""
    log = _read_json(path, "log")
    if not isinstance(log, dict):
        raise DamagedSnapshot(path, ValueError("no update log"))
    return log


def damaged_snapshots(snapshot_dir: str, up_to_step: int | None = None) -> list:
    """`[(path, reason)]` of the snapshots that do not read back whole.

    Every stored array is read and its CRC-32 checked (a whole pass over the
    snapshots at or before `up_to_step`, all of them when `None`).
    """
    out = []
    for step, path in list_snapshots(snapshot_dir):
        if up_to_step is not None and step > up_to_step:
            break
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"Bad CRC-32 for file {bad!r}")
            snapshot_log(path)
            read_meta(path)
        except DamagedSnapshot as e:
            out.append((path, e.reason))
        except ValueError as e:
            out.append((path, str(e)))
        except Exception as e:  # noqa: BLE001 (any failure: unusable)
            out.append((path, f"{type(e).__name__}: {e}"))
    return out


def check_snapshot_dir(snapshot_dir: str, run_id, paths: list) -> None:
    """Refuses a `snapshot_dir` that holds snapshots of another run.

    `MultiEMA` calls it before it writes: a second run's snapshots would mix
    with the first's (another run's profiles, or another model's variables).
    Damaged snapshots are left to `synthesize`, which names them.

    Raises:
        ValueError: one line naming a foreign snapshot and what to do.
    """
    if not os.path.isdir(snapshot_dir):
        return
    for _, path in list_snapshots(snapshot_dir):
        try:
            meta = read_meta(path)
        except ValueError:
            continue
        if meta.get("run_id") != run_id or list(meta.get("paths", [])) != list(paths):
            what = ("another model's variables"
                    if list(meta.get("paths", [])) != list(paths) else
                    f"run {meta.get('run_id')}")
            raise ValueError(
                f"MultiEMA: snapshot_dir {snapshot_dir!r} holds snapshots of "
                f"another run ({os.path.basename(path)}: {what}; this run is "
                f"{run_id}). Give this run its own snapshot_dir, or move those "
                "snapshots away."
            )


class Snapshots:
    """The snapshots of one run in a directory: read, checked, damaged ones out."""

    def __init__(self, snapshot_dir):
        snaps = list_snapshots(snapshot_dir)
        if not snaps:
            raise ValueError(
                f"No snapshots in {snapshot_dir!r}: train with "
                "MultiEMA(snapshot_dir=..., snapshot_every=N) first."
            )
        self.dir = snapshot_dir
        self.good = []  # [(step, path, meta)]
        self.damaged = {}  # path -> reason
        for step, path in snaps:
            try:
                self.good.append((step, path, _read_json(path, "meta")))
            except DamagedSnapshot as e:
                self.damaged[e.path] = e.reason
        for step, path, meta in list(self.good):
            if not isinstance(meta, dict):
                self.drop(path, "ValueError: no description")
        self._require_some()
        key = _run_key(self.good[-1][2])
        for step, path, meta in self.good:
            if _run_key(meta) != key:
                raise ValueError(
                    f"{snapshot_dir!r} mixes snapshots of two runs: "
                    f"{os.path.basename(path)} ({_run_text(meta)}) and "
                    f"{os.path.basename(self.good[-1][1])} "
                    f"({_run_text(self.good[-1][2])}). Keep one run's snapshots "
                    "per directory: move the others to their own."
                )
        m = self.good[-1][2]
        self.decays = [float(d) for d in m["decays"]]
        self.paths = list(m["paths"])

    def drop(self, path, reason):
        self.damaged[path] = reason
        self.good = [g for g in self.good if g[1] != path]
        self._require_some()

    def _require_some(self):
        if not self.good:
            path, reason = sorted(self.damaged.items())[-1]
            raise ValueError(
                f"Every snapshot in {self.dir!r} is damaged (the last: "
                f"{os.path.basename(path)}, {reason}). Restore them from a copy, "
                "or retrain with --snapshot_every."
            )

    def warn_damaged(self):
        for path, reason in sorted(self.damaged.items()):
            warnings.warn(
                f"post-hoc EMA: skipped snapshot {path}: it is damaged "
                f"({reason}). Delete it to silence this warning.",
                stacklevel=3,
            )

    def damaged_text(self):
        if not self.damaged:
            return ""
        names = ", ".join(os.path.basename(p) for p in sorted(self.damaged))
        return f"; damaged snapshots left out: {names} (restore them from a copy)"


def _run_key(meta):
    return (meta.get("run_id"), tuple(meta.get("paths", ())),
            tuple(float(d) for d in meta.get("decays", ())))


def _run_text(meta):
    return (f"run {meta.get('run_id')}, {len(meta.get('paths', ()))} variables, "
            f"decays {meta.get('decays')}")

