"""Post-hoc EMA profiles: the weight an average gives to each iterate.

Iterate `n` is the model weights after `n` optimizer steps; iterate 0 is the
initial weights. A target profile is `EMAProfile` (a classic EMA, as
`MultiEMA` computes it), `PowerProfile` (EDM2's power EMA, by its relative
width `sigma_rel`) or `UniformProfile` (SWA, LAWA); `log_profiles` gives the
exact profiles of the stored EMAs from their update log (Karras et al. 2023,
EDM2, Sec. 3 and App. C).
"""

import math

import numpy as np

from keras_ema.checks import as_float
from keras_ema.checks import check_int
from keras_ema.checks import is_int
from keras_ema.decay import check_decay

# === Power EMA parameters (EDM2 Eq. 123, Algorithm 2) ===


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2's relative width of a power EMA of exponent `gamma`.

    `sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3)))` (EDM2 Eq. 123).

    Args:
        gamma: float > -1. The exponent of the power profile.

    Returns:
        The relative standard deviation of the profile, a float.
    """
    g = as_float(gamma)
    if not g > -1 or not math.isfinite(g):
        raise ValueError(
            f"Invalid value for argument `gamma`: expected a finite float > -1. "
            f"Received: gamma={gamma!r}"
        )
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-EMA exponent `gamma` whose relative width is `sigma_rel`.

    Inverts `gamma_to_sigma_rel` (EDM2 Algorithm 2: the largest real root of
    `t^2 (g^3 + 7 g^2 + 16 g + 12) = g + 1` with `t = sigma_rel`, written as
    the cubic `g^3 + 7 g^2 + (16 - 1/t^2) g + 12 - 1/t^2 = 0`).
    0.10 -> 6.94, 0.05 -> 16.97.

    Args:
        sigma_rel: float in (0, 0.3003). The profile's standard deviation
            relative to the training length: smaller concentrates the average
            on the last iterates.

    Returns:
        gamma, a float > -0.382 (the larger root).
    """
    s = as_float(sigma_rel)
    if not (0.0 < s < _SIGMA_REL_MAX) or not math.isfinite(s):
        raise ValueError(
            "Invalid value for argument `sigma_rel`: expected a float in "
            f"(0, {_SIGMA_REL_MAX:.4f}). Received: sigma_rel={sigma_rel!r}"
        )
    t = s * s
    roots = np.roots([1.0, 7.0, 16.0 - 1.0 / t, 12.0 - 1.0 / t])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1]
    return float(max(real))


# gamma_to_sigma_rel is 0 at gamma = -1 and at infinity; its maximum, 0.3003,
# is at gamma = (sqrt(5) - 3) / 2.
_SIGMA_REL_MAX = math.sqrt(
    ((5**0.5 - 3) / 2 + 1) / (((5**0.5 - 3) / 2 + 2) ** 2 * ((5**0.5 - 3) / 2 + 3))
)


# === Profiles ===


def check_step(step):
    if not is_int(step) or step < 1:
        raise ValueError(
            f"Invalid target step: expected an int >= 1. Received: step={step!r}"
        )
    return int(step)


class EMAProfile:
    """A classic EMA, as `MultiEMA` computes it with one decay.

    Starting from the initial weights (iterate 0), after every `period`-th
    optimizer step (0-based index `t`, `(t + 1) % period == 0`) the average
    `s` becomes `a * s + (1 - a) * w_{t+1}` with
    `a = min(decay, (t + 1) / (t + 10))` when `warmup`, else `a = decay`.

    Args:
        decay: float in (0, 1). The EMA decay.
        period: int >= 1. Optimizer steps between two updates. Defaults to `1`.
        warmup: bool. Whether the warm-up decay is used. Defaults to `True`.

    Example:

    ```python
    EMAProfile(0.97).weights(300)  # 301 weights on iterates 0..300
    ```
    """

    def __init__(self, decay: float, period: int = 1, warmup: bool = True):
        self.decay = check_decay(decay)
        self.period = check_int("period", period)
        self.warmup = bool(warmup)

    def weights(self, step: int) -> np.ndarray:
        """The weight on each iterate `0..step` of the average at `step`.

        O(step): the update after step `t` reads iterate `t + 1` with weight
        `1 - a_t`, then every later update multiplies it by its decay; the
        products of the later decays are one reversed cumulative product.
        """
        step = check_step(step)
        t = np.arange(self.period - 1, step, self.period, dtype=np.float64)
        if self.warmup:
            a = np.minimum(self.decay, (t + 1.0) / (t + 10.0))
        else:
            a = np.full(len(t), self.decay)
        # later[k]: product of the decays of the updates after update k.
        later = np.ones(len(a) + 1)
        later[:-1] = np.cumprod(a[::-1])[::-1]
        p = np.zeros(step + 1)
        p[0] = later[0]
        p[t.astype(np.int64) + 1] = (1.0 - a) * later[1:]
        return p

    def length(self, step: int) -> float:
        """Averaging length in steps: the mean age of the averaged iterates."""
        return _mean_age(self.weights(step))

    def __repr__(self):
        return (f"EMAProfile(decay={self.decay}, period={self.period}, "
                f"warmup={self.warmup})")


class PowerProfile:
    """EDM2's power-function EMA of relative width `sigma_rel`.

    At target step `N` the weight on iterate `n` (`0 <= n <= N`) is
    `n^gamma / sum_{m=0..N} m^gamma`, with `gamma = sigma_rel_to_gamma(
    sigma_rel)`: the discrete form of EDM2's `p_t(tau) ∝ tau^gamma`
    (App. C.1). The initial weights (iterate 0) get weight 0. EDM2's
    recursive form `beta_t = (1 - 1/t)^(gamma + 1)` approximates these
    weights; this class uses the exact normalized powers.

    Args:
        sigma_rel: float. The width of the profile relative to the training
            length (EDM2 uses 0.05 to 0.15).

    Example:

    ```python
    PowerProfile(0.10).gamma  # 6.94...
    ```
    """

    def __init__(self, sigma_rel: float):
        self.gamma = sigma_rel_to_gamma(sigma_rel)
        self.sigma_rel = float(sigma_rel)

    def weights(self, step: int) -> np.ndarray:
        step = check_step(step)
        n = np.arange(step + 1, dtype=np.float64) / step
        p = n ** self.gamma
        return p / p.sum()

    def length(self, step: int) -> float:
        return _mean_age(self.weights(step))

    def __repr__(self):
        return f"PowerProfile(sigma_rel={self.sigma_rel})"


class UniformProfile:
    """A uniform average of iterates `start_step..end_step` (SWA, LAWA).

    Args:
        start_step: int >= 0. First iterate averaged.
        end_step: int or `None`. Last iterate averaged (inclusive); `None`
            means the target step. Defaults to `None`.

    Example:

    ```python
    UniformProfile(200).weights(300)  # 1/101 on iterates 200..300
    ```
    """

    def __init__(self, start_step: int, end_step: int | None = None):
        check_int("start_step", start_step, minimum=0)
        if end_step is not None and (not is_int(end_step) or end_step < start_step):
            raise ValueError(
                "Invalid value for argument `end_step`: expected None or an "
                f"int >= start_step={start_step}. Received: end_step={end_step!r}"
            )
        self.start_step = int(start_step)
        self.end_step = None if end_step is None else int(end_step)

    def weights(self, step: int) -> np.ndarray:
        step = check_step(step)
        end = step if self.end_step is None else self.end_step
        if end > step or self.start_step > step:
            raise ValueError(
                f"UniformProfile({self.start_step}, {self.end_step}) averages "
                f"iterates after the target step {step}. Choose a later step "
                "or an earlier window."
            )
        p = np.zeros(step + 1)
        p[self.start_step : end + 1] = 1.0 / (end - self.start_step + 1)
        return p

    def length(self, step: int) -> float:
        return _mean_age(self.weights(step))

    def __repr__(self):
        return f"UniformProfile(start_step={self.start_step}, end_step={self.end_step})"


def _mean_age(p):
    """Mean age (steps before the last iterate) of a profile's weights."""
    n = len(p) - 1
    return float(np.dot(p, n - np.arange(n + 1)) / p.sum())


# === Update log and snapshot profiles ===


def log_profiles(start: int, log_steps, log_decays, at_steps):
    """Profiles of the EMAs of an update log at each step of `at_steps`.

    The EMAs start equal to iterate `start`; log entry `k` applied
    `s = a * s + (1 - a) * w_{log_steps[k]}` with `a = log_decays[k]` (one
    decay per EMA), and the profile at step `S` uses the entries with
    `log_steps[k] <= S`. Computed in float64 from cumulative log-decays, so
    the cost is `len(at_steps) * len(log)` per EMA, whatever the step count.

    Returns:
        `(iterates, profiles)`: the iterates that can carry weight
        (`start` and the logged steps, increasing) and a float64 array
        `(len(at_steps), num_emas, len(iterates))`.
    """
    steps = np.asarray(log_steps, np.int64)
    a = np.asarray(log_decays, np.float64).reshape(len(steps), -1)
    m = a.shape[1] if len(steps) else 1
    iterates = np.concatenate([[start], steps])
    # cum[k] = sum of log(a) over the first k entries.
    cum = np.concatenate([np.zeros((1, m)), np.cumsum(np.log(a), axis=0)])
    out = np.zeros((len(at_steps), m, len(iterates)))
    for r, s in enumerate(at_steps):
        k = int(np.searchsorted(steps, s, side="right"))  # entries applied
        out[r, :, 0] = np.exp(cum[k])
        if k:
            out[r, :, 1 : k + 1] = ((1.0 - a[:k]) * np.exp(cum[k] - cum[1 : k + 1])).T
    return iterates, out
