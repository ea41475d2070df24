"""EMACheckpoint: saves an EMA's weights when its validation metric improves."""

import os
import warnings

import keras

from keras_ema._ema_check import check_multi_ema
from keras_ema import messages
from keras_ema.files import atomic_path
from keras_ema.best import BestTracker


class EMACheckpoint(keras.callbacks.Callback):
    """Saves the weights of one EMA of a `MultiEMA` at its best epoch so far.

    `keras.callbacks.ModelCheckpoint(monitor="ema_0.998_val_accuracy")`
    watches the EMA's metric but saves the model's weights, which are the
    live (SGD) weights, not the EMA's; in Keras 3.15.1 it also needs
    `mode="max"` (or `"min"` for a loss), since `mode="auto"` cannot tell the
    direction of such a key. This callback reads the EMA's metric from the
    epoch's logs (`ema_<decay>_<monitor>`, added by the `MultiEMA`) and, when
    it improves, writes the EMA's weights to `filepath` (under a temporary
    name, then renamed), the live weights left untouched. Place it after the
    `MultiEMA` in the callback list: callbacks run in list order.

    The epoch of the saved weights is kept in `best_epoch`, counted from 0
    as in Keras's `History` and `CSVLogger` (the progress bar shows epoch
    `e` as `e + 1`), and the metric's value in `best`.

    Args:
        ema: the `keras_ema.MultiEMA` (or `SwitchEMA`, `Belay`) whose EMA is
            saved; it needs `validation_data`.
        filepath: str. A `.weights.h5` file (the EMA's weights, loadable
            with `model.load_weights`) or a `.keras` file (a copy of the
            model holding the EMA); overwritten at each improvement.
        decay: float or `None`. The EMA to watch and save: one of
            `ema.decays`. `None` takes the EMA's only decay. Defaults to
            `None`.
        monitor: str. The EMA's validation metric, `"val_accuracy"`,
            `"val_loss"` or another metric the model is compiled with
            (with or without the `val_` prefix). Defaults to
            `"val_accuracy"`.
        mode: str. `"max"`, `"min"` or `"auto"`: a loss is minimized, an
            accuracy maximized, a compiled metric follows its direction.
            Defaults to `"auto"`.
        verbose: int. 1 prints a line at each save. Defaults to `0`.

    Example:

    ```python
    ema = keras_ema.MultiEMA(decays=(0.99, 0.998), validation_data=(x_val, y_val))
    best = keras_ema.EMACheckpoint(ema, "ema_0.998_best.weights.h5", decay=0.998)
    model.fit(x, y, epochs=100, callbacks=[ema, best])   # ema first
    model.load_weights("ema_0.998_best.weights.h5")      # the EMA of best_epoch
    ```
    """

    # MultiEMA warns when a callback with this flag comes before it.
    _reads_ema_logs = True

    def __init__(
        self,
        ema,
        filepath: str | os.PathLike,
        decay: float | None = None,
        monitor: str = "val_accuracy",
        mode: str = "auto",
        verbose: int = 0,
    ):
        super().__init__()
        check_multi_ema(ema)
        if not isinstance(filepath, (str, os.PathLike)) or not (
            str(filepath).endswith(".weights.h5") or str(filepath).endswith(".keras")
        ):
            raise ValueError(
                "Invalid value for argument `filepath`: expected a path ending "
                f"in `.weights.h5` or `.keras`. Received: filepath={filepath!r}"
            )
        if decay is None:
            if len(ema.decays) != 1:
                raise ValueError(
                    f"EMACheckpoint needs `decay`: the MultiEMA keeps decays "
                    f"{ema.decays}. Received: decay=None"
                )
            decay = ema.decays[0]
        try:
            known = float(decay) in ema.decays
        except (TypeError, ValueError):
            known = False
        if not known:
            raise ValueError(
                f"Invalid value for argument `decay`: {decay!r} is not one of "
                f"the kept decays {ema.decays}. Received: decay={decay!r}"
            )
        if not isinstance(monitor, str) or not monitor or monitor.startswith("ema_"):
            raise ValueError(
                "Invalid value for argument `monitor`: expected the EMA's "
                "metric name, e.g. 'val_accuracy' or 'val_loss' (the decay "
                f"goes in `decay`). Received: monitor={monitor!r}"
            )
        self.ema = ema
        self.filepath = os.fspath(filepath)
        self.decay = float(decay)
        self.monitor = monitor if monitor.startswith("val_") else f"val_{monitor}"
        self.mode = mode
        self.verbose = verbose
        self._tracker = BestTracker(self.monitor, mode)
        self._missing_warned = False

    @property
    def key(self) -> str:
        """The logs key watched: `ema_<decay>_<monitor>`."""
        return f"ema_{self.decay}_{self.monitor}"

    @property
    def best(self) -> float | None:
        """The best value of `key` so far (`None` before the first)."""
        return self._tracker.value

    @property
    def best_epoch(self) -> int | None:
        """The epoch of `best`, counted from 0."""
        return self._tracker.epoch

    def on_train_begin(self, logs=None):
        if self.ema.validation_data is None:
            raise ValueError(
                "EMACheckpoint needs a MultiEMA with `validation_data`: "
                f"without it no {self.key} is logged. Received a "
                f"{type(self.ema).__name__} with validation_data=None."
            )
        self._tracker.resolve(self.model, type(self).__name__)
        self._missing_warned = False

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.key)
        if value is None:
            if not self._missing_warned:
                self._missing_warned = True
                warnings.warn(
                    f"EMACheckpoint: the epoch's logs hold no {self.key}, so "
                    "nothing is saved. Place the MultiEMA before this "
                    "callback (callbacks=[ema, checkpoint]) and check "
                    f"`monitor` against the EMA's metrics.",
                    stacklevel=2,
                )
            return
        value = float(value)
        if not self._tracker.improves(value):
            return
        self._save()
        if self.verbose:
            previous = "" if self.best is None else f" from {self.best:.5f}"
            messages.print_msg(
                f"EMACheckpoint: epoch {epoch} (counted from 0): {self.key} "
                f"improved{previous} to {value:.5f}; saved the EMA to "
                f"{self.filepath}"
            )
        self._tracker.update(value, epoch)

    def _save(self):
        directory = os.path.dirname(self.filepath)
        if directory:
            os.makedirs(directory, exist_ok=True)
        if self.filepath.endswith(".weights.h5"):
            self.ema.save_weights(self.decay, self.filepath)
            return
        model = self.ema.ema_model(self.decay)
        with atomic_path(self.filepath) as tmp:
            model.save(tmp)
