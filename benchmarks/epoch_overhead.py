"""Where an epoch of train.py goes: seconds and bytes per phase, against plain fit.

Runs `zoo.run.experiment.train` with the given train.py flags in a scratch
directory for a few epochs, timing each phase of every epoch and counting
the bytes each phase puts on disk (the size of every file renamed into
place, the run's one way of writing). Then trains the same model with a plain
`model.fit` on the same data, as in-memory normalized arrays, with the same
validation arrays and no callbacks, for as many epochs, in the same process;
the last column is each epoch's time over the median plain epoch.

Phases (each time is exclusive: a phase inside another counts once):

- training steps: the rest of the epoch (forward, backward, optimizer, fit's
  own validation);
- data loading: `ArrayLoader` batches (crop, flip, normalize);
- EMA updates: MultiEMA's compiled updates;
- EMA evaluation: every EMA swapped in and evaluated;
- BN recompute: the EMAs' BatchNorm statistics recomputed (when configured);
- backup writes: the model's backup (weights and optimizer), the EMA state,
  the history copy;
- best-file writes: files of the best epochs (EMA and SGD) and, at the last
  epoch, the last weights (a file made as a hard link to another counts as
  a file of 0 bytes);
- history/summary: history.csv and summary.json;
- plots: curves.png, written once after training (its own row);
- background: the files the run's background writer thread puts on disk
  while the next epoch trains (bytes and files only: its time overlaps
  training and is in no phase above).

    python benchmarks/epoch_overhead.py --dataset=digits --model=resnet18 \\
        --width=1 --ema_decays=0.968,0.984,0.992,0.996,0.998 --ema_period=16
    python benchmarks/epoch_overhead.py --synthetic=cifar100 --model=resnet18 \\
        --steps=20          # CIFAR-100-shaped random data, 20 steps an epoch

Any train.py flag may be given (`--flagfile` too); the run goes to a scratch
directory removed at the end, whatever `--output_dir` says. Timings on a shared machine vary: read
the ratios, measured side by side.
"""

import contextlib
import dataclasses
import functools
import os
import shutil
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

# zoo/ is the repository's kit, not installed: import it from this checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zoo.run import config as run_config  # noqa: E402

run_config.define_flags()
flags.DEFINE_integer("measure_epochs", 3, "Epochs to train and report.",
                     lower_bound=1)
flags.DEFINE_integer("steps", 0, "Training steps per epoch (the training "
                     "split cut to steps x batch_size); 0: all.", lower_bound=0)
flags.DEFINE_string("synthetic", "", "Random uint8 data shaped like a dataset "
                    "instead of --dataset: cifar10, cifar100 or "
                    "tiny_imagenet.")
flags.DEFINE_integer("synthetic_images", 50_000, "Training images of "
                     "--synthetic (a fifth more for validation and test).",
                     lower_bound=1)
FLAGS = flags.FLAGS

PHASES = ("training steps", "data loading", "EMA updates", "EMA evaluation",
          "BN recompute", "backup writes", "best-file writes",
          "history/summary")
SYNTHETIC = {"cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
             "tiny_imagenet": ((64, 64, 3), 200)}


class Profile:
    """Exclusive seconds and bytes renamed into place, per phase."""

    def __init__(self):
        self.seconds, self.bytes, self.files = {}, {}, {}
        self._stack = []

    def reset(self):
        self.seconds, self.bytes, self.files = {}, {}, {}

    @contextlib.contextmanager
    def phase(self, name):
        start, outer = time.perf_counter(), self._stack[-1] if self._stack else None
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            _, inner = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if outer is not None:
                outer[1] += elapsed

    def wrap(self, owner, attribute, name):
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def count(self, path, written=True):
        if threading.current_thread() is not threading.main_thread():
            name = "background"  # the writer thread, overlapping training
        else:
            name = self._stack[-1][0] if self._stack else "other"
        size = _size(path) if written else 0
        self.bytes[name] = self.bytes.get(name, 0) + size
        self.files[name] = self.files.get(name, 0) + 1


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f))
                   for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path) if os.path.exists(path) else 0


def _instrument(profile):
    """Wraps the run's phases and the renames that put files in place."""
    import keras_ema
    from keras_ema import multi_ema
    from zoo.data.loader import ArrayLoader
    from zoo.run import experiment
    from zoo.run.backup import AtomicBackupAndRestore
    from zoo.run.log import RunLogger
    from zoo.selection import ChosenWeights

    profile.wrap(ArrayLoader, "__getitem__", "data loading")
    profile.wrap(keras_ema.MultiEMA, "_run_update", "EMA updates")
    profile.wrap(keras_ema.MultiEMA, "evaluate", "EMA evaluation")
    profile.wrap(multi_ema, "recompute_batch_norm_statistics", "BN recompute")
    profile.wrap(keras_ema.MultiEMA, "_save_backup", "backup writes")
    profile.wrap(AtomicBackupAndRestore, "on_epoch_end", "backup writes")
    profile.wrap(keras_ema.MultiEMA, "_update_best", "best-file writes")
    profile.wrap(ChosenWeights, "on_epoch_end", "best-file writes")
    profile.wrap(RunLogger, "on_epoch_end", "history/summary")
    profile.wrap(experiment, "plot_curves", "plots")
    # Every file of a run is written under a temporary name and renamed (or,
    # for a second name of the same bytes, linked) into place.
    replace, link = os.replace, os.link
    linked = set()  # temporary names made as hard links: no bytes written

    def counted_replace(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if not os.path.basename(os.fspath(dst)).startswith("."):
            profile.count(dst, written=os.fspath(src) not in linked)
        linked.discard(os.fspath(src))

    def counted_link(src, dst, *args, **kwargs):
        link(src, dst, *args, **kwargs)
        linked.add(os.fspath(dst))

    os.replace, os.link = counted_replace, counted_link
    return lambda: setattr(os, "replace", replace) or setattr(os, "link", link)


def _synthetic(name, images, seed):
    import numpy as np

    from zoo.data.dataset import Dataset

    shape, classes = SYNTHETIC[name]
    rng = np.random.default_rng(seed)
    held = max(1, images // 5)

    def split(n):
        return (rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                rng.integers(0, classes, n).astype(np.int32))

    (xt, yt), (xv, yv), (xs, ys) = split(images), split(held), split(held)
    return Dataset(f"synthetic {name}", xt, yt, xv, yv, xs, ys, classes,
                   mean=np.full(3, 0.5, np.float32),
                   std=np.full(3, 0.25, np.float32))


class _EpochClock:
    """Keras callback: per-epoch wall time and phase profile; stops after `epochs`."""

    def __new__(cls, profile, epochs):
        import keras

        class Clock(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                profile.reset()
                self.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                wall = time.perf_counter() - self.start
                self.epochs.append((epoch, wall, dict(profile.seconds),
                                    dict(profile.bytes), dict(profile.files)))
                if len(self.epochs) >= epochs:
                    self.model.stop_training = True

        clock = Clock()
        clock.epochs = []
        return clock


def _plain_fit_seconds(config, data, epochs):
    """Seconds per epoch of `model.fit` on in-memory arrays, no callbacks."""
    import keras
    import numpy as np

    from zoo.data.loader import ArrayLoader
    from zoo.models import get_model
    from zoo.regularization import PyTorchSGD
    from zoo.run import experiment
    from zoo.schedules import WarmupCosine

    def arrays(x, y):
        loader = ArrayLoader(x, y, len(x), data.mean, data.std)
        return loader[0]

    x, y = arrays(data.x_train, data.y_train)
    val = arrays(data.x_val, data.y_val) if data.x_val is not None else arrays(
        data.x_test, data.y_test)
    model = get_model(config.model, num_classes=data.num_classes,
                      input_shape=data.image_shape, width=config.width)
    steps = -(-len(x) // config.batch_size)
    model.compile(
        optimizer=PyTorchSGD(
            learning_rate=WarmupCosine(config.lr, config.epochs * steps,
                                       config.warmup_epochs * steps),
            momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], jit_compile=experiment._jit_compile())
    seconds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        model.fit(x, y, batch_size=config.batch_size, epochs=epoch + 1,
                  initial_epoch=epoch, validation_data=val,
                  validation_batch_size=2 * config.batch_size, shuffle=False,
                  verbose=0)
        seconds.append(time.perf_counter() - start)
    return seconds


def _mb(n):
    return f"{n / 1e6:.1f}"


def _table(epochs, plain, plots):
    import numpy as np

    warm = float(np.median(plain[1:] if len(plain) > 1 else plain))
    lines = [f"plain model.fit, no callbacks: {', '.join(f'{s:.2f}' for s in plain)}"
             f" s per epoch (first includes tracing); reference {warm:.2f} s"]
    header = f"{'phase':<18}" + "".join(
        f"{f'epoch {e} s':>11}{'MB':>9}{'files':>6}" for e, *_ in epochs)
    lines += [header, "-" * len(header)]
    for name in PHASES:
        row = f"{name:<18}"
        for _, wall, seconds, nbytes, files in epochs:
            if name == "training steps":
                s = wall - sum(v for k, v in seconds.items() if k != name)
            else:
                s = seconds.get(name, 0.0)
            row += f"{s:>11.3f}{_mb(nbytes.get(name, 0)):>9}{files.get(name, 0):>6}"
        lines.append(row)
    row, total = f"{'epoch total':<18}", f"{'/ plain fit':<18}"
    bookkeeping = f"{'writes+summary':<18}"
    for _, wall, seconds, nbytes, files in epochs:
        written = sum(nbytes.values())
        row += f"{wall:>11.3f}{_mb(written):>9}{sum(files.values()):>6}"
        total += f"{wall / warm:>11.2f}{'':>15}"
        writes = sum(seconds.get(k, 0.0) for k in
                     ("backup writes", "best-file writes", "history/summary"))
        bookkeeping += f"{writes:>11.3f}{'':>15}"
    row_bg = f"{'(background)':<18}"
    for _, wall, seconds, nbytes, files in epochs:
        row_bg += f"{'':>11}{_mb(nbytes.get('background', 0)):>9}{files.get('background', 0):>6}"
    lines += [row_bg, "-" * len(header), row, bookkeeping, total]
    lines.append(f"{'plots (once, after training)':<30}{plots[0]:.3f} s, "
                 f"{_mb(plots[1])} MB")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"epoch_overhead.py: unexpected arguments {argv[1:]}")
    import keras

    from zoo.run import experiment

    # A new run in a scratch directory, whatever --output_dir says (a flag
    # file's own output_dir included): the run is measured from scratch.
    scratch = tempfile.mkdtemp(prefix="epoch_overhead_")
    FLAGS.output_dir = os.path.join(scratch, "run")
    try:
        config = run_config.config_from_flags(FLAGS).resolved()
    except run_config.ConfigError as error:
        sys.exit(f"epoch_overhead.py: error: {error}")
    loaded = {}
    load = experiment.load_dataset

    def load_dataset(*args, **kwargs):
        data = (_synthetic(FLAGS.synthetic, FLAGS.synthetic_images, config.seed)
                if FLAGS.synthetic else load(*args, **kwargs))
        if FLAGS.steps:
            keep = FLAGS.steps * config.batch_size
            data = dataclasses.replace(data, x_train=data.x_train[:keep],
                                       y_train=data.y_train[:keep],
                                       noise_mask=None if data.noise_mask is None
                                       else data.noise_mask[:keep])
        loaded["data"] = data
        return data

    if FLAGS.synthetic and FLAGS.synthetic not in SYNTHETIC:
        sys.exit(f"epoch_overhead.py: --synthetic={FLAGS.synthetic}: expected "
                 f"one of {', '.join(SYNTHETIC)}.")
    experiment.load_dataset = load_dataset
    profile = Profile()
    restore = _instrument(profile)
    clock = _EpochClock(profile, FLAGS.measure_epochs)
    try:
        try:
            experiment.train(config, verbose=0, callbacks=(clock,))
        finally:
            restore()
        plots = (profile.seconds.get("plots", 0.0), profile.bytes.get("plots", 0))
        data = loaded["data"]
        plain = _plain_fit_seconds(config, data, FLAGS.measure_epochs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{config.model} x{config.width:g} on {data.name} "
          f"{'x'.join(map(str, data.image_shape))}, {len(data.x_train)} "
          f"training images, batch {config.batch_size}, decays "
          f"{','.join(map(str, config.ema_decays))}, period {config.ema_period}; "
          f"{keras.backend.backend()}, {os.cpu_count()} CPU(s)")
    print(_table(clock.epochs, plain, plots))
    return None


if __name__ == "__main__":
    app.run(main)
