"""Selection rules: epochs chosen on validation only, the SGD files of SEMA runs.

The runs train on a tiny image folder (2 classes, 40 training images each,
8x8 pixels) in batches of 16, so that every batch, of the 64-image tuning
split and of the 80-image full training set, has the same even size.
"""

import functools
import json
import os
import shutil

import keras
import numpy as np
import pytest
from conftest import Interrupt
from conftest import tiny_config

import zoo.models
from zoo import evaluation
from zoo.run import experiment
from zoo import report
from zoo.data.loader import ArrayLoader
from zoo.data import load_dataset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for k, name in enumerate(("dark", "light")):
        for split, count in (("train", 40), ("test", 10)):
            os.makedirs(root / split / name)
            for i in range(count):
                pixels = rng.normal(90 + 70 * k, 40, size=(8, 8, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    root / split / name / f"{i}.png")
    return f"folder:{root}"


def config(folder, output_dir, **overrides):
    settings = dict(dataset=folder, batch_size=16, ema_period=1, seed=0)
    settings.update(overrides)
    return tiny_config(output_dir, **settings)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def history(run):
    import csv

    with open(os.path.join(run, "history.csv")) as f:
        return {int(r["epoch"]): {k: float(v) for k, v in r.items() if v}
                for r in csv.DictReader(f)}


@functools.lru_cache(maxsize=None)
def dataset(folder, val_fraction):
    return load_dataset(folder, val_fraction=val_fraction, seed=0)


def evaluate_files(folder, run, names, val_fraction, split):
    """Keras metrics of weights files, compiled as training compiles.

    One model is built and compiled; each file is loaded into it in turn.
    """
    data = dataset(folder, val_fraction)
    model = zoo.models.get_model("resnet18", num_classes=2, input_shape=data.image_shape,
                          width=0.0625)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    x, y = (data.x_test, data.y_test) if split == "test" else (data.x_val, data.y_val)
    results = {}
    for name in names:
        model.load_weights(os.path.join(run, name))
        results[name] = model.evaluate(ArrayLoader(x, y, 32, data.mean, data.std),
                                       verbose=0, return_dict=True)
    return results


def evaluate_file(folder, run, name, val_fraction, split):
    """Keras metrics of a weights file, compiled as training compiles."""
    return evaluate_files(folder, run, [name], val_fraction, split)[name]


# The epochs the tuning run is made to have chosen (all before the last).
CHOSEN = {"sgd": 1, "0.5": {"accuracy": 0, "loss": 1}, "0.8": {"accuracy": 1, "loss": 0}}
LAST = 2


@pytest.fixture(scope="module")
def tune(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    experiment.train(config(folder, root / "real", val_fraction=0.2), verbose=0)
    # A copy whose summary chose known epochs, so that chosen != last != best on test.
    tuned = root / "tuned"
    shutil.copytree(root / "real", tuned)
    summary = read_json(tuned / "summary.json")
    summary["sgd"]["best_accuracy"]["epoch"] = CHOSEN["sgd"]
    for decay in ("0.5", "0.8"):
        for criterion in ("accuracy", "loss"):
            summary["ema"][decay][f"best_{criterion}"]["epoch"] = CHOSEN[decay][criterion]
    (tuned / "summary.json").write_text(json.dumps(summary))
    return str(root / "real"), str(tuned)


@pytest.fixture(scope="module")
def full(folder, tune, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    summary = experiment.train(
        config(folder, run, val_fraction=0.0, selection_from=tune[1]), verbose=0)
    return str(run), summary


def test_full_run_keeps_the_epochs_the_tuning_run_chose(folder, tune, full):
    run, summary = full
    assert summary["selection_split"] == "tuning_run"
    assert summary["selection_from"] == tune[1]
    rows = history(run)
    checks = [("sgd_best_accuracy.weights.h5", CHOSEN["sgd"], ""),
              ("sgd_last.weights.h5", LAST, "")]
    for decay in ("0.5", "0.8"):
        for criterion in ("accuracy", "loss"):
            record = summary["ema"][decay][f"best_{criterion}"]
            assert record["epoch"] == CHOSEN[decay][criterion]
            assert record["chosen_by"] == {"run": tune[1], "split": "validation",
                                           "criterion": criterion}
            checks.append((record["weights"], record["epoch"], f"ema_{decay}_"))
        checks.append((f"ema_{decay}_last.weights.h5", LAST, f"ema_{decay}_"))
    assert summary["sgd"]["best_accuracy"]["chosen_by"]["run"] == tune[1]
    scores = evaluate_files(folder, run, [name for name, _, _ in checks], 0.0, "test")
    for name, epoch, prefix in checks:
        # The file scores on test what the history logged for that epoch.
        got = scores[name]
        row = rows[epoch]
        assert got["accuracy"] == pytest.approx(row[f"{prefix}val_accuracy"], abs=1e-6), name
        assert got["loss"] == pytest.approx(row[f"{prefix}val_loss"], rel=1e-4), name


def test_resumed_full_run_saves_the_same_files(folder, tune, full, tmp_path):
    # The tuning run changes its choices between the kill and the resume: the
    # final run keeps those it started with (its copy, selection.json).
    tuned = tmp_path / "tuned"
    shutil.copytree(tune[1], tuned)
    run = tmp_path / "resumed"
    cfg = config(folder, run, val_fraction=0.0, selection_from=str(tuned))
    with pytest.raises(KeyboardInterrupt):
        experiment.train(cfg, verbose=0, callbacks=[Interrupt(2)])
    summary = read_json(tuned / "summary.json")
    summary["ema"]["0.5"]["best_loss"]["epoch"] = 0  # was 1, already saved
    summary["ema"]["0.8"]["best_accuracy"]["epoch"] = 2  # was 1
    (tuned / "summary.json").write_text(json.dumps(summary))
    resumed = experiment.train(cfg, verbose=0)
    for decay in ("0.5", "0.8"):
        for criterion in ("accuracy", "loss"):
            key = f"best_{criterion}"
            got, want = resumed["ema"][decay][key], full[1]["ema"][decay][key]
            assert got.pop("chosen_by")["run"] == str(tuned)
            want = {k: v for k, v in want.items() if k != "chosen_by"}
            assert got == want
            assert got["epoch"] == CHOSEN[decay][criterion]
    assert read_json(run / "selection.json")["ema"]["0.5"]["best_loss"]["epoch"] == 1
    import h5py

    for name in sorted(f for f in os.listdir(full[0]) if f.endswith(".weights.h5")):
        with h5py.File(os.path.join(full[0], name)) as a, h5py.File(run / name) as b:
            keys = []
            a.visititems(lambda k, v: keys.append(k) if isinstance(v, h5py.Dataset) else None)
            for key in keys:
                np.testing.assert_array_equal(a[key][()], b[key][()], err_msg=f"{name}:{key}")


def test_bad_selection_from_fails_before_writing(folder, tune, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tune[0], unfinished)
    summary = read_json(unfinished / "summary.json")
    summary["completed"] = False
    (unfinished / "summary.json").write_text(json.dumps(summary))
    late = tmp_path / "late"
    shutil.copytree(tune[1], late)
    summary = read_json(late / "summary.json")
    summary["ema"]["0.5"]["best_loss"]["epoch"] = 7
    (late / "summary.json").write_text(json.dumps(summary))
    cases = [
        (dict(selection_from=str(tmp_path / "nope")), "does not exist"),
        (dict(selection_from=str(unfinished)), "unfinished run"),
        (dict(selection_from=tune[1], val_fraction=0.2),
         "this run has --val_fraction=0.2"),
        (dict(selection_from=tune[1], epochs=4),
         r"another configuration \(--epochs=3 there, 4 here\)"),
        (dict(selection_from=tune[1], ema_decays=(0.5, 0.9)),
         r"--ema_decays=0.5,0.8 there, 0.5,0.9 here"),
        (dict(selection_from=tune[1], model="vgg16"), "--model=resnet18 there"),
        (dict(selection_from=str(late)),
         r'summary\.json is damaged \(ema\["0\.5"\]\["best_loss"\]\["epoch"\] is 7, '
         r"not in \[0, 3\)\)"),
        (dict(export_from="best_loss"), "--export_from=best_loss: with --val_fraction=0"),
    ]
    for overrides, message in cases:
        out = tmp_path / "out"
        settings = dict(val_fraction=0.0)
        settings.update(overrides)
        with pytest.raises(experiment.ConfigError, match=message):
            experiment.train(config(folder, out, **settings), verbose=0)
        assert not out.exists(), overrides
    # The tuning run of a full run (no validation split) cannot tune.
    full_without = tmp_path / "plain_full"
    (full_without).mkdir()
    shutil.copytree(tune[0], full_without / "run")
    flags = (full_without / "run" / "flags.cfg").read_text().replace(
        "--val_fraction=0.2", "--val_fraction=0.0")
    (full_without / "run" / "flags.cfg").write_text(flags)
    with pytest.raises(experiment.ConfigError, match="has no validation split"):
        experiment.train(config(folder, tmp_path / "out", val_fraction=0.0,
                                selection_from=str(full_without / "run")), verbose=0)


def test_seed_may_differ_from_the_tuning_run(folder, tune):
    from zoo.selection import check_selection

    choices = check_selection(config(folder, "unused", val_fraction=0.0, seed=1,
                                     selection_from=tune[1]).resolved())
    assert choices["seed"] == 0
    assert choices["ema"]["0.5"]["best_loss"]["epoch"] == CHOSEN["0.5"]["loss"]


@pytest.fixture(scope="module")
def plain_full(folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("plain") / "run"
    summary = experiment.train(config(folder, run, val_fraction=0.0), verbose=0)
    return str(run), summary


def test_full_run_without_selection_chooses_nothing(folder, plain_full):
    run, summary = plain_full
    assert summary["selection_split"] == "none"
    assert summary["validation_data"] == "test"
    assert "best_accuracy" not in summary["sgd"]
    assert sorted(f for f in os.listdir(run) if f.endswith(".weights.h5")) == [
        "ema_0.5_last.weights.h5", "ema_0.8_last.weights.h5", "sgd_last.weights.h5"]
    for decay in ("0.5", "0.8"):
        assert set(summary["ema"][decay]) == {"last"}
    got = evaluate_file(folder, run, "ema_0.8_last.weights.h5", 0.0, "test")
    assert got["loss"] == pytest.approx(history(run)[LAST]["ema_0.8_val_loss"], rel=1e-4)


def test_evaluate_without_selection_reports_last_epochs_only(plain_full, tmp_path):
    runs = evaluation.load_runs([plain_full[0]])
    res, _ = evaluation.evaluate(runs, ["generalization"], bn_recompute=False,
                                 log=lambda s: None)
    assert list(res["evals"]["generalization"]["table"]) == ["baseline", "ema_last"]
    chosen = res["selection"]["run"]
    assert chosen["ema_last"] == {"weights": "ema_0.8_last.weights.h5", "decay": 0.8,
                                  "epoch": LAST, "chosen_by": None}
    assert res["setup"]["selection_split"] == "none"
    text = report.format_markdown(res)
    assert "no early stopping" in text and "EMA (last epoch)" in text
    assert "EMA (best accuracy)" not in text
    with pytest.raises(evaluation.EvaluationError, match="no validation split"):
        evaluation.evaluate(runs, ["generalization"], decay="best_on_validation",
                            log=lambda s: None)


def test_evaluate_a_full_run_reports_the_tuned_epochs(tune, full):
    runs = evaluation.load_runs([full[0]])
    lines = []
    res, _ = evaluation.evaluate(runs, ["generalization"], bn_recompute=False,
                                 log=lines.append)
    assert "EMA decay: the largest tracked, 0.8 (the paper's tables)." in lines
    chosen = res["selection"]["run"]
    assert chosen["ema_loss"] == {
        "weights": "ema_0.8_best_loss.weights.h5", "decay": 0.8,
        "epoch": CHOSEN["0.8"]["loss"],
        "chosen_by": {"run": tune[1], "split": "validation", "criterion": "loss"}}
    assert chosen["sgd_best_accuracy"]["epoch"] == CHOSEN["sgd"]
    assert chosen["baseline"]["chosen_by"] is None
    assert res["setup"]["selection_split"] == "tuning_run"
    assert "validation split of the tuning run(s)" in report.format_markdown(res)
    # best_on_validation: the decay whose tuning-run validation value is best.
    values = read_json(os.path.join(tune[1], "summary.json"))["ema"]
    ev = evaluation.Evaluator(runs, decay="best_on_validation", log=lambda s: None)
    best_loss = min(values, key=lambda d: (values[d]["best_loss"]["value"], -float(d)))
    assert ev.selection(runs[0], "ema_loss")["decay"] == float(best_loss)


def test_decay_flag_values():
    assert evaluation.parse_decay(None) == "largest"
    assert evaluation.parse_decay("best_on_validation") == "best_on_validation"
    assert evaluation.parse_decay("0.998") == 0.998
    for bad in ("fast", "1.5", "0"):
        with pytest.raises(evaluation.EvaluationError, match=f"--decay={bad}: use largest"):
            evaluation.parse_decay(bad)


def test_sema_sgd_files_hold_the_model_the_history_describes(folder, tmp_path):
    run = tmp_path / "sema"
    summary = experiment.train(config(folder, run, val_fraction=0.2, averaging="sema",
                                      ema_decays=(0.8,)), verbose=0)
    rows = history(str(run))
    best = summary["sgd"]["best_accuracy"]["epoch"]
    checks = (("sgd_last.weights.h5", LAST), ("sgd_best_accuracy.weights.h5", best))
    scores = evaluate_files(folder, str(run), [name for name, _ in checks]
                            + ["ema_0.8_last.weights.h5"], 0.2, "val")
    for name, epoch in checks:
        got = scores[name]
        assert got["accuracy"] == pytest.approx(rows[epoch]["val_accuracy"], abs=1e-6), name
        assert got["loss"] == pytest.approx(rows[epoch]["val_loss"], rel=1e-4), name
    # The EMA (which SEMA copies into the model at each epoch end) differs.
    ema = scores["ema_0.8_last.weights.h5"]
    assert ema["loss"] == pytest.approx(rows[LAST]["ema_0.8_val_loss"], rel=1e-4)
    assert ema["loss"] != pytest.approx(rows[LAST]["val_loss"], rel=1e-4)
    runs = evaluation.load_runs([str(run)])
    ev = evaluation.Evaluator(runs, log=lambda s: None)
    assert ev.name("baseline") == "SEMA model (last, before the switch)"
