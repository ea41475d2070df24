"""evaluate.py end to end on tiny digits runs of two seeds."""

import itertools
import json
import os
import shutil
import sys

import keras
import numpy as np
import pytest
import subprocesses
from conftest import tiny_config

import zoo.models
from zoo import evaluation
from zoo.run import experiment
from zoo import notes
from zoo import report
from zoo.data import load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(finished_run, tmp_path_factory):
    """Seeds 0 and 3 of `tiny_config`; seed 3 is the session's finished run."""
    path = tmp_path_factory.mktemp("runs") / "s0"
    experiment.train(tiny_config(path, seed=0), verbose=0)
    return [str(path), finished_run[0]]


def _cli(args, cwd=ROOT):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocesses.run([sys.executable, os.path.join(ROOT, "evaluate.py")] + args,
                          cwd=cwd, env=env, capture_output=True, text=True)


def _test_logits(run, weights):
    """Test logits of a run's weights, normalized here from the raw images."""
    data = load_dataset("digits", val_fraction=0.2, seed=json.load(
        open(os.path.join(run, "summary.json")))["seed"])
    model = zoo.models.get_model("resnet18", num_classes=10, input_shape=(32, 32, 3),
                          width=0.0625)
    model.load_weights(os.path.join(run, weights))
    x = (data.x_test / 255.0 - data.mean) / data.std
    return keras.ops.convert_to_numpy(model(x.astype("float32"), training=False)), data.y_test


@pytest.fixture(scope="module")
def results(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = _cli(runs + ["--evals=generalization,calibration,churn,transfer",
                          "--transfer_dataset=digits", "--probe_epochs=2",
                          f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    return out, json.load(open(out / "results.json"))


def test_files_and_tables(results):
    out, res = results
    assert sorted(os.listdir(out)) == ["reliability_baseline.png",
                                       "reliability_ema_loss.png",
                                       "results.json", "results.md"]
    text = open(out / "results.md").read()
    for heading in ("Generalization (Table 1)", "Prediction disagreement",
                    "Linear probe on digits (Table 4)", "Calibration (Table 5)"):
        assert heading in text
    assert res["setup"]["seed_values"] == [0, 3]
    # Which epochs and which seed, said where a reader meets them.
    assert ("Epochs count from 0 as in history.csv; Keras's progress bar "
            "shows epoch e as e+1.") in text
    assert "Reliability diagrams of seed 0 on test" in text


def test_baseline_accuracy_and_loss_match_an_independent_computation(runs, results):
    _, res = results
    accuracies, losses = [], []
    for run in runs:
        logits, y = _test_logits(run, "sgd_last.weights.h5")
        z = logits - logits.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        accuracies.append(100 * np.mean(logits.argmax(1) == y))
        losses.append(-np.mean(log_p[np.arange(len(y)), y]))
    table = res["evals"]["generalization"]["table"]["baseline"]
    assert table["accuracy"]["mean"] == pytest.approx(np.mean(accuracies), abs=1e-6)
    assert table["accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1), abs=1e-6)
    assert table["loss"]["mean"] == pytest.approx(np.mean(losses), rel=1e-4)


def test_ema_selection_follows_the_validation_records(runs, results):
    _, res = results
    # By default the largest decay, as the paper's tables.
    assert res["setup"]["decay"] == "largest"
    ev = evaluation.Evaluator(evaluation.load_runs(runs), decay="best_on_validation")
    for run, loaded in zip(runs, ev.runs):
        summary = json.load(open(os.path.join(run, "summary.json")))
        chosen = res["selection"][os.path.basename(run)]
        for model, criterion in (("ema_accuracy", "accuracy"), ("ema_loss", "loss")):
            record = summary["ema"]["0.8"][f"best_{criterion}"]
            assert chosen[model] == {
                "weights": f"ema_0.8_best_{criterion}.weights.h5", "decay": 0.8,
                "epoch": record["epoch"],
                "chosen_by": {"run": run, "split": "validation", "criterion": criterion}}
        # --decay=best_on_validation: the decay whose validation value is best.
        acc = {d: e["best_accuracy"]["value"] for d, e in summary["ema"].items()}
        loss = {d: e["best_loss"]["value"] for d, e in summary["ema"].items()}
        assert ev.selection(loaded, "ema_accuracy")["decay"] == float(
            max(acc, key=lambda d: (acc[d], float(d))))
        assert ev.selection(loaded, "ema_loss")["decay"] == float(
            min(loss, key=lambda d: (loss[d], -float(d))))


def test_churn_of_the_baselines_matches_numpy(runs, results):
    _, res = results
    (la, _), (lb, _) = (_test_logits(r, "sgd_last.weights.h5") for r in runs)
    expected = 100 * np.mean(la.argmax(1) != lb.argmax(1))
    got = res["evals"]["churn"]["table"]["baseline"]["churn"]
    assert got["mean"] == pytest.approx(expected, abs=1e-6)
    assert got["n"] == len(list(itertools.combinations(runs, 2)))


def test_label_noise_needs_noisy_runs_and_reports_them(runs, noisy_run):
    with pytest.raises(evaluation.EvaluationError, match="needs runs trained with --label_noise"):
        evaluation.evaluate(evaluation.load_runs(runs[:1]), ["label_noise"], log=lambda s: None)
    noisy = noisy_run[0]  # 1 epoch on symmetric:0.4 noise
    res, _ = evaluation.evaluate(evaluation.load_runs([str(noisy)]), ["label_noise"],
                                 bn_recompute=False, log=lambda s: None)
    entry = res["evals"]["label_noise"]
    assert entry["label_noise"] == "symmetric:0.4"
    logits, y = _test_logits(str(noisy), "sgd_last.weights.h5")
    assert entry["table"]["baseline"]["accuracy"]["mean"] == pytest.approx(
        100 * np.mean(logits.argmax(1) == y), abs=1e-6)


def test_bad_input(runs, tmp_path):
    with pytest.raises(evaluation.EvaluationError, match="does not exist"):
        evaluation.load_runs([str(tmp_path / "nope")])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs[0], unfinished)
    summary = json.load(open(unfinished / "summary.json"))
    summary["completed"] = False
    (unfinished / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(evaluation.EvaluationError, match="unfinished run"):
        evaluation.load_runs([str(unfinished)])
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    flags = (other / "flags.cfg").read_text().replace("--dataset=digits",
                                                      "--dataset=cifar10")
    (other / "flags.cfg").write_text(flags)
    with pytest.raises(evaluation.EvaluationError,
                       match=r"different datasets: .* is digits, .* is cifar10"):
        evaluation.load_runs([runs[0], str(other)])
    with pytest.raises(evaluation.EvaluationError, match="same --seed=0"):
        evaluation.load_runs([runs[0], runs[0]])
    with pytest.raises(evaluation.EvaluationError, match="at least two runs, got 1"):
        evaluation.evaluate(evaluation.load_runs(runs[:1]), ["churn"], log=lambda s: None)
    with pytest.raises(evaluation.EvaluationError, match="--evals=accuracy: unknown"):
        evaluation.evaluate(evaluation.load_runs(runs[:1]), ["accuracy"], log=lambda s: None)


@pytest.mark.slow
def test_cli_error_is_one_line_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "results"
    result = _cli([runs[0], f"--output_dir={out}", "--evals=churn"])
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("evaluate.py: error: --evals=churn compares seeds")
    assert not out.exists()


def _stat(mean):
    return {"mean": mean, "std": 0.0, "n": 1, "values": [mean]}


# A digits-like run: 1149 training images in batches of 128 (9 steps per
# epoch), 2 epochs, the EMA 0.8 at period 2 (window 2 / 0.2 = 10 steps, its
# warm-up ends at step 35), 288 validation and 360 test images.
FACTS = {"train_size": 1149, "val_size": 288, "test_size": 360, "epochs": 2,
         "steps_per_epoch": 9, "steps": 18, "decay": 0.8, "period": 2,
         "warmup": True, "label_noise": None}


def test_a_note_says_why_the_ema_does_not_beat_the_baseline():
    table = {"baseline": {"accuracy": _stat(95.0)},
             "ema_accuracy": {"accuracy": _stat(94.5)},
             "ema_loss": {"accuracy": _stat(93.0)}}
    (note,) = notes.generalization_notes(table, FACTS)
    # 0.5 points of 360 images: 1.8 images.
    assert note.startswith(
        "Note: the EMA does not beat the baseline here (EMA (best accuracy) "
        "94.50% against Baseline (SGD last) 95.00% test accuracy, 1.8 of 360 "
        "test images on average). Likely: the run's 18 optimizer steps end "
        "before the warm-up of decay 0.8 (step 35)")
    assert "small data (1149 training images)" in note
    assert "few epochs (2)" in note
    # Past the warm-up, a window shorter than an epoch is named instead.
    long_run = dict(FACTS, epochs=40, steps_per_epoch=20, steps=800)
    (note,) = notes.generalization_notes(table, long_run)
    assert ("the EMA's window (period / (1 - decay) = 10 optimizer steps) is "
            "shorter than one epoch (20 steps): window too short") in note
    assert "warm-up" not in note.split("Likely:")[1]
    # An EMA ahead: no note.
    table["ema_loss"]["accuracy"] = _stat(95.5)
    assert notes.generalization_notes(table, FACTS) == []


def test_a_note_says_why_temperature_scaling_raises_the_ece():
    table = {"baseline": {"ece": _stat(4.0), "ece_ts": _stat(3.0)},
             "ema_loss": {"ece": _stat(1.5), "ece_ts": _stat(2.25)}}
    (note,) = notes.calibration_notes(table, FACTS)
    assert note == (
        "Note: temperature scaling raises the ECE of EMA (lowest loss) "
        "(1.50% to 2.25%). Likely: the temperature minimizes the NLL, not the "
        "ECE; it is fitted on 288 validation images (small data), too few to "
        "pin it down; the model is already calibrated within 1.50%, where "
        "the NLL's optimum can lie on either side of the ECE's.")


def test_notes_appear_under_their_tables():
    results = {
        "setup": {"model": "resnet18", "width": 0.0625, "dataset": "digits",
                  "seeds": 1, "seed_values": [0], "averaging": "ema",
                  "label_noise": None, "selection_text": "s",
                  "decay_text": "d", "bn_recompute": True},
        "evals": {"generalization": {"table": {
            "baseline": {"accuracy": _stat(95.0), "loss": _stat(0.2)}}}},
        "notes": {"generalization": ["Note: a reason."]},
    }
    text = report.format_markdown(results)
    assert text.endswith("| Baseline (SGD last) | 95.00 | 0.2000 |\n\nNote: a reason.\n")


def test_one_run_with_the_default_evals_skips_churn_quietly(runs, tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the CLI's own default applies
    result = subprocesses.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), runs[0],
         f"--output_dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Skipping churn (the default --evals)" in result.stdout
    res = json.load(open(out / "results.json"))
    assert sorted(res["evals"]) == ["calibration", "generalization"]
    # No TensorFlow start-up lines (I0000 ... oneDNN, E0000 ... cuInit) and
    # no retracing warning: nothing a user could act on.
    assert result.stderr.strip() == "", result.stderr[-2000:]


def test_evaluate_looks_each_evaluation_up_in_the_registry(finished_run, monkeypatch):
    calls = []

    def check(runs, options):
        calls.append(("check", options.probe_epochs))

    def run(ev, runs, figures, options):
        calls.append(("run", [r.path for r in runs]))
        figures["extra.png"] = "drawn"
        return {"answer": 42}

    monkeypatch.setitem(evaluation.EVALUATORS, "extra", evaluation.Evaluation(
        "extra", "an evaluation added for the test", run, check))
    runs = evaluation.load_runs([finished_run[0]])
    results, figures = evaluation.evaluate(runs, ["extra"], probe_epochs=7,
                                           log=lambda s: None)
    assert calls == [("check", 7), ("run", [finished_run[0]])]
    assert results["evals"] == {"extra": {"answer": 42}}
    assert figures == {"extra.png": "drawn"}

    def refuse(runs, options):
        raise evaluation.EvaluationError("--evals=extra: refused")

    monkeypatch.setitem(evaluation.EVALUATORS, "extra", evaluation.Evaluation(
        "extra", "refuses", run, refuse))
    with pytest.raises(evaluation.EvaluationError, match="refused"):
        evaluation.evaluate(runs, ["generalization", "extra"], log=lambda s: None)
    assert len(calls) == 2  # the check ran before any evaluation


def test_the_report_orders_its_sections_whatever_the_evals_order():
    table = {"baseline": {"accuracy": _stat(95.0), "loss": _stat(0.2),
                          "ece": _stat(3.0), "churn": _stat(1.5),
                          "jensen_shannon": _stat(0.01)}}
    results = {
        "setup": {"model": "resnet18", "width": 0.0625, "dataset": "digits",
                  "seeds": 1, "seed_values": [0], "averaging": "ema",
                  "label_noise": None, "selection_text": "s",
                  "decay_text": "d", "bn_recompute": True},
        "evals": {"calibration": {"table": table, "temperature_tuned_on": None},
                  "churn": {"table": table},
                  "generalization": {"table": table}},
    }
    text = report.format_markdown(results)
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Generalization (Table 1)",
                        "## Prediction disagreement between seeds (Table 3)",
                        "## Calibration (Table 5)"]
    assert "| Baseline (SGD last) | 95.00 | 3.00 | - |" in text
    assert "| Baseline (SGD last) | 1.50 | 0.0100 |" in text


def _image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(("dark", "light")):
        for split, count in (("train", 20), ("test", 8)):
            os.makedirs(root / split / name)
            for i in range(count):
                pixels = rng.normal(90 + 70 * k, 40, size=(8, 8, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    root / split / name / f"{i}.png")
    return root


def test_a_run_whose_data_changed_is_refused(tmp_path):
    # A folder: run records its data's counts and checksum; a resume or an
    # evaluation on changed data is refused in one line (before: evaluate.py
    # silently gave the tables of the other data).
    from conftest import Interrupt
    from PIL import Image
    from zoo.data import DatasetError

    folder = _image_folder(tmp_path / "images")
    run = tmp_path / "run"
    cfg = tiny_config(run, dataset=f"folder:{folder}", batch_size=8, epochs=2,
                      warmup_epochs=0, ema_period=1)
    image = folder / "test" / "dark" / "0.png"
    original = image.read_bytes()

    def change():  # one pixel of one test image
        pixels = np.array(Image.open(image))
        pixels[0, 0, 0] ^= 1
        Image.fromarray(pixels).save(image)

    with pytest.raises(KeyboardInterrupt):
        experiment.train(cfg, verbose=0, callbacks=[Interrupt(1)])
    change()
    with pytest.raises(DatasetError, match=r"^the data of the run in .*run changed "
                       r"since it was trained \(same counts, other content: checksum "
                       r"[0-9a-f]{8} -> [0-9a-f]{8}\); restore the data, or train "
                       r"again in a new --output_dir\.$"):
        experiment.train(cfg, verbose=0)
    image.write_bytes(original)
    summary = experiment.train(cfg, verbose=0)
    assert summary["data_fingerprint"]["train"] == 32  # 20% of 40 held out
    assert summary["data_fingerprint"]["test"] == 16
    runs = evaluation.load_runs([str(run)])
    evaluation.evaluate(runs, ["generalization"], log=lambda s: None)  # same data
    change()
    with pytest.raises(evaluation.EvaluationError, match=(
            r"^.*run was trained on other data than folder:.*images holds now "
            r"\(same counts, other content: checksum .*\); evaluate it on the data "
            r"it was trained on, or train it again\.$")):
        evaluation.evaluate(evaluation.load_runs([str(run)]), ["generalization"],
                            log=lambda s: None)
    os.remove(folder / "train" / "light" / "0.png")
    with pytest.raises(evaluation.EvaluationError, match=r"\((train|val) \d+ -> \d+"):
        evaluation.evaluate(evaluation.load_runs([str(run)]), ["generalization"],
                            log=lambda s: None)
