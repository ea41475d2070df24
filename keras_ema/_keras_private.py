"""Every use of a private Keras API, one function each.

Keras does not promise these names: each function says which Keras version
it was read from, and `pyproject.toml` bounds Keras to the versions the
suite has run against. When Keras moves one of them, only this file
changes.
"""

import contextlib
import io
import sys
import weakref

import keras


def flatten_layers(model) -> list:
    """Every layer nested in `model` (not `model` itself), depth first.

    `Layer._flatten_layers(include_self=False)` (Keras 3.15.1,
    `keras/src/layers/layer.py`) walks sublayers of any model kind
    (functional, Sequential, subclassed) where `model.layers` lists the
    top level only.
    """
    return list(model._flatten_layers(include_self=False))


def lora_base(layer):
    """`(base variable, merged value)` of a layer with LoRA enabled.

    Keras 3.15.1 (`keras/src/layers/core/dense.py`, `einsum_dense.py`,
    `embedding.py`) keeps the frozen base weight as `_kernel` (`_embeddings`)
    and its public `kernel` (`embeddings`) property returns the base plus
    the scaled LoRA product: the value `save_own_variables` writes.
    """
    if hasattr(layer, "_kernel"):
        return layer._kernel, layer.kernel
    return layer._embeddings, layer.embeddings


def raw_iterations(optimizer):
    """The optimizer's batch counter, gradient-accumulation steps included.

    With `gradient_accumulation_steps=n` the public `iterations` is this
    counter `// n` (Keras 3.15.1, `keras/src/optimizers/base_optimizer.py`:
    `_iterations` counts every batch).
    """
    return optimizer._iterations


def distribute_strategy(model):
    """The `tf.distribute.Strategy` the model was built under, or `None`.

    Keras 3.15.1 (`keras/src/backend/tensorflow/trainer.py`) stores it as
    `model._distribute_strategy`.
    """
    return getattr(model, "_distribute_strategy", None)


def calling_callbacks(callback):
    """The callbacks of the `keras.callbacks.CallbackList` running `callback`.

    `fit` wraps its callbacks in a `CallbackList` that calls each hook of
    each callback in list order (Keras 3.15.1, `callback_list.py`), and does
    not tell a callback its neighbours; the list is found as the `self` of a
    calling frame (`sys._getframe`, CPython). `None` when the caller is not
    a CallbackList (hooks driven by hand, another training loop).
    """
    frame = sys._getframe(1)
    try:
        for _ in range(8):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.callbacks.CallbackList) and any(
                c is callback for c in owner.callbacks
            ):
                return list(owner.callbacks)
            frame = frame.f_back
        return None
    finally:
        del frame



@contextlib.contextmanager
def counting_calls(layers):
    """Yields `{id(layer): calls}`, counting the calls of each of `layers`.

    Keras 3.15.1's `Layer.__call__` (`keras/src/layers/layer.py`) runs
    `self.call`, looked up on the instance: a counting `call` is set on each
    instance past Keras' attribute tracking (`object.__setattr__`) and
    removed on exit, which leaves the class's `call` in force again.
    """
    counts = {id(layer): 0 for layer in layers}

    def counting(layer):
        original = layer.call

        def call(*args, **kwargs):
            counts[id(layer)] += 1
            return original(*args, **kwargs)

        return call

    for layer in layers:
        object.__setattr__(layer, "call", counting(layer))
    try:
        yield counts
    finally:
        for layer in layers:
            layer.__dict__.pop("call", None)


def h5_weights_bytes(model, include_optimizer=True):
    """The bytes `model.save_weights` writes to a `.weights.h5` file, or `None`.

    Without `include_optimizer`, the file leaves out the optimizer's
    variables (its `optimizer` group), as `save_weights` of the same model
    uncompiled would write it.

    Keras' private `saving_lib` (read from Keras 3.15.1:
    `H5IOStore(io.BytesIO(), mode="w")` and `_save_state(...)`, as
    `saving_lib.save_weights_only` does for a file); `None` when this Keras
    lays them out otherwise.
    """
    try:
        from keras.src.saving import saving_lib

        store = saving_lib.H5IOStore(io.BytesIO(), mode="w")
    except (ImportError, AttributeError, TypeError):  # another Keras layout
        return None
    buffer = store.path_or_io
    # Saveables already "visited" are skipped, and their children with them.
    optimizer = getattr(model, "optimizer", None)
    skip = {id(optimizer)} if optimizer is not None and not include_optimizer else set()
    try:
        saving_lib._save_state(model, weights_store=store, assets_store=None,
                               inner_path="", visited_saveables=skip)
    finally:
        store.close()
    return buffer.getbuffer()


def copy_lora_layers(source, copy):
    """Gives `copy` the record of which of its layers have LoRA that `source` has.

    keras-hub's backbones (read from keras-hub 0.32.0,
    `keras_hub/src/models/backbone.py`) keep it in the private
    `_lora_enabled_layers` and `_lora_rank`, which `save_lora_weights` and
    `load_lora_weights` read; layers without them are left alone.
    """
    if getattr(source, "_lora_enabled_layers", None):
        copy._lora_enabled_layers = list(source._lora_enabled_layers)
        copy._lora_rank = source._lora_rank


def sync_training_state(callback):
    """Puts `fit`'s training state back into the model's variables (JAX).

    During a JAX epoch `fit` holds the variables' values in arrays of its
    own; reading a callback's `model` makes Keras 3.15.1 call the model's
    `jax_state_sync()` first (`keras/src/callbacks/callback.py`,
    `Callback.model`), so that the variables hold the current weights. On
    the other backends this reads `model` and nothing else. Returns the model.
    """
    return callback.model


# How Keras' saving lays out each model's file: {model: {key: _Plan}}.
_PLANS = weakref.WeakKeyDictionary()


def weights_snapshot(model, include_optimizer, values, make_reader, to_host):
    """`model.save_weights`'s file as it is now, to build later in any thread.

    Returns a function of no arguments giving the bytes `write_weights`
    writes, or `None` when this Keras lays its saving out otherwise or a
    layer saves a computed value in place of one of `values`. `values` maps
    `id(variable)` to the value to save in place of the variable's own (an
    EMA: a function of no arguments giving a numpy array).

    `make_reader(variables)` gives a function reading their values as they
    are now, frozen (`keras_ema._backend.Reader`); `to_host(frozen)` gives a
    numpy array. Read from Keras 3.15.1 (`keras/src/saving/saving_lib.py`):
    Keras' private `_save_state` is run against a store that records each
    group it makes and the variable (or computed value) it is given; the
    bytes are built by replaying those calls on Keras' own `H5IOStore`, the
    values copied to the host then, so the file is the one
    `model.save_weights` writes. The recorded calls are kept per model and
    reused while its variables are the same ones: recording takes Keras
    about 0.25 s for a ResNet-18, reading the values a few milliseconds.
    """
    values = values or {}
    optimizer = getattr(model, "optimizer", None)
    if not include_optimizer:
        optimizer = None
    signature = _signature(model, optimizer)
    key = (include_optimizer, frozenset(values))
    plans = _PLANS.setdefault(model, {})
    plan = plans.get(key)
    if plan is None or plan.signature != signature:
        plan = _record(model, include_optimizer, values, make_reader)
        if plan is None:
            return None
        plan.signature = signature
        if plan.reusable:
            plans[key] = plan
    frozen = iter(plan.read())
    calls = []
    for call, name, argument in plan.calls:
        if call == "variable":
            argument = values[id(argument)] if id(argument) in values else next(frozen)
        calls.append((call, name, argument))
    store_type = plan.store_type

    def build():
        store = store_type(io.BytesIO(), mode="w")
        buffer = store.path_or_io
        try:
            for call, name, argument in calls:
                if call == "make":
                    store.make(name, metadata=argument)
                else:
                    store[name] = to_host(argument)
        finally:
            store.close()
        return buffer.getbuffer()

    return build


def _signature(model, optimizer):
    """What a recorded plan depends on: the variables of `model` and `optimizer`."""
    variables = list(model.variables)
    if optimizer is not None:
        variables += list(optimizer.variables)
    return (id(optimizer), tuple(id(v) for v in variables))


class _Plan:
    """The calls Keras' saving made: ("make", group, metadata),
    ("variable", key, variable) and ("value", key, a value computed then,
    as a numpy array); `read()` gives the values of the variables not
    replaced, frozen."""

    def __init__(self, store_type, calls, read, reusable):
        self.store_type = store_type
        self.calls = calls
        self.read = read
        self.reusable = reusable  # no computed value in it
        self.signature = None


def _record(model, include_optimizer, values, make_reader):
    """The `_Plan` of `model`'s file, or `None` (see `weights_snapshot`)."""
    try:
        from keras.src.saving import saving_lib
    except ImportError:
        return None
    store_type = getattr(saving_lib, "H5IOStore", None)
    if store_type is None or not hasattr(saving_lib, "_save_state"):
        return None
    calls = []
    optimizer = getattr(model, "optimizer", None)
    skip = {id(optimizer)} if optimizer is not None and not include_optimizer else set()
    try:
        recorder = _recorder(store_type, values, calls)
        with _optimizers_save_variables(optimizer if include_optimizer else None):
            saving_lib._save_state(model, weights_store=recorder, assets_store=None,
                                   inner_path="", visited_saveables=skip)
    except (_ComputedValue, TypeError, AttributeError):
        return None
    live = [a for call, _, a in calls if call == "variable" and id(a) not in values]
    reusable = all(call != "value" for call, _, _ in calls)
    return _Plan(store_type, calls, make_reader(live), reusable)


@contextlib.contextmanager
def _optimizers_save_variables(optimizer):
    """Keras 3.15.1's optimizers save `variable.numpy()`, a host copy made at
    once (`BaseOptimizer.save_own_variables`); meanwhile `optimizer` (and an
    inner optimizer) give their variables themselves instead, under the
    same keys, so that they are read like the model's."""
    from keras.src.optimizers import base_optimizer

    patched = []
    while optimizer is not None and optimizer not in patched:
        if (type(optimizer).save_own_variables
                is base_optimizer.BaseOptimizer.save_own_variables):
            patched.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)

    def saver(optimizer):
        def save_own_variables(store):
            for i, variable in enumerate(optimizer.variables):
                store[str(i)] = variable
        return save_own_variables

    for each in patched:
        object.__setattr__(each, "save_own_variables", saver(each))
    try:
        yield
    finally:
        for each in patched:
            object.__delattr__(each, "save_own_variables")


def _recorder(store_type, values, calls):
    """A `store_type` (Keras' `H5IOStore`) that records into `calls`; opens no file."""

    class Recorder(store_type):
        """Records `make` and `__setitem__`; opens no file."""

        def __init__(self):  # noqa: D107 - no H5 file
            pass

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            calls.append(("make", path, metadata))
            return self

        def __setitem__(self, key, value):
            if isinstance(value, keras.Variable):
                calls.append(("variable", key, value))
                return
            if values:
                raise _ComputedValue()  # can't tell whether an EMA enters it
            calls.append(("value", key, keras.ops.convert_to_numpy(value)))

    return Recorder()


class _ComputedValue(Exception):
    pass
