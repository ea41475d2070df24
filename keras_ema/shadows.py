"""The EMAs themselves: one stack of every decay's EMA per averaged variable.

The averaged variables are the trainable float variables and, if averaged,
the BatchNorm moving statistics. Any other non-trainable variable (a
counter, a step, a frozen layer's weight) is never averaged: a model holding
an EMA takes its live value.
"""

import contextlib

import keras

from keras_ema import _backend
from keras_ema import lora
from keras_ema.batch_norm import batch_norm_statistics


def averaged_variables(model, average_batch_norm: bool) -> list:
    """The variables of `model` the EMAs average, in `model.weights` order."""
    statistics = {id(v) for v in batch_norm_statistics(model)}
    return [
        v
        for v in model.weights
        if "float" in str(v.dtype)
        and (
            (v.trainable and id(v) not in statistics)
            or (average_batch_norm and id(v) in statistics)
        )
    ]


def make_shadows(model, average_batch_norm: bool, num_decays: int, shadow_device):
    """`(variables, shadows)`: the averaged variables and their EMA stacks.

    Each stack holds `num_decays` EMAs equal to the variable, placed like
    it: on JAX sharded as it is (decay axis unsharded), so a device holds
    the copies of its own shards only; or in host memory with
    `shadow_device="cpu"`. `ValueError` on an unbuilt model or one with
    nothing to average.
    """
    if not model.built:
        raise ValueError(
            "MultiEMA needs a built model: call the model on a batch or "
            "`model.build(input_shape)` before using it. Received an "
            f"unbuilt model: {model.name}"
        )
    variables = averaged_variables(model, average_batch_norm)
    if not variables:
        raise ValueError(
            f"MultiEMA found no trainable float variables to average in "
            f"model {model.name}. Make some layers trainable."
        )
    shadows = [
        _backend.make_shadow(v, num_decays, f"ema_{i}", model, shadow_device)
        for i, v in enumerate(variables)
    ]
    return variables, shadows


def assign(variables, shadows, index: int, shadow_device, skip=()):
    """Copies EMA `index` into the `variables` not in `skip`.

    A plain assignment of the stored values: float32 variables receive the
    shadow bit for bit.
    """
    skip = {id(v) for v in skip}
    for v, s in zip(variables, shadows):
        if id(v) not in skip:
            value = keras.ops.cast(s[index], v.dtype)
            if shadow_device is not None:
                value = _backend.place_like(value, v)
            v.assign(value)


@contextlib.contextmanager
def restored_after(model):
    """Context manager: every variable of `model` assigned back on exit.

    The values are copied aside on entry and assigned back bit for bit on
    exit, also through an exception.
    """
    everything = model.weights
    saved = _backend.snapshot(everything)
    try:
        yield model
    finally:
        for v, value in zip(everything, saved):
            v.assign(value)


def weights_with(model, variables, shadows, index: int) -> list:
    """`model.get_weights()` with EMA `index` in place of the averaged values."""
    averaged = {id(v): s for v, s in zip(variables, shadows)}
    out = []
    for v in model.weights:
        value = averaged.get(id(v))
        if value is None:
            out.append(keras.ops.convert_to_numpy(v))
        else:
            out.append(keras.ops.convert_to_numpy(value[index]).astype(v.dtype))
    return out


def clone_with(model, weights) -> keras.Model:
    """An independent copy of `model` holding `weights`, compiled like it if possible."""
    clone = lora.clone_like(model)
    clone.set_weights(weights)
    if getattr(model, "compiled", False):
        try:
            clone.compile_from_config(model.get_compile_config())
        except Exception:  # an uncompiled copy is still a usable model
            pass
    return clone


def reader(ema):
    """The `_backend.Reader` of `ema`'s stacked shadows, made once per build."""
    made = getattr(ema, "_shadow_reader", None)
    if made is None or made[0] is not ema._shadows:
        made = (ema._shadows, _backend.Reader(ema._shadows))
        ema._shadow_reader = made
    return made[1]
