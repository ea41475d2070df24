"""The check of an `ema=` argument, for the callbacks that read a MultiEMA.

Apart from `checks` (a leaf every module imports) because it needs the
`MultiEMA` class.
"""

from keras_ema.multi_ema import MultiEMA


def check_multi_ema(ema):
    """`ema` if it is a `MultiEMA` (or a `SwitchEMA`/`Belay`), for the
    callbacks that read its logs."""
    if not isinstance(ema, MultiEMA):
        raise ValueError(
            "Invalid value for argument `ema`: expected a "
            "keras_ema.MultiEMA, SwitchEMA or Belay. Received: "
            f"ema={ema!r}"
        )
    return ema
