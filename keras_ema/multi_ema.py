"""MultiEMA: several exponential moving averages of a model's weights at once."""

import contextlib
import itertools
import math
import os
import uuid
import warnings
from collections.abc import Sequence

import keras
import numpy as np

from keras_ema import _backend
from keras_ema import _keras_private
from keras_ema import _monitors
from keras_ema import _validation_data
from keras_ema import _writer
from keras_ema import lora
from keras_ema import state_file
from keras_ema._checks import check_int
from keras_ema._files import atomic_path
from keras_ema._files import write_weights
from keras_ema.batch_norm import batch_norm_statistics
from keras_ema.batch_norm import recompute_batch_norm_statistics
from keras_ema.decay import DEFAULT_DECAYS
from keras_ema.decay import check_decays
from keras_ema.decay import warmup_decay
from keras_ema.decay import warmup_end_step

# Keys under which `model.evaluate` reports accuracy, most specific last.
_ACCURACY_KEYS = (
    "accuracy",
    "acc",
    "sparse_categorical_accuracy",
    "categorical_accuracy",
    "binary_accuracy",
)

# Keras callbacks that read every key of the epoch's logs (History, CSVLogger,
# TensorBoard, RemoteMonitor) or one named by `monitor` (the others).
_LOG_RECORDERS = ("History", "CSVLogger", "TensorBoard", "RemoteMonitor")
_LOG_MONITORS = ("ModelCheckpoint", "EarlyStopping", "ReduceLROnPlateau")


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


def _file_identity(path):
    """What tells whether `path` is still the file it was: inode, size, time."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _to_int(value):
    return int(keras.ops.convert_to_numpy(value))


def _accumulation_steps(optimizer):
    """Batches per optimizer step: `gradient_accumulation_steps`, or 1."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return int(getattr(optimizer, "gradient_accumulation_steps", None) or 1)


class MultiEMA(keras.callbacks.Callback):
    """Keeps several exponential moving averages (EMAs) of the model weights.

    One training run yields one EMA per decay, so the averaging window is
    chosen after training instead of by repeated runs. The averaged
    variables are the trainable float variables and, with
    `average_batch_norm`, the BatchNorm moving mean and variance; every other
    non-trainable variable (a counter, a step, a frozen layer's weight) is
    never averaged: the EMA model takes its live value whenever an EMA is
    swapped in, saved, exported or copied (`swapped_in`, `ema_weights`,
    `ema_model`). Every `period` optimizer steps each EMA `s` of a weight
    `w` is updated as

    ```
    a = min(decay, (t + 1) / (t + 10))   # with `warmup`, else a = decay
    s = a * s + (1 - a) * w
    ```

    where `t` is the 0-based index of the optimizer step just taken, counting
    every step since training began (as `tf.train.ExponentialMovingAverage`
    with `num_updates` set to the global step). The steps a
    `keras.optimizers.LossScaleOptimizer` skips (overflowing gradients) are
    not optimizer steps and do not count. With `gradient_accumulation_steps=n`
    an optimizer step is taken every `n` batches, and only those count (as
    `optimizer.iterations` does): the EMAs average the weights after each
    real step, never the same weights twice. Updating every `period` steps
    makes the per-step decay `decay ** (1 / period)`: 0.998 at period 16 acts
    like 0.99987 per step. All EMAs are updated in one compiled call.

    Averaging the BatchNorm statistics makes the EMA model's statistics the
    EMA of the live model's (Cai et al., 2021). The EMAs start equal to the
    weights at the start of training.

    With `steps_per_execution > 1` a callback sees the weights only at the
    end of each execution: an update due inside an execution is applied with
    the weights at its end, up to `steps_per_execution - 1` batches late.
    Updates are exact when `period` (times `gradient_accumulation_steps`) and
    the batches per epoch are multiples of `steps_per_execution`; otherwise
    a warning at the start of training suggests such a `period`.

    With `validation_data`, every EMA is evaluated at the end of each epoch
    and its metrics are added to the logs as `ema_<decay>_val_<metric>` (for
    example `ema_0.998_val_accuracy`). Callbacks run in list order, so only
    the `History`, `CSVLogger`, `TensorBoard`, `EarlyStopping` or
    `ModelCheckpoint` placed *after* this callback see these keys: put it
    first. A warning at the start of training names those placed before
    it. To save an EMA's weights when its metric improves, use
    `keras_ema.EMACheckpoint` (a `ModelCheckpoint` monitoring an EMA key
    saves the live model). The best epoch of each EMA by highest validation
    accuracy and by lowest validation loss is kept in `best` (epochs count
    from 0, as in `History` and `CSVLogger`; an untracked decay raises a
    `KeyError` naming the tracked ones).

    If a live weight holds a NaN or an infinity when an update is due, the
    update is skipped (the EMAs stay finite) and a warning names the steps at
    the end of the epoch; `raise_on_nonfinite=True` raises instead.

    Several `fit()` calls on the same model continue the same EMAs; call
    `reset()` to start again from the current weights.

    Args:
        decays: sequence of floats in (0, 1), distinct. The EMA decays.
            Defaults to `(0.968, 0.984, 0.992, 0.996, 0.998)`.
        period: int >= 1. Optimizer steps between two updates; with
            `steps_per_execution > 1`, each multiple of `period` crossed counts
            as one update (see above). Defaults to `16`.
        warmup: bool. Whether to use the warm-up decay above. Defaults to
            `True`.
        average_batch_norm: bool. Whether the BatchNorm moving statistics are
            averaged too; if `False`, the EMA model uses the live model's
            statistics. Defaults to `True`.
        validation_data: data for `model.evaluate` (a tuple `(x, y)`, a
            `tf.data.Dataset` or a `keras.utils.PyDataset`) on which every EMA
            is evaluated at each epoch end, or `None`. It is checked at the
            start of training (class labels within the model's outputs, one
            batch evaluated), so a mismatch raises a `ValueError` before the
            first epoch. Defaults to `None`.
        validation_batch_size: int or `None`. Batch size of that evaluation
            for array inputs. Defaults to `None` (32).
        recompute_batch_norm_data: data for `recompute_batch_norm_statistics`,
            or `None`. If given, each EMA's BatchNorm statistics are recomputed
            on it before its evaluation (the live model is not affected).
            Defaults to `None`.
        best_weights_dir: str or `None`. If given, the weights of each EMA at
            its best epoch are written there as
            `ema_<decay>_best_accuracy.weights.h5` and
            `ema_<decay>_best_loss.weights.h5` (written to a temporary file,
            then renamed). Defaults to `None`.
        backup_dir: str or `None`. If given, the whole state is written there
            at each epoch end, and a run that resumes at the same optimizer
            step (for example through `keras.callbacks.BackupAndRestore` with
            `save_freq="epoch"`) restores it; the two newest states are
            kept. A resume at a step whose state is damaged, or missing while
            other steps are saved, raises `ValueError` naming the file instead
            of restarting the EMAs. Defaults to `None`.
        raise_on_nonfinite: bool. Raise `FloatingPointError` instead of
            skipping an update on non-finite weights. Defaults to `False`.
        jit_compile: bool. Compile the update with XLA. Defaults to `True`.
        verbose: int. 1 prints the decay schedule at the start of training
            (through Keras' `print_msg`, so to `absl.logging` after
            `keras.config.disable_interactive_logging()`); 0 is silent.
            Defaults to `1`.
        snapshot_dir: str or `None`. Where post-hoc EMA snapshots are
            written (`keras_ema.posthoc`): one run's only. Training refuses
            (`ValueError`) a directory holding another run's snapshots (each
            is stamped with a run id, kept by a resume, and the variables'
            paths), and a resume warns about a damaged snapshot before its
            resume point. Defaults to `None`.
        snapshot_every: int or `None`. Every `snapshot_every` optimizer
            steps all EMAs are written to `snapshot_dir` as
            `snapshot_<step>.npz` (temporary file with the pid, renamed), with
            the decays, period, warm-up flag, variable paths and the log of the
            updates applied so far, from which `keras_ema.posthoc` synthesizes
            any other average. A resumed run rewrites the snapshots after its
            resume point. Defaults to `None` (no snapshots).
        snapshot_dtype: `"float32"` or `"float16"` (half the disk; the
            synthesized weights then differ by 2e-4 to 4e-3 relative, measured
            on the demo). Defaults to `"float32"`.
        shadow_device: `None` or `"cpu"`. Where the EMAs live. `None`:
            beside the weights; under JAX's `keras.distribution.ModelParallel`
            each variable's stack of EMAs is sharded like the variable (the
            decay axis unsharded), so a device holds `len(decays)` copies of
            its own shards only, and the update runs shard by shard. `"cpu"`:
            in host memory (as NeMo and DeepSeek-V3 keep theirs), freeing
            accelerator memory; every `period` steps the weights are copied
            to the host and the update runs there. On JAX the copy and the
            update are dispatched asynchronously, off the training step's
            critical path; on TensorFlow they run in the callback. Swapping
            in, `ema_model` and saving copy the host values back beside the
            weights. Defaults to `None`.

    Example:

    ```python
    ema = keras_ema.MultiEMA(validation_data=(x_val, y_val))
    # MultiEMA first: the callbacks after it see its ema_<decay>_val_* logs.
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
        self.snapshot_dir = snapshot_dir
        self.snapshot_every = None if snapshot_every is None else int(snapshot_every)
        self.snapshot_dtype = snapshot_dtype
        # Update log for post-hoc EMA: the EMAs started equal to iterate
        # `_log_start`; each applied update read iterate `_log_steps[k]` with
        # the decays `_log_decays[k]` (float64, products when combined).
        self._log_start = 0
        self._log_steps = []
        self._log_decays = []
        self._log_pending = []
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
        self._shadows = None
        self._update = None
        self._step = 0
        self._attempted = 0
        self._pending = []
        self._swapped = None
        self._epoch_start_batch = 0
        self._accumulation = 1
        self._count_batches = True
        self._written = {}  # (decay, step): (path, its os.stat) last written

    @property
    def best(self) -> BestRecords:
        """`{decay: {"accuracy": {"epoch", "value"}, "loss": {...}}}`.

        The epoch (counted from 0, as in Keras's `History` and `CSVLogger`;
        the progress bar shows epoch `e` as `e + 1`) and value of each EMA's
        highest validation accuracy and lowest validation loss. An
        untracked decay raises a `KeyError` that names the tracked ones.
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
        n = len(self.decays)
        lines = [
            f"{type(self).__name__}: "
            + (f"1 EMA (decay {self.decays[0]})" if n == 1 else f"{n} EMAs")
            + ", one update every "
            + ("optimizer step" if self.period == 1
               else f"{self.period} optimizer steps")
            + (", warm-up min(a, (t+1)/(t+10))" if self.warmup else "")
        ]
        for d in self.decays:
            per_step = d ** (1.0 / self.period)
            line = f"  decay {d}: per-step equivalent {per_step:.6f}"
            if self.warmup:
                line += f", warm-up ends at step {warmup_end_step(d)}"
            lines.append(line)
        return "\n".join(lines)

    def _warn_short_run(self, total_steps):
        if not self.warmup or not total_steps:
            return
        late = [d for d in self.decays if warmup_end_step(d) >= total_steps]
        if not late:
            return
        name = type(self).__name__
        if len(late) == 1:
            text = (
                f"the warm-up of decay {late[0]} ends at optimizer step "
                f"{warmup_end_step(late[0])}, after the run's {total_steps} "
                "steps: the EMA uses the smaller warm-up decay (t + 1) / "
                f"(t + 10) throughout and averages a shorter window than "
                f"{late[0]} says. Use a smaller decay or a longer run."
            )
        else:
            ends = ", ".join(str(warmup_end_step(d)) for d in late)
            text = (
                f"the warm-ups of decays {late} end at optimizer steps "
                f"{ends}, after the run's {total_steps} steps: those EMAs "
                "use the same warm-up decay (t + 1) / (t + 10) throughout "
                "and stay identical to each other. Use smaller decays or a "
                "longer run."
            )
        warnings.warn(f"{name}: {text}", stacklevel=2)

    def _warn_callback_order(self):
        """Warns when a callback reading the logs runs before this one.

        Callbacks run in list order, so one placed before this callback has
        handled the epoch's logs before the `ema_<decay>_val_*` keys are
        added: a CSVLogger silently writes no EMA column, a ModelCheckpoint
        monitoring an EMA key never finds it.
        """
        if self.validation_data is None:
            return
        callbacks = _keras_private.calling_callbacks(self)
        if not callbacks:
            return
        before = itertools.takewhile(lambda c: c is not self, callbacks)
        late = []
        for c in before:
            name = type(c).__name__
            kinds = [k.__name__ for k in type(c).__mro__]
            monitor = str(getattr(c, "monitor", "") or "")
            if (getattr(c, "_reads_ema_logs", False)
                    and getattr(c, "ema", None) is self) or any(
                k in _LOG_RECORDERS for k in kinds
            ) or (any(k in _LOG_MONITORS for k in kinds)
                  and monitor.startswith("ema_")):
                late.append(name)
        if late:
            name = type(self).__name__
            who = (f"{late[0]} comes" if len(late) == 1
                   else f"{', '.join(late)} come")
            warnings.warn(
                f"{name}: {who} before {name} in the callback list, so at "
                "each epoch end it runs before the `ema_<decay>_val_*` keys "
                "are added and never sees them (a CSVLogger writes no EMA "
                f"column). Put {name} first: callbacks=[{name.lower()}, ...].",
                stacklevel=2,
            )

    def _warn_changed_variables(self):
        """Warns when another fit() trains variables the EMAs do not hold."""
        if self._owner is not self.model:
            return
        kept = {id(v) for v in self._variables}
        new = [v.path for v in self._averaged_variables(self.model)
               if id(v) not in kept]
        if new:
            warnings.warn(
                f"MultiEMA: variables {new} became trainable after the EMAs "
                "were created; they are not averaged (the EMA model takes "
                "their live values). Call `reset()` before this fit() to "
                "average them too.",
                stacklevel=2,
            )

    def _warn_late_updates(self, steps, accumulation):
        """Warns when updates fall inside a `steps_per_execution` block."""
        execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if execution <= 1:
            return
        # Updates are due every `period * accumulation` batches; a callback
        # runs only after each block of `execution` batches.
        unit = execution // math.gcd(execution, accumulation)
        aligned = (self.period * accumulation) % execution == 0
        if aligned and (not steps or steps % execution == 0):
            return
        advice = []
        if not aligned:
            suggestion = -(-self.period // unit) * unit
            what = "a multiple of steps_per_execution"
            if accumulation > 1:
                what = ("period * gradient_accumulation_steps a multiple of "
                        "steps_per_execution")
            advice.append(f"use period={suggestion} ({what})")
        if steps and steps % execution:
            advice.append(
                f"make the batches per epoch ({steps}) a multiple of "
                f"steps_per_execution={execution}"
            )
        warnings.warn(
            f"MultiEMA: with steps_per_execution={execution} the callback sees "
            f"the weights only every {execution} batches, so an update due "
            f"inside an execution is applied with the weights at its end (up "
            f"to {execution - 1} batches late). For exact updates, "
            + " and ".join(advice) + ".",
            stacklevel=2,
        )

    # === State ===

    def _averaged_variables(self, model):
        """The trainable float variables and, if averaged, the BN statistics.

        Any other non-trainable variable (a counter, a step, a frozen
        layer's weight) is never averaged: the EMA model takes its live value.
        """
        statistics = {id(v) for v in batch_norm_statistics(model)}
        return [
            v
            for v in model.weights
            if "float" in str(v.dtype)
            and (
                (v.trainable and id(v) not in statistics)
                or (self.average_batch_norm and id(v) in statistics)
            )
        ]

    def _build(self, model):
        if not model.built:
            raise ValueError(
                "MultiEMA needs a built model: call the model on a batch or "
                "`model.build(input_shape)` before using it. Received an "
                f"unbuilt model: {model.name}"
            )
        variables = self._averaged_variables(model)
        if not variables:
            raise ValueError(
                f"MultiEMA found no trainable float variables to average in "
                f"model {model.name}. Make some layers trainable."
            )
        m = len(self.decays)
        # One stack of the M EMAs per variable, placed like the variable: on
        # JAX sharded as it is (decay axis unsharded), so a device holds M
        # copies of its shards only; or in host memory with `shadow_device`.
        shadows = [
            _backend.make_shadow(v, m, f"ema_{i}", model, self.shadow_device)
            for i, v in enumerate(variables)
        ]
        self._owner = model
        self._variables = variables
        self._shadows = shadows
        optimizer = getattr(model, "optimizer", None)
        self._log_start = 0 if optimizer is None else _to_int(optimizer.iterations)
        self._log_steps, self._log_decays, self._log_pending = [], [], []
        self._run_id = uuid.uuid4().hex[:16]
        self._snapshot_dir_checked = False
        self._resumed = False
        self._update = self._make_update(shadows, variables)
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
        self._written = {}

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
        return {
            "decays": list(self.decays),
            "period": self.period,
            "warmup": self.warmup,
            "average_batch_norm": self.average_batch_norm,
            "step": self._step,
            "attempted": self._attempted,
            "skipped_steps": list(self.skipped_steps),
            "best": {repr(d): v for d, v in self.best.items()},
            "paths": [v.path for v in self._variables],
            "update_log": self._update_log(),
            "run_id": self._run_id,
            "shadows": [keras.ops.convert_to_numpy(s) for s in self._shadows],
            "lora_factors": lora.live_factors(self._owner),
        }

    def _update_log(self):
        return {
            "start": self._log_start,
            "steps": list(self._log_steps),
            "decays": [list(a) for a in self._log_decays],
        }

    def set_state(self, state: dict):
        """Restores a state from `get_state`, for the same model and decays.

        Everything is checked first (keys, arguments, number, shapes and
        finiteness of the shadows, a step and counters not negative, the
        update log); on any mismatch a `ValueError` is raised
        and nothing is changed.
        """
        self._require_built()
        required = ("decays", "period", "warmup", "average_batch_norm", "step",
                    "attempted", "skipped_steps", "best", "shadows")
        if not isinstance(state, dict):
            raise ValueError(
                "Invalid MultiEMA state: expected a dict from `get_state`. "
                f"Received: {type(state).__name__}"
            )
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(
                f"Invalid MultiEMA state: missing keys {missing}. Pass a dict "
                "from `get_state`."
            )
        for key in ("decays", "period", "warmup", "average_batch_norm"):
            mine = getattr(self, key)
            theirs = state[key]
            if key == "decays":
                try:
                    theirs = [float(d) for d in theirs]
                except (TypeError, ValueError):
                    pass  # reported as a mismatch below
                mine = list(mine)
            if mine != theirs:
                raise ValueError(
                    f"Cannot restore a MultiEMA state with {key}={theirs} into "
                    f"a MultiEMA with {key}={mine}. Use the same arguments."
                )
        if len(state["shadows"]) != len(self._shadows):
            raise ValueError(
                f"Cannot restore a MultiEMA state of {len(state['shadows'])} "
                f"variables into a model with {len(self._shadows)} averaged "
                "variables. Restore it into the model it was saved from."
            )
        values = []
        for i, (s, v, value) in enumerate(
            zip(self._shadows, self._variables, state["shadows"])
        ):
            value = np.asarray(value, np.float32)
            if tuple(value.shape) != tuple(s.shape):
                raise ValueError(
                    f"Cannot restore a MultiEMA state: shadow {i} has shape "
                    f"{tuple(value.shape)}, but variable {v.path} needs "
                    f"{tuple(s.shape)}. Restore it into the model it was "
                    "saved from."
                )
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"Cannot restore a MultiEMA state: shadow {i} (variable "
                    f"{v.path}) holds NaN or infinite values. The state is "
                    "corrupt; use an older one."
                )
            values.append(value)
        try:
            step = int(state["step"])
            attempted = int(state["attempted"])
            skipped = [int(t) for t in state["skipped_steps"]]
            best = {float(d): dict(v) for d, v in state["best"].items()}
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(
                f"Invalid MultiEMA state: bad step, attempted, skipped_steps "
                f"or best entry ({e}). Pass a dict from `get_state`."
            ) from None
        for key, value in (("step", step), ("attempted", attempted)):
            if value < 0:
                raise ValueError(
                    f"Invalid MultiEMA state: {key}={value} is negative. Pass "
                    "a dict from `get_state`."
                )
        log = self._check_update_log(state.get("update_log"))
        # Everything is checked: only now is anything changed.
        lora.unmerge_restored(self._owner, state.get("lora_factors"))
        for s, value in zip(self._shadows, values):
            s.assign(value)
        self._step = step
        self._attempted = attempted
        self.skipped_steps = skipped
        self._pending = []
        self.best = best
        self._written = {}
        if log is not None:
            self._log_start, self._log_steps, self._log_decays = log
        else:  # a state from before the log: snapshots cannot be exact
            self._log_start = None
            self._log_steps, self._log_decays = [], []
        self._log_pending = []
        self._run_id = state.get("run_id")
        self._snapshot_dir_checked = False
        self._resumed = True

    def _check_update_log(self, log):
        """`(start, steps, decays)` of a state's `update_log`, or `None`.

        Raises `ValueError` on a log that is not one from `get_state`: not a
        dict of `start`, `steps` and `decays`, a negative step, steps and
        rows of decays of different counts, or a row of decays not one per
        kept decay in [0, 1].
        """
        if log is None:
            return None

        def bad(what):
            return ValueError(
                f"Invalid MultiEMA state: its update_log {what}. Pass a dict "
                "from `get_state`."
            )

        try:
            start = int(log["start"])
            steps = [int(t) for t in log["steps"]]
            decays = [[float(a) for a in row] for row in log["decays"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise bad(f"is malformed ({type(e).__name__}: {e})") from None
        if start < 0:
            raise bad(f"starts at step {start}, which is negative")
        if len(steps) != len(decays):
            raise bad(f"has {len(steps)} steps but {len(decays)} rows of decays")
        negative = [t for t in steps if t < 0]
        if negative:
            raise bad(f"has negative steps {negative[:3]}")
        m = len(self.decays)
        for row in decays:
            if len(row) != m or not all(0.0 <= a <= 1.0 for a in row):
                raise bad(f"has a row of decays {row}; each row holds {m} "
                          "decays in [0, 1]")
        return start, steps, decays

    def backup_steps(self) -> list:
        """Optimizer steps whose state files in `backup_dir` read back whole.

        A resume can continue these EMAs only at one of these steps; a
        damaged file is left out.
        """
        return state_file.backup_steps(self.backup_dir) if self.backup_dir else []

    def _save_backup(self):
        # Keep the two newest: a kill between this file and the model's own
        # backup leaves the model one epoch behind, and that state is kept;
        # a damaged newest file leaves the older one to resume from.
        # Written by the run's background writer, if one is open (`_writer`).
        _writer.submit(state_file.write_state_file, self.backup_dir,
                       self.get_state(), keep=2)

    def _restore_backup(self, step):
        """Restores the state saved at optimizer step `step`, if any.

        Returns `False` when `backup_dir` holds no state (a new run) or
        `step` is 0. Raises `ValueError` naming the file when the state of
        `step` is damaged, or when other steps are saved but not `step`: the
        EMAs never restart silently from the current weights.
        """
        files = state_file.state_files(self.backup_dir)
        path = state_file.state_path(self.backup_dir, step)
        if not os.path.exists(path):
            if files and step > 0:
                steps = ", ".join(str(s) for s in state_file.file_steps(files))
                prefix = os.path.join(self.backup_dir, state_file.STATE_PREFIX)
                raise ValueError(
                    f"MultiEMA: no saved state at optimizer step {step} in "
                    f"{self.backup_dir} (it holds steps {steps}), so the EMAs "
                    "cannot continue. Resume the model from one of those "
                    f"steps, or remove {prefix}"
                    "*.npz to restart the EMAs from the current weights."
                )
            return False
        self.set_state(state_file.read_state_file(path))
        return True

    def restore_backup(self, model: keras.Model) -> bool:
        """Builds the EMAs of `model` and loads them from `backup_dir`, outside fit.

        Training restores the backup by itself; this serves a program that
        needs the EMAs of a run whose training already ended (say, a rerun
        that finds every epoch done), with `model` holding the weights and
        optimizer step the backup was taken at.

        Args:
            model: the built, compiled model these EMAs average.

        Returns:
            `True` if a state saved at the optimizer step of `model` was
            restored; `False` if there is none (the EMAs then equal the
            model's current weights).
        """
        if not self.backup_dir:
            raise ValueError(
                "MultiEMA.restore_backup needs a backup_dir. Received: "
                f"backup_dir={self.backup_dir!r}"
            )
        self.set_model(model)
        self._build(model)
        self._step = self._optimizer_step() if model.optimizer is not None else 0
        return self._restore_backup(self._step)

    def _require_built(self):
        if self._shadows is None:
            raise ValueError(
                "MultiEMA has no EMAs yet: they are created when training "
                "starts. Call `model.fit(..., callbacks=[ema])` first."
            )

    # === Training hooks ===

    def on_train_begin(self, logs=None):
        if self.verbose:
            _keras_private.print_msg(self.schedule_summary())
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        accumulation = _accumulation_steps(self.model.optimizer)
        if epochs and steps:
            self._warn_short_run(epochs * steps // accumulation)
        self._warn_late_updates(steps, accumulation)
        self._warn_changed_variables()
        self._warn_callback_order()
        _monitors.check_monitors(self, _keras_private.calling_callbacks(self))
        if self.validation_data is not None:
            _validation_data.check_validation_data(
                self.model, self.validation_data, self.validation_batch_size
            )

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        step = self._optimizer_step()
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
            self._check_snapshot_dir(step)
        # A LossScaleOptimizer skips the steps whose gradients overflow (its
        # `iterations` stays put): then ask it at every batch end, at the cost
        # of a device sync; otherwise count batches. An optimizer that
        # accumulates gradients over `n` batches counts every batch in its
        # raw counter and steps after the batch that brings it to a multiple
        # of `n` (`iterations` is that counter // n): count batches in the
        # raw counter, read once here, so a resumed run whose counter is not
        # a multiple of `n` stays exact.
        optimizer = model.optimizer
        self._count_batches = not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        )
        self._accumulation = _accumulation_steps(optimizer)
        self._epoch_start_batch = step * self._accumulation
        if self._count_batches and self._accumulation > 1:
            self._epoch_start_batch = _to_int(_keras_private.raw_iterations(optimizer))

    def on_train_batch_end(self, batch, logs=None):
        # Keras passes the index of the last batch of the execution, which for
        # a final partial execution (steps_per_execution > 1) lies past the
        # epoch's end: clamp it, or ask the optimizer when the length is unknown.
        steps = self.params.get("steps") if self.params else None
        if steps and self._count_batches:
            batches = self._epoch_start_batch + min(batch + 1, steps)
            step = batches // self._accumulation
        else:
            step = self._optimizer_step()
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

    def _optimizer_step(self):
        """Optimizer steps taken (a LossScaleOptimizer's skips excluded)."""
        return _to_int(self.model.optimizer.iterations)

    def _apply(self, decays, step):
        self.model  # on JAX, attaches the training state to the variables
        applied = self._run_update(decays)
        self._pending.append((step, applied))
        self._log_pending.append((step, [float(a) for a in np.prod(decays, axis=0)]))
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
        self._commit_log(set(bad))
        if not bad:
            return
        self.skipped_steps += bad
        if self.raise_on_nonfinite:
            raise FloatingPointError(
                f"MultiEMA: the model weights are not finite at optimizer step "
                f"{bad[0]}. Lower the learning rate or check the data; pass "
                "raise_on_nonfinite=False to skip such updates instead."
            )
        warnings.warn(
            f"MultiEMA: skipped the EMA update at optimizer steps {bad} "
            "because the model weights held NaN or infinite values; the EMAs "
            "keep their last finite values.",
            stacklevel=2,
        )

    def _commit_log(self, bad_steps):
        """Moves the pending updates to the log, minus the skipped ones."""
        pending, self._log_pending = self._log_pending, []
        for step, decays in pending:
            if step not in bad_steps:
                self._log_steps.append(step)
                self._log_decays.append(decays)

    def _check_snapshot_dir(self, step):
        """Before the first snapshot: the directory holds only this run's, and
        on a resume the snapshots it keeps (up to `step`) read back whole."""
        from keras_ema import posthoc

        posthoc.check_snapshot_dir(
            self.snapshot_dir, self._run_id, [v.path for v in self._variables]
        )
        if self._resumed and os.path.isdir(self.snapshot_dir):
            for path, reason in posthoc.damaged_snapshots(self.snapshot_dir, step):
                warnings.warn(
                    f"MultiEMA: snapshot {path} (before the resume point, step "
                    f"{step}) is damaged ({reason}); post-hoc EMA will leave it "
                    "out. Restore it from a copy, or delete it.",
                    stacklevel=2,
                )
        self._snapshot_dir_checked = True

    def _maybe_snapshot(self, previous, step):
        """Writes a post-hoc snapshot when a multiple of `snapshot_every` is crossed."""
        every = self.snapshot_every
        if not every or step // every <= previous // every:
            return
        self._flush_pending()
        if self._log_start is None:
            warnings.warn(
                "MultiEMA: no snapshot written: the EMAs were restored from a "
                "state without an update log, so their profiles are unknown.",
                stacklevel=2,
            )
            return
        from keras_ema import posthoc

        meta = {
            "run_id": self._run_id,
            "decays": list(self.decays),
            "period": self.period,
            "warmup": self.warmup,
            "average_batch_norm": self.average_batch_norm,
            "paths": [v.path for v in self._variables],
            "log": self._update_log(),
        }
        posthoc.write_snapshot(
            self.snapshot_dir,
            step,
            [keras.ops.convert_to_numpy(s) for s in self._shadows],
            meta,
            self.snapshot_dtype,
        )

    def on_epoch_end(self, epoch, logs=None):
        if self._shadows is None:
            return
        self._flush_pending()
        self._warn_never_updated(epoch)
        if self.validation_data is not None:
            results = self.evaluate(self.validation_data)
            for decay, metrics in results.items():
                for key, value in metrics.items():
                    if logs is not None:
                        logs[f"ema_{decay}_val_{key}"] = value
                self._update_best(decay, epoch, metrics)
        self._after_epoch_end(epoch, logs)
        self._written = {}  # SwitchEMA's copy may have changed the weights
        if self.backup_dir:
            self._save_backup()

    def _warn_never_updated(self, epoch):
        """Warns at an epoch end when no update has been applied yet.

        The EMAs then still equal the weights training started from: their
        metrics are the initial model's, whatever the decay.
        """
        if self.num_updates:
            return
        name = type(self).__name__
        skipped = (f" ({len(self.skipped_steps)} skipped on non-finite "
                   "weights)" if self.skipped_steps else "")
        warnings.warn(
            f"{name}: epoch {epoch} ended after {self._step} optimizer steps "
            f"with no EMA update yet{skipped} (one every {self.period} steps): "
            "the EMAs still equal the initial weights, and their metrics are "
            "the initial model's. Use a period of at most the steps per "
            "epoch, or train longer.",
            stacklevel=2,
        )

    def _after_epoch_end(self, epoch, logs):
        """Runs after the epoch's EMA evaluation and before the state backup."""

    def _update_best(self, decay, epoch, metrics):
        record = self.best.setdefault(decay, {})
        candidates = []
        acc_key = next((k for k in _ACCURACY_KEYS if k in metrics), None)
        if acc_key is not None:
            candidates.append(("accuracy", metrics[acc_key], 1.0))
        if "loss" in metrics:
            candidates.append(("loss", metrics["loss"], -1.0))
        for criterion, value, sign in candidates:
            old = record.get(criterion)
            if not math.isfinite(value):
                continue
            if old is None or sign * value > sign * old["value"]:
                record[criterion] = {"epoch": int(epoch), "value": float(value)}
                if self.best_weights_dir:
                    self.save_weights(
                        decay,
                        os.path.join(
                            self.best_weights_dir,
                            f"ema_{decay}_best_{criterion}.weights.h5",
                        ),
                    )

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
        model = self.model
        everything = model.weights
        saved = _backend.snapshot(everything)
        self._swapped = decay
        try:
            self._assign_ema(i)
            yield model
        finally:
            for v, value in zip(everything, saved):
                v.assign(value)
            self._swapped = None

    def _assign_ema(self, index, skip=()):
        """Copies EMA `index` into the averaged variables not in `skip`.

        A plain assignment of the stored values: float32 variables receive
        the shadow bit for bit.
        """
        skip = {id(v) for v in skip}
        for v, s in zip(self._variables, self._shadows):
            if id(v) not in skip:
                value = keras.ops.cast(s[index], v.dtype)
                if self.shadow_device is not None:
                    value = _backend.place_like(value, v)
                v.assign(value)

    def ema_weights(self, decay: float) -> list:
        """`model.get_weights()` with the EMA of `decay` in place of the live values."""
        i = self._index(decay)
        averaged = {id(v): s for v, s in zip(self._variables, self._shadows)}
        out = []
        for v in self._owner.weights:
            value = averaged.get(id(v))
            if value is None:
                out.append(keras.ops.convert_to_numpy(v))
            else:
                out.append(keras.ops.convert_to_numpy(value[i]).astype(v.dtype))
        return out

    def save_weights(self, decay: float, path: str):
        """Writes the model weights with the EMA of `decay` to `path` (.weights.h5).

        The file holds the model's weights only, not the optimizer's state
        (the live optimizer's momentum means nothing beside an EMA): load it
        with `model.load_weights`. The file is written under a temporary name
        and renamed, so a crash never leaves a truncated file at `path`. The
        same EMA at the same optimizer step saved again under another name
        (two criteria that chose the same epoch) becomes a hard link to the
        first file, written once.
        """
        if not path.endswith(".weights.h5"):
            raise ValueError(
                f"Invalid path {path!r}: weight files must end in `.weights.h5`."
            )
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        key = (self.decays[self._index(decay)], self._step)
        if _writer.save_ema_weights(self, decay, key, path):
            return  # from a host copy, by the run's background writer
        with atomic_path(path) as tmp:
            if not self._link_written(key, tmp):
                with self.swapped_in(decay) as model:
                    write_weights(model, tmp, include_optimizer=False)
        self._written[key] = (path, _file_identity(path))

    def _link_written(self, key, tmp):
        """Links `tmp` to the file last written for `key` if it is still there."""
        path, identity = self._written.get(key, (None, None))
        if path is None or _file_identity(path) != identity:
            return False
        try:
            os.link(path, tmp)
        except OSError:  # no hard links on this file system: write it
            return False
        return True

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
        weights = self.ema_weights(decay)
        model = self._owner
        clone = lora.clone_like(model)
        clone.set_weights(weights)
        if getattr(model, "compiled", False):
            try:
                clone.compile_from_config(model.get_compile_config())
            except Exception:  # an uncompiled copy is still a usable model
                pass
        return clone

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
