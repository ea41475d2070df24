"""The one place that knows which framework runs under Keras.

Everything else in `keras_ema` is written with `keras.ops`; the hot path, the
EMA update of all shadow sets, is compiled here per backend:

- TensorFlow: one `tf.function(jit_compile=True)` that reads every live weight
  once and writes every stacked shadow once (XLA fuses the multiply-adds);
  the coupled variant (BELAY) also writes the pulled weights in that call.
- JAX: one `jax.jit` with the shadows donated, so they are updated in place.
  Each stacked shadow is sharded like its weight (an unsharded leading decay
  axis, then the weight's own sharding), so under `ModelParallel` a device
  holds only its shards of the EMAs and the update runs with no gather.
- other backends: the same arithmetic with `keras.ops`, eagerly.

The decays (and BELAY's coupling) are input tensors, so a changing warm-up
decay never retraces.
Each variant is one short function, chosen from the table `_UPDATES` by
backend and variant (plain, host shadows, coupled), and returns an `Update`.
TensorFlow and JAX are imported inside the functions that need them, so
importing `keras_ema` requires neither.
"""

import functools

import keras
import numpy as np


def backend_name() -> str:
    """The name of the backend Keras runs on: "tensorflow", "jax", ..."""
    return keras.backend.backend()


def _float32(x):
    return keras.ops.cast(x, "float32")


SHADOW_DEVICES = (None, "cpu")


def validate_shadow_device(shadow_device):
    """`None` (beside the weights) or `"cpu"` (host memory)."""
    if not isinstance(shadow_device, (str, type(None))) or (
        shadow_device not in SHADOW_DEVICES
    ):
        raise ValueError(
            "Invalid value for argument `shadow_device`: expected None (the "
            "EMAs live beside the weights) or 'cpu' (host memory). Received: "
            f"shadow_device={shadow_device!r}"
        )
    if shadow_device == "cpu" and backend_name() not in ("tensorflow", "jax"):
        raise ValueError(
            "shadow_device='cpu' needs the TensorFlow or JAX backend. "
            f"Received: shadow_device='cpu' with the {backend_name()} backend; pass "
            "shadow_device=None."
        )
    return shadow_device


def make_shadow(weight, count, name, model=None, shadow_device=None):
    """A float32 variable of shape `(count,) + weight.shape`, each row `weight`.

    With `shadow_device=None` it is placed like `weight`: on JAX sharded as
    `weight` is, with an unsharded leading axis (each device holds `count`
    copies of its own shard only, never the whole stack); on TensorFlow in
    `model`'s distribution strategy. With `"cpu"` it lives in host memory
    (JAX's cpu device, TensorFlow's `/CPU:0`).
    """
    shape = (count,) + tuple(weight.shape)
    backend = backend_name()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        sharding = _jax_shadow_sharding(weight, shadow_device)
        value = weight.value
        if shadow_device == "cpu":
            value = jax.device_put(value, sharding)

        def stack(w):
            return jnp.broadcast_to(w.astype(jnp.float32)[None], shape)

        # Built sharded: the full stack is never materialized on one device.
        value = jax.jit(stack, out_shardings=sharding)(value)
        return keras.Variable(value, dtype="float32", trainable=False,
                              name=name, layout=sharding)
    if backend == "tensorflow" and shadow_device == "cpu":
        import tensorflow as tf

        with tf.device("/CPU:0"):
            value = keras.ops.broadcast_to(_float32(weight)[None], shape)
            return keras.Variable(value, dtype="float32", trainable=False,
                                  name=name)
    with strategy_scope(model):
        return keras.Variable(
            keras.ops.broadcast_to(_float32(weight)[None], shape),
            dtype="float32", trainable=False, name=name,
        )


def _jax_shadow_sharding(weight, shadow_device):
    import jax

    if shadow_device == "cpu":
        return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    sharding = weight.value.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(None, *sharding.spec)
        return jax.sharding.NamedSharding(
            sharding.mesh, spec, memory_kind=sharding.memory_kind
        )
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    # Another kind of sharding: replicate the stack over the same devices.
    return jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(list(sharding.device_set)), ("d",)),
        jax.sharding.PartitionSpec(),
    )


def place_like(value, variable):
    """`value` moved to where `variable` lives (on JAX, its sharding)."""
    if backend_name() != "jax":
        return value
    import jax

    return jax.device_put(value, variable.value.sharding)


def make_ema_update(shadows, weights, jit_compile=True, shadow_device=None):
    """Returns an `Update`, `update(decays) -> finite`, for fixed lists of variables.

    `shadows[j]` is a float32 `keras.Variable` of shape `(M,) + weights[j].shape`;
    row `i` is the EMA with decay `decays[i]`. The returned function applies
    `s <- a * s + (1 - a) * w` to every row of every shadow in one compiled
    call, unless a live weight holds a NaN or an infinity: then nothing is
    written. It returns a scalar boolean tensor (True when the update was
    applied) without waiting for the device.

    With `shadow_device="cpu"` (shadows from `make_shadow` in host memory)
    the live weights are copied to the host and the update runs there; on
    JAX the copy and the update are dispatched asynchronously, so the next
    training step does not wait for them.
    """
    _check_lengths(shadows, weights)
    return _build(shadows, weights, None, jit_compile, shadow_device)


def make_coupled_update(shadows, weights, pulled, jit_compile=True,
                        shadow_device=None):
    """Returns an `Update`, `update(decays, coupling) -> finite`: the EMA
    update plus a pull.

    As `make_ema_update`, and in the same compiled call, every weight `w`
    with `pulled[j]` true then moves toward the updated EMAs `s_new`:

    ```
    s_new = a * s + (1 - a) * w
    w     = w - sum_i coupling[i] * (w - s_new[i])
    ```

    `coupling` has one entry per EMA. When a live weight is not finite,
    neither the shadows nor the weights are written.
    """
    _check_lengths(shadows, weights)
    if len(pulled) != len(weights):
        raise ValueError(
            f"Expected one `pulled` flag per weight. Received {len(pulled)} "
            f"flags for {len(weights)} weights."
        )
    return _build(shadows, weights, [bool(p) for p in pulled], jit_compile,
                  shadow_device)


def _check_lengths(shadows, weights):
    if len(shadows) != len(weights):
        raise ValueError(
            f"Expected one shadow per weight. Received {len(shadows)} shadows "
            f"for {len(weights)} weights."
        )


def _build(shadows, weights, pulled, jit_compile, shadow_device=None):
    """The `Update` of the backend and variant, from `_UPDATES`."""
    host = shadow_device == "cpu"
    if pulled is not None:
        variant = "coupled"
    else:
        variant = "host" if host else "ema"
    make = _UPDATES.get((backend_name(), variant), _eager_update)
    return make(shadows, weights, pulled, jit_compile, host)


class Update:
    """A compiled update for fixed lists of variables.

    `update(decays)` (`update(decays, coupling)` for the coupled variant)
    runs it and returns a scalar boolean tensor, True when the update was
    applied. `compiled_text()` is the optimized HLO where the backend has it
    (JAX's plain update), to check for collectives; `tracing_count()` how
    often the compiled function was traced where the backend counts it
    (TensorFlow), to check that a changing decay never retraces.
    """

    def __init__(self, run, compiled_text=None, tracing_count=None):
        self._run = run
        self._compiled_text = compiled_text
        self._tracing_count = tracing_count

    def __call__(self, *args):
        return self._run(*args)

    def tracing_count(self) -> int:
        return self._available(self._tracing_count, "tracing count",
                               "TensorFlow's updates count theirs")

    def compiled_text(self) -> str:
        return self._available(self._compiled_text, "compiled text",
                               "it is JAX's plain EMA update only")

    @staticmethod
    def _available(getter, what, where):
        """`getter()`, or a refusal naming what this backend lacks."""
        if getter is None:
            raise NotImplementedError(
                f"The {what} of this update is not available on the "
                f"{backend_name()} backend; {where}."
            )
        return getter()


def _broadcast(decays, ndim):
    return keras.ops.reshape(decays, (-1,) + (1,) * ndim)


# -- TensorFlow ---------------------------------------------------------------


def _tf_variables(shadows, weights, jit_compile, host):
    """`(shadow values, weight values, jit)`: whether XLA may compile it.

    A distribution strategy mirrors variables on several devices; one XLA
    cluster cannot assign to all copies, so compile only without one. (The
    callbacks run outside the strategy's scope: look at the variables.)
    Host shadows: the arithmetic is placed on the CPU, beside them (one XLA
    cluster cannot span the weights' device and the host).
    """
    import tensorflow as tf

    shadow_vars = [s.value for s in shadows]
    weight_vars = [w.value for w in weights]
    distributed = tf.distribute.has_strategy() or any(
        isinstance(v, tf.distribute.DistributedValues)
        for v in shadow_vars + weight_vars
    )
    jit = bool(jit_compile) and not distributed and not host
    return shadow_vars, weight_vars, jit


def _tf_assign_ema(shadow_vars, live, decays):
    """Writes `a * s + (1 - a) * w` into every shadow unless a weight is not
    finite; returns `(new values, finite)`."""
    import tensorflow as tf

    finite = tf.reduce_all(
        tf.stack([tf.reduce_all(tf.math.is_finite(w)) for w in live])
    )
    new = []
    for s, w in zip(shadow_vars, live):
        a = tf.reshape(decays, [-1] + [1] * len(w.shape))
        new.append(a * s + (1.0 - a) * w[None])
        s.assign(tf.where(finite, new[-1], s))
    return new, finite


def _tf_ema(shadows, weights, pulled, jit_compile, host):
    """TensorFlow: one `tf.function` over every shadow."""
    import tensorflow as tf

    shadow_vars, weight_vars, jit = _tf_variables(
        shadows, weights, jit_compile, host)

    @tf.function(jit_compile=jit, autograph=False)
    def update(decays):
        live = [tf.cast(w, tf.float32) for w in weight_vars]
        return _tf_assign_ema(shadow_vars, live, decays)[1]

    return Update(lambda decays: update(tf.constant(decays, dtype=tf.float32)),
                  tracing_count=update.experimental_get_tracing_count)


def _tf_host_ema(shadows, weights, pulled, jit_compile, host):
    """TensorFlow, host shadows: the weights are copied to the host by a
    plain function; the update of the host shadows from those copies is one
    XLA cluster on the CPU."""
    import tensorflow as tf

    shadow_vars, weight_vars, _ = _tf_variables(
        shadows, weights, jit_compile, host)

    @tf.function(jit_compile=bool(jit_compile), autograph=False)
    def host_update(decays, live):
        return _tf_assign_ema(shadow_vars, live, decays)[1]

    @tf.function(autograph=False)
    def update(decays):
        with tf.device("/CPU:0"):
            live = [tf.identity(tf.cast(w, tf.float32)) for w in weight_vars]
            return host_update(decays, live)

    return Update(lambda decays: update(tf.constant(decays, dtype=tf.float32)),
                  tracing_count=update.experimental_get_tracing_count)


def _tf_coupled(shadows, weights, pulled, jit_compile, host):
    """TensorFlow, BELAY: the EMA update, then the pull of the weights, in
    one `tf.function`."""
    import contextlib

    import tensorflow as tf

    shadow_vars, weight_vars, jit = _tf_variables(
        shadows, weights, jit_compile, host)

    @tf.function(jit_compile=jit, autograph=False)
    def coupled(decays, coupling):
        place = tf.device("/CPU:0") if host else contextlib.nullcontext()
        with place:
            live = [tf.cast(w, tf.float32) for w in weight_vars]
            new, finite = _tf_assign_ema(shadow_vars, live, decays)
        for var, w, s_new, pull in zip(weight_vars, live, new, pulled):
            if pull:
                k = tf.reshape(coupling, [-1] + [1] * len(w.shape))
                moved = w - tf.reduce_sum(k * (w[None] - s_new), axis=0)
                var.assign(tf.where(finite, tf.cast(moved, var.dtype), var))
        return finite

    return Update(lambda decays, coupling: coupled(
        tf.constant(decays, dtype=tf.float32),
        tf.constant(coupling, dtype=tf.float32),
    ), tracing_count=coupled.experimental_get_tracing_count)


# -- JAX ----------------------------------------------------------------------


def _jax_parts(shadows, weights, host):
    """`(ema, inputs, write_shadows)`, shared by the two JAX updates.

    `ema(shadow values, weight values, decays) -> (live, new, finite)` is
    the pure arithmetic; each new stack keeps its shadow's sharding (the
    decay axis unsharded, then the weight's), so the update runs shard by
    shard, with no gather. `inputs()` reads the variables (copied to the
    host for host shadows), `write_shadows(new)` assigns the new stacks.
    """
    import jax
    import jax.numpy as jnp

    shardings = [s.value.sharding for s in shadows]
    host_device = jax.devices("cpu")[0] if host else None

    def constrain(new):
        if host:
            return new
        return [
            jax.lax.with_sharding_constraint(v, sh)
            if isinstance(sh, jax.sharding.NamedSharding) else v
            for v, sh in zip(new, shardings)
        ]

    def ema(shadow_values, weight_values, decays):
        live = [w.astype(jnp.float32) for w in weight_values]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(w)) for w in live]))
        new = []
        for s, w in zip(shadow_values, live):
            a = decays.reshape((-1,) + (1,) * w.ndim)
            new.append(jnp.where(finite, a * s + (1.0 - a) * w[None], s))
        return live, constrain(new), finite

    def inputs():
        live = [w.value for w in weights]
        if host:
            # An asynchronous device-to-host copy: the update queued after it
            # runs on the host while training goes on.
            live = jax.device_put(live, host_device)
        return [s.value for s in shadows], live

    def write_shadows(new):
        for s, value in zip(shadows, new):
            s.assign(value)

    return ema, inputs, write_shadows


def _jax_ema(shadows, weights, pulled, jit_compile, host):
    """JAX: one `jax.jit` with the shadows donated, so XLA writes the new
    averages into their buffers. The live weights are not donated: the
    trainer may still hold them."""
    import jax
    import jax.numpy as jnp

    ema, inputs, write_shadows = _jax_parts(shadows, weights, host)

    def update(shadow_values, weight_values, decays):
        _, new, finite = ema(shadow_values, weight_values, decays)
        return new, finite

    compiled = jax.jit(update, donate_argnums=(0,))

    def run(decays):
        new, finite = compiled(*inputs(), jnp.asarray(decays, jnp.float32))
        write_shadows(new)
        return finite

    def compiled_text():
        """The optimized HLO of the update (to check for collectives)."""
        decays = jnp.ones((shadows[0].shape[0],), jnp.float32)
        return compiled.lower(*inputs(), decays).compile().as_text()

    return Update(run, compiled_text)


def _jax_coupled(shadows, weights, pulled, jit_compile, host):
    """JAX, BELAY: the EMA update and the pull in one `jax.jit`."""
    import jax
    import jax.numpy as jnp

    ema, inputs, write_shadows = _jax_parts(shadows, weights, host)

    def coupled(shadow_values, weight_values, decays, coupling):
        live, new, finite = ema(shadow_values, weight_values, decays)
        moved = []
        for w, s_new, original, pull in zip(live, new, weight_values, pulled):
            if pull:
                k = coupling.reshape((-1,) + (1,) * w.ndim)
                value = w - jnp.sum(k * (w[None] - s_new), axis=0)
                value = value.astype(original.dtype)
                moved.append(jnp.where(finite, value, original))
        return new, moved, finite

    compiled_coupled = jax.jit(coupled, donate_argnums=(0,))
    pulled_weights = [w for w, pull in zip(weights, pulled) if pull]

    def run_coupled(decays, coupling):
        new, moved, finite = compiled_coupled(
            *inputs(),
            jnp.asarray(decays, jnp.float32),
            jnp.asarray(coupling, jnp.float32),
        )
        write_shadows(new)
        for w, value in zip(pulled_weights, moved):
            w.assign(place_like(value, w) if host else value)
        return finite

    return Update(run_coupled)


# -- other backends -----------------------------------------------------------


def _eager_update(shadows, weights, pulled, jit_compile=False, host=False):
    """Any backend: the same arithmetic with `keras.ops`, eagerly."""
    ops = keras.ops

    def run(decays, coupling=None):
        decays = ops.convert_to_tensor(np.asarray(decays, np.float32))
        live = [_float32(w) for w in weights]
        finite = ops.all(ops.stack([ops.all(ops.isfinite(w)) for w in live]))
        if not bool(finite):
            return finite
        new = []
        for s, w in zip(shadows, live):
            a = _broadcast(decays, len(w.shape))
            new.append(a * s + (1.0 - a) * ops.expand_dims(w, 0))
            s.assign(new[-1])
        if pulled is not None:
            coupling = ops.convert_to_tensor(np.asarray(coupling, np.float32))
            for var, w, s_new, pull in zip(weights, live, new, pulled):
                if pull:
                    k = _broadcast(coupling, len(w.shape))
                    gap = ops.expand_dims(w, 0) - s_new
                    moved = w - ops.sum(k * gap, axis=0)
                    var.assign(ops.cast(moved, var.dtype))
        return finite

    if pulled is None:
        return Update(lambda decays: run(decays))
    return Update(run)


# (backend, variant) -> the function building its `Update`; a backend not
# listed runs `_eager_update`. The JAX host variant is `_jax_ema` with the
# weights copied to the host first.
_UPDATES = {
    ("tensorflow", "ema"): _tf_ema,
    ("tensorflow", "host"): _tf_host_ema,
    ("tensorflow", "coupled"): _tf_coupled,
    ("jax", "ema"): _jax_ema,
    ("jax", "host"): _jax_ema,
    ("jax", "coupled"): _jax_coupled,
}


def snapshot(variables):
    """Copies of the current values, unaffected by later assignments.

    Copies on JAX too: its arrays are immutable, but Keras' compiled
    `evaluate` donates the buffers of the model's variables (`donate_argnums`,
    Keras 3.15.1 JAX trainer), which deletes a buffer kept by reference. A
    variable no swap assigns (a frozen base under LoRA) would then be
    restored from a deleted buffer.
    """
    return [keras.ops.copy(v.value) for v in variables]


class Reader:
    """Reads a fixed list of variables as they are now, left on their devices.

    Later assignments do not change what it read, so another thread can
    copy it to the host (`numpy.asarray`) while training goes on.
    TensorFlow: one `tf.function` reading every variable, no copy (a read
    value keeps its buffer; a later assignment or in-place update gets
    another one). JAX: an asynchronous device copy of each (the trainer
    donates its variables' buffers to the next step, the EMA update its
    shadows'). Other backends: numpy copies, now.
    """

    def __init__(self, variables):
        self._variables = list(variables)
        self._backend = backend_name()
        self._read = None
        if self._backend == "tensorflow":
            import tensorflow as tf

            values = [v.value for v in self._variables]

            @tf.function(autograph=False)
            def read():
                return [tf.identity(v) for v in values]

            self._read = read

    def __call__(self) -> list:
        """The values, frozen (tensors or arrays)."""
        if not self._variables:
            return []
        if self._read is not None:
            return list(self._read())
        if self._backend == "jax":
            import jax.numpy as jnp

            return [jnp.copy(v.value) for v in self._variables]
        return [keras.ops.convert_to_numpy(v) for v in self._variables]

    def rows(self, index) -> list:
        """Row `index` of each (stacked) variable: functions of no arguments
        giving numpy arrays, to call in any thread. JAX slices the rows on
        the device now, asynchronously; TensorFlow reads the stacks (no
        copy) and the rows are taken on the host when called."""
        if self._backend == "jax":
            rows = [v.value[index] for v in self._variables]
            return [functools.partial(np.asarray, row) for row in rows]
        return [functools.partial(_row, stack, index) for stack in self()]


def _row(stack, index):
    return np.asarray(stack)[index]


def strategy_scope(model):
    """The scope new variables must be created in to live beside `model`'s."""
    from keras_ema import _keras_private

    strategy = _keras_private.distribute_strategy(model)
    if backend_name() == "tensorflow" and strategy is not None:
        return strategy.scope()
    import contextlib

    return contextlib.nullcontext()
