"""Linear probe: a linear classifier trained on a frozen backbone's features."""

import keras
import numpy as np

from keras_ema.checks import as_float
from keras_ema.checks import check_fraction
from keras_ema.checks import check_int
from keras_ema.checks import numpy_if_tf

CLASSIFIER_NAME = "classifier"


def feature_extractor(
    backbone: keras.Model, feature_layer: str = CLASSIFIER_NAME
) -> keras.Model:
    """A model from `backbone`'s inputs to the input of its classifier.

    The classifier is the layer named `feature_layer`, by default
    `"classifier"` (the zoo models' final `Dense`); a backbone without it is
    refused. The new model shares the backbone's layers and variables.

    Args:
        backbone: `keras.Model`. A functional model (including the zoo's
            `ResNet`, `WideResNet` and `VGG`) or a built `Sequential`.
        feature_layer: str. The name of the layer whose input are the
            features (the classifier). Defaults to `"classifier"`.

    Returns:
        A functional `keras.Model` whose output is the classifier's input.
    """
    if not isinstance(backbone, keras.Model):
        raise ValueError(
            "Invalid value for argument `backbone`: expected a keras.Model. "
            f"Received: {type(backbone).__name__}"
        )
    names = [layer.name for layer in backbone.layers]
    if feature_layer not in names:
        raise ValueError(
            f"Model {backbone.name} has no layer named {feature_layer!r}: "
            "the features probed are that layer's input. Name the final "
            f"Dense layer {CLASSIFIER_NAME!r} (as the zoo models do) or pass "
            f"its name as `feature_layer`. Received: feature_layer="
            f"{feature_layer!r}; the last layers are {names[-3:]}."
        )
    classifier = backbone.get_layer(feature_layer)
    try:
        try:
            # A functional model's `input` keeps the structure it was built
            # with (one tensor, not a list of one, which Keras warns about
            # when called with one array).
            inputs = backbone.input
        except AttributeError:  # a Sequential keeps its graph inside
            inputs = backbone.inputs
            if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
                inputs = inputs[0]
        return keras.Model(inputs, classifier.input)
    except (AttributeError, ValueError, TypeError):
        raise ValueError(
            f"Cannot read the features of model {backbone.name}: the input of "
            f"its layer {classifier.name!r} is not part of a functional graph. "
            "Pass a functional or built Sequential model."
        ) from None


def _labels(y):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        return y.argmax(axis=1)
    return y.reshape(-1).astype(np.int64)


def _features(extractor, data, batch_size, name):
    """(features, labels) of `data`: flattened float32 features, int labels."""
    if isinstance(data, tuple):
        if len(data) < 2:
            raise ValueError(
                f"Invalid value for argument `{name}`: expected a tuple "
                f"(x, y). Received a tuple of {len(data)} elements."
            )
        x, y = data[0], data[1]
        features = extractor.predict(x, batch_size=batch_size, verbose=0)
        labels = _labels(y)
    else:
        try:
            iterator = iter(data)
        except TypeError:
            raise ValueError(
                f"Invalid value for argument `{name}`: expected a tuple "
                "(x, y), a tf.data.Dataset or a keras.utils.PyDataset of "
                f"(x, y) batches. Received: {type(data).__name__}"
            ) from None
        features, labels = [], []
        for batch in iterator:
            if not isinstance(batch, tuple) or len(batch) < 2:
                raise ValueError(
                    f"Invalid value for argument `{name}`: every batch must "
                    "be a tuple (x, y)."
                )
            x = keras.tree.map_structure(numpy_if_tf, batch[0])
            features.append(keras.ops.convert_to_numpy(
                extractor.predict_on_batch(x)
            ))
            labels.append(_labels(batch[1]))
        if not features:
            raise ValueError(f"Received no batches in `{name}`.")
        features, labels = np.concatenate(features), np.concatenate(labels)
    features = np.asarray(features, np.float32)
    features = features.reshape(features.shape[0], -1)
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"Invalid value for argument `{name}`: {features.shape[0]} inputs "
            f"but {labels.shape[0]} labels."
        )
    return features, labels


class _ShuffledEpochs(keras.utils.PyDataset):
    """All `epochs` epochs as one sequence of batches, each epoch reshuffled.

    Batch `i` belongs to epoch `i // batches_per_epoch`, whose order is
    drawn from `default_rng([seed, epoch])`: the batches depend on their index
    only, so the result does not depend on when the fit loop asks for them.
    """

    def __init__(self, x, y, batch_size, epochs, seed):
        super().__init__()
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.per_epoch = -(-x.shape[0] // batch_size)
        self.epochs = epochs
        self.seed = seed
        self._orders = {}

    @property
    def num_batches(self):
        return self.per_epoch * self.epochs

    def __getitem__(self, index):
        epoch, i = divmod(index, self.per_epoch)
        order = self._orders.get(epoch)
        if order is None:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.x.shape[0])
            self._orders = {epoch: order}  # batches come in order: keep one
        rows = order[i * self.batch_size:(i + 1) * self.batch_size]
        return self.x[rows], self.y[rows]


def linear_probe(
    backbone: keras.Model,
    train_data,
    test_data,
    epochs: int = 50,
    batch_size: int = 128,
    learning_rate: float = 0.01,
    momentum: float = 0.9,
    seed: int = 0,
    verbose: int = 0,
    feature_layer: str = CLASSIFIER_NAME,
) -> float:
    """Test accuracy of a linear classifier trained on frozen features.

    The transfer evaluation of the paper (Table 4): the backbone is every
    layer but the classifier, the layer named `"classifier"` (the zoo
    models' final `Dense`); a model whose classifier has another name needs
    `feature_layer=` that name (see `feature_extractor`). Its features are
    computed once, in inference mode (BatchNorm uses its moving statistics,
    dropout is off), for the train and the test data; then a linear layer
    (`Dense(num_classes)`, softmax cross-entropy on its logits) is trained
    on the train features for `epochs` epochs with SGD and Nesterov
    momentum, a constant learning rate, no weight decay and no warm-up, and
    evaluated on the test features. The backbone is not modified.

    The number of classes is one more than the largest label of train and
    test. The head starts from Glorot-uniform weights seeded with `seed`, and
    each epoch visits the train features in an order drawn from
    `numpy.random.default_rng([seed, epoch])`, so a call is repeatable. The
    epochs run as one `fit` call over `epochs` times as many batches.

    Args:
        backbone: `keras.Model`. A functional model or built `Sequential`
            with a layer named `feature_layer` (`"classifier"` unless
            given), whose input are the features (the zoo models qualify).
        train_data: tuple `(x, y)` of arrays, or a `tf.data.Dataset`,
            `keras.utils.PyDataset` or iterable of `(x, y)` batches. Labels
            are integers (or one-hot rows).
        test_data: the test data, in the same forms.
        epochs: int >= 1. Training epochs of the linear layer. Defaults to
            `50`.
        batch_size: int >= 1. Batch size of feature extraction (for arrays)
            and of training. Defaults to `128`.
        learning_rate: float > 0. Defaults to `0.01`.
        momentum: float in [0, 1). Nesterov momentum. Defaults to `0.9`.
        seed: int. Seeds the head's initialization and the data order.
            Defaults to `0`.
        verbose: int. Passed to `fit` of the linear layer. Defaults to `0`.
        feature_layer: str. The name of the backbone's classifier layer,
            whose input are the features. Defaults to `"classifier"`.

    Returns:
        The test accuracy of the linear layer, a float in [0, 1].

    Example:

    ```python
    accuracy = keras_ema.linear_probe(ema.ema_model(0.998),
                                      (x_train_c100, y_train_c100),
                                      (x_test_c100, y_test_c100))
    ```
    """
    epochs = check_int("epochs", epochs)
    batch_size = check_int("batch_size", batch_size)
    if not as_float(learning_rate) > 0:
        raise ValueError(
            "Invalid value for argument `learning_rate`: expected a float > 0. "
            f"Received: learning_rate={learning_rate!r}"
        )
    check_fraction("momentum", momentum, low_open=False)
    extractor = feature_extractor(backbone, feature_layer)
    x_train, y_train = _features(extractor, train_data, batch_size, "train_data")
    x_test, y_test = _features(extractor, test_data, batch_size, "test_data")
    if min(y_train.min(), y_test.min()) < 0:
        raise ValueError("Labels must be non-negative class indices.")
    num_classes = int(max(y_train.max(), y_test.max())) + 1

    inputs = keras.Input((x_train.shape[1],), name="features")
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        dtype="float32",
        name="linear_head",
    )(inputs)
    head = keras.Model(inputs, logits, name="linear_probe")
    head.compile(
        optimizer=keras.optimizers.SGD(
            float(learning_rate), momentum=float(momentum), nesterov=True
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    head.fit(
        _ShuffledEpochs(x_train, y_train, batch_size, epochs, seed),
        epochs=1,
        shuffle=False,
        verbose=verbose,
    )
    predictions = head.predict(x_test, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(predictions, axis=1) == y_test))
