"""Post-hoc EMA synthesis: a new average from the stored snapshots.

A target profile (`keras_ema.posthoc_profiles`) is matched by least squares
over the exact profiles of the snapshots at or before the target step
(from their update log), in float64, under the constraint that the
coefficients sum to 1; the weights are then combined snapshot by snapshot,
streaming from disk (`keras_ema.posthoc_snapshots`). Karras et al. 2023
(EDM2), Sec. 3 and App. C.
"""

import contextlib
import math

import numpy as np

from keras_ema import state_file
from keras_ema.checks import is_real
from keras_ema.posthoc_profiles import check_step
from keras_ema.posthoc_profiles import log_profiles
from keras_ema.posthoc_snapshots import SHADOWS
from keras_ema.posthoc_snapshots import DamagedSnapshot
from keras_ema.posthoc_snapshots import Snapshots
from keras_ema.posthoc_snapshots import open_snapshot
from keras_ema.posthoc_snapshots import snapshot_log


def _one_blas_thread():
    """BLAS on one thread: the products here are small or memory-bound, and
    a threaded BLAS waking its threads on a busy machine is 100x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


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
    with open_snapshot(path) as data:  # any failure: DamagedSnapshot
        for j in range(num_vars):
            s = state_file.read_array(data, SHADOWS, j).astype(np.float64)
            top = max(top, float(np.abs(s).max(initial=0.0)))
            spread = max(spread, float(np.abs(s - s[:1]).max(initial=0.0)))
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


def _used(snaps, step):
    """`(step, used)`: the target step (`None`: the last snapshot's) and the
    readable snapshots `[(step, path, meta)]` at or before it."""
    good = snaps.good
    first, last = good[0][0], good[-1][0]
    if step is None:
        step = last
    step = check_step(step)
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
    return step, used


def _basis(snaps, used, step):
    """`(iterates, a, owners)`: the iterates read up to `step`, the profiles
    of the `used` snapshots' EMAs on them (one column each) and the
    `(step, path, EMA index, decay)` of each column."""
    # The last snapshot's log holds every update read up to it, those after
    # the target step's last snapshot included (weight the basis cannot match).
    log = snapshot_log(snaps.good[-1][1])
    iterates, profiles = log_profiles(
        log["start"], log["steps"], log["decays"], [s for s, _, _ in used]
    )
    inside = iterates <= step
    iterates = iterates[inside]
    a = profiles[:, :, inside].reshape(-1, len(iterates)).T
    owners = [(s, path, i, d) for s, path, _ in used
              for i, d in enumerate(snaps.decays)]
    return iterates, a, owners


def _target_weights(target, step, iterates):
    """The target's weights on `iterates`, renormalized to sum to 1."""
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
    return p / total


def _fit(snaps, used, a, p):
    """`(c, ridge)`: the coefficients of the columns of `a` for `p`."""
    # A target in the basis: that column alone (exactly that snapshot).
    diff = np.abs(a - p[:, None]).max(axis=0)
    k = int(np.argmin(diff))
    if diff[k] <= 1e-9 * p.max():
        c = np.zeros(a.shape[1])
        c[k] = 1.0
        return c, 0.0
    eps = max(_EPS.get(meta.get("dtype", "float32"), _EPS["float32"])
              for _, _, meta in used)
    top, spread = _scale(used[-1][1], len(snaps.paths))
    amplification = eps * top / spread if spread > 0 else 0.0
    with _one_blas_thread():
        return _constrained_lstsq(a, p, amplification)


def _solve(snaps, target, step):
    """`(report, plan)` over the readable snapshots of `snaps` (a `Snapshots`)."""
    step, used = _used(snaps, step)
    iterates, a, owners = _basis(snaps, used, step)
    p = _target_weights(target, step, iterates)
    c, ridge = _fit(snaps, used, a, p)
    residual = a @ c - p
    error = float(np.linalg.norm(residual)) / float(np.linalg.norm(p))
    plan, coefficients = {}, {}
    for ck, (s, path, i, d) in zip(c, owners):
        if ck != 0.0:
            plan.setdefault(path, np.zeros(len(snaps.decays)))[i] = ck
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
    snaps = Snapshots(snapshot_dir)
    while True:
        try:
            report, plan = _solve(snaps, target, step)
            break
        except DamagedSnapshot as e:
            snaps.drop(e.path, e.reason)
    snaps.warn_damaged()
    return report, plan


def _combine(report, plan, num_vars):
    """Streams the planned snapshots into float64 sums; `(arrays, max |value|, eps)`."""
    out = [None] * num_vars
    top, eps = 0.0, 0.0
    for path, coeffs in plan:
        with open_snapshot(path) as data:  # any failure: DamagedSnapshot
            for j in range(num_vars):
                s = state_file.read_array(data, SHADOWS, j)
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
    return out, top, eps


def _gap(path, arrays):
    """Max distance of `arrays` from the fastest EMA of the snapshot at `path`."""
    gap = 0.0
    with open_snapshot(path) as data:  # any failure: DamagedSnapshot
        for j, w in enumerate(arrays):
            stored = state_file.read_array(data, SHADOWS, j)[0]
            gap = max(gap, float(np.abs(w - stored).max(initial=0.0)))
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
    snaps = Snapshots(snapshot_dir)
    report, out, top, eps, gap = _solve_and_combine(snaps, target, step)
    snaps.warn_damaged()
    relative = _bound(report, snaps, top, eps, gap)
    if max_error is not None and not report.error_bound <= max_error:
        _refuse(report, relative, max_error, snaps)
    for j, o in enumerate(out):  # one float64 array freed at a time
        out[j] = o.astype(np.float32)
        del o
    return out, report


def _solve_and_combine(snaps, target, step):
    """`(report, float64 arrays, max |value|, eps, gap)`; a damaged snapshot
    is dropped from `snaps` and the coefficients solved again without it."""
    while True:
        try:
            report, plan = _solve(snaps, target, step)
            with _one_blas_thread():
                out, top, eps = _combine(report, plan, len(snaps.paths))
            return report, out, top, eps, _gap(report._last, out)
        except DamagedSnapshot as e:
            snaps.drop(e.path, e.reason)


def _bound(report, snaps, top, eps, gap):
    """Sets the report's `rounding_bound`, `gap` and `error_bound`; returns
    the rounding relative to the gap."""
    rounding = report.coefficient_norm * eps * top
    if gap == 0.0:  # the target is the fastest stored EMA: use the EMAs' spread
        gap = _scale(report._last, len(snaps.paths))[1]
    relative = rounding / gap if gap > 0 else (0.0 if rounding == 0 else math.inf)
    report.rounding_bound = rounding
    report.gap = gap
    report.error_bound = report.profile_error + relative
    return relative


def _refuse(report, relative, max_error, snaps):
    """Raises `UnmatchedTargetError`: what the bound is and what to do."""
    todo = "track a decay closer to it or snapshot more often"
    if report._after > 1e-3:
        todo = (f"{100 * report._after:.0f}% of its weight is on iterates after "
                "the last snapshot at or before that step: choose a snapshot's step")
    raise UnmatchedTargetError(
        f"post-hoc EMA: {report.target!r} at step {report.step} is matched only "
        f"within {report.error_bound:.2g} of its distance from the live "
        f"weights (profile error {report.profile_error:.2g}, rounding "
        f"{relative:.2g} with sum|c| = {report.coefficient_norm:.3g}), above "
        f"max_error={max_error}; {todo}, or pass max_error=None to accept it"
        f"{snaps.damaged_text()}."
    )


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
