"""The finished runs that evaluate.py reads: `Run` and `load_runs`.

A group of run directories, one per seed of one configuration, is loaded
and checked together: each finished and not diverged, all on one dataset
with the same flags (but `PER_RUN_FLAGS`), seeds distinct, and all with
chosen epochs or none (`has_selection`, see `zoo.selection`).
"""

import dataclasses
import itertools
import os

from zoo.evals import EvaluationError
from zoo.run import run_dir
from zoo.run.config import Config

# Settings that may differ between the runs of one group.
PER_RUN_FLAGS = ("seed", "output_dir", "distribution", "selection_from")


@dataclasses.dataclass
class Run:
    """A finished run: its directory, configuration and summary."""

    path: str
    config: Config
    summary: dict
    flags: dict

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


def load_runs(paths: "list[str]") -> list:
    """The finished runs in `paths`, checked to be seeds of one configuration.

    Raises:
        EvaluationError: no run, a missing or unfinished run directory,
            runs on different datasets or with other differing flags, two
            runs with the same seed, or runs with chosen epochs and without.
    """
    if not paths:
        raise EvaluationError(
            "No run directories given; pass the --output_dir of finished "
            "train.py runs, e.g. evaluate.py runs/demo_s0 runs/demo_s1."
        )
    runs = [_load_run(path) for path in paths]
    first = runs[0]
    for run in runs[1:]:
        _check_same_configuration(first, run)
    for a, b in itertools.combinations(runs, 2):
        if a.config.seed == b.config.seed:
            raise EvaluationError(
                f"{a.path} and {b.path} have the same --seed={a.config.seed}; "
                "pass each seed's run once."
            )
    for run in runs[1:]:
        if has_selection(run) != has_selection(first):
            raise EvaluationError(
                f"{first.path} has chosen epochs ({first.summary.get('selection_split')}), "
                f"{run.path} has none ({run.summary.get('selection_split')}); "
                "pass full runs that all use --selection_from, or none does."
            )
    return runs


def has_selection(run: Run) -> bool:
    """Whether `run` chose its epochs on a validation split (its own or a tuning run's)."""
    return run.summary.get("selection_split") in ("validation", "tuning_run")


def _load_run(path):
    _check_not_diverged(path)
    try:
        loaded = run_dir.load_run(path)
    except run_dir.RunDirError as error:
        raise EvaluationError(str(error)) from None
    try:
        config = Config.from_flags(loaded["flags"]).resolved()
    except ValueError as error:  # ConfigError too: it parses but is wrong
        raise EvaluationError(str(run_dir.DamagedFileError(
            os.path.join(path, "flags.cfg"), error,
            "restore it from a copy, or retrain the run"))) from None
    return Run(path, config, loaded["summary"], loaded["flags"])


def _check_same_configuration(first, run):
    if run.config.dataset != first.config.dataset:
        raise EvaluationError(
            f"Runs on different datasets: {first.path} is "
            f"{first.config.dataset}, {run.path} is {run.config.dataset}; "
            "evaluate the runs of one dataset at a time."
        )
    differ = [k for k in sorted(set(first.flags) | set(run.flags))
              if k not in PER_RUN_FLAGS
              and first.flags.get(k) != run.flags.get(k)]
    if differ:
        k = differ[0]
        raise EvaluationError(
            f"Runs of different configurations: {first.path} has "
            f"--{k}={first.flags.get(k)}, {run.path} has "
            f"--{k}={run.flags.get(k)}; pass the seeds of one configuration."
        )


def _check_not_diverged(path):
    """Raises EvaluationError if the run in `path` stopped on a non-finite loss."""
    summary_path = os.path.join(path, "summary.json")
    if not os.path.isfile(summary_path):
        return
    try:
        diverged = run_dir.read_json(summary_path).get("diverged")
    except (OSError, ValueError, AttributeError):
        return  # load_run reports an unreadable summary
    if isinstance(diverged, dict) and diverged:  # else load_run checks it
        raise EvaluationError(
            f"{path} diverged at epoch {diverged.get('epoch')}: its training "
            "loss became NaN or infinite, so it has no result to evaluate; "
            "train it again with a lower --lr, or leave it out."
        )
