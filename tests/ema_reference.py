"""Numpy references for the EMA tests, written independently of keras_ema,
and the small model, data and callbacks those tests share."""

import zipfile

import keras
import numpy as np


def reference_decay(alpha, t, warmup):
    """The decay of the update made right after 0-based optimizer step t."""
    return min(alpha, (t + 1) / (t + 10)) if warmup else alpha


def crossed_steps(previous, step, period):
    """0-based steps t after which an update is due, moving previous -> step."""
    return [m * period - 1 for m in range(previous // period + 1,
                                          step // period + 1)]


class ReferenceEMA:
    """EMAs in float64 of a list of arrays, one per decay."""

    def __init__(self, weights, decays, period, warmup, step=0):
        self.decays = decays
        self.period = period
        self.warmup = warmup
        self.step = step
        self.shadows = [[np.array(w, np.float64) for w in weights]
                        for _ in decays]

    def advance(self, step, weights, after_update=None):
        """Moves to `step`, updating with `weights` at each crossed multiple.

        `after_update(shadows, weights)`, if given, runs after each single
        update and returns the weights for the next one of the same batch
        end; `advance` returns the last weights.
        """
        for t in crossed_steps(self.step, step, self.period):
            for k, alpha in enumerate(self.decays):
                a = reference_decay(alpha, t, self.warmup)
                self.shadows[k] = [a * s + (1 - a) * np.asarray(w, np.float64)
                                   for s, w in zip(self.shadows[k], weights)]
            if after_update is not None:
                weights = after_update(self.shadows, weights)
        self.step = step
        return weights


def reference_ema(records, decays, period, warmup, averaged):
    """Numpy EMAs over the recorded trajectory; `averaged[j]` says if weight j is."""
    ref = ReferenceEMA(records[0][1], decays, period, warmup, records[0][0])
    for step, weights in records[1:]:
        ref.advance(step, weights)
    final = records[-1][1]
    return [
        [s if averaged[j] else final[j] for j, s in enumerate(per_decay)]
        for per_decay in ref.shadows
    ]


class Recorder(keras.callbacks.Callback):
    """Records (optimizer step, all weights) at the start and after each batch."""

    def on_train_begin(self, logs=None):
        self.records = [(self._step(), self.model.get_weights())]

    def on_train_batch_end(self, batch, logs=None):
        self.records.append((self._step(), self.model.get_weights()))

    def _step(self):
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))


def tiny_model(steps_per_execution=1, accumulation=None, loss_scale=False):
    """Dense -> BatchNorm -> ReLU -> Dense on 4 features, 3 classes, SGD.

    `accumulation` sets SGD's `gradient_accumulation_steps`; `loss_scale`
    wraps SGD in a `LossScaleOptimizer`.
    """
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="d1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(3, name="d2")(x)
    model = keras.Model(inputs, outputs)
    optimizer = keras.optimizers.SGD(
        0.1, momentum=0.9, gradient_accumulation_steps=accumulation
    )
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def data(n=40, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.integers(0, 3, size=(n,)).astype("int32")
    return x, y


class StopAtEpoch(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at the start of `epoch`, as a kill would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt("simulated kill")


def flip_middle_bytes(path, member="s0.npy"):
    """Flips 16 bytes in the middle of one stored array of a snapshot."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    with open(path, "r+b") as f:
        middle = info.header_offset + 200 + info.compress_size // 2
        f.seek(middle)
        chunk = f.read(16)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in chunk))
