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
import warnings
import zipfile

import numpy as np

from keras_ema._checks import as_float
from keras_ema._checks import check_int
from keras_ema._checks import is_int
from keras_ema._checks import is_real
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
        """The weight on each iterate `0..step` of the average at `step`.

        O(step): the update after step `t` reads iterate `t + 1` with weight
        `1 - a_t`, then every later update multiplies it by its decay; the
        products of the later decays are one reversed cumulative product.
        """
        step = _check_step(step)
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


# === Snapshots on disk ===


def snapshot_path(snapshot_dir: str, step: int) -> str:
    return os.path.join(snapshot_dir, f"{SNAPSHOT_PREFIX}{int(step):012d}.npz")


def write_snapshot(
    snapshot_dir: str, step: int, shadows: list, meta: dict, dtype: str = "float32"
) -> str:
    """Writes one snapshot atomically (temporary file with the pid, renamed).

    `shadows[j]` is the `(num_emas,) + shape` array of variable `j`; `meta`
    a JSON-able dict: `run_id` (the run that wrote it: snapshots of two runs
    are never combined), decays, period, warmup, `paths` (the variables) and
    `log` (the update log). The log is stored as its own array, so that
    reading what a snapshot holds does not parse the log.
    """
    os.makedirs(snapshot_dir, exist_ok=True)
    path = snapshot_path(snapshot_dir, step)
    meta = dict(meta, step=int(step), dtype=str(dtype))
    log = meta.pop("log")
    # The temporary name is hidden from `list_snapshots`.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            meta=np.asarray(json.dumps(meta)),
            log=np.asarray(json.dumps(log)),
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


class _Damaged(Exception):
    """A snapshot that does not read back (internal: the basis drops it)."""

    def __init__(self, path, error):
        super().__init__(path)
        self.path = path
        self.reason = f"{type(error).__name__}: {error}"


def _read_json(path, key):
    # A damaged file fails in many ways: zero length (EOFError), bit flips
    # (zipfile.BadZipFile: Bad CRC-32), truncation, garbage (OSError,
    # ValueError, KeyError); any of them means the file is unusable.
    try:
        with np.load(path) as data:
            if key not in data.files:
                return None
            return json.loads(str(data[key]))
    except Exception as e:  # noqa: BLE001 (see above)
        raise _Damaged(path, e) from None


def _damaged_message(path, reason):
    return (f"Snapshot {path} is damaged ({reason}). Delete it (post-hoc EMA "
            "then uses the other snapshots) or restore it from a copy.")


def read_meta(path: str) -> dict:
    """What a snapshot holds (run, decays, variables...), without its log."""
    try:
        meta = _read_json(path, "meta")
        if not isinstance(meta, dict):
            raise _Damaged(path, ValueError("no description"))
    except _Damaged as e:
        raise ValueError(_damaged_message(e.path, e.reason)) from None
    meta.pop("log", None)  # snapshots written before the log had its own array
    return meta


def read_log(path: str) -> dict:
    """The update log a snapshot stores (`start`, `steps`, `decays`)."""
    try:
        return _read_log(path)
    except _Damaged as e:
        raise ValueError(_damaged_message(e.path, e.reason)) from None


def _read_log(path):
    log = _read_json(path, "log")
    if log is None:
        log = (_read_json(path, "meta") or {}).get("log")
    if not isinstance(log, dict):
        raise _Damaged(path, ValueError("no update log"))
    return log


def damaged_snapshots(snapshot_dir: str, up_to_step: int | None = None) -> list:
    """`[(path, reason)]` of the snapshots that do not read back whole.

    Every stored array is read and its CRC-32 checked (a whole pass over the
    snapshots at or before `up_to_step`, all of them when `None`).
    """
    out = []
    for step, path in list_snapshots(snapshot_dir):
        if up_to_step is not None and step > up_to_step:
            break
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"Bad CRC-32 for file {bad!r}")
            _read_log(path)
            read_meta(path)
        except _Damaged as e:
            out.append((path, e.reason))
        except ValueError as e:
            out.append((path, str(e)))
        except Exception as e:  # noqa: BLE001 (any failure: unusable)
            out.append((path, f"{type(e).__name__}: {e}"))
    return out


def check_snapshot_dir(snapshot_dir: str, run_id, paths: list) -> None:
    """Refuses a `snapshot_dir` that holds snapshots of another run.

    `MultiEMA` calls it before it writes: a second run's snapshots would mix
    with the first's (another run's profiles, or another model's variables).
    Damaged snapshots are left to `synthesize`, which names them.

    Raises:
        ValueError: one line naming a foreign snapshot and what to do.
    """
    if not os.path.isdir(snapshot_dir):
        return
    for _, path in list_snapshots(snapshot_dir):
        try:
            meta = read_meta(path)
        except ValueError:
            continue
        if meta.get("run_id") != run_id or list(meta.get("paths", [])) != list(paths):
            what = ("another model's variables"
                    if list(meta.get("paths", [])) != list(paths) else
                    f"run {meta.get('run_id')}")
            raise ValueError(
                f"MultiEMA: snapshot_dir {snapshot_dir!r} holds snapshots of "
                f"another run ({os.path.basename(path)}: {what}; this run is "
                f"{run_id}). Give this run its own snapshot_dir, or move those "
                "snapshots away."
            )


class _Snapshots:
    """The snapshots of one run in a directory: read, checked, damaged ones out."""

    def __init__(self, snapshot_dir):
        snaps = list_snapshots(snapshot_dir)
        if not snaps:
            raise ValueError(
                f"No snapshots in {snapshot_dir!r}: train with "
                "MultiEMA(snapshot_dir=..., snapshot_every=N) first."
            )
        self.dir = snapshot_dir
        self.good = []  # [(step, path, meta)]
        self.damaged = {}  # path -> reason
        for step, path in snaps:
            try:
                self.good.append((step, path, _read_json(path, "meta")))
            except _Damaged as e:
                self.damaged[e.path] = e.reason
        for step, path, meta in list(self.good):
            if not isinstance(meta, dict):
                self.drop(path, "ValueError: no description")
        self._require_some()
        key = _run_key(self.good[-1][2])
        for step, path, meta in self.good:
            if _run_key(meta) != key:
                raise ValueError(
                    f"{snapshot_dir!r} mixes snapshots of two runs: "
                    f"{os.path.basename(path)} ({_run_text(meta)}) and "
                    f"{os.path.basename(self.good[-1][1])} "
                    f"({_run_text(self.good[-1][2])}). Keep one run's snapshots "
                    "per directory: move the others to their own."
                )
        m = self.good[-1][2]
        self.decays = [float(d) for d in m["decays"]]
        self.paths = list(m["paths"])

    def drop(self, path, reason):
        self.damaged[path] = reason
        self.good = [g for g in self.good if g[1] != path]
        self._require_some()

    def _require_some(self):
        if not self.good:
            path, reason = sorted(self.damaged.items())[-1]
            raise ValueError(
                f"Every snapshot in {self.dir!r} is damaged (the last: "
                f"{os.path.basename(path)}, {reason}). Restore them from a copy, "
                "or retrain with --snapshot_every."
            )

    def warn_damaged(self):
        for path, reason in sorted(self.damaged.items()):
            warnings.warn(
                f"post-hoc EMA: skipped snapshot {path}: it is damaged "
                f"({reason}). Delete it to silence this warning.",
                stacklevel=3,
            )

    def damaged_text(self):
        if not self.damaged:
            return ""
        names = ", ".join(os.path.basename(p) for p in sorted(self.damaged))
        return f"; damaged snapshots left out: {names} (restore them from a copy)"


def _run_key(meta):
    return (meta.get("run_id"), tuple(meta.get("paths", ())),
            tuple(float(d) for d in meta.get("decays", ())))


def _run_text(meta):
    return (f"run {meta.get('run_id')}, {len(meta.get('paths', ()))} variables, "
            f"decays {meta.get('decays')}")


# === The solve ===


class UnmatchedTargetError(ValueError):
    """The snapshots match a target only above the accepted error."""


class Report:
    """What `synthesize` did: the target, step, coefficients and error bound.

    Attributes:
        target: the target profile.
        step: the target optimizer step.
        coefficients: dict `{(snapshot_step, decay): coefficient}` (nonzero
            ones); they sum to 1 (every synthesized average is an average).
        profile_error: `||A c - p|| / ||p||`, relative error of the
            synthesized profile `A c` against the target's `p`, both on the
            iterates the EMAs read (the target renormalized there).
        profile_l1: `||A c - p||_1`. The weights' error from the profile
            mismatch is at most this times the largest distance of an
            averaged iterate from any other.
        coefficient_norm: `sum |c|`, the factor by which the snapshots'
            rounding is amplified.
        rounding_bound: bound on the absolute weight error due to the
            snapshots' rounding: `coefficient_norm * eps(snapshot dtype) *
            max |stored value|` (`None` from `solve`, which reads no weights).
        gap: max distance between the synthesized weights and the fastest
            stored EMA of the last snapshot used (its stand-in for the live
            weights; `None` from `solve`).
        error_bound: `profile_error + rounding_bound / gap`, the weight error
            relative to the target's distance from the live weights, the
            rounding included (`None` from `solve`).
        length: the target's averaging length on the iterates read (mean age
            in steps).
        ridge: the ridge of the least squares (0: none; see `solve`).
        damaged: paths of damaged snapshots left out of the basis.
        paths: the averaged variables' paths.
    """

    def __init__(self, target, step, coefficients, profile_error, paths, **extra):
        self.target = target
        self.step = step
        self.coefficients = coefficients
        self.profile_error = profile_error
        self.paths = paths
        self.profile_l1 = extra.get("profile_l1")
        self.coefficient_norm = extra.get("coefficient_norm")
        self.rounding_bound = extra.get("rounding_bound")
        self.gap = extra.get("gap")
        self.error_bound = extra.get("error_bound")
        self.length = extra.get("length")
        self.ridge = extra.get("ridge", 0.0)
        self.damaged = extra.get("damaged", [])

    def __repr__(self):
        bound = "" if self.error_bound is None else f", error_bound={self.error_bound:.3g}"
        return (
            f"Report(target={self.target!r}, step={self.step}, "
            f"snapshots={len({s for s, _ in self.coefficients})}, "
            f"profile_error={self.profile_error:.3g}{bound})"
        )


_EPS = {"float32": float(np.finfo(np.float32).eps),
        "float16": float(np.finfo(np.float16).eps)}


def _scale(path, num_vars):
    """`(max |value|, max distance of an EMA from the fastest)` of one snapshot."""
    top = spread = 0.0
    try:
        with np.load(path) as data:
            for j in range(num_vars):
                s = data[f"s{j}"].astype(np.float64)
                top = max(top, float(np.abs(s).max(initial=0.0)))
                spread = max(spread, float(np.abs(s - s[:1]).max(initial=0.0)))
    except Exception as e:  # noqa: BLE001 (unusable whatever the failure)
        raise _Damaged(path, e) from None
    return top, spread


def _constrained_lstsq(a, p, amplification):
    """`c` minimizing `||a c - p||` with `sum(c) = 1`, and the ridge used.

    The constraint is eliminated with a Householder reflection `H` that maps
    the ones vector to `-sqrt(m) e_1`: `c = H y` with `y_0 = -1/sqrt(m)` and
    `y_1..` free (an orthonormal basis of the vectors summing to 0, so no
    conditioning is lost). The free part is solved by SVD with a ridge
    `lam` chosen from a grid to minimize the estimated weight error
    `profile_error(lam) + sum|c(lam)| * amplification`, where
    `amplification` is the snapshots' rounding relative to the weights'
    distances (`eps * max|w| / spread`): an ill-conditioned basis whose
    coefficients would multiply the float32 rounding gets a ridge instead.
    """
    m = a.shape[1]
    if m == 1:
        return np.ones(1), 0.0
    v = np.ones(m)
    v[0] += math.sqrt(m)
    vv = float(v @ v)
    ah = a - np.outer(a @ v, v) * (2.0 / vv)
    y0 = -1.0 / math.sqrt(m)
    b = p - ah[:, 0] * y0
    u, sv, vt = np.linalg.svd(ah[:, 1:], full_matrices=False)
    beta = u.T @ b
    norm_p = float(np.linalg.norm(p))
    cutoff = sv[0] * max(a.shape) * np.finfo(np.float64).eps if len(sv) else 0.0

    def coefficients(lam):
        f = np.where(sv > cutoff, sv / (sv * sv + lam), 0.0) if lam == 0 else sv / (sv * sv + lam)
        y = np.concatenate([[y0], vt.T @ (f * beta)])
        return y - v * (2.0 * float(v @ y) / vv)

    best = None
    lams = [0.0]
    if amplification > 0 and len(sv) and sv[0] > 0:
        lams += [float(sv[0]) ** 2 * 10.0 ** -k for k in range(16, 0, -1)]
    for lam in lams:
        c = coefficients(lam)
        err = float(np.linalg.norm(a @ c - p)) / norm_p
        estimate = err + float(np.abs(c).sum()) * amplification
        if best is None or estimate < best[0]:
            best = (estimate, c, lam)
    return best[1], best[2]


def _solve(snaps, target, step):
    """`(report, plan)` over the readable snapshots of `snaps` (a `_Snapshots`)."""
    good = snaps.good
    first, last = good[0][0], good[-1][0]
    if step is None:
        step = last
    step = _check_step(step)
    if step > last:
        raise ValueError(
            f"Invalid step={step}: past the last snapshot (step {last}) in "
            f"{snaps.dir!r}, so the iterates after step {last} are unknown. "
            f"Choose a step in [{first}, {last}]{snaps.damaged_text()}."
        )
    used = [(s, path, meta) for s, path, meta in good if s <= step]
    if not used:
        raise ValueError(
            f"Invalid step={step}: no snapshot at or before it in "
            f"{snaps.dir!r}. Choose a step in [{first}, {last}] (the first "
            f"snapshot is at step {first}){snaps.damaged_text()}."
        )
    # The last snapshot's log holds every update read up to it, those after
    # the target step's last snapshot included (weight the basis cannot match).
    log = _read_log(good[-1][1])
    decays = snaps.decays
    iterates, profiles = log_profiles(
        log["start"], log["steps"], log["decays"], [s for s, _, _ in used]
    )
    inside = iterates <= step
    iterates = iterates[inside]
    a = profiles[:, :, inside].reshape(-1, len(iterates)).T
    owners = [(s, path, i, d) for s, path, _ in used for i, d in enumerate(decays)]
    # The EMAs read only these iterates (with period P: iterate 0 and the
    # multiples of P): the target is defined on them, renormalized.
    p = np.asarray(target.weights(step), np.float64)[iterates]
    total = float(p.sum())
    if not total > 0:
        raise UnmatchedTargetError(
            f"{target!r} at step {step} puts no weight on the iterates the "
            f"EMAs read (iterate {int(iterates[0])} and the updates' steps). "
            "Choose a target whose window holds an EMA update."
        )
    p = p / total
    # A target in the basis: that column alone (exactly that snapshot).
    diff = np.abs(a - p[:, None]).max(axis=0)
    k = int(np.argmin(diff))
    ridge = 0.0
    if diff[k] <= 1e-9 * p.max():
        c = np.zeros(a.shape[1])
        c[k] = 1.0
    else:
        eps = max(_EPS.get(meta.get("dtype", "float32"), _EPS["float32"])
                  for _, _, meta in used)
        top, spread = _scale(used[-1][1], len(snaps.paths))
        amplification = eps * top / spread if spread > 0 else 0.0
        with _one_blas_thread():
            c, ridge = _constrained_lstsq(a, p, amplification)
    residual = a @ c - p
    error = float(np.linalg.norm(residual)) / float(np.linalg.norm(p))
    plan, coefficients = {}, {}
    for ck, (s, path, i, d) in zip(c, owners):
        if ck != 0.0:
            plan.setdefault(path, np.zeros(len(decays)))[i] = ck
            coefficients[(s, d)] = float(ck)
    report = Report(
        target, step, coefficients, error, snaps.paths,
        profile_l1=float(np.abs(residual).sum()),
        coefficient_norm=float(np.abs(c).sum()),
        length=float(np.dot(p, step - iterates)),
        ridge=ridge, damaged=sorted(snaps.damaged),
    )
    report._after = float(p[iterates > used[-1][0]].sum())
    report._last = used[-1][1]
    return report, sorted(plan.items())


def _check_target(target):
    if not callable(getattr(target, "weights", None)):
        raise ValueError(
            "Invalid `target`: expected EMAProfile, PowerProfile or "
            f"UniformProfile. Received: target={target!r}"
        )


def _check_max_error(max_error):
    if max_error is not None and (not is_real(max_error) or not max_error > 0
                                  or not math.isfinite(max_error)):
        raise ValueError(
            "Invalid value for argument `max_error`: expected a finite float > 0 "
            f"or None. Received: max_error={max_error!r}"
        )


def solve(snapshot_dir: str, target, step: int | None = None) -> tuple:
    """Coefficients of the snapshots for `target` at `step`.

    The target is defined on the iterates the EMAs read (with period `P`:
    iterate 0 and the multiples of `P`), its weights renormalized to sum to
    1. The coefficients minimize the profile error under the constraint that
    they sum to 1, so the result is an average (EDM2's least squares has no
    such constraint: at period `P` its coefficients add up to about `1/P`).
    When the basis is ill-conditioned (large coefficients of both signs), a
    ridge trades profile error for smaller coefficients so the float32
    rounding they multiply stays small (see `_constrained_lstsq`).

    Damaged snapshots are left out with a warning (one per file).

    Returns `(report, plan)` where `plan` is `[(path, coefficients per EMA)]`
    of the snapshots with a nonzero coefficient.

    Raises:
        ValueError: no snapshots, a step outside the snapshots' range,
            snapshots of two runs mixed, or every snapshot damaged.
    """
    _check_target(target)
    snaps = _Snapshots(snapshot_dir)
    while True:
        try:
            report, plan = _solve(snaps, target, step)
            break
        except _Damaged as e:
            snaps.drop(e.path, e.reason)
    snaps.warn_damaged()
    return report, plan


def _combine(report, plan, num_vars):
    """Streams the planned snapshots into float64 sums; `(arrays, max |value|, eps)`."""
    out = [None] * num_vars
    top, eps = 0.0, 0.0
    for path, coeffs in plan:
        try:
            with np.load(path) as data:
                for j in range(num_vars):
                    s = data[f"s{j}"]
                    eps = max(eps, _EPS.get(str(s.dtype), _EPS["float32"]))
                    if out[j] is None:
                        out[j] = np.zeros(s.shape[1:])
                    top = max(top, float(np.abs(s).max(initial=0.0)))
                    # Combined in float64 (one EMA at a time): the only
                    # rounding left is the snapshots' own.
                    for i, ck in enumerate(coeffs):
                        if ck != 0.0:
                            out[j] += s[i].astype(np.float64) * float(ck)
                    del s
        except Exception as e:  # noqa: BLE001 (unusable whatever the failure)
            raise _Damaged(path, e) from None
    return out, top, eps


def _gap(path, arrays):
    """Max distance of `arrays` from the fastest EMA of the snapshot at `path`."""
    gap = 0.0
    try:
        with np.load(path) as data:
            for j, w in enumerate(arrays):
                gap = max(gap, float(np.abs(w - data[f"s{j}"][0]).max(initial=0.0)))
    except Exception as e:  # noqa: BLE001
        raise _Damaged(path, e) from None
    return gap


def synthesize(
    snapshot_dir: str, target, step: int | None = None, max_error: float | None = 0.05
) -> tuple:
    """The weights of `target` at `step`, combined from the stored snapshots.

    Solves for the coefficients (`solve`: the target on the iterates the
    EMAs read, coefficients summing to 1), then combines the stored EMAs
    snapshot by snapshot and variable by variable, reading one array at a
    time, in float64 (peak memory: the float64 result, about two model
    copies, plus one stored array). A damaged snapshot is left out with a
    warning and the coefficients solved again without it.

    The report bounds the error: `error_bound = profile_error +
    rounding_bound / gap`, relative to the target's distance from the live
    weights (`Report`). Above `max_error` nothing is returned.

    Args:
        snapshot_dir: str. The `snapshot_dir` of the `MultiEMA` that wrote
            the snapshots.
        target: `EMAProfile`, `PowerProfile` or `UniformProfile`.
        step: int or `None`. Target optimizer step, at most the last
            snapshot's; only snapshots at or before it are used. Defaults to
            `None` (the last snapshot's step).
        max_error: float or `None`. Largest `error_bound` accepted; `None`
            accepts any (read the report). Defaults to `0.05`.

    Returns:
        `(arrays, report)`: float32 arrays in the order of `report.paths`,
        and a `Report`.

    Raises:
        UnmatchedTargetError: (a `ValueError`) the error bound is above
            `max_error`; the message says what to add.
        ValueError: see `solve`.
    """
    _check_target(target)
    _check_max_error(max_error)
    snaps = _Snapshots(snapshot_dir)
    while True:
        try:
            report, plan = _solve(snaps, target, step)
            with _one_blas_thread():
                out, top, eps = _combine(report, plan, len(snaps.paths))
            gap = _gap(report._last, out)
            break
        except _Damaged as e:
            snaps.drop(e.path, e.reason)
    snaps.warn_damaged()
    rounding = report.coefficient_norm * eps * top
    if gap == 0.0:  # the target is the fastest stored EMA: use the EMAs' spread
        gap = _scale(report._last, len(snaps.paths))[1]
    relative = rounding / gap if gap > 0 else (0.0 if rounding == 0 else math.inf)
    report.rounding_bound = rounding
    report.gap = gap
    report.error_bound = report.profile_error + relative
    if max_error is not None and not report.error_bound <= max_error:
        todo = "track a decay closer to it or snapshot more often"
        if report._after > 1e-3:
            todo = (f"{100 * report._after:.0f}% of its weight is on iterates after "
                    "the last snapshot at or before that step: choose a snapshot's step")
        raise UnmatchedTargetError(
            f"post-hoc EMA: {target!r} at step {report.step} is matched only "
            f"within {report.error_bound:.2g} of its distance from the live "
            f"weights (profile error {report.profile_error:.2g}, rounding "
            f"{relative:.2g} with sum|c| = {report.coefficient_norm:.3g}), above "
            f"max_error={max_error}; {todo}, or pass max_error=None to accept it"
            f"{snaps.damaged_text()}."
        )
    for j, o in enumerate(out):  # one float64 array freed at a time
        out[j] = o.astype(np.float32)
        del o
    return out, report


def synthesize_into(
    model, snapshot_dir: str, target, step: int | None = None,
    max_error: float | None = 0.05,
) -> Report:
    """Assigns the synthesized average of `target` into `model`.

    The averaged variables (those the snapshots hold, matched by path: the
    trainable variables and, when they were averaged, the BatchNorm
    statistics) receive the synthesized values; every other variable keeps
    its live value (the library's rule for non-averaged variables).
    Everything is checked before the first assignment: a refusal leaves the
    model untouched.

    Args:
        model: the trained `keras.Model` (same architecture as the run's).
        snapshot_dir: str. Where `MultiEMA` wrote the snapshots.
        target: `EMAProfile`, `PowerProfile` or `UniformProfile`.
        step: int or `None`. Target optimizer step. Defaults to `None` (the
            last snapshot's step).
        max_error: float or `None`. Largest error bound accepted (see
            `synthesize`). Defaults to `0.05`.

    Returns:
        The `Report` of `synthesize`.

    Example:

    ```python
    report = synthesize_into(model, "run/snapshots", PowerProfile(0.10))
    ```
    """
    import keras

    by_path = {v.path: v for v in model.weights}
    arrays, report = synthesize(snapshot_dir, target, step, max_error)
    missing = [p for p in report.paths if p not in by_path]
    if missing:
        raise ValueError(
            f"The snapshots in {snapshot_dir!r} hold variables {missing[:3]} "
            f"that model {model.name} lacks. Pass the model they were taken from."
        )
    for path, value in zip(report.paths, arrays):
        v = by_path[path]
        if tuple(v.shape) != value.shape:
            raise ValueError(
                f"Snapshot variable {path} has shape {value.shape}, the model's "
                f"has {tuple(v.shape)}. Pass the model the snapshots were taken from."
            )
    for path, value in zip(report.paths, arrays):
        v = by_path[path]
        v.assign(keras.ops.cast(value, v.dtype))
    return report
