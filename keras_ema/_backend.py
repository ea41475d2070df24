"""The one place that knows which framework runs under Keras.

Everything else in `keras_ema` is written with `keras.ops`; the hot path, the
EMA update of all shadow sets, is compiled here per backend:

- TensorFlow: one `tf.function(jit_compile=True)` that reads every live weight
  once and writes every stacked shadow once (XLA fuses the multiply-adds).
- JAX: one `jax.jit` with the shadows donated, so they are updated in place.
- other backends: the same arithmetic with `keras.ops`, eagerly.

The decays are an input tensor, so a changing warm-up decay never retraces.
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
    if len(shadows) != len(weights):
        raise ValueError(
            f"Expected one shadow per weight. Received {len(shadows)} shadows "
            f"for {len(weights)} weights."
        )
    backend = name()
    if backend == "tensorflow":
        return _tf_update(shadows, weights, jit_compile)
    if backend == "jax":
        return _jax_update(shadows, weights)
    return _eager_update(shadows, weights)


def _broadcast(decays, ndim):
    return keras.ops.reshape(decays, (-1,) + (1,) * ndim)


def _tf_update(shadows, weights, jit_compile):
    import tensorflow as tf

    shadow_vars = [s.value for s in shadows]
    weight_vars = [w.value for w in weights]
    # A distribution strategy splits variables across replicas; XLA clusters
    # cannot assign to those, so compile only in the default strategy.
    jit = bool(jit_compile) and not tf.distribute.has_strategy()

    @tf.function(jit_compile=jit, autograph=False)
    def update(decays):
        live = [tf.cast(w, tf.float32) for w in weight_vars]
        finite = tf.reduce_all(
            tf.stack([tf.reduce_all(tf.math.is_finite(w)) for w in live])
        )
        for s, w in zip(shadow_vars, live):
            a = tf.reshape(decays, [-1] + [1] * len(w.shape))
            s.assign(tf.where(finite, a * s + (1.0 - a) * w[None], s))
        return finite

    def run(decays):
        return update(tf.constant(decays, dtype=tf.float32))

    return run


def _jax_update(shadows, weights):
    import jax
    import jax.numpy as jnp

    def update(shadow_values, weight_values, decays):
        live = [w.astype(jnp.float32) for w in weight_values]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(w)) for w in live]))
        new = []
        for s, w in zip(shadow_values, live):
            a = decays.reshape((-1,) + (1,) * w.ndim)
            new.append(jnp.where(finite, a * s + (1.0 - a) * w[None], s))
        return new, finite

    # Donating the shadows lets XLA write the new averages into their buffers.
    compiled = jax.jit(update, donate_argnums=(0,))

    def run(decays):
        new, finite = compiled(
            [s.value for s in shadows],
            [w.value for w in weights],
            jnp.asarray(decays, dtype=jnp.float32),
        )
        for s, value in zip(shadows, new):
            s.assign(value)
        return finite

    return run


def _eager_update(shadows, weights):
    ops = keras.ops

    def run(decays):
        decays = ops.convert_to_tensor(np.asarray(decays, np.float32))
        live = [_float32(w) for w in weights]
        finite = ops.all(ops.stack([ops.all(ops.isfinite(w)) for w in live]))
        if bool(finite):
            for s, w in zip(shadows, live):
                a = _broadcast(decays, len(w.shape))
                s.assign(a * s + (1.0 - a) * ops.expand_dims(w, 0))
        return finite

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
