"""Callbacks that monitor an `ema_<decay>_val_<metric>` key: checked before training.

`EarlyStopping`, `ReduceLROnPlateau` and `ModelCheckpoint` read one key of
each epoch's logs. Monitoring an EMA key can go wrong in ways Keras reports
late or never: with `mode="auto"` Keras 3.15.1 cannot tell the direction of
an `ema_` key and raises after the first epoch (`MonitorCallback.
_set_monitor_op`, `keras/src/callbacks/monitor_callback.py`); a key of a
decay not kept, or of a MultiEMA without `validation_data` (fit's
`validation_split` and `validation_data` are not given to callbacks), never
appears and Keras only warns at each epoch end. Each is refused here in one
line, at the start of training.
"""

import re

_KEY = re.compile(r"^ema_(?P<decay>[^_]+)_val_(?P<metric>.+)$")


def check_monitors(ema, callbacks):
    """Raises `ValueError` for a callback after `ema` whose EMA monitor cannot work."""
    if not callbacks:
        return
    after = False
    for c in callbacks:
        if c is ema:
            after = True
            continue
        monitor = getattr(c, "monitor", None)
        if (not after or not isinstance(monitor, str)
                or not getattr(c, "save_best_only", True)):  # a ModelCheckpoint saving every epoch reads no key
            continue
        match = _KEY.match(monitor)
        if not match:
            continue
        name = type(c).__name__
        where = f"{name}(monitor={monitor!r})"
        ema_name = type(ema).__name__
        if ema.validation_data is None:
            raise ValueError(
                f"{where} watches a key that never exists: {ema_name} has no "
                "validation_data (fit's validation_split and validation_data "
                f"are not passed to callbacks). Pass {ema_name}("
                "validation_data=(x_val, y_val))."
            )
        try:
            decay = float(match["decay"])
        except ValueError:
            decay = None
        if decay not in ema.decays:
            keys = ", ".join(f"ema_{d}_val_{match['metric']}" for d in ema.decays)
            raise ValueError(
                f"{where} watches a decay {ema_name} does not keep: monitor "
                f"one of {keys}."
            )
        if getattr(c, "mode", None) == "auto" and getattr(c, "monitor_op", None) is None:
            direction = "min" if "loss" in match["metric"] else "max"
            raise ValueError(
                f"{where} needs an explicit mode: Keras cannot tell whether an "
                "ema_ key should go up or down and would fail after the first "
                f"epoch. Pass mode={direction!r}."
            )
