"""LoRA adapters: the EMA of an adapter as an adapter file, and EMA copies that keep LoRA.

After `backbone.enable_lora(rank)` (keras-hub) or `layer.enable_lora(rank)`
(Keras' Dense, EinsumDense, Embedding) only the adapters `lora_kernel_a`,
`lora_kernel_b` (and whatever else is left trainable: the task's head, the
biases of the LoRA layers) are trainable, so `MultiEMA` keeps EMAs of those
alone: nothing for the frozen base, which the EMA model shares with the live
one. This module writes the EMA of the adapters in keras-hub's own LoRA
format, and gives a copy of a model the LoRA layers of the original.

keras-hub is never imported here: a backbone is recognised by the methods
and attributes its `Backbone` class has (keras-hub 0.32.0,
`keras_hub/src/models/backbone.py`: `enable_lora`, `save_lora_weights`,
`_lora_enabled_layers`, `_lora_rank`).
"""

import os
import warnings

from keras_ema import _keras_private
from keras_ema.files import atomic_path

_LORA_NAMES = ("lora_kernel_a", "lora_kernel_b")


def _layers(model):
    return [model] + _keras_private.flatten_layers(model)


def lora_variables(model) -> list:
    """The LoRA factors (`lora_kernel_a`, `lora_kernel_b`) of every layer of `model`."""
    out = []
    for layer in _lora_layers(model):
        out += [getattr(layer, name) for name in _LORA_NAMES]
    return out


def _lora_layers(model):
    return [layer for layer in _layers(model) if getattr(layer, "lora_enabled", False)]


def live_factors(model) -> list:
    """The live LoRA factors of `model` as arrays, `[A, B]` per LoRA layer, in layer order.

    `MultiEMA.get_state` keeps them (they are small: that is LoRA's point)
    because a Keras weights file cannot: see `unmerge_restored`.
    """
    import keras

    out = []
    for layer in _lora_layers(model):
        out += [keras.ops.convert_to_numpy(layer.lora_kernel_a),
                keras.ops.convert_to_numpy(layer.lora_kernel_b)]
    return out


def unmerge_restored(model, factors):
    """Undoes, with the factors of `live_factors`, what loading a Keras weights file does to LoRA.

    A Keras weights file (`save_weights`, hence `BackupAndRestore` and
    `ModelCheckpoint`) stores a LoRA layer's kernel merged, base + scale *
    A @ B, and loading it sets A and B to zero (Keras 3.15.1, `Dense`,
    `EinsumDense`, `Embedding`: `save_own_variables`, `load_own_variables`).
    The model then computes the same function, but a resumed run trains
    nothing (with A = B = 0 both gradients are zero) and an EMA of A and B
    swapped in would add the adapters twice. For each LoRA layer whose A and
    B are both zero while `factors` holds others, A and B get their saved
    values and the base kernel loses the merged product again (to float32
    rounding of the merge: a resumed run matches an uninterrupted one to
    about 1e-7, not bit for bit). Checks everything before changing anything.
    """
    import keras
    import numpy as np

    if not factors:
        return
    layers = _lora_layers(model)
    if len(factors) != 2 * len(layers):
        raise ValueError(
            f"Cannot restore a MultiEMA state: it holds the LoRA factors of "
            f"{len(factors) // 2} layers, but model {model.name} has "
            f"{len(layers)} LoRA layers. Restore it into the model it was "
            "saved from."
        )
    todo = []
    for i, layer in enumerate(layers):
        a, b = (np.asarray(f, np.float32) for f in factors[2 * i: 2 * i + 2])
        if (a.shape != tuple(layer.lora_kernel_a.shape)
                or b.shape != tuple(layer.lora_kernel_b.shape)):
            raise ValueError(
                f"Cannot restore a MultiEMA state: the LoRA factors of layer "
                f"{layer.path} have shapes {a.shape}, {b.shape}, not those of "
                "the model. Restore it into the model it was saved from."
            )
        live_a = keras.ops.convert_to_numpy(layer.lora_kernel_a)
        live_b = keras.ops.convert_to_numpy(layer.lora_kernel_b)
        if not live_a.any() and not live_b.any() and (a.any() or b.any()):
            todo.append((layer, a, b))
    for layer, a, b in todo:
        layer.lora_kernel_a.assign(a)
        layer.lora_kernel_b.assign(b)
        base, merged = _keras_private.lora_base(layer)
        base.assign(base - (merged - base))


def lora_backbones(model) -> list:
    """The layers of `model` (itself included) that are keras-hub backbones with LoRA on."""
    return [
        layer for layer in _layers(model)
        if getattr(layer, "_lora_enabled_layers", None)
        and callable(getattr(layer, "save_lora_weights", None))
    ]


def enable_lora_like(source, clone):
    """Gives `clone` (a copy of `source`, as `keras.models.clone_model` makes) its LoRA.

    A copy is built from the layers' or the backbone's configuration, which
    does not say that LoRA was enabled afterwards: the copy would lack the
    adapters, and the weights of `source` would not fit it. Each layer of
    `source` with LoRA gets it in the layer of `clone` with the same path,
    with the same rank and alpha; a keras-hub backbone also gets its
    record of the LoRA layers (so `clone`'s backbone can `save_lora_weights`);
    then every variable of `clone` takes the `trainable` flag of its
    counterpart. A `source` without LoRA is left alone.
    """
    lora_layers = [s for s in _layers(source) if getattr(s, "lora_enabled", False)]
    if not lora_layers:
        return clone
    by_path = {getattr(c, "path", None): c for c in _layers(clone)}
    for s in lora_layers:
        c = by_path.get(s.path)
        if c is None or not callable(getattr(c, "enable_lora", None)):
            raise ValueError(
                f"Cannot copy model {source.name} with its LoRA: its copy has "
                f"no layer {s.path} to enable LoRA on."
            )
        if not getattr(c, "lora_enabled", False):
            c.enable_lora(s.lora_rank, lora_alpha=getattr(s, "lora_alpha", None))
    for s in _layers(source):
        c = by_path.get(getattr(s, "path", None))
        if c is None:
            continue
        _keras_private.copy_lora_layers(s, c)
        c.trainable = s.trainable
    for s, c in zip(source.weights, clone.weights):
        c.trainable = s.trainable
    return clone


def clone_like(model):
    """A new model with `model`'s architecture, LoRA and variable layout (not its values).

    `keras.models.clone_model`, then `enable_lora_like`. When the copy still
    does not hold the same number of weights (keras-hub's causal LMs tie
    their output layer to the token embedding, which `clone_model` copies
    twice), the copy is made from the model's class and configuration
    instead (`type(model).from_config(model.get_config())`), which keras-hub
    tasks and backbones support.
    """
    import keras

    clone = enable_lora_like(model, keras.models.clone_model(model))
    if len(clone.weights) == len(model.weights):
        return clone
    try:
        clone = enable_lora_like(model, type(model).from_config(model.get_config()))
    except Exception as e:
        raise ValueError(
            f"Cannot copy model {model.name}: keras.models.clone_model gives "
            f"a model of {len(clone.weights)} weights, not "
            f"{len(model.weights)}, and {type(model).__name__}.from_config "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Use `ema.swapped_in(decay)` or `ema.save_weights` instead."
        ) from None
    return clone


def save_lora_weights(ema, decay: float, path: str, backbone=None) -> str:
    """Writes the EMA of `decay` of a keras-hub backbone's LoRA adapters to `path`.

    The file is keras-hub's own LoRA format (`Backbone.save_lora_weights`
    writes it, with the EMA swapped in): on a fresh backbone of the same
    configuration, `backbone.load_lora_weights(path)` enables LoRA with the
    same rank and loads the EMA adapters, so that backbone computes what the
    EMA model's backbone computes. Written under a temporary name and renamed.

    keras-hub's file holds the LoRA factors only. A task's head (a
    classifier's dense layer) is not in it: save it apart (for a causal LM
    whose output layer is the frozen token embedding, the adapters are
    everything trained). A warning names the trained backbone variables
    outside the adapters (the biases of the LoRA layers stay trainable after
    `enable_lora`), whose EMA the file cannot carry: freeze them after
    `enable_lora` for the file to reproduce the EMA model.

    Args:
        ema: a `MultiEMA` whose training has started.
        decay: float, one of `ema.decays`.
        path: str ending in `.lora.h5` (keras-hub's requirement).
        backbone: the keras-hub backbone in `ema`'s model, or `None` to find
            the one with LoRA enabled. Defaults to `None`.

    Returns:
        `path`.
    """
    path = os.fspath(path)
    if not path.endswith(".lora.h5"):
        raise ValueError(
            f"Invalid path {path!r}: keras-hub's LoRA files must end in `.lora.h5`."
        )
    ema._index(decay)  # built, and a kept decay
    model = ema.model
    if backbone is None:
        found = lora_backbones(model)
        if not found:
            raise ValueError(
                f"save_lora_weights found no keras-hub backbone with LoRA "
                f"enabled in model {model.name}: call "
                "`backbone.enable_lora(rank)` before training, or use "
                "`ema.save_weights` for the whole model."
            )
        if len(found) > 1:
            names = ", ".join(b.name for b in found)
            raise ValueError(
                f"save_lora_weights found several keras-hub backbones with "
                f"LoRA enabled ({names}): pass the one to write as `backbone=`."
            )
        backbone = found[0]
    elif not lora_backbones(backbone):
        raise ValueError(
            f"save_lora_weights: backbone {backbone.name} has no LoRA layers: "
            "call `backbone.enable_lora(rank)` before training."
        )
    averaged = {id(v) for v in ema._variables}
    adapters = lora_variables(backbone)
    missing = [v.path for v in adapters if id(v) not in averaged]
    if missing:
        raise ValueError(
            f"save_lora_weights: the LoRA weight {missing[0]} (and "
            f"{len(missing) - 1} more) has no EMA: LoRA was enabled after the "
            "EMAs were created. Call `ema.reset()` and train again."
        )
    adapter_ids = {id(v) for v in adapters}
    others = [v.path for v in backbone.weights
              if id(v) in averaged and id(v) not in adapter_ids]
    if others:
        warnings.warn(
            f"save_lora_weights: keras-hub's LoRA file holds the LoRA factors "
            f"only, not the EMA of {len(others)} other trained variables of "
            f"backbone {backbone.name} (first: {others[0]}); a backbone "
            "loading the file keeps their original values. Freeze them after "
            "`enable_lora` (variable.trainable = False) for the file to "
            "reproduce the EMA model.",
            stacklevel=2,
        )
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with atomic_path(path) as tmp, ema.swapped_in(decay):
        backbone.save_lora_weights(tmp)
    return path
