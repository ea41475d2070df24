"""The one place that knows which framework runs under Keras.

Everything else in `keras_ema` is written with `keras.ops`; the hot path, the
EMA update of all shadow sets, is compiled here per backend:

- TensorFlow: one `tf.function(jit_compile=True)` that reads every live weight
  once and writes every stacked shadow once (XLA fuses the multiply-adds);
  the coupled variant (BELAY) also writes the pulled weights in that call.
- JAX: one `jax.jit` with the shadows donated, so they are updated in place.
- other backends: the same arithmetic with `keras.ops`, eagerly.

The decays (and BELAY's coupling) are input tensors, so a changing warm-up
decay never retraces.
TensorFlow and JAX are imported inside the functions that need them, so
importing `keras_ema` requires neither.
"""

import keras
import numpy as np


def name() -> str:
    return keras.backend.backend()


def _float32(x):
    return keras.ops.cast(x, "float32")


def make_ema_update(shadows, weights, jit_compile=True):
    """Returns `update(decays) -> finite` for fixed lists of variables.

    `shadows[j]` is a float32 `keras.Variable` of shape `(M,) + weights[j].shape`;
    row `i` is the EMA with decay `decays[i]`. The returned function applies
    `s <- a * s + (1 - a) * w` to every row of every shadow in one compiled
    call, unless a live weight holds a NaN or an infinity: then nothing is
    written. It returns a scalar boolean tensor (True when the update was
    applied) without waiting for the device.
    """
    _check_lengths(shadows, weights)
    return _build(shadows, weights, None, jit_compile)


def make_coupled_update(shadows, weights, pulled, jit_compile=True):
    """Returns `update(decays, coupling) -> finite`: the EMA update plus a pull.

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
    return _build(shadows, weights, [bool(p) for p in pulled], jit_compile)


def _check_lengths(shadows, weights):
    if len(shadows) != len(weights):
        raise ValueError(
            f"Expected one shadow per weight. Received {len(shadows)} shadows "
            f"for {len(weights)} weights."
        )


def _build(shadows, weights, pulled, jit_compile):
    backend = name()
    if backend == "tensorflow":
        return _tf_update(shadows, weights, pulled, jit_compile)
    if backend == "jax":
        return _jax_update(shadows, weights, pulled)
    return _eager_update(shadows, weights, pulled)


def _broadcast(decays, ndim):
    return keras.ops.reshape(decays, (-1,) + (1,) * ndim)


def _tf_update(shadows, weights, pulled, jit_compile):
    import tensorflow as tf

    shadow_vars = [s.value for s in shadows]
    weight_vars = [w.value for w in weights]
    # A distribution strategy mirrors variables on several devices; one XLA
    # cluster cannot assign to all copies, so compile only without one. (The
    # callbacks run outside the strategy's scope: look at the variables.)
    distributed = tf.distribute.has_strategy() or any(
        isinstance(v, tf.distribute.DistributedValues)
        for v in shadow_vars + weight_vars
    )
    jit = bool(jit_compile) and not distributed

    def ema(decays):
        live = [tf.cast(w, tf.float32) for w in weight_vars]
        finite = tf.reduce_all(
            tf.stack([tf.reduce_all(tf.math.is_finite(w)) for w in live])
        )
        new = []
        for s, w in zip(shadow_vars, live):
            a = tf.reshape(decays, [-1] + [1] * len(w.shape))
            new.append(a * s + (1.0 - a) * w[None])
            s.assign(tf.where(finite, new[-1], s))
        return live, new, finite

    if pulled is None:

        @tf.function(jit_compile=jit, autograph=False)
        def update(decays):
            return ema(decays)[2]

        def run(decays):
            return update(tf.constant(decays, dtype=tf.float32))

        return run

    @tf.function(jit_compile=jit, autograph=False)
    def coupled(decays, coupling):
        live, new, finite = ema(decays)
        for var, w, s_new, pull in zip(weight_vars, live, new, pulled):
            if pull:
                k = tf.reshape(coupling, [-1] + [1] * len(w.shape))
                moved = w - tf.reduce_sum(k * (w[None] - s_new), axis=0)
                var.assign(tf.where(finite, tf.cast(moved, var.dtype), var))
        return finite

    def run_coupled(decays, coupling):
        return coupled(
            tf.constant(decays, dtype=tf.float32),
            tf.constant(coupling, dtype=tf.float32),
        )

    return run_coupled


def _jax_update(shadows, weights, pulled):
    import jax
    import jax.numpy as jnp

    def ema(shadow_values, weight_values, decays):
        live = [w.astype(jnp.float32) for w in weight_values]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(w)) for w in live]))
        new = []
        for s, w in zip(shadow_values, live):
            a = decays.reshape((-1,) + (1,) * w.ndim)
            new.append(jnp.where(finite, a * s + (1.0 - a) * w[None], s))
        return live, new, finite

    def update(shadow_values, weight_values, decays):
        _, new, finite = ema(shadow_values, weight_values, decays)
        return new, finite

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

    # Donating the shadows lets XLA write the new averages into their buffers.
    # The live weights are not donated: the trainer may still hold them.
    def inputs():
        return [s.value for s in shadows], [w.value for w in weights]

    def write_shadows(new):
        for s, value in zip(shadows, new):
            s.assign(value)

    if pulled is None:
        compiled = jax.jit(update, donate_argnums=(0,))

        def run(decays):
            new, finite = compiled(*inputs(), jnp.asarray(decays, jnp.float32))
            write_shadows(new)
            return finite

        return run

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
            w.assign(value)
        return finite

    return run_coupled


def _eager_update(shadows, weights, pulled):
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
        return lambda decays: run(decays)
    return run


def snapshot(variables):
    """Copies of the current values, unaffected by later assignments."""
    if name() == "jax":
        return [v.value for v in variables]  # jax arrays are immutable
    return [keras.ops.copy(v.value) for v in variables]


def strategy_scope(model):
    """The scope new variables must be created in to live beside `model`'s."""
    strategy = getattr(model, "_distribute_strategy", None)
    if name() == "tensorflow" and strategy is not None:
        return strategy.scope()
    import contextlib

    return contextlib.nullcontext()
