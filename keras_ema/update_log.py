"""The log of the EMA updates applied, from which post-hoc EMA works.

The EMAs started equal to the weights of optimizer step `start`; the k-th
applied update read the weights of step `steps[k]` with the decays
`decays[k]` (one per kept decay; the product when updates made back to back
were combined). An update waits in `pending` until it is known to have been
applied: one skipped on non-finite weights never enters the log.
"""


class UpdateLog:
    """`start`, `steps`, `decays` and the `pending` updates; see the module."""

    def __init__(self, start: int = 0, steps=(), decays=()):
        self.start = int(start)
        self.steps = list(steps)
        self.decays = [list(row) for row in decays]
        self.pending = []

    def add(self, step: int, decays):
        """An update made at `step` with `decays`, applied or not: pending."""
        self.pending.append((step, [float(a) for a in decays]))

    def commit(self, bad_steps):
        """Moves the pending updates to the log, minus those of `bad_steps`."""
        pending, self.pending = self.pending, []
        for step, decays in pending:
            if step not in bad_steps:
                self.steps.append(step)
                self.decays.append(decays)

    def as_dict(self) -> dict:
        """`{"start", "steps", "decays"}`: the committed log, as plain data."""
        return {
            "start": self.start,
            "steps": list(self.steps),
            "decays": [list(a) for a in self.decays],
        }

    @classmethod
    def from_dict(cls, log, num_decays: int) -> "UpdateLog":
        """The log of `as_dict`, checked: `ValueError` on any other.

        Refused: not a dict of `start`, `steps` and `decays`, a negative
        step, steps and rows of decays of different counts, or a row of
        decays not `num_decays` values in [0, 1].
        """

        def bad(what):
            return ValueError(
                f"Invalid MultiEMA state: its update_log {what}. Pass a dict "
                "from `get_state`."
            )

        try:
            start = int(log["start"])
            steps = [int(t) for t in log["steps"]]
            decays = [[float(a) for a in row] for row in log["decays"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise bad(f"is malformed ({type(e).__name__}: {e})") from None
        if start < 0:
            raise bad(f"starts at step {start}, which is negative")
        if len(steps) != len(decays):
            raise bad(f"has {len(steps)} steps but {len(decays)} rows of decays")
        negative = [t for t in steps if t < 0]
        if negative:
            raise bad(f"has negative steps {negative[:3]}")
        for row in decays:
            if len(row) != num_decays or not all(0.0 <= a <= 1.0 for a in row):
                raise bad(f"has a row of decays {row}; each row holds "
                          f"{num_decays} decays in [0, 1]")
        return cls(start, steps, decays)
