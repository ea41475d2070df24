"""EMA decays: the warm-up schedule and the checks of decay arguments."""

import math

from keras_ema.checks import as_float

DEFAULT_DECAYS = (0.968, 0.984, 0.992, 0.996, 0.998)


def warmup_decay(decay: float, step: int) -> float:
    """The decay used by the update made right after optimizer step `step`.

    `min(decay, (step + 1) / (step + 10))`, with `step` the 0-based index of
    the optimizer step, counting every step since training began. For
    `decay=0.998` the warm-up value reaches the decay at step 4490.
    """
    return min(decay, (step + 1.0) / (step + 10.0))


def warmup_end_step(decay: float) -> int:
    """First 0-based optimizer step at which `warmup_decay` equals `decay`.

    `(t + 1) / (t + 10) >= decay` holds from `t = 9 * decay / (1 - decay) - 1`:
    0.968 -> 272, 0.984 -> 553, 0.992 -> 1115, 0.996 -> 2240, 0.998 -> 4490.
    """
    # The tolerance absorbs the rounding of 9 * 0.998 / 0.002 = 4491.000000004.
    return max(0, math.ceil(9.0 * decay / (1.0 - decay) - 1e-6) - 1)


def check_decays(decays) -> tuple:
    """`decays` as a tuple of distinct floats in (0, 1); a bare number is one decay."""
    if isinstance(decays, (int, float)):
        decays = (decays,)
    try:
        decays = tuple(float(d) for d in decays)
    except (TypeError, ValueError):
        raise ValueError(
            "Invalid value for argument `decays`: expected a sequence of "
            f"floats in (0, 1). Received: decays={decays!r}"
        ) from None
    if not decays:
        raise ValueError(
            "Invalid value for argument `decays`: at least one decay is "
            "needed, e.g. decays=(0.99,). Received: decays=()"
        )
    for d in decays:
        if not 0.0 < d < 1.0 or not math.isfinite(d):
            raise ValueError(
                "Invalid value for argument `decays`: every decay must lie "
                f"strictly between 0 and 1. Received: decays={decays} "
                f"(bad value: {d})"
            )
    if len(set(decays)) != len(decays):
        raise ValueError(
            "Invalid value for argument `decays`: decays must be distinct. "
            f"Received: decays={decays}"
        )
    return decays


def check_decay(decay) -> float:
    """The check of a single-EMA callback's `decay` argument."""
    d = as_float(decay)
    if not 0.0 < d < 1.0 or not math.isfinite(d):
        raise ValueError(
            "Invalid value for argument `decay`: expected a float strictly "
            f"between 0 and 1. Received: decay={decay!r}"
        )
    return d


def schedule_summary(name: str, decays, period: int, warmup: bool) -> str:
    """A table: per-step decay and warm-up end of every EMA of `name`."""
    n = len(decays)
    lines = [
        f"{name}: "
        + (f"1 EMA (decay {decays[0]})" if n == 1 else f"{n} EMAs")
        + ", one update every "
        + ("optimizer step" if period == 1 else f"{period} optimizer steps")
        + (", warm-up min(a, (t+1)/(t+10))" if warmup else "")
    ]
    for d in decays:
        line = f"  decay {d}: per-step equivalent {d ** (1.0 / period):.6f}"
        if warmup:
            line += f", warm-up ends at step {warmup_end_step(d)}"
        lines.append(line)
    return "\n".join(lines)
