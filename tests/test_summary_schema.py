"""summary.json that parses but is wrong: one line naming the file and the key.

evaluate.py and `--selection_from` read a finished run's summary.json through
`zoo.run.run_dir.load_run`, which checks it against the schema of
`zoo.run.summary_schema` once. Each case is a row of the README's
troubleshooting table.
"""

import json
import os
import shutil

import pytest

from zoo import evaluation
from zoo.run import run_dir
from zoo.run.summary_schema import is_plain_name
from zoo.run.summary_schema import summary_problem


def _record(epoch, weights, **values):
    return {"epoch": epoch, "weights": weights, **values}


@pytest.fixture
def run(tmp_path):
    """A run directory with the weights files the summary below names."""
    for name in ("sgd_last.weights.h5", "ema_0.9_best_loss.weights.h5",
                 "ema_0.9_last.weights.h5"):
        (tmp_path / name).write_bytes(b"")
    return str(tmp_path)


def summary():
    """A summary as zoo.run.log.summarize writes it (2 epochs, one decay)."""
    return {
        "layout_version": 1, "completed": True, "epochs_done": 2,
        "selection_split": "validation", "selection_from": None,
        "sgd": {"last": _record(1, "sgd_last.weights.h5", val_accuracy=0.5,
                                val_loss=1.25)},
        "ema": {"0.9": {
            "best_loss": _record(0, "ema_0.9_best_loss.weights.h5", value=1.5,
                                 val_accuracy=0.25,
                                 chosen_by={"run": ".", "split": "validation"}),
            "last": _record(1, "ema_0.9_last.weights.h5", val_accuracy=None,
                            val_loss=2.0),
        }},
    }


def edited(path, value):
    """`summary()` with the key at `path` set to `value` (or removed: `...`)."""
    data = summary()
    *parents, last = path
    target = data
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return data


CASES = [
    # (what, key path, value, problem)
    ("epoch not an integer", ("ema", "0.9", "best_loss", "epoch"), "two",
     """ema["0.9"]["best_loss"]["epoch"] is 'two', not an integer"""),
    ("epoch a float", ("ema", "0.9", "last", "epoch"), 1.0,
     """ema["0.9"]["last"]["epoch"] is 1.0, not an integer"""),
    ("epoch past the run", ("sgd", "last", "epoch"), 2,
     """sgd["last"]["epoch"] is 2, not in [0, 2)"""),
    ("negative epoch", ("ema", "0.9", "best_loss", "epoch"), -1,
     """ema["0.9"]["best_loss"]["epoch"] is -1, not in [0, 2)"""),
    ("no epoch", ("ema", "0.9", "last", "epoch"), ...,
     """ema["0.9"]["last"] has no epoch"""),
    ("empty ema", ("ema",), {},
     "ema records no EMA; flags.cfg has --ema_decays=0.9"),
    ("ema not an object", ("ema",), [],
     "ema is [], not an object"),
    ("decay not a number", ("ema",), {"fast": {}},
     """ema["fast"] is not a decay in (0, 1)"""),
    ("weights outside the run", ("ema", "0.9", "best_loss", "weights"),
     "../../../../etc/passwd",
     """ema["0.9"]["best_loss"]["weights"] is '../../../../etc/passwd', not the """
     "name of a file in the run directory (a plain name: no /, \\, .. or "
     "absolute path)"),
    ("absolute weights path", ("ema", "0.9", "last", "weights"), "/etc/passwd",
     """ema["0.9"]["last"]["weights"] is '/etc/passwd', not the name of a file"""),
    ("weights '..'", ("sgd", "last", "weights"), "..",
     """sgd["last"]["weights"] is '..', not the name of a file"""),
    ("weights not a string", ("sgd", "last", "weights"), 3,
     """sgd["last"]["weights"] is 3, not the name of a file"""),
    ("weights missing from the run", ("ema", "0.9", "last", "weights"),
     "ema_0.9_best_accuracy.weights.h5",
     """ema["0.9"]["last"]["weights"] names ema_0.9_best_accuracy.weights.h5, """
     "which is not a file in "),
    ("infinite value", ("ema", "0.9", "best_loss", "value"), float("inf"),
     """ema["0.9"]["best_loss"]["value"] is inf, not a finite number"""),
    ("NaN accuracy", ("sgd", "last", "val_accuracy"), float("nan"),
     """sgd["last"]["val_accuracy"] is nan, not a finite number"""),
    ("accuracy above 1", ("ema", "0.9", "best_loss", "val_accuracy"), 25.0,
     """ema["0.9"]["best_loss"]["val_accuracy"] is 25.0, not in [0.0, 1.0]"""),
    ("negative loss", ("ema", "0.9", "best_loss", "value"), -1.5,
     """ema["0.9"]["best_loss"]["value"] is -1.5, not >= 0.0"""),
    ("loss a string", ("sgd", "last", "val_loss"), "1.25",
     """sgd["last"]["val_loss"] is '1.25', not a number"""),
    ("accuracy a bool", ("sgd", "last", "val_accuracy"), True,
     """sgd["last"]["val_accuracy"] is True, not a number"""),
    ("completed a string", ("completed",), "yes",
     "completed is 'yes', not true or false"),
    ("no epochs_done", ("epochs_done",), ...,
     "epochs_done is None, not an integer"),
    ("sgd missing", ("sgd",), ..., "sgd is None, not an object"),
    ("chosen_by a string", ("ema", "0.9", "best_loss", "chosen_by"), ".",
     """ema["0.9"]["best_loss"]["chosen_by"] is '.', not an object"""),
    ("diverged without an epoch", ("diverged",), {"step": 3},
     """diverged["epoch"] is None, not an integer"""),
    ("selection_split not a string", ("selection_split",), 1,
     "selection_split is 1, not a string"),
]


@pytest.mark.all_backends
def test_a_summary_as_written_passes(run):
    assert summary_problem(summary(), run, (0.9,)) == ""
    assert summary_problem(summary(), run) == ""


@pytest.mark.all_backends
@pytest.mark.parametrize("what, path, value, problem", CASES, ids=[c[0] for c in CASES])
def test_the_first_problem_names_the_key(run, what, path, value, problem):
    found = summary_problem(edited(path, value), run, (0.9,))
    assert found.startswith(problem), found
    assert "\n" not in found


@pytest.mark.all_backends
def test_the_decays_are_those_of_the_flags(run):
    assert summary_problem(summary(), run, (0.9, 0.99)) == (
        "ema has no entry for the decay 0.99 of flags.cfg's --ema_decays")
    assert summary_problem(summary(), run, (0.99,)) == (
        """ema["0.9"] is not one of flags.cfg's --ema_decays=0.99""")


@pytest.mark.all_backends
def test_plain_names():
    assert is_plain_name("ema_0.998_best_loss.weights.h5")
    for name in ("", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", "x\0y", None, 3):
        assert not is_plain_name(name), name


@pytest.mark.parametrize("what, path, value, problem", [
    c for c in CASES if c[0] in ("epoch not an integer", "empty ema",
                                 "weights outside the run")])
def test_evaluate_refuses_before_building_a_model(tmp_path, finished_run, what,
                                                  path, value, problem):
    """The three summaries that gave tracebacks (and opened /etc/passwd)."""
    source, written = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    decay = max(written["ema"], key=float)
    path = [decay if key == "0.9" else key for key in path]
    data = json.loads((copy / "summary.json").read_text())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    (copy / "summary.json").write_text(json.dumps(data))
    with pytest.raises(evaluation.EvaluationError) as info:
        evaluation.load_runs([str(copy)])
    message = str(info.value)
    assert message.startswith(f"{copy}/summary.json is damaged (")
    assert problem.replace('"0.9"', f'"{decay}"').split(";")[0].split(",")[0] in message
    assert message.endswith(f"retrain the run with --flagfile={copy}/flags.cfg "
                            "--output_dir=NEW")
    assert "\n" not in message
    with pytest.raises(run_dir.DamagedFileError):
        run_dir.load_run(str(copy))


def test_evaluate_refuses_flags_that_parse_but_are_wrong(tmp_path, finished_run):
    source, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    text = (copy / "flags.cfg").read_text()
    (copy / "flags.cfg").write_text(text.replace("--lr=0.05", "--lr=-0.05"))
    with pytest.raises(evaluation.EvaluationError, match=(
            rf"^{copy}/flags\.cfg is damaged \(--lr=-0\.05: must be > 0\); "
            r"restore it from a copy, or retrain the run$")):
        evaluation.load_runs([str(copy)])
    assert os.listdir(copy) == os.listdir(source)
