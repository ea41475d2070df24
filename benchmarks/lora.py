"""What MultiEMA keeps and costs for a LoRA fine-tune of a keras-hub backbone.

Builds one small keras-hub BERT classifier twice from constructor arguments
(random weights, nothing downloaded): fully trainable, and with
`backbone.enable_lora(rank)`. Each is trained a few steps with MultiEMA,
then prints

- the bytes of the model, of its trainable weights and of the EMAs
  (goal: EMA bytes = number of decays x trainable bytes, nothing for the
  frozen base);
- the time of one EMA update (all decays, one compiled call), LoRA against
  fully trainable, the two alternated round by round in this one process so
  that drifts in machine speed hit them alike.

    python benchmarks/lora.py                       # TensorFlow
    KERAS_BACKEND=jax python benchmarks/lora.py     # JAX
"""

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402


def nbytes(arrays):
    return sum(int(np.prod(a.shape)) * np.dtype(str(a.dtype)).itemsize
               for a in arrays)


def build(args, lora):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=args.vocabulary, num_layers=args.layers, num_heads=2,
        hidden_dim=args.hidden, intermediate_dim=2 * args.hidden,
        max_sequence_length=args.sequence)
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2,
                                                preprocessor=None)
    if lora:
        backbone.enable_lora(rank=args.rank)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    n = 8 * args.batch
    x = {"token_ids": rng.integers(0, args.vocabulary, (n, args.sequence)).astype("int32"),
         "segment_ids": np.zeros((n, args.sequence), "int32"),
         "padding_mask": np.ones((n, args.sequence), "int32")}
    y = rng.integers(0, 2, n).astype("int32")
    ema = keras_ema.MultiEMA(period=16, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, callbacks=[ema])
    return model, ema


def time_update(ema, repeats):
    decays = np.asarray(ema.decays, np.float32)
    start = time.perf_counter()
    for _ in range(repeats):
        flag = ema._update(decays)
    keras.ops.convert_to_numpy(flag)  # wait for the last one
    keras.ops.convert_to_numpy(ema._shadows[0])
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocabulary", type=int, default=2000)
    parser.add_argument("--sequence", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    runs = {name: build(args, lora) for name, lora in (("full", False), ("lora", True))}
    print(f"keras-hub BERT, {args.layers} layers, hidden {args.hidden}, "
          f"vocabulary {args.vocabulary}; LoRA rank {args.rank}; "
          f"MultiEMA with {len(keras_ema.DEFAULT_DECAYS)} decays; "
          f"backend {keras.backend.backend()}")
    for name, (model, ema) in runs.items():
        total = nbytes(model.weights)
        trainable = nbytes(model.trainable_weights)
        shadows = nbytes(ema._shadows)
        print(f"  {name:4s}: model {total / 1024:9.1f} KiB, trainable "
              f"{trainable / 1024:9.1f} KiB, EMAs {shadows / 1024:9.1f} KiB = "
              f"{shadows / trainable:.2f} x trainable = "
              f"{shadows / total:.3f} x model")
    for _, ema in runs.values():
        time_update(ema, 3)  # compile
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (_, ema) in runs.items():
            times[name].append(time_update(ema, args.repeats))
    full, lora = (float(np.median(times[n])) for n in ("full", "lora"))
    print(f"  one EMA update (median of {args.rounds} rounds of "
          f"{args.repeats}): full {full * 1e6:.0f} us, LoRA {lora * 1e6:.0f} us, "
          f"LoRA / full = {lora / full:.3f}")


if __name__ == "__main__":
    main()
