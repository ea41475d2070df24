"""A MultiEMA's post-hoc snapshots: every `snapshot_every` optimizer steps.

Each snapshot holds every EMA, the arguments they were made with, the
variables' paths, the update log (`keras_ema.update_log`) and the run id
that keeps two runs' snapshots apart; `keras_ema.posthoc` writes and reads
the files and synthesizes other averages from them.
"""

import os
import warnings

import keras

from keras_ema.checks import check_int


def check_arguments(snapshot_dir, snapshot_every, snapshot_dtype) -> int | None:
    """`snapshot_every` as an int (or `None`); `ValueError` on bad arguments."""
    check_int("snapshot_every", snapshot_every, allow_none=True)
    if (snapshot_every is None) != (snapshot_dir is None):
        raise ValueError(
            "MultiEMA needs both `snapshot_dir` and `snapshot_every` to "
            f"write snapshots. Received: snapshot_dir={snapshot_dir!r}, "
            f"snapshot_every={snapshot_every!r}"
        )
    if snapshot_dtype not in ("float32", "float16"):
        raise ValueError(
            "Invalid value for argument `snapshot_dtype`: expected "
            f"'float32' or 'float16'. Received: snapshot_dtype={snapshot_dtype!r}"
        )
    return None if snapshot_every is None else int(snapshot_every)


def check_dir(ema, step: int):
    """Before the first snapshot: the directory holds only this run's, and
    on a resume the snapshots it keeps (up to `step`) read back whole."""
    from keras_ema import posthoc

    posthoc.check_snapshot_dir(
        ema.snapshot_dir, ema._run_id, [v.path for v in ema._variables]
    )
    if ema._resumed and os.path.isdir(ema.snapshot_dir):
        for path, reason in posthoc.damaged_snapshots(ema.snapshot_dir, step):
            warnings.warn(
                f"MultiEMA: snapshot {path} (before the resume point, step "
                f"{step}) is damaged ({reason}); post-hoc EMA will leave it "
                "out. Restore it from a copy, or delete it.",
                stacklevel=2,
            )


def is_due(every: int | None, previous: int, step: int) -> bool:
    """Whether the steps after `previous` up to `step` cross a multiple of `every`."""
    return bool(every) and step // every > previous // every


def write(ema, step: int, log: dict):
    """Writes the EMAs of `ema` at optimizer step `step`, with the update `log`."""
    from keras_ema import posthoc

    meta = {
        "run_id": ema._run_id,
        "decays": list(ema.decays),
        "period": ema.period,
        "warmup": ema.warmup,
        "average_batch_norm": ema.average_batch_norm,
        "paths": [v.path for v in ema._variables],
        "log": log,
    }
    posthoc.write_snapshot(
        ema.snapshot_dir,
        step,
        [keras.ops.convert_to_numpy(s) for s in ema._shadows],
        meta,
        ema.snapshot_dtype,
    )
