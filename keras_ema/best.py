"""The best value of a monitored quantity so far, and its epoch.

`BestTracker` follows the `mode` of Keras's `ModelCheckpoint` and
`EarlyStopping`: `"min"`, `"max"`, or `"auto"`, where the direction comes
from the quantity's name (a loss is minimized) or, for a metric the model is
compiled with, from Keras itself. `MultiEMA.best`, `EMACheckpoint` and the
kit's `ChosenWeights` keep their best epochs with it.
"""

import math

import keras

MODES = ("auto", "min", "max")

# Keys under which `model.evaluate` reports accuracy, most specific last.
_ACCURACY_KEYS = (
    "accuracy",
    "acc",
    "sparse_categorical_accuracy",
    "categorical_accuracy",
    "binary_accuracy",
)


class UntrackedDecayError(KeyError):
    """`MultiEMA.best[decay]` for a decay without a record; says why."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class BestRecords(dict):
    """`{decay: {"accuracy": {"epoch", "value"}, "loss": {...}}}`.

    A dict whose missing keys raise `UntrackedDecayError` (a `KeyError`)
    naming the decay and the tracked ones. Epochs count from 0, as Keras's
    `History`, `CSVLogger` and `history.csv`.
    """

    def __init__(self, decays, records=()):
        super().__init__(records)
        self.decays = tuple(decays)

    def __missing__(self, decay):
        try:
            tracked = float(decay) in self.decays
        except (TypeError, ValueError):
            tracked = False
        if tracked and float(decay) in self:
            return self[float(decay)]
        if tracked:
            raise UntrackedDecayError(
                f"No best epoch recorded yet for decay {decay!r}: `best` is "
                "filled at each epoch end, and only with `validation_data`."
            )
        raise UntrackedDecayError(
            f"Invalid decay: {decay!r} is not one of the kept decays "
            f"{self.decays}."
        )


def _keras_direction(monitor, model):
    """+1 or -1 as Keras's `EarlyStopping(mode="auto")` decides, or `None`.

    Keras chooses the direction of a compiled metric at its first epoch
    end; a throwaway `EarlyStopping` is asked through that public hook and
    its public `monitor_op`. `None` when Keras cannot tell.
    """
    if model is None:
        return None
    probe = keras.callbacks.EarlyStopping(monitor=monitor, mode="auto")
    probe.set_model(model)
    try:
        probe.on_epoch_end(0, {monitor: 0.0})
    except ValueError:  # Keras cannot tell this metric's direction
        return None
    if probe.monitor_op is None:
        return None
    return 1.0 if bool(probe.monitor_op(1.0, 0.0)) else -1.0


class BestTracker:
    """The best finite value of `monitor` so far (`value`) and its `epoch`.

    Args:
        monitor: str. The quantity's name, e.g. `"val_accuracy"`.
        mode: `"max"`, `"min"` or `"auto"`, as in `keras.callbacks.
            ModelCheckpoint`: with `"auto"`, a loss (`loss`, `*_loss`) is
            minimized, a metric the model is compiled with follows the
            direction Keras gives it, and any other name holding `acc` is
            maximized; `resolve(model)` settles it.
        record: `{"epoch", "value"}` of an earlier best, or `None`.
    """

    def __init__(self, monitor: str, mode: str = "auto", record: dict | None = None):
        if mode not in MODES:
            raise ValueError(
                "Invalid value for argument `mode`: expected 'auto', 'min' or "
                f"'max'. Received: mode={mode!r}"
            )
        self.monitor = monitor
        self.mode = mode
        self.value = None if record is None else record["value"]
        self.epoch = None if record is None else record["epoch"]
        self.sign = {"max": 1.0, "min": -1.0}.get(mode)

    @property
    def record(self) -> dict:
        """`{"epoch": epoch, "value": value}` of the best so far."""
        return {"epoch": self.epoch, "value": self.value}

    def resolve(self, model=None, owner: str = "BestTracker") -> float:
        """Settles the direction of `mode="auto"`: +1 to maximize, -1 to minimize.

        Raises `ValueError` (naming `owner`) when it cannot be told.
        """
        if self.mode != "auto":
            return self.sign
        name = self.monitor.removeprefix("val_")
        sign = None
        if name == "loss" or name.endswith("_loss"):
            sign = -1.0
        if sign is None:
            sign = _keras_direction(name, model)
        if sign is None and "acc" in name:
            sign = 1.0
        if sign is None:
            raise ValueError(
                f"{owner} cannot tell whether {self.monitor} should be "
                "maximized or minimized; pass mode='max' or mode='min'."
            )
        self.sign = sign
        return sign

    def improves(self, value) -> bool:
        """Whether finite `value` beats the best so far (always, for the first)."""
        value = float(value)
        if not math.isfinite(value):
            return False
        return self.value is None or self.sign * value > self.sign * self.value

    def update(self, value, epoch) -> bool:
        """Keeps `value` and `epoch` if `value` is a new best; says whether."""
        if not self.improves(value):
            return False
        self.value, self.epoch = float(value), int(epoch)
        return True


def update_best_record(record: dict, epoch: int, metrics: dict):
    """Updates one EMA's `{"accuracy": {...}, "loss": {...}}` with an epoch's metrics.

    The highest accuracy (under any of Keras's accuracy names) and the
    lowest loss are kept. Yields each criterion that improved, right after
    its record is updated.
    """
    accuracy = next((k for k in _ACCURACY_KEYS if k in metrics), None)
    for criterion, key, mode in (("accuracy", accuracy, "max"),
                                 ("loss", "loss", "min")):
        if key not in metrics:
            continue
        tracker = BestTracker(criterion, mode, record.get(criterion))
        if tracker.update(metrics[key], epoch):
            record[criterion] = tracker.record
            yield criterion
