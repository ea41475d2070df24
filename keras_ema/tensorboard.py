"""TensorBoard runs for the EMAs of a `MultiEMA`."""

import os

import keras

from keras_ema._ema_check import check_multi_ema


class EMATensorBoard(keras.callbacks.Callback):
    """Writes each EMA's validation metrics as its own TensorBoard run.

    Keras's `TensorBoard` callback writes the keys that start with `val_` to
    the run `<log_dir>/validation` and every other key to `<log_dir>/train`,
    so the `ema_<decay>_val_<metric>` keys that a `MultiEMA` adds land among
    the training curves, each on a chart of its own. This callback writes
    them again, each EMA to the run `<log_dir>/ema_<decay>/validation` under
    the tag Keras uses for the validation metric (`epoch_accuracy`,
    `epoch_loss`, at step `epoch`), so that with the same `log_dir` as
    Keras's callback, TensorBoard draws the SGD weights' validation curve and
    each EMA's on one chart:

    ```
    log_dir/train/                  Keras: training metrics (and the ema_* keys)
    log_dir/validation/             Keras: epoch_accuracy, epoch_loss, ...
    log_dir/ema_0.998/validation/   this callback: epoch_accuracy, epoch_loss, ...
    ```

    It writes with `tf.summary`, as Keras's `TensorBoard` does, so it needs
    the `tensorflow` and `tensorboard` packages (the `tensorflow` extra) on
    any Keras backend. Place it after the
    `MultiEMA` in the callback list: callbacks run in list order.

    Args:
        ema: the `keras_ema.MultiEMA` (or `SwitchEMA`, `Belay`) whose EMAs
            are written; it needs `validation_data`.
        log_dir: str. The `log_dir` of Keras's `TensorBoard` callback, the
            directory that `tensorboard --logdir` reads. Defaults to
            `"logs"`.

    Example:

    ```python
    ema = keras_ema.MultiEMA(decays=(0.99, 0.998), validation_data=(x_val, y_val))
    model.fit(x, y, epochs=100, validation_data=(x_val, y_val),
              callbacks=[ema,   # first: the others read the keys it adds
                         keras.callbacks.TensorBoard("logs"),
                         keras_ema.EMATensorBoard(ema, "logs")])
    # tensorboard --logdir logs: runs validation, ema_0.99/validation,
    # ema_0.998/validation overlay on the epoch_accuracy chart.
    ```
    """

    # MultiEMA warns when a callback with this flag comes before it.
    _reads_ema_logs = True

    def __init__(self, ema, log_dir: str = "logs"):
        super().__init__()
        check_multi_ema(ema)
        if not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir):
            raise ValueError(
                "Invalid value for argument `log_dir`: expected a directory "
                f"path. Received: log_dir={log_dir!r}"
            )
        self.ema = ema
        self.log_dir = str(log_dir)
        self._summary = _tf_summary()
        self._writers = {}

    def run_dir(self, decay: float) -> str:
        """The TensorBoard run directory of the EMA of `decay`."""
        return os.path.join(self.log_dir, f"ema_{decay}", "validation")

    def on_train_begin(self, logs=None):
        if self.ema.validation_data is None:
            raise ValueError(
                "EMATensorBoard needs a MultiEMA with `validation_data`: "
                "without it no ema_<decay>_val_* metric is logged. Received "
                "a MultiEMA with validation_data=None."
            )

    def on_epoch_end(self, epoch, logs=None):
        for decay in self.ema.decays:
            prefix = f"ema_{decay}_val_"
            values = {key[len(prefix):]: value
                      for key, value in (logs or {}).items()
                      if key.startswith(prefix)}
            if not values:
                continue
            writer = self._writer(decay)
            with writer.as_default():
                for name, value in values.items():
                    self._summary.scalar(f"epoch_{name}", float(value),
                                         step=epoch)
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def _writer(self, decay):
        if decay not in self._writers:
            self._writers[decay] = self._summary.create_file_writer(
                self.run_dir(decay)
            )
        return self._writers[decay]


def _tf_summary():
    """`tf.summary`, or an `ImportError` saying what to install.

    `tf.summary.scalar` is implemented by the `tensorboard` package, which
    TensorFlow 2.21 no longer installs: without it the first write fails.
    """
    try:
        import tensorboard  # noqa: F401
        import tensorflow.summary as summary
    except ImportError:
        raise ImportError(
            "EMATensorBoard writes TensorBoard event files with TensorFlow's "
            "tf.summary, which needs the tensorflow and tensorboard packages: "
            "install them with pip install \"keras-ema[tensorflow]\" (the "
            "model can still train on JAX)."
        ) from None
    return summary
