"""MultiEMA in a few lines: five EMAs of a small network on the digits data."""

import keras
import numpy as np
from sklearn.datasets import load_digits

import keras_ema

keras.utils.set_random_seed(0)
digits = load_digits()
x = (digits.images[..., None] / 16.0).astype("float32")
y = digits.target.astype("int32")
order = np.random.default_rng(0).permutation(len(x))
train, val = order[:1400], order[1400:]

model = keras.Sequential([
    keras.Input((8, 8, 1)),
    keras.layers.Conv2D(16, 3, padding="same"),
    keras.layers.BatchNormalization(),
    keras.layers.ReLU(),
    keras.layers.GlobalAveragePooling2D(),
    keras.layers.Dense(10),
])
model.compile(
    optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
# A short run: period 1 and small decays (the paper's 0.968-0.998 at period 16
# assume ~78k optimizer steps).
ema = keras_ema.MultiEMA(decays=(0.9, 0.95, 0.98), period=1,
                         validation_data=(x[val], y[val]))
model.fit(x[train], y[train], batch_size=32, epochs=5, verbose=2, callbacks=[ema])
# ema.best counts epochs from 0; the progress bar above shows epoch e as e+1.
for decay in ema.decays:
    best = ema.best[decay]
    print(f"EMA {decay}: best val accuracy {best['accuracy']['value']:.3f} "
          f"(epoch {best['accuracy']['epoch']}), lowest val loss "
          f"{best['loss']['value']:.3f} (epoch {best['loss']['epoch']})")
