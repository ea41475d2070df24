"""Where the EMAs live: sharded shadows, and shadows in host memory.

Prints ratios measured in one process run, the configurations alternated
round by round so that drifts in machine speed hit them alike:

- `sharded` (JAX, 8 faked CPU devices as a (2, 4) mesh ("batch", "model"),
  every Dense kernel of an MLP split 4 ways by `keras.distribution.ModelParallel`):
  the time of one update of 5 EMAs and the shadow bytes per device, with the
  shadows replicated (every device holds all 5 EMAs of every kernel: what a
  variable created without the kernel's layout gets) against sharded like
  their kernels (`MultiEMA`'s placement);
- `host`: the step time of `fit` on the zoo's ResNet-18 with MultiEMA(5,
  period 16) beside the weights and with `shadow_device="cpu"`, over plain
  `fit`, and the update alone both ways (timed to completion). On a machine
  without an accelerator the host is the device, so this measures the cost of
  the host path itself (the copy and the update placed on the CPU), not of a
  transfer over PCIe.

    python benchmarks/shadow_placement.py sharded            # sets JAX, 8 devices
    python benchmarks/shadow_placement.py host               # TensorFlow
    KERAS_BACKEND=jax python benchmarks/shadow_placement.py host
"""

import argparse
import os
import re
import sys
import time
import warnings

PART = sys.argv[1] if len(sys.argv) > 1 else None
if PART == "sharded":
    # The devices must be faked before JAX starts.
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# _cli is the repository's, not installed: import it from this checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _cli  # noqa: E402

if __name__ == "__main__":  # Ctrl-C, SIGTERM: one line, also while Keras imports
    _cli.handle_interrupts(f"benchmarks/{os.path.basename(__file__)}")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402
from keras_ema import _backend  # noqa: E402
from ema_overhead import StepTimer  # noqa: E402


def median_time(fn, sync, reps):
    for _ in range(2):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_sharded(args):
    import jax

    devices = keras.distribution.list_devices("cpu")
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["dense.*/kernel"] = (None, "model")
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((args.width,))
        x = inputs
        for _ in range(args.layers):
            x = keras.layers.Dense(args.width, activation="relu")(x)
        model = keras.Model(inputs, keras.layers.Dense(16)(x))
        variables = model.trainable_variables
        m = len(keras_ema.DEFAULT_DECAYS)
        sharded = [_backend.make_shadow(v, m, f"ema_{i}")
                   for i, v in enumerate(variables)]
        replicated = []
        for i, v in enumerate(variables):
            layout = jax.sharding.NamedSharding(
                v.value.sharding.mesh, jax.sharding.PartitionSpec())
            value = jax.device_put(
                np.broadcast_to(np.asarray(v, np.float32)[None],
                                (m,) + tuple(v.shape)), layout)
            replicated.append(keras.Variable(value, trainable=False,
                                             name=f"replicated_{i}",
                                             layout=layout))
    decays = np.asarray(keras_ema.DEFAULT_DECAYS, np.float32)
    configs = {
        "replicated": (replicated, _backend.make_ema_update(replicated, variables)),
        "sharded": (sharded, _backend.make_ema_update(sharded, variables)),
    }

    def sync(flag):
        jax.block_until_ready(flag)

    totals = {name: 0.0 for name in configs}
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            update = configs[name][1]
            totals[name] += median_time(lambda: update(decays), sync, args.reps)
    params = sum(int(np.prod(v.shape)) for v in variables)
    print(f"\nUpdate of {m} EMAs of an MLP ({params / 1e6:.1f}M parameters, "
          f"{args.layers} Dense {args.width}x{args.width} kernels split 4 ways "
          f"on a (2, 4) mesh of 8 faked CPU devices), median of {args.reps} "
          f"calls x {args.rounds} alternated rounds:")
    print(f"  {'shadows':12s} {'ms/update':>10s} {'MB on device 0':>15s} "
          f"{'gathers':>8s}")
    for name, (shadows, update) in configs.items():
        mb = sum(shard.data.nbytes for s in shadows
                 for shard in s.value.addressable_shards
                 if str(shard.device) == str(jax.devices()[0])) / 1e6
        gathers = len(re.findall(r"\ball-gather(?:-start)?\(",
                                 update.compiled_text()))
        per = totals[name] / args.rounds
        print(f"  {name:12s} {per * 1e3:10.2f} {mb:15.1f} {gathers:8d}")
    base = totals["replicated"]
    print(f"  sharded / replicated time: {totals['sharded'] / base:.3f}")


def bench_host(args):
    import zoo.models

    def build():
        keras.utils.set_random_seed(0)
        model = zoo.models.get_model("resnet18", 10, (args.image_size, args.image_size, 3),
                              width=args.width)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    steps = args.steps + args.skip + 1
    rng = np.random.default_rng(0)
    n = args.batch_size * steps
    x = rng.normal(size=(n, args.image_size, args.image_size, 3)).astype("float32")
    y = rng.integers(0, 10, size=(n,))
    configs = {
        # One callback per configuration, reused: later fit() calls continue
        # its EMAs, so the compiled update is traced once, in the warm-up.
        "plain fit": (build(), []),
        "MultiEMA(5, period 16)": (build(), [
            keras_ema.MultiEMA(period=16, verbose=0)]),
        "MultiEMA(5, period 16), cpu": (build(), [
            keras_ema.MultiEMA(period=16, verbose=0, shadow_device="cpu")]),
    }

    def time_fit(model, callbacks):
        timer = StepTimer(args.skip)
        model.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=False,
                  verbose=0, callbacks=callbacks + [timer])
        return timer.total()

    totals = {name: [0.0, 0] for name in configs}
    for model, callbacks in configs.values():  # compile and warm up
        time_fit(model, callbacks)
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            seconds, count = time_fit(*configs[name])
            totals[name][0] += seconds
            totals[name][1] += count
    base = totals["plain fit"][0] / totals["plain fit"][1]
    print(f"\nStep time, resnet18 width {args.width}, batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size} inputs, {args.rounds} alternated "
          f"rounds of {args.steps} steps, backend {keras.backend.backend()}:")
    print(f"  {'configuration':30s} {'ms/step':>9s} {'ratio':>8s}")
    for name, (seconds, count) in totals.items():
        per = seconds / count
        print(f"  {name:30s} {per * 1e3:9.1f} {per / base:8.4f}")
    decays = np.asarray(keras_ema.DEFAULT_DECAYS, np.float32)
    times = {}
    for name in ("MultiEMA(5, period 16)", "MultiEMA(5, period 16), cpu"):
        ema = configs[name][1][0]
        ema.model  # on JAX, attaches the training state to the variables
        times[name] = median_time(
            lambda: ema._update(decays),
            lambda flag: keras.ops.convert_to_numpy(flag), args.reps)
    beside, host = times.values()
    print(f"  update alone, to completion: beside the weights {beside * 1e3:.1f} "
          f"ms, cpu {host * 1e3:.1f} ms, ratio {host / beside:.2f}")
    # The same cost spread over its 16 steps: robust to a shared machine's
    # noise, which the step times above are not.
    print(f"  update / 16 / plain step: beside the weights "
          f"{beside / 16 / base:.4f}, cpu {host / 16 / base:.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["sharded", "host"])
    parser.add_argument("--width", type=float, default=None,
                        help="MLP width (sharded, default 1024) or ResNet-18 "
                        "width multiplier (host, default 1.0)")
    parser.add_argument("--layers", type=int, default=4, help="sharded: Dense layers")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32,
                        help="host: timed steps per configuration and round")
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10,
                        help="timed update calls per configuration and round")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="MultiEMA: the run has")
    if args.part == "sharded":
        args.width = int(args.width or 1024)
        bench_sharded(args)
    else:
        args.width = args.width or 1.0
        bench_host(args)


if __name__ == "__main__":
    _cli.main_of(main)()
