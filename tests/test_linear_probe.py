"""linear_probe on tiny backbones and separable data."""

import keras
import numpy as np
import pytest

import zoo.models
from keras_ema.linear_probe import feature_extractor
from keras_ema.linear_probe import linear_probe

pytestmark = pytest.mark.all_backends

NUM_CLASSES = 3


def backbone(dead_classifier=True):
    """Input(4) -> Dense(8, "features") -> Dense(3, "classifier") -> softmax.

    The classifier's kernel and bias are zero, so its output carries no
    information: a probe of the wrong layer (the output instead of the
    classifier's input) scores chance, about 1/3.
    """
    inputs = keras.Input((4,))
    features = keras.layers.Dense(8, name="features")(inputs)
    logits = keras.layers.Dense(NUM_CLASSES, name="classifier")(features)
    outputs = keras.layers.Softmax(name="softmax")(logits)
    model = keras.Model(inputs, outputs)
    if dead_classifier:
        model.get_layer("classifier").set_weights(
            [np.zeros((8, NUM_CLASSES), "float32"),
             np.zeros(NUM_CLASSES, "float32")])
    return model


def blobs(n, seed, dim=4, spread=0.4):
    """Three Gaussian blobs around 0, 3 e_1 and 3 e_2: linearly separable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, size=n)
    centers = np.zeros((NUM_CLASSES, dim))
    centers[1, 0] = centers[2, 1] = 3.0
    x = centers[y] + rng.normal(scale=spread, size=(n, dim))
    return x.astype("float32"), y.astype("int32")


def weights(model):
    return [np.array(w) for w in model.get_weights()]


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_feature_extractor_outputs_the_classifier_input(kind):
    if kind == "functional":
        model = backbone()
    else:
        model = keras.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(8, name="features"),
            keras.layers.Dense(NUM_CLASSES, name="classifier"),
        ])
    x, _ = blobs(10, seed=0)
    kernel, bias = model.get_layer("features").get_weights()
    expected = x.astype(np.float64) @ kernel + bias  # numpy: Dense "features"
    got = keras.ops.convert_to_numpy(feature_extractor(model)(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_probe_learns_separable_classes_and_leaves_the_backbone_alone():
    model = backbone()
    before = weights(model)
    train, test = blobs(384, seed=1), blobs(150, seed=2)
    accuracy = linear_probe(model, train, test, epochs=5, batch_size=64,
                            learning_rate=0.05)
    assert accuracy >= 0.95
    # The backbone's own predictions are chance (its classifier is zero).
    predicted = np.argmax(model.predict(test[0], verbose=0), axis=1)
    assert np.mean(predicted == test[1]) < 0.6
    for a, b in zip(weights(model), before):
        np.testing.assert_array_equal(a, b)


def test_probe_is_repeatable_and_accepts_batches_and_one_hot_labels():
    model = backbone()
    (x, y), test = blobs(256, seed=3), blobs(90, seed=4)
    # Few epochs, a small learning rate: accuracy below 1, so the comparison
    # of two runs means something.
    kwargs = dict(epochs=1, batch_size=32, learning_rate=0.002, momentum=0.0,
                  seed=5)
    first = linear_probe(model, (x, y), test, **kwargs)
    again = linear_probe(model, (x, y), test, **kwargs)
    assert first == again

    def batches():
        for start in range(0, x.shape[0], 32):
            yield x[start:start + 32], np.eye(NUM_CLASSES)[y[start:start + 32]]

    assert linear_probe(model, batches(), test, **kwargs) == first


def test_zoo_resnet_backbone():
    model = zoo.models.get_model("resnet18", num_classes=10, input_shape=(8, 8, 3),
                          width=0.0625)
    before = weights(model)
    rng = np.random.default_rng(6)
    # Two classes differing in the mean colour: separable after global
    # average pooling of a random network with high probability; the margin
    # is large.
    y = rng.integers(0, 2, size=96)
    x = rng.normal(scale=0.1, size=(96, 8, 8, 3)) + np.where(
        y[:, None, None, None] == 1, 2.0, -2.0)
    x = x.astype("float32")
    accuracy = linear_probe(model, (x[:64], y[:64]), (x[64:], y[64:]),
                            epochs=10, batch_size=32, learning_rate=0.1)
    assert accuracy >= 0.9
    for a, b in zip(weights(model), before):
        np.testing.assert_array_equal(a, b)


def test_backbone_without_classifier_is_refused():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, name="head")(
        keras.layers.Dense(8)(inputs))
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match="'classifier'") as info:
        linear_probe(model, blobs(10, 0), blobs(10, 1), epochs=1)
    assert "\n" not in str(info.value)
    assert "pass its name as `feature_layer`" in str(info.value)


def test_feature_layer_names_another_classifier():
    inputs = keras.Input((4,))
    features = keras.layers.Dense(8, name="features")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(features))
    # A zero head: a probe of its output instead of its input scores chance.
    model.get_layer("head").set_weights(
        [np.zeros((8, 3), "float32"), np.zeros(3, "float32")])
    x, _ = blobs(10, seed=0)
    kernel, bias = model.get_layer("features").get_weights()
    expected = x.astype(np.float64) @ kernel + bias  # numpy: Dense "features"
    got = keras.ops.convert_to_numpy(feature_extractor(model, "head")(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    accuracy = linear_probe(model, blobs(384, seed=1), blobs(150, seed=2),
                            epochs=5, batch_size=64, learning_rate=0.05,
                            feature_layer="head")
    assert accuracy >= 0.95


def test_subclassed_backbone_is_refused():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.features = keras.layers.Dense(8)
            self.classifier = keras.layers.Dense(3, name="classifier")

        def call(self, x):
            return self.classifier(self.features(x))

    model = Subclassed()
    model(np.zeros((2, 4), "float32"))
    with pytest.raises(ValueError, match="functional"):
        linear_probe(model, blobs(10, 0), blobs(10, 1), epochs=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epochs=0), "epochs=0"),
        (dict(epochs=1.5), "epochs=1.5"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(learning_rate=0.0), "learning_rate=0.0"),
        (dict(learning_rate="fast"), "learning_rate='fast'"),
        (dict(momentum=1.0), "momentum=1.0"),
        (dict(momentum=None), "momentum=None"),
        (dict(train_data=(np.zeros((4, 4), "float32"),)), "train_data"),
        (dict(train_data=5), "train_data"),
        (dict(test_data=(np.zeros((4, 4), "float32"), np.zeros(3))),
         "test_data"),
        (dict(backbone="resnet"), "backbone"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(backbone=backbone(), train_data=blobs(8, 0),
                test_data=blobs(8, 1), epochs=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as info:
        linear_probe(**args)
    assert "\n" not in str(info.value)
