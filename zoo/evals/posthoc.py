"""`posthoc`: the post-hoc EMA sweep over each run's snapshots (`zoo.posthoc_sweep`)."""

check = None  # a run without snapshots is refused when the sweep reaches it


def run(ev, runs: list, figures: dict, options) -> dict:
    """The sweep of every run; one plot per run in `figures`."""
    from zoo import posthoc_sweep

    return posthoc_sweep.evaluate_posthoc(ev, runs, figures)
