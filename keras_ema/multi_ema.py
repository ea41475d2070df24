"""MultiEMA: several exponential moving averages of a model's weights at once."""

import contextlib
import os
import uuid
import warnings
from collections.abc import Sequence

import keras
import numpy as np

from keras_ema import _backend
from keras_ema import _keras_private
from keras_ema import messages
from keras_ema import _validation_data
from keras_ema import writer
from keras_ema import ema_state
from keras_ema import lora
from keras_ema import shadows
from keras_ema import snapshots
from keras_ema import state_file
from keras_ema import training_checks
from keras_ema.checks import check_int
from keras_ema.files import atomic_path
from keras_ema.files import write_weights
from keras_ema.batch_norm import recompute_batch_norm_statistics
from keras_ema.best import BestRecords
from keras_ema.best import UntrackedDecayError  # noqa: F401 (keras_ema's API)
from keras_ema.best import update_best_record
from keras_ema.decay import DEFAULT_DECAYS
from keras_ema.decay import check_decays
from keras_ema.decay import schedule_summary
from keras_ema.decay import warmup_decay
from keras_ema.step_counter import StepCounter
from keras_ema.step_counter import optimizer_step
from keras_ema.step_counter import to_int
from keras_ema.update_log import UpdateLog
from keras_ema.written_files import WrittenFiles


class MultiEMA(keras.callbacks.Callback):
    """Keeps several exponential moving averages (EMAs) of the model weights.

    One training run yields one EMA per decay, so the averaging window is
    chosen after training instead of by repeated runs. Every `period`
    optimizer steps each EMA `s` of an averaged weight `w` becomes
    `a * s + (1 - a) * w`, with `a = min(decay, (t + 1) / (t + 10))` under
    `warmup` (`t` the 0-based optimizer step), all EMAs in one compiled call.
    With `validation_data` every EMA is evaluated at each epoch end: its
    metrics join the logs as `ema_<decay>_val_<metric>` (put this callback
    first: only the callbacks after it see them) and its best epochs are
    kept in `best`. The EMAs are used through `swapped_in`, `ema_weights`,
    `save_weights` and `ema_model`; `get_state`, `set_state` and
    `backup_dir` continue them in another run. README.md, section
    "MultiEMA", describes the update, the arguments and the warnings in full.

    Args:
        decays: the EMA decays, distinct floats in (0, 1).
        period: optimizer steps between two updates.
        warmup: whether to use the warm-up decay above.
        average_batch_norm: whether the BatchNorm statistics are averaged too.
        validation_data: data on which every EMA is evaluated at each epoch end.
        validation_batch_size: batch size of that evaluation (array inputs).
        recompute_batch_norm_data: data on which each EMA's BatchNorm
            statistics are recomputed before its evaluation.
        best_weights_dir: where each EMA's weights at its best epochs go.
        backup_dir: where the state goes at each epoch end, for a resume.
        raise_on_nonfinite: raise on non-finite weights instead of skipping.
        jit_compile: compile the update with XLA.
        verbose: 1 prints the decay schedule at the start of training.
        snapshot_dir: where post-hoc EMA snapshots go (`keras_ema.posthoc`).
        snapshot_every: optimizer steps between two snapshots.
        snapshot_dtype: `"float32"` or `"float16"`, the snapshots' dtype.
        shadow_device: `None` (the EMAs beside the weights) or `"cpu"`.

    Example:

    ```python
    ema = keras_ema.MultiEMA(validation_data=(x_val, y_val))
    model.fit(x, y, epochs=100,
              callbacks=[ema, keras.callbacks.CSVLogger("history.csv")])
    print(ema.best[0.998]["loss"])           # {"epoch": ..., "value": ...}
    with ema.swapped_in(0.998):
        model.evaluate(x_test, y_test)
    shipped = ema.ema_model(0.998)
    ```
    """

    def __init__(
        self,
        decays: Sequence[float] | float = DEFAULT_DECAYS,
        period: int = 16,
        warmup: bool = True,
        average_batch_norm: bool = True,
        validation_data=None,
        validation_batch_size: int | None = None,
        recompute_batch_norm_data=None,
        best_weights_dir: str | None = None,
        backup_dir: str | None = None,
        raise_on_nonfinite: bool = False,
        jit_compile: bool = True,
        verbose: int = 1,
        snapshot_dir: str | None = None,
        snapshot_every: int | None = None,
        snapshot_dtype: str = "float32",
        shadow_device: str | None = None,
    ):
        super().__init__()
        self.decays = check_decays(decays)
        self.shadow_device = _backend.validate_shadow_device(shadow_device)
        self.snapshot_every = snapshots.check_arguments(
            snapshot_dir, snapshot_every, snapshot_dtype
        )
        self.snapshot_dir = snapshot_dir
        self.snapshot_dtype = snapshot_dtype
        self._log = UpdateLog()  # of the updates applied, for post-hoc EMA
        # Stamped on every snapshot: snapshots of two runs are never mixed.
        self._run_id = None
        self._snapshot_dir_checked = False
        self._resumed = False
        self.period = check_int("period", period)
        self.warmup = bool(warmup)
        self.average_batch_norm = bool(average_batch_norm)
        self.validation_data = validation_data
        self.validation_batch_size = validation_batch_size
        self.recompute_batch_norm_data = recompute_batch_norm_data
        self.best_weights_dir = best_weights_dir
        self.backup_dir = backup_dir
        self.raise_on_nonfinite = bool(raise_on_nonfinite)
        self.jit_compile = bool(jit_compile)
        self.verbose = verbose
        self.best = {}
        self.skipped_steps = []
        self._owner = None  # the model the shadows belong to
        self._variables = None
        self._shadows = self._shadow_reader = None
        self._update = None
        self._step = 0
        self._attempted = 0
        self._pending = []
        self._swapped = None
        self._counter = StepCounter()
        self._written = WrittenFiles()

    @property
    def best(self) -> BestRecords:
        """`{decay: {"accuracy": {"epoch", "value"}, "loss": {...}}}`.

        Each EMA's highest validation accuracy and lowest validation loss,
        epochs counted from 0; an untracked decay raises a `KeyError`.
        """
        return self._best

    @best.setter
    def best(self, records):
        self._best = BestRecords(self.decays, records)

    # === Schedule ===

    def decays_at(self, step: int) -> np.ndarray:
        """The decays of the update made right after 0-based step `step`."""
        if not self.warmup:
            return np.asarray(self.decays, np.float64)
        return np.asarray([warmup_decay(d, step) for d in self.decays])

    def schedule_summary(self, total_steps: int | None = None) -> str:
        """A table: per-step decay and warm-up end of every EMA."""
        return schedule_summary(type(self).__name__, self.decays, self.period,
                                self.warmup)

    # === State ===

    def _build(self, model):
        variables, stacks = shadows.make_shadows(
            model, self.average_batch_norm, len(self.decays), self.shadow_device
        )
        self._owner = model
        self._variables = variables
        self._shadows = stacks
        optimizer = getattr(model, "optimizer", None)
        self._log = UpdateLog(0 if optimizer is None else to_int(optimizer.iterations))
        self._run_id = uuid.uuid4().hex[:16]
        self._snapshot_dir_checked = False
        self._resumed = False
        self._update = self._make_update(stacks, variables)
        self._attempted = 0
        self._pending = []
        self.skipped_steps = []
        self.best = {}

    def _make_update(self, shadows, variables):
        """The compiled update `_run_update` calls; subclasses may extend it."""
        return _backend.make_ema_update(
            shadows, variables, jit_compile=self.jit_compile,
            shadow_device=self.shadow_device,
        )

    def reset(self):
        """Forgets the EMAs; the next training batch restarts them."""
        self._owner = None
        self._variables = None
        self._shadows = None
        self._update = None
        self.best = {}
        self.skipped_steps = []
        self._written.clear()

    @property
    def num_updates(self) -> int:
        """EMA updates applied so far (skipped ones not counted)."""
        self._flush_pending()
        return self._attempted - len(self.skipped_steps)

    @property
    def step(self) -> int:
        """Optimizer steps seen so far."""
        return self._step

    def get_state(self) -> dict:
        """Everything needed to continue these EMAs, as numpy and python data."""
        self._require_built()
        self._flush_pending()
        return ema_state.state_of(self)

    def set_state(self, state: dict):
        """Restores a state from `get_state`, for the same model and decays.

        Everything is checked first (keys, arguments, number, shapes and
        finiteness of the shadows, a step and counters not negative, the
        update log); on any mismatch a `ValueError` is raised
        and nothing is changed.
        """
        self._require_built()
        checked = ema_state.check_state(self, state)
        # Everything is checked: only now is anything changed.
        lora.unmerge_restored(self._owner, checked.lora_factors)
        for s, value in zip(self._shadows, checked.shadows):
            s.assign(value)
        self._step = checked.step
        self._attempted = checked.attempted
        self.skipped_steps = checked.skipped_steps
        self._pending = []
        self.best = checked.best
        self._written.clear()
        self._log = checked.log
        self._run_id = checked.run_id
        self._snapshot_dir_checked = False
        self._resumed = True

    def backup_steps(self) -> list:
        """Optimizer steps whose state files in `backup_dir` read back whole.

        A resume can continue these EMAs only at one of these steps; a
        damaged file is left out.
        """
        return state_file.backup_steps(self.backup_dir) if self.backup_dir else []

    def _save_backup(self):
        ema_state.save_backup(self)

    def _restore_backup(self, step):
        return ema_state.restore_backup_at(self, step)

    def restore_backup(self, model: keras.Model) -> bool:
        """Builds the EMAs of `model` and loads them from `backup_dir`, outside fit.

        For a run whose training already ended, `model` (built, compiled)
        holding the weights and optimizer step of the backup. Returns
        whether a state saved at that step was restored (if not, the EMAs
        equal the model's current weights).
        """
        if not self.backup_dir:
            raise ValueError(
                "MultiEMA.restore_backup needs a backup_dir. Received: "
                f"backup_dir={self.backup_dir!r}"
            )
        self.set_model(model)
        self._build(model)
        self._step = optimizer_step(self.model) if model.optimizer is not None else 0
        return self._restore_backup(self._step)

    @property
    def _log_pending(self):
        """The updates made whose finite flags are not read yet."""
        return self._log.pending

    def _require_built(self):
        if self._shadows is None:
            raise ValueError(
                "MultiEMA has no EMAs yet: they are created when training "
                "starts. Call `model.fit(..., callbacks=[ema])` first."
            )

    # === Training hooks ===

    def on_train_begin(self, logs=None):
        if self.verbose:
            messages.print_msg(self.schedule_summary())
        training_checks.check_start_of_training(self)

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        step = optimizer_step(self.model)
        if self._owner is not model:
            self._build(model)
            self._step = step
            if self.backup_dir:
                self._restore_backup(step)
        elif step != self._step:
            # The optimizer moved without us (weights loaded, another fit):
            # continue counting from its step.
            self._step = step
        if self.snapshot_dir and not self._snapshot_dir_checked:
            snapshots.check_dir(self, step)
            self._snapshot_dir_checked = True
        self._counter.start_epoch(model.optimizer, step)

    def on_train_batch_end(self, batch, logs=None):
        steps = self.params.get("steps") if self.params else None
        step = self._counter.step_at_batch_end(self.model, batch, steps)
        previous, self._step = self._step, step
        first = previous // self.period + 1
        last = step // self.period
        if last < first:
            self._maybe_snapshot(previous, step)
            return
        # One update per multiple of `period` crossed, each with the decay of
        # the step it belongs to, all applied to the current weights.
        decays = np.stack(
            [self.decays_at(m * self.period - 1) for m in range(first, last + 1)]
        )
        self._apply(decays, step)
        self._attempted += last - first + 1
        self._maybe_snapshot(previous, step)

    def _apply(self, decays, step):
        _keras_private.sync_training_state(self)  # the weights of this step
        applied = self._run_update(decays)
        self._pending.append((step, applied))
        self._log.add(step, np.prod(decays, axis=0))
        if self.raise_on_nonfinite:
            self._flush_pending()

    def _run_update(self, decays):
        """Applies the updates due at one batch end; returns the finite flag.

        `decays[n]` holds the decays of the n-th multiple of `period` crossed
        (one row unless `steps_per_execution > 1`). Updates made back to back
        with the same weights compose into one with the product of the decays.
        """
        combined = np.ones(decays.shape[1])
        for row in decays:
            combined *= row
        return self._update(combined.astype(np.float32))

    def _flush_pending(self):
        pending, self._pending = self._pending, []
        bad = [s for s, ok in pending if not bool(keras.ops.convert_to_numpy(ok))]
        self._log.commit(set(bad))
        if not bad:
            return
        self.skipped_steps += bad
        training_checks.report_skipped(self, bad)

    def _maybe_snapshot(self, previous, step):
        """Writes a post-hoc snapshot when a multiple of `snapshot_every` is crossed."""
        if snapshots.is_due(self.snapshot_every, previous, step):
            self._flush_pending()
            snapshots.write(self, step, self._log.as_dict())

    def on_epoch_end(self, epoch, logs=None):
        if self._shadows is None:
            return
        self._flush_pending()
        training_checks.warn_never_updated(self, epoch)
        if self.validation_data is not None:
            results = self.evaluate(self.validation_data)
            for decay, metrics in results.items():
                for key, value in metrics.items():
                    if logs is not None:
                        logs[f"ema_{decay}_val_{key}"] = value
                self._update_best(decay, epoch, metrics)
        self._after_epoch_end(epoch, logs)
        self._written.clear()  # SwitchEMA's copy may have changed the weights
        if self.backup_dir:
            self._save_backup()

    def _after_epoch_end(self, epoch, logs):
        """Runs after the epoch's EMA evaluation and before the state backup."""

    def _update_best(self, decay, epoch, metrics):
        record = self.best.setdefault(decay, {})
        for criterion in update_best_record(record, epoch, metrics):
            if self.best_weights_dir:
                name = f"ema_{decay}_best_{criterion}.weights.h5"
                self.save_weights(decay, os.path.join(self.best_weights_dir, name))

    # === Using the EMAs ===

    def _index(self, decay):
        self._require_built()
        try:
            return self.decays.index(float(decay))
        except (TypeError, ValueError):
            raise ValueError(
                f"Invalid decay: {decay!r} is not one of the kept decays "
                f"{self.decays}."
            ) from None

    @contextlib.contextmanager
    def swapped_in(self, decay: float):
        """Context manager: the EMA of `decay` in the model, live weights after.

        Every variable of the model is copied aside, the EMA values are
        assigned (exact copies, no arithmetic), and on exit, also through an
        exception, the copies are assigned back bit for bit. Swaps cannot be
        nested.
        """
        i = self._index(decay)
        if self._swapped is not None:
            raise ValueError(
                f"The EMA with decay {self._swapped} is already swapped in; "
                f"leave that `swapped_in` block before swapping in {decay}."
            )
        self._swapped = decay
        try:
            with shadows.restored_after(self.model) as model:
                self._assign_ema(i)
                yield model
        finally:
            self._swapped = None

    def _assign_ema(self, index, skip=()):
        """Copies EMA `index` into the averaged variables not in `skip`.

        A plain assignment of the stored values: float32 variables receive
        the shadow bit for bit.
        """
        shadows.assign(self._variables, self._shadows, index, self.shadow_device, skip)

    def ema_weights(self, decay: float) -> list:
        """`model.get_weights()` with the EMA of `decay` in place of the live values."""
        i = self._index(decay)
        return shadows.weights_with(self._owner, self._variables, self._shadows, i)

    def save_weights(self, decay: float, path: str):
        """Writes the model weights with the EMA of `decay` to `path` (.weights.h5).

        The model's weights only, no optimizer state: load it with
        `model.load_weights`. Written under a temporary name and renamed; the
        same EMA at the same step saved again is a hard link to the first file.
        """
        if not path.endswith(".weights.h5"):
            raise ValueError(
                f"Invalid path {path!r}: weight files must end in `.weights.h5`."
            )
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        i = self._index(decay)
        key = (self.decays[i], self._step)
        if writer.active() is not None and writer.save_ema_weights(
                self.model, list(zip(self._variables, shadows.reader(self).rows(i))),
                self._written, key, path):
            return  # from a host copy, by the run's background writer
        with atomic_path(path) as tmp:
            if not self._written.link(key, tmp):
                with self.swapped_in(decay) as model:
                    write_weights(model, tmp, include_optimizer=False)
        self._written.remember(key, path)

    def save_lora_weights(self, decay: float, path: str, backbone=None) -> str:
        """Writes the EMA of `decay` of a keras-hub backbone's LoRA adapters.

        In keras-hub's own format (`backbone.load_lora_weights(path)` reads
        it); see `keras_ema.lora.save_lora_weights`.
        """
        return lora.save_lora_weights(self, decay, path, backbone)

    def ema_model(self, decay: float) -> keras.Model:
        """An independent copy of the model holding the EMA of `decay`.

        The copy is compiled like the original when that is possible; the
        live model is not touched.
        """
        return shadows.clone_with(self._owner, self.ema_weights(decay))

    def evaluate(self, data, batch_size: int | None = None) -> dict:
        """`model.evaluate` of every EMA: `{decay: {metric: value}}`."""
        batch_size = batch_size or self.validation_batch_size
        results = {}
        for decay in self.decays:
            with self.swapped_in(decay) as model:
                if self.recompute_batch_norm_data is not None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        recompute_batch_norm_statistics(
                            model, self.recompute_batch_norm_data
                        )
                results[decay] = _validation_data.evaluate(model, data, batch_size)
        return results
