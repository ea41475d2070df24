"""ArrayLoader's images/s against the algorithm it replaced, side by side.

CIFAR-shaped batches (32x32x3 uint8, batch 128, shuffled, random crop with
4 pixels of padding, horizontal flip, per-channel normalization in float32).
The reference below is the earlier algorithm, kept verbatim: a per-pixel
gather for the crop and the flip, then normalization by broadcasting a
(channels,) vector. Rounds alternate between the two so that drifts in
machine speed hit both alike; every batch of the current loader is checked
bit for bit against the reference's.

Goal: at least 4x the reference's images/s.

    python benchmarks/loader.py                 # 50,000 images, 5 rounds of 40 batches
    python benchmarks/loader.py --quick         # 2,000 images, 2 rounds of 8 batches
    python benchmarks/loader.py --workers 2     # also through a PyDataset with 2 workers
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

# zoo/ is the repository's kit, not installed: import it from this checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zoo.data.loader import ArrayLoader  # noqa: E402

MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)


def reference_batch(loader, index):
    """The earlier `ArrayLoader.__getitem__` (augmenting, shuffled)."""
    epoch = loader.epoch
    start = index * loader.batch_size
    stop = min(start + loader.batch_size, len(loader.x))
    rows = np.random.default_rng([loader.seed, epoch]).permutation(
        len(loader.x))[start:stop]
    x, y = loader.x[rows], loader.y[rows]
    rng = np.random.default_rng([loader.seed, epoch, index])
    pad = loader.PAD
    n, height, width, _ = x.shape
    top = rng.integers(0, 2 * pad + 1, size=n)
    left = rng.integers(0, 2 * pad + 1, size=n)
    flip = rng.random(n) < 0.5
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    r = top[:, None] + np.arange(height)
    c = left[:, None] + np.arange(width)
    c = np.where(flip[:, None], c[:, ::-1], c)
    x = padded[np.arange(n)[:, None, None], r[:, :, None], c[:, None, :]]
    x = x.astype(np.float32)
    x *= loader._scale
    x -= loader._shift
    return x, y


def rate(fetch, batches, batch_size):
    start = time.perf_counter()
    for index in range(batches):
        fetch(index)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2,000 images, 2 rounds of 8 batches")
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=40,
                        help="batches per round and loader")
    parser.add_argument("--workers", type=int, default=0,
                        help="also time the loader through keras' PyDataset "
                             "with this many worker threads")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.batches = 2_000, 2, 8
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, args.images).astype(np.int32)
    loader = ArrayLoader(x, y, args.batch_size, MEAN, STD, shuffle=True,
                         augment=True, seed=0)
    batches = min(args.batches, len(loader))
    for index in range(batches):
        got, want = loader[index], reference_batch(loader, index)
        if not (np.array_equal(got[0].view(np.uint32), want[0].view(np.uint32))
                and np.array_equal(got[1], want[1])):
            sys.exit(f"batch {index}: ArrayLoader differs from the reference")
    old, new = [], []
    for _ in range(args.rounds):
        old.append(rate(lambda i: reference_batch(loader, i), batches,
                        args.batch_size))
        new.append(rate(loader.__getitem__, batches, args.batch_size))
    old, new = np.median(old), np.median(new)
    print(f"{args.images} CIFAR-shaped images, batch {args.batch_size}, crop "
          f"pad 4 + flip + normalize, {os.cpu_count()} CPU(s); "
          f"median of {args.rounds} rounds of {batches} batches")
    print(f"{'loader':<34}{'images/s':>10}{'ratio':>8}")
    print(f"{'reference (earlier algorithm)':<34}{old:>10.0f}{1.0:>8.2f}")
    print(f"{'ArrayLoader':<34}{new:>10.0f}{new / old:>8.2f}")
    if args.workers:
        threaded = ArrayLoader(x, y, args.batch_size, MEAN, STD, shuffle=True,
                               augment=True, seed=0, workers=args.workers)
        threaded.on_epoch_begin()
        iterator = iter(threaded)
        next(iterator)  # Starts the workers.
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        fast = batches * args.batch_size / (time.perf_counter() - start)
        print(f"{f'ArrayLoader, {args.workers} worker threads':<34}"
              f"{fast:>10.0f}{fast / old:>8.2f}")
    print("batches bit-identical to the reference: yes")
    return new


if __name__ == "__main__":
    main()
