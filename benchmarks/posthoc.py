"""Post-hoc EMA synthesis: time and peak memory against model size and snapshots.

    python benchmarks/posthoc.py                    # 1M, 4M, 10M parameters x 8, 32 snapshots
    python benchmarks/posthoc.py --params=4 --snapshots=20 --decays=2

Writes synthetic snapshots (as MultiEMA does: decays 0.99 and 0.999, float32,
one update per step without warm-up, a snapshot every 50 steps) into a temporary directory, then for
each case prints:

- read: seconds to read every stored array once (np.load, page cache warm);
- synth: seconds of `keras_ema.posthoc.synthesize` for an untracked EMA
  (solve + streaming combination), and its ratio to `read`;
- peak: peak Python/numpy memory of the synthesis (tracemalloc) in model
  copies (model = parameters x 4 bytes).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _cli  # noqa: E402

if __name__ == "__main__":  # Ctrl-C, SIGTERM: one line, also while Keras imports
    _cli.handle_interrupts(f"benchmarks/{os.path.basename(__file__)}")

from keras_ema import posthoc  # noqa: E402

EVERY = 50


def write(directory, params, snapshots, decays):
    rng = np.random.default_rng(0)
    # 20 variables of equal size, as a model's layers.
    shapes = [(params // 20,)] * 20
    d = np.array(decays)
    steps, log = [], []
    for t in range(snapshots * EVERY):
        steps.append(t + 1)
        log.append([float(x) for x in d])
        if (t + 1) % EVERY == 0:
            shadows = [rng.standard_normal((len(d),) + s, dtype=np.float32) for s in shapes]
            meta = {"decays": list(decays), "period": 1, "warmup": False,
                    "paths": [f"v{j}" for j in range(len(shapes))],
                    "log": {"start": 0, "steps": list(steps), "decays": [list(x) for x in log]}}
            posthoc.write_snapshot(directory, t + 1, shadows, meta)


def read_once(directory):
    total = 0.0
    for _, path in posthoc.list_snapshots(directory):
        with np.load(path) as data:
            for key in data.files:
                if key.startswith("s"):
                    total += float(data[key][0, 0])
    return total


def case(params_m, snapshots, decays):
    directory = tempfile.mkdtemp(prefix="posthoc_bench_")
    try:
        params = int(params_m * 1_000_000)
        write(directory, params, snapshots, decays)
        read_once(directory)  # warm the page cache
        t0 = time.perf_counter()
        read_once(directory)
        read = time.perf_counter() - t0
        target = posthoc.EMAProfile(0.995, warmup=False)  # between the decays
        tracemalloc.start()
        t0 = time.perf_counter()
        _, report = posthoc.synthesize(directory, target, max_error=None)
        synth = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # Time again without tracemalloc's overhead.
        t0 = time.perf_counter()
        posthoc.synthesize(directory, target, max_error=None)
        synth = min(synth, time.perf_counter() - t0)
        model = params * 4
        disk = sum(os.path.getsize(p) for _, p in posthoc.list_snapshots(directory))
        print(f"{params_m:5g}M params  {snapshots:3d} snapshots x {len(decays)} decays "
              f"({disk / 2**20:7.0f} MiB)  read {read:6.2f} s  synth {synth:6.2f} s "
              f"(x{synth / read:4.2f})  peak {peak / model:4.2f} model copies  "
              f"profile error {report.profile_error:.1e}", flush=True)
    finally:
        shutil.rmtree(directory)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="*", default=[1, 4, 10],
                        help="model sizes in millions of parameters")
    parser.add_argument("--snapshots", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--decays", type=int, default=2, help="EMAs per snapshot")
    args = parser.parse_args()
    decays = [0.99, 0.999, 0.9, 0.9995, 0.9999][: args.decays]
    for p in args.params:
        for s in args.snapshots:
            case(p, s, decays)


if __name__ == "__main__":
    _cli.main_of(main)()
