"""What MultiEMA costs: step time with and without EMA, and the update's speed.

Prints ratios measured in one process run, the configurations alternated
round by round so that drifts in machine speed hit them alike:

- step time of `fit` with MultiEMA(5 decays, period 16), MultiEMA(5, period 1)
  and Keras' own optimizer EMA (`use_ema=True`, one EMA, every step), each
  over plain `fit`, on the zoo's ResNet-18 (11.2M parameters; a small input
  keeps the step short on a CPU while the update moves the full model);
- the EMA update alone against the time to stream the same bytes once (an
  in-place copy of the same stacked tensors, compiled the same way).

Goals: MultiEMA(5, 16) adds at most 0.5% to the step time; MultiEMA(5, 1)
adds no more than Keras' single EMA; the update takes at most 2x streaming.

    python benchmarks/ema_overhead.py                       # TensorFlow
    KERAS_BACKEND=jax python benchmarks/ema_overhead.py     # JAX
"""

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# zoo/ and _cli are the repository's, not installed: import them from this checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _cli  # noqa: E402

if __name__ == "__main__":  # Ctrl-C, SIGTERM: one line, also while Keras imports
    _cli.handle_interrupts(f"benchmarks/{os.path.basename(__file__)}")

import keras  # noqa: E402
import numpy as np  # noqa: E402


import keras_ema  # noqa: E402
import zoo.models  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    """Wall time between consecutive batch ends, after `skip` batches."""

    def __init__(self, skip):
        super().__init__()
        self.skip = skip

    def on_train_begin(self, logs=None):
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())

    def total(self):
        t = self.times[self.skip:]
        return t[-1] - t[0], len(t) - 1


def build(args, use_ema=False):
    keras.utils.set_random_seed(0)
    model = zoo.models.get_model(args.model, 10, (args.image_size, args.image_size, 3),
                          width=args.width)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True,
                                       use_ema=use_ema, ema_momentum=0.99),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def time_fit(model, data, callbacks, steps, skip):
    timer = StepTimer(skip)
    x, y = data
    model.fit(x, y, batch_size=len(x) // steps, epochs=1, shuffle=False,
              verbose=0, callbacks=callbacks + [timer])
    return timer.total()


def bench_steps(args):
    rng = np.random.default_rng(0)
    n = args.batch_size * (args.steps + args.skip + 1)
    data = (rng.normal(size=(n, args.image_size, args.image_size, 3)).astype("float32"),
            rng.integers(0, 10, size=(n,)))
    steps = args.steps + args.skip + 1
    configs = {
        # One callback per configuration, reused: later fit() calls continue
        # its EMAs, so the compiled update is traced once, in the warm-up.
        "plain fit": (build(args), []),
        "MultiEMA(5, period 16)": (build(args), [
            keras_ema.MultiEMA(period=16, verbose=0)]),
        "MultiEMA(5, period 1)": (build(args), [
            keras_ema.MultiEMA(period=1, verbose=0)]),
        "Keras use_ema (1 EMA, every step)": (build(args, use_ema=True), []),
    }
    keras_ema_name = "Keras use_ema (1 EMA, every step)"
    # Keras 3.15's optimizer EMA fails on JAX in a second fit() of the same
    # model ("Attempt to donate the same buffer twice"): there it gets a new
    # model for every fit; its compilation falls in the `skip` steps.
    rebuild = keras.backend.backend() == "jax"
    totals = {name: [0.0, 0] for name in configs}
    for name, (model, callbacks) in configs.items():  # compile and warm up
        time_fit(model, data, callbacks, steps, args.skip)
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            model, callbacks = configs[name]
            if rebuild and name == keras_ema_name:
                model = build(args, use_ema=True)
            seconds, count = time_fit(model, data, callbacks, steps, args.skip)
            totals[name][0] += seconds
            totals[name][1] += count
    base = totals["plain fit"][0] / totals["plain fit"][1]
    print(f"\nStep time, {args.model} width {args.width}, batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size} inputs, {args.rounds} alternated rounds "
          f"of {args.steps} steps, backend {keras.backend.backend()}:")
    print(f"  {'configuration':38s} {'ms/step':>9s} {'ratio':>8s}")
    for name, (seconds, count) in totals.items():
        per = seconds / count
        print(f"  {name:38s} {per * 1e3:9.1f} {per / base:8.4f}")
    return totals


def bench_update(args):
    model = build(args)
    ema = keras_ema.MultiEMA(period=1, verbose=0)
    ema.set_model(model)
    ema._build(model)
    stream_dst = [keras.Variable(keras.ops.zeros(s.shape, s.dtype), trainable=False)
                  for s in ema._shadows]
    copy = _make_copy(stream_dst, ema._shadows)
    decays = np.asarray(ema.decays, np.float32)

    def timed(fn, sync):
        for _ in range(3):
            sync(fn())
        times = []
        for _ in range(args.update_reps):
            t0 = time.perf_counter()
            sync(fn())
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def sync_flag(flag):
        keras.ops.convert_to_numpy(flag)

    def sync_copy(_):
        keras.ops.convert_to_numpy(stream_dst[-1][0, 0])

    t_update = t_copy = 0.0
    for _ in range(args.rounds):
        t_update += timed(lambda: ema._update(decays), sync_flag)
        t_copy += timed(copy, sync_copy)
    shadow_bytes = sum(int(np.prod(s.shape)) * 4 for s in ema._shadows)
    print(f"\nEMA update of {len(ema.decays)} EMAs, {shadow_bytes / 1e6:.0f} MB of "
          f"shadows, median of {args.update_reps} calls x {args.rounds} rounds:")
    print(f"  update {t_update / args.rounds * 1e3:.1f} ms, streaming copy "
          f"{t_copy / args.rounds * 1e3:.1f} ms, ratio {t_update / t_copy:.2f} "
          f"(update reads the shadows and the weights and writes the shadows; "
          f"the copy reads and writes the shadows)")
    return t_update / args.rounds


def _make_copy(dst, src):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        d = [v.value for v in dst]
        s = [v.value for v in src]

        @tf.function(jit_compile=True, autograph=False)
        def copy():
            for a, b in zip(d, s):
                a.assign(b)
            return tf.constant(True)

        return copy
    if backend == "jax":
        import jax

        @jax.jit
        def fresh(values):
            return [v + 0.0 for v in values]

        def copy():
            for a, value in zip(dst, fresh([v.value for v in src])):
                a.assign(value)
            return True

        return copy

    def copy():
        for a, b in zip(dst, src):
            a.assign(b)
        return True

    return copy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=48,
                        help="timed steps per configuration and round")
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--update_reps", type=int, default=10)
    parser.add_argument("--skip_steps", action="store_true",
                        help="only measure the update against streaming")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="MultiEMA: the run has")
    totals = None if args.skip_steps else bench_steps(args)
    update = bench_update(args)
    if totals is not None:
        seconds, count = totals["plain fit"]
        share = update / (16 * seconds / count)
        print(f"\nEMA update's share of a step at period 16: {share:.3%} "
              f"(one update / 16 plain steps; goal <= 0.5%)")


if __name__ == "__main__":
    _cli.main_of(main)()
