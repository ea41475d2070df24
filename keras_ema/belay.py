"""BELAY: an EMA whose spring also pulls the model toward the average."""

import keras
import numpy as np

from keras_ema import _backend
from keras_ema.checks import check_fraction
from keras_ema.decay import check_decay
from keras_ema.multi_ema import MultiEMA


class Belay(MultiEMA):
    """An EMA coupled both ways to the model: the model is pulled toward it.

    Patsenker, Li and Kluger (arXiv 2310.13854) describe the EMA of weights
    as two particles joined by a zero-length spring: the EMA `s` is drawn
    to the model weights `w`. Their method, BELAY, lets the spring act on
    both particles. The paper's text is not available to this package: the
    equations below are reconstructed from that physical picture, not taken
    from the paper, and may differ from its algorithm.

    In the overdamped limit a particle's velocity is the force on it divided
    by its damping coefficient. With spring constant `kappa`, damping
    coefficients `gamma_s` (EMA) and `gamma_w` (model) and one explicit time
    step `T` (the `period`, in optimizer steps), the spring moves the
    particles by

    ```
    s <- s + (kappa * T / gamma_s) * (w - s)     # the EMA: 1 - a
    w <- w + (kappa * T / gamma_w) * (s - w)     # the pull: k = coupling
    ```

    on top of the optimizer's steps on `w`. A plain EMA is the limit of an
    infinitely damped model particle (`coupling = 0`), and
    `coupling / (1 - a)` is the ratio `gamma_s / gamma_w`. Every `period`
    optimizer steps this callback makes the `MultiEMA` update and then, in
    the same compiled call, moves the model toward the updated EMA:

    ```
    a = min(decay, (t + 1) / (t + 10))   # with `warmup`, else a = decay
    s = a * s + (1 - a) * w
    w = w - coupling * (w - s)           # trainable weights only
    ```

    with `t` the 0-based index of the optimizer step just taken. The gap
    `w - s` left for the next step is `(1 - coupling) * a` times the gap
    before the update, against `a` for a plain EMA: the model is held on a
    rope near its own average. When `steps_per_execution > 1` makes several
    updates due at one batch end, they run one after the other, each with
    the decay of its own step.

    Only trainable weights are pulled. The BatchNorm moving statistics are
    not optimized, they follow the data seen by the live model, so they are
    averaged (with `average_batch_norm`) but never pulled. The optimizer's
    slots (momentum) do not see the pull. With `coupling=0` the EMA and the
    training trajectory are exactly those of `MultiEMA(decays=(decay,))`.
    If a live weight is not finite, neither the EMA nor the weights are
    changed (see `MultiEMA`).

    Args:
        decay: float in (0, 1). The EMA decay. Defaults to `0.998`.
        coupling: float in [0, 1). The fraction `k` of the distance to the
            EMA that the trainable weights move at each update. Defaults to
            `0.1`.
        **kwargs: the other arguments of `MultiEMA` (`period`, `warmup`,
            `average_batch_norm`, `validation_data`, `backup_dir`, ...).

    Example:

    ```python
    belay = keras_ema.Belay(decay=0.998, coupling=0.1, period=16)
    model.fit(x, y, epochs=100, callbacks=[belay])
    with belay.swapped_in(0.998):
        model.evaluate(x_test, y_test)
    ```
    """

    def __init__(self, decay: float = 0.998, coupling: float = 0.1, **kwargs):
        decay = check_decay(decay)
        coupling = check_fraction("coupling", coupling, low_open=False)
        super().__init__(decays=(decay,), **kwargs)
        self.decay = decay
        self.coupling = coupling

    def _make_update(self, shadows, variables):
        pulled = [v.trainable for v in variables]
        return _backend.make_coupled_update(
            shadows, variables, pulled, jit_compile=self.jit_compile,
            shadow_device=self.shadow_device,
        )

    def _run_update(self, decays):
        # Updates due together merge into one with the product of the decays
        # (as MultiEMA does) only without a pull: each pull moves the weights
        # the next update averages.
        if self.coupling == 0.0:
            decays = np.prod(decays, axis=0, keepdims=True)
        coupling = np.float32([self.coupling])
        finite = None
        for row in decays:
            applied = self._update(row.astype(np.float32), coupling)
            if finite is None:
                finite = applied
            else:
                finite = keras.ops.logical_and(finite, applied)
        return finite

    def get_state(self) -> dict:
        state = super().get_state()
        state["coupling"] = self.coupling
        return state

    def set_state(self, state: dict):
        if "coupling" in state and float(state["coupling"]) != self.coupling:
            raise ValueError(
                f"Cannot restore a Belay state with coupling={state['coupling']}"
                f" into a Belay with coupling={self.coupling}. Use the same "
                "arguments."
            )
        super().set_state(state)
