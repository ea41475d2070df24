"""A LoRA fine-tune of a keras-hub backbone with MultiEMA, offline, in a CPU minute.

A small BERT (random weights standing in for a preset, which would need a
download) is fine-tuned with rank-4 LoRA on a synthetic sentiment task:
does a sentence hold more "good" words than "bad" ones? Its tokenizer reads
a vocabulary written here. MultiEMA keeps three EMAs of what LoRA trains
(the adapters and the classifier's head) and nothing of the frozen base;
the live and EMA validation metrics are printed per epoch. Then the EMA of
the adapters is written as a keras-hub LoRA file, and a fresh backbone that
loads it (with the EMA head) scores what the EMA did.

    python examples/finetune_lora.py [OUTPUT_DIR]      # default: lora_out/
"""

import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "lora_out"
os.makedirs(out, exist_ok=True)
keras.utils.set_random_seed(0)

GOOD = ["good", "great", "fine", "nice", "happy"]
BAD = ["bad", "awful", "poor", "sad", "ugly"]
OTHER = ["the", "a", "film", "day", "food", "was", "and", "very", "it", "is"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + GOOD + BAD + OTHER


def sentences(n, seed):
    """Sentences of 6-10 words; label 1 when good words outnumber bad ones."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    while len(texts) < n:
        words = list(rng.choice(OTHER, rng.integers(4, 7)))
        good, bad = rng.integers(0, 4), rng.integers(0, 4)
        if good == bad:
            continue
        words += list(rng.choice(GOOD, good)) + list(rng.choice(BAD, bad))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(int(good > bad))
    return np.array(texts), np.array(labels, "int32")


def make_backbone():
    return keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB), num_layers=2, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=16, dropout=0.0)


tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCAB, lowercase=True)
preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
    tokenizer, sequence_length=16)
x_train, y_train = sentences(1600, seed=1)
x_val, y_val = sentences(400, seed=2)

backbone = make_backbone()
base = os.path.join(out, "base.weights.h5")
backbone.save_weights(base)  # the "pretrained" base a fresh backbone loads
classifier = keras_hub.models.BertTextClassifier(
    backbone, num_classes=2, preprocessor=preprocessor, dropout=0.0)
backbone.enable_lora(rank=4)
# enable_lora leaves the LoRA layers' biases trainable; keras-hub's LoRA file
# holds the LoRA factors only, so freeze them for the file to be the model.
for v in backbone.trainable_weights:
    if "lora_kernel" not in v.path:
        v.trainable = False
classifier.compile(
    optimizer=keras.optimizers.Adam(0.01),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"])

# A short run: period 1 and decays whose warm-ups end within its 300
# optimizer steps (0.95: step 171).
ema = keras_ema.MultiEMA(decays=(0.8, 0.9, 0.95), period=1, verbose=0,
                         validation_data=(x_val, y_val))
with warnings.catch_warnings():
    # keras-hub's preprocessor hands fit a tf.data pipeline: Keras says its
    # `shuffle` is ignored (keras-hub shuffles it itself).
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
    history = classifier.fit(x_train, y_train, batch_size=32, epochs=6,
                             validation_data=(x_val, y_val), verbose=0,
                             callbacks=[ema])

trainable = sum(int(np.prod(v.shape)) for v in classifier.trainable_weights)
total = sum(int(np.prod(v.shape)) for v in classifier.weights)
shadow = sum(int(np.prod(s.shape)) for s in ema._shadows)
print(f"trainable {trainable} of {total} weights (LoRA + head); "
      f"EMAs hold {shadow} = {shadow / trainable:.0f} x trainable")
h = history.history
print("epoch  live acc  loss   | " + " | ".join(
    f"EMA {d} acc  loss " for d in ema.decays))
for e in range(len(h["val_loss"])):
    row = f"{e:5d}  {h['val_accuracy'][e]:.3f}  {h['val_loss'][e]:.4f} | "
    row += " | ".join(f"{h[f'ema_{d}_val_accuracy'][e]:.3f}  "
                      f"{h[f'ema_{d}_val_loss'][e]:.4f}" for d in ema.decays)
    print(row)

decay = min(ema.decays, key=lambda d: ema.best[d]["loss"]["value"])
adapter = ema.save_lora_weights(decay, os.path.join(out, f"ema_{decay}.lora.h5"))
head = os.path.join(out, f"ema_{decay}_head.npz")
with ema.swapped_in(decay):
    np.savez(head, *classifier.get_layer("logits").get_weights())
print(f"wrote {adapter} ({os.path.getsize(adapter)} bytes) and {head}; "
      f"lowest EMA validation loss: decay {decay}")

# A fresh backbone: the base, then the EMA adapters and the EMA head.
fresh = make_backbone()
fresh.load_weights(base)
fresh.load_lora_weights(adapter)
reloaded = keras_hub.models.BertTextClassifier(
    fresh, num_classes=2, preprocessor=preprocessor, dropout=0.0)
with np.load(head) as f:
    reloaded.get_layer("logits").set_weights([f["arr_0"], f["arr_1"]])
reloaded.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["accuracy"])
scores = reloaded.evaluate(x_val, y_val, verbose=0, return_dict=True)
print(f"fresh backbone + EMA adapter file: val accuracy "
      f"{scores['accuracy']:.3f}, loss {scores['loss']:.4f} (EMA {decay} at "
      f"the last epoch: {h[f'ema_{decay}_val_accuracy'][-1]:.3f}, "
      f"{h[f'ema_{decay}_val_loss'][-1]:.4f})")
