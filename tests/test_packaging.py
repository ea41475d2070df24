"""What the wheel installs, and keras_ema on JAX without TensorFlow."""

import importlib.metadata
import os
import re
import sys
import textwrap

import pytest
import subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(requirement):
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_the_wheel_installs_only_keras_ema():
    # PyPI's `zoo` is another project: the kit stays in the checkout.
    assert _pyproject()["tool"]["setuptools"]["packages"] == ["keras_ema"]


def test_core_dependencies_and_extras():
    project = _pyproject()["project"]
    assert sorted(_name(r) for r in project["dependencies"]) == ["keras", "numpy", "scipy"]
    extras = project["optional-dependencies"]
    assert {"tensorflow", "jax", "data", "zoo", "hub", "test"} <= set(extras)
    assert "keras-hub" in [_name(r) for r in extras["hub"]]
    assert "hub" in extras["test"][-1]
    assert "tensorflow" in [_name(r) for r in extras["tensorflow"]]
    assert "jax" in [_name(r) for r in extras["jax"]]
    # The Keras the suite runs against satisfies the pin, which has an upper
    # bound (the package reads Keras internals).
    from packaging.requirements import Requirement

    keras = next(Requirement(r) for r in project["dependencies"] if _name(r) == "keras")
    assert any(spec.operator in ("<", "<=") for spec in keras.specifier)
    assert keras.specifier.contains(importlib.metadata.version("keras"))


def test_one_version_string():
    import keras_ema

    pyproject = _pyproject()
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "keras_ema.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", keras_ema.__version__)
    with open(os.path.join(ROOT, "keras_ema", "__init__.py")) as f:
        assert f.read().count(keras_ema.__version__) == 1


def test_fit_on_jax_imports_no_tensorflow(tmp_path):
    # TensorFlow is installed here: this catches an import a JAX user without
    # it would get as a ModuleNotFoundError.
    pytest.importorskip("jax")
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import keras
        import keras_ema

        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 4, 4, 1)).astype("float32")
        y = rng.integers(0, 3, 32)
        inputs = keras.Input((4, 4, 1))
        h = keras.layers.Conv2D(4, 3)(inputs)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        model = keras.Model(inputs, keras.layers.Dense(3)(h))
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        ema = keras_ema.MultiEMA(decays=(0.3,), period=1, validation_data=(x, y), verbose=0)
        history = model.fit(x, y, batch_size=4, epochs=2, callbacks=[ema], verbose=0)
        print(keras.backend.backend(), "ema_0.3_val_accuracy" in history.history)
        # Up to here: keras.models.clone_model (ema.ema_model) makes Keras 3.15.1
        # itself import TensorFlow where it is installed (serialization_lib).
        print(sorted(m for m in ("tensorflow", "tensorflow_datasets", "zoo", "keras_hub")
                     if m in sys.modules))
    """)
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocesses.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-3:] == ["jax True", "[]", ""]
