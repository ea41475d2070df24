"""Post-hoc EMA: any averaging after training, from snapshots of the EMAs.

Karras et al. 2023 ("Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2, Sec. 3 and App. C): every average of the weights is
a linear combination of the past iterates, with a *profile*, the weight it
gives to each iterate. Iterate `n` is the model weights after `n` optimizer
steps; iterate 0 is the initial weights, which the EMAs start equal to.

`MultiEMA(snapshot_dir=..., snapshot_every=N)` writes all its EMAs every `N`
optimizer steps, with the log of the updates actually applied (the optimizer
step whose weights each update read and the decay it used; updates applied
together under `steps_per_execution > 1` multiply their decays, skipped
non-finite updates are absent). From that log the profile of every stored
EMA is exact. A target profile (`EMAProfile`, `PowerProfile`,
`UniformProfile`) is matched by least squares over the profiles of the
snapshots at or before the target step, in float64, and the weights are
combined snapshot by snapshot, streaming from disk.

Example:

```python
ema = keras_ema.MultiEMA(decays=(0.9, 0.99), period=1,
                         snapshot_dir="snaps", snapshot_every=10)
model.fit(x, y, epochs=10, callbacks=[ema])
report = keras_ema.posthoc.synthesize_into(
    model, "snaps", keras_ema.posthoc.EMAProfile(0.97))
print(report.profile_error)
```
"""

import contextlib
import json
import math
import os
import re

import numpy as np

from keras_ema._checks import as_float
from keras_ema._checks import check_int
from keras_ema._checks import is_int
from keras_ema._files import atomic_path
from keras_ema.decay import check_decay

SNAPSHOT_PREFIX = "snapshot_"
_SNAPSHOT_RE = re.compile(r"^snapshot_(\d{12})\.npz$")


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


def _check_step(step):
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
        """The weight on each iterate `0..step` of the average at `step`."""
        step = _check_step(step)
        p = np.zeros(step + 1)
        p[0] = 1.0
        for t in range(self.period - 1, step, self.period):
            a = min(self.decay, (t + 1.0) / (t + 10.0)) if self.warmup else self.decay
            p *= a
            p[t + 1] += 1.0 - a
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
        step = _check_step(step)
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
        step = _check_step(step)
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


def _one_blas_thread():
    """BLAS on one thread: the products here are small or memory-bound, and
    a threaded BLAS waking its threads on a busy machine is 100x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def snapshot_path(snapshot_dir: str, step: int) -> str:
    return os.path.join(snapshot_dir, f"{SNAPSHOT_PREFIX}{int(step):012d}.npz")


def write_snapshot(
    snapshot_dir: str, step: int, shadows: list, meta: dict, dtype: str = "float32"
) -> str:
    """Writes one snapshot atomically (temporary file with the pid, renamed).

    `shadows[j]` is the `(num_emas,) + shape` array of variable `j`; `meta`
    a JSON-able dict (decays, period, warmup, paths, the update log).
    """
    os.makedirs(snapshot_dir, exist_ok=True)
    path = snapshot_path(snapshot_dir, step)
    meta = dict(meta, step=int(step), dtype=str(dtype))
    # The temporary name is hidden from `list_snapshots`.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            meta=np.asarray(json.dumps(meta)),
            **{f"s{j}": np.asarray(s).astype(dtype)
               for j, s in enumerate(shadows)},
        )
    return path


def list_snapshots(snapshot_dir: str) -> list:
    """`[(step, path)]` of the snapshots in `snapshot_dir`, by step."""
    if not os.path.isdir(snapshot_dir):
        raise ValueError(
            f"Invalid snapshot_dir={snapshot_dir!r}: not a directory. Pass the "
            "`snapshot_dir` given to MultiEMA (or the run's `snapshots/`)."
        )
    found = []
    for name in os.listdir(snapshot_dir):
        m = _SNAPSHOT_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(snapshot_dir, name)))
    return sorted(found)


def read_meta(path: str) -> dict:
    try:
        with np.load(path) as data:
            return json.loads(str(data["meta"]))
    except Exception as e:
        raise ValueError(
            f"Cannot read snapshot {path}: {type(e).__name__}: {e}. The file is "
            "damaged; delete it and synthesize from the others."
        ) from None


class Report:
    """What `synthesize` did: the target, step, coefficients and profile error.

    Attributes:
        target: the target profile.
        step: the target optimizer step.
        coefficients: dict `{(snapshot_step, decay): coefficient}` (nonzero ones).
        profile_error: `||A c - p|| / ||p||`, relative error of the
            synthesized profile against the target's.
        paths: the averaged variables' paths.
    """

    def __init__(self, target, step, coefficients, profile_error, paths):
        self.target = target
        self.step = step
        self.coefficients = coefficients
        self.profile_error = profile_error
        self.paths = paths

    def __repr__(self):
        return (
            f"Report(target={self.target!r}, step={self.step}, "
            f"snapshots={len({s for s, _ in self.coefficients})}, "
            f"profile_error={self.profile_error:.3g})"
        )


def solve(snapshot_dir: str, target, step: int | None = None) -> tuple:
    """Least-squares coefficients of the snapshots for `target` at `step`.

    Returns `(report, plan)` where `plan` is `[(path, coefficients per EMA)]`
    of the snapshots with a nonzero coefficient.
    """
    if not callable(getattr(target, "weights", None)):
        raise ValueError(
            "Invalid `target`: expected EMAProfile, PowerProfile or "
            f"UniformProfile. Received: target={target!r}"
        )
    snaps = list_snapshots(snapshot_dir)
    if not snaps:
        raise ValueError(
            f"No snapshots in {snapshot_dir!r}: train with "
            "MultiEMA(snapshot_dir=..., snapshot_every=N) first."
        )
    if step is None:
        step = snaps[-1][0]
    step = _check_step(step)
    snaps = [(s, p) for s, p in snaps if s <= step]
    if not snaps:
        first = list_snapshots(snapshot_dir)[0][0]
        raise ValueError(
            f"Invalid step={step}: no snapshot at or before it in "
            f"{snapshot_dir!r} (the first is at step {first})."
        )
    last_meta = read_meta(snaps[-1][1])
    log = last_meta["log"]
    decays = last_meta["decays"]
    paths = last_meta["paths"]
    iterates, profiles = log_profiles(
        log["start"], log["steps"], log["decays"], [s for s, _ in snaps]
    )
    inside = iterates <= step
    iterates = iterates[inside]
    a = profiles[:, :, inside].reshape(-1, len(iterates)).T
    owners = [(s, path, i, d) for s, path in snaps for i, d in enumerate(decays)]
    full = target.weights(step)
    p = full[iterates]
    # The target's weight on iterates no snapshot holds cannot be matched.
    outside = max(float(np.dot(full, full) - np.dot(p, p)), 0.0)
    # A target in the basis: that column alone (exactly that snapshot).
    diff = np.abs(a - p[:, None]).max(axis=0)
    k = int(np.argmin(diff))
    if outside == 0.0 and diff[k] <= 1e-9 * p.max():
        c = np.zeros(a.shape[1])
        c[k] = 1.0
    else:
        with _one_blas_thread():
            c = np.linalg.lstsq(a, p, rcond=None)[0]
    residual = float(np.sum((a @ c - p) ** 2)) + outside
    error = math.sqrt(residual) / float(np.linalg.norm(full))
    plan, coefficients = {}, {}
    for ck, (s, path, i, d) in zip(c, owners):
        if ck != 0.0:
            plan.setdefault(path, np.zeros(len(decays)))[i] = ck
            coefficients[(s, d)] = float(ck)
    report = Report(target, step, coefficients, error, paths)
    return report, sorted(plan.items())


def synthesize(snapshot_dir: str, target, step: int | None = None) -> tuple:
    """The weights of `target` at `step`, combined from the stored snapshots.

    Solves the least-squares match of the target's profile by the profiles
    of the snapshots at or before `step` (float64), then combines the stored
    EMAs snapshot by snapshot and variable by variable, reading one array
    at a time: each snapshot's EMAs in float32, the sum over
    snapshots in float64 (peak memory: the float64 result, about two model
    copies).

    Args:
        snapshot_dir: str. The `snapshot_dir` of the `MultiEMA` that wrote
            the snapshots.
        target: `EMAProfile`, `PowerProfile` or `UniformProfile`.
        step: int or `None`. Target optimizer step; only snapshots at or
            before it are used. Defaults to `None` (the last snapshot's step).

    Returns:
        `(arrays, report)`: float32 arrays in the order of `report.paths`,
        and a `Report`.
    """
    report, plan = solve(snapshot_dir, target, step)
    out = None
    with _one_blas_thread():
        for path, coeffs in plan:
            with np.load(path) as data:
                n = len(report.paths)
                if out is None:
                    out = [None] * n
                for j in range(n):
                    s = data[f"s{j}"]
                    if s.dtype != np.float32:  # float16 snapshots: combine in float32
                        s = s.astype(np.float32)
                    if out[j] is None:
                        out[j] = np.zeros(s.shape[1:])
                    # This snapshot's EMAs combined in float32 (one BLAS pass over
                    # the stored array), accumulated over snapshots in float64.
                    part = np.dot(coeffs.astype(s.dtype), s.reshape(len(coeffs), -1))
                    np.add(out[j], part.reshape(s.shape[1:]), out=out[j])
                    del s, part
    for j, o in enumerate(out):  # one float64 array freed at a time
        out[j] = o.astype(np.float32)
        del o
    return out, report


def synthesize_into(
    model, snapshot_dir: str, target, step: int | None = None
) -> Report:
    """Assigns the synthesized average of `target` into `model`.

    The averaged variables (those the snapshots hold, matched by path: the
    trainable variables and, when they were averaged, the BatchNorm
    statistics) receive the synthesized values; every other variable keeps
    its live value (the library's rule for non-averaged variables).

    Args:
        model: the trained `keras.Model` (same architecture as the run's).
        snapshot_dir: str. Where `MultiEMA` wrote the snapshots.
        target: `EMAProfile`, `PowerProfile` or `UniformProfile`.
        step: int or `None`. Target optimizer step. Defaults to `None` (the
            last snapshot's step).

    Returns:
        The `Report` of `synthesize`.

    Example:

    ```python
    report = synthesize_into(model, "run/snapshots", PowerProfile(0.10))
    ```
    """
    import keras

    by_path = {v.path: v for v in model.weights}
    snaps = list_snapshots(snapshot_dir)
    paths = read_meta(snaps[-1][1])["paths"] if snaps else []
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise ValueError(
            f"The snapshots in {snapshot_dir!r} hold variables {missing[:3]} "
            f"that model {model.name} lacks. Pass the model they were taken from."
        )
    arrays, report = synthesize(snapshot_dir, target, step)
    for path, value in zip(report.paths, arrays):
        v = by_path[path]
        if tuple(v.shape) != value.shape:
            raise ValueError(
                f"Snapshot variable {path} has shape {value.shape}, the model's "
                f"has {tuple(v.shape)}. Pass the model the snapshots were taken from."
            )
        v.assign(keras.ops.cast(value, v.dtype))
    return report
