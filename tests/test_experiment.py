"""train.py's protocol end to end on the digits data with a tiny ResNet."""

import json
import os
import pathlib
import shutil
import sys

import keras
import numpy as np
import pytest
import subprocesses
from conftest import read_history
from conftest import read_summary
from conftest import tiny_config

from zoo.run import experiment
from zoo.run import run_dir
from zoo.data import DatasetError
from zoo.run.run_dir import RunDirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weights_of(path):
    import h5py

    values = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: values.__setitem__(name, np.array(obj))
            if isinstance(obj, h5py.Dataset) else None
        )
    return values


def test_run_directory_files(finished_run):
    run, summary = finished_run
    for name in ("flags.cfg", "history.csv", "summary.json", "curves.png",
                 "sgd_last.weights.h5", "sgd_best_accuracy.weights.h5",
                 "ema_0.5_best_accuracy.weights.h5", "ema_0.8_best_loss.weights.h5"):
        assert os.path.exists(os.path.join(run, name)), name
    assert not os.path.exists(os.path.join(run, "backup"))
    assert not [f for f in os.listdir(run) if ".tmp" in f]
    assert summary == read_summary(run)
    assert summary["completed"] is True
    assert summary["epochs_done"] == 3


def test_history_rows_and_summary_agree(finished_run):
    run, summary = finished_run
    rows = read_history(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for column in ("lr", "loss", "accuracy", "val_loss", "val_accuracy",
                   "ema_0.5_val_accuracy", "ema_0.8_val_loss"):
        assert column in rows[0], column
    # Per-epoch learning rate of the schedule at the epoch's last step: the
    # warm-up's peak after epoch 0 (1 warm-up epoch), then cosine to 0.
    steps = -(-int(0.8 * 1437) // 128)
    total = 3 * steps
    expected_last = 0.05 * 0.5 * (1 + np.cos(np.pi * (3 * steps - steps) / (total - steps)))
    assert float(rows[-1]["lr"]) == pytest.approx(expected_last, abs=1e-7)
    # Best epochs recomputed from the CSV.
    acc = [float(r["ema_0.8_val_accuracy"]) for r in rows]
    loss = [float(r["ema_0.8_val_loss"]) for r in rows]
    ema = summary["ema"]["0.8"]
    assert ema["best_accuracy"]["epoch"] == int(np.argmax(acc))
    assert ema["best_accuracy"]["value"] == pytest.approx(max(acc))
    assert ema["best_loss"]["epoch"] == int(np.argmin(loss))
    assert ema["best_loss"]["value"] == pytest.approx(min(loss))
    assert summary["sgd"]["last"]["val_accuracy"] == pytest.approx(
        float(rows[-1]["val_accuracy"]))
    # The epochs above count from 0, and the summary and its printout say so.
    assert summary["epoch_numbering"].startswith(
        "every epoch here counts from 0, as in history.csv")
    assert ("Epochs count from 0 as in history.csv; Keras's progress bar shows "
            "epoch e as e+1.") in experiment.format_summary(summary)


def cross_entropy_of(run, weights):
    """Mean cross-entropy of RUN/weights on the run's validation images.

    The model is the run's architecture with the file loaded; the images are
    normalized and the softmax cross-entropy taken in float64 NumPy here,
    not by Keras.
    """
    import zoo.models
    from zoo.data import load_dataset
    from zoo.run.config import Config
    from zoo.run.config import read_flags

    config = Config.from_flags(read_flags(os.path.join(run, "flags.cfg"))).resolved()
    data = load_dataset(config.dataset, val_fraction=config.val_fraction,
                        seed=config.seed)
    model = zoo.models.get_model(config.model, data.num_classes, data.image_shape,
                                 width=config.width)
    model.load_weights(os.path.join(run, weights))
    images = (data.x_val / 255.0 - data.mean) / data.std
    logits = model.predict(images.astype("float32"), verbose=0).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(data.y_val)), data.y_val].mean()


def test_validation_losses_are_the_cross_entropy(finished_run):
    # The paper's validation loss, with weight decay in the optimizer: an L2
    # term in the model's losses made every logged loss larger (by 0.78 on
    # the demo at --weight_decay=0.05), and the lowest-loss choice with it.
    run, summary = finished_run
    last = read_history(run)[-1]
    np.testing.assert_allclose(float(last["val_loss"]),
                               cross_entropy_of(run, "sgd_last.weights.h5"), rtol=1e-5)
    best = summary["ema"]["0.8"]["best_loss"]
    np.testing.assert_allclose(best["value"],
                               cross_entropy_of(run, "ema_0.8_best_loss.weights.h5"),
                               rtol=1e-5)


def test_flags_file_replays_the_run(finished_run):
    run, _ = finished_run
    text = open(os.path.join(run, "flags.cfg")).read()
    assert "--ema_decays=0.5,0.8\n" in text
    assert "--weight_decay=0.0001\n" in text  # the paper's ResNet value, resolved
    # Rerunning with the same flags finds the run complete and returns at once.
    again = experiment.train(tiny_config(run), verbose=0)
    assert again == read_summary(run)


def test_other_flags_on_an_existing_run_are_refused(finished_run):
    run, _ = finished_run
    before = sorted(os.listdir(run))
    with pytest.raises(RunDirError, match=r"--lr=0.05 -> 0.1"):
        experiment.train(tiny_config(run, lr=0.1), verbose=0)
    assert sorted(os.listdir(run)) == before


def test_resumed_run_ends_like_an_uninterrupted_one(finished_run, stopped_run,
                                                   tmp_path):
    clean, clean_summary = finished_run
    run = tmp_path / "resumed"
    shutil.copytree(stopped_run, run)  # interrupted at the start of epoch 2
    partial = read_summary(run)
    assert partial["completed"] is False and partial["epochs_done"] == 2
    summary = experiment.train(tiny_config(run), verbose=0)
    assert read_history(run) == read_history(clean)
    for key in ("sgd", "ema", "epochs_done", "completed"):
        assert summary[key] == clean_summary[key], key
    for name in ("sgd_last.weights.h5", "ema_0.8_best_accuracy.weights.h5",
                 "ema_0.5_best_loss.weights.h5"):
        a, b = weights_of(os.path.join(clean, name)), weights_of(os.path.join(run, name))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ema_decays=(0.9, 1.0)), r"^--ema_decays=0.9,1.0: decay 1.0 is outside"),
        (dict(model="resnet50"), r"^--model=resnet50: unknown model"),
        (dict(warmup_epochs=3), r"^--warmup_epochs=3: must be in \[0, --epochs=3\)"),
        (dict(averaging="sema"), r"^--ema_decays=0.5,0.8: --averaging=sema keeps one EMA"),
        (dict(export_decay=0.7), r"^--export_decay=0.7: not one of"),
        (dict(val_fraction=1.0), r"^--val_fraction=1.0: must be in \[0, 1\)"),
    ],
)
def test_bad_settings_fail_before_writing(tmp_path, overrides, message):
    run = tmp_path / "run"
    with pytest.raises(experiment.ConfigError, match=message):
        experiment.train(tiny_config(run, **overrides), verbose=0)
    assert not run.exists()


def test_bad_dataset_fails_before_writing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match="Unknown dataset 'mnist'"):
        experiment.train(tiny_config(run, dataset="mnist"), verbose=0)
    assert not run.exists()


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="holds no flags.cfg"):
        experiment.train(tiny_config(tmp_path), verbose=0)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_noisy_run_writes_the_mask_and_exports(noisy_run):
    tf = pytest.importorskip("tensorflow")
    run, summary = noisy_run  # 1 epoch, symmetric:0.4, --export_from=best_loss
    run = pathlib.Path(run)
    mask = np.load(run / "noise_mask.npy")
    n_train = 1437 - int(round(0.2 * 1437))
    assert mask.shape == (n_train,)
    assert abs(mask.mean() - 0.4) < 0.05
    assert summary["label_noise"] == "symmetric:0.4"
    # The export holds the largest decay's lowest-loss weights, BN recomputed,
    # and takes raw images: it equals the saved EMA fed normalized images.
    info = json.load(open(run / "export" / "export.json"))
    assert info["decay"] == 0.8 and info["weights"] == "best_loss"
    # It documents the input (raw pixels) and the output (logits, checked
    # against the EMA model's raw outputs below).
    assert info["input_shape"] == [None, 32, 32, 3]
    assert info["input_dtype"] == "float32" and info["signature"] == "serve"
    assert info["input_range"].startswith("raw pixel values 0..255")
    assert info["output"].startswith("logits") and info["output_shape"] == [None, 10]
    served = tf.saved_model.load(str(run / "export" / "saved_model"))
    reloaded = keras.saving.load_model(str(run / "export" / "model.keras"))
    # Weight decay was the optimizer's: the shipped model has no regularizer.
    assert reloaded.losses == []
    assert not [layer.name for layer in reloaded.get_layer("resnet18").layers
                if getattr(layer, "kernel_regularizer", None) is not None]
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3))
    images = images.astype("float32")
    out = served.serve(images).numpy()
    np.testing.assert_allclose(out, keras.ops.convert_to_numpy(reloaded(images)),
                               atol=1e-5)
    import zoo.models

    ema = zoo.models.get_model("resnet18", num_classes=10, input_shape=(32, 32, 3),
                        width=0.0625)
    ema.load_weights(str(run / "ema_0.8_best_loss.weights.h5"))
    inner = reloaded.get_layer(ema.name)
    for layer in ema.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # Recomputed statistics: copy them in to compare the rest.
            layer.moving_mean.assign(inner.get_layer(layer.name).moving_mean)
            layer.moving_variance.assign(inner.get_layer(layer.name).moving_variance)
    mean, std = np.array(info["mean"]), np.array(info["std"])
    expected = ema((images / 255.0 - mean) / std, training=False)
    np.testing.assert_allclose(out, keras.ops.convert_to_numpy(expected),
                               rtol=1e-4, atol=1e-4)


def _cli(args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocesses.run(
        [sys.executable, os.path.join(ROOT, "train.py")] + args,
        cwd=cwd, env=env, capture_output=True, text=True,
    )


@pytest.mark.slow
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    result = _cli(["--output_dir=out", "--ema_decays=0.9,2", "--epochs=1",
                   "--warmup_epochs=0"], tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == "train.py: error: --ema_decays=0.9,2.0: decay 2.0 is outside (0, 1)"
    assert not (tmp_path / "out").exists()


# === A run's life cycle: cut after the last epoch, lock, divergence ===


def _without_time(summary):
    return {k: v for k, v in summary.items() if k != "train_seconds"}


def test_run_cut_after_its_last_epoch_is_finished_by_a_rerun(
        finished_run, stopped_run, tmp_path, monkeypatch):
    clean, clean_summary = finished_run
    run = tmp_path / "cut"
    shutil.copytree(stopped_run, run)  # its last epoch is trained below

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("killed in the results phase")

    with monkeypatch.context() as patch:
        patch.setattr(experiment, "plot_curves", interrupted)
        with pytest.raises(KeyboardInterrupt):
            experiment.train(tiny_config(run), verbose=0)
    partial = read_summary(run)
    assert partial["completed"] is False and partial["epochs_done"] == 3
    assert os.path.isdir(run / "backup")
    # The rerun trains no epoch and writes the results from disk alone.
    summary = experiment.train(tiny_config(run), verbose=0)
    assert _without_time(summary) == _without_time(clean_summary)
    assert _without_time(read_summary(run)) == _without_time(clean_summary)
    assert read_history(run) == read_history(clean)
    assert os.path.exists(run / "curves.png")
    assert not os.path.exists(run / "backup")
    for name in ("sgd_last.weights.h5", "ema_0.8_best_accuracy.weights.h5"):
        a, b = weights_of(os.path.join(clean, name)), weights_of(run / name)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")


def test_export_cut_midway_is_redone_identically(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    import keras_ema.export

    run = tmp_path / "export_cut"
    config = tiny_config(run, epochs=1, warmup_epochs=0, export=True)
    export_model = keras_ema.export.export_model
    images = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    first = []

    def export_then_fail(model, directory, **kwargs):
        export_model(model, directory, **kwargs)
        first.append(keras.ops.convert_to_numpy(model(images)))
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(keras_ema.export, "export_model", export_then_fail)
        with pytest.raises(run_dir.DiskFullError, match="No space left"):
            experiment.train(config, verbose=0)
    # Nothing half-exported is left, and the run is not marked completed.
    assert not os.path.exists(run / "export")
    assert not [n for n in os.listdir(run) if ".tmp" in n]
    assert read_summary(run)["completed"] is False
    summary = experiment.train(config, verbose=0)
    assert summary["completed"] is True
    reloaded = keras.saving.load_model(str(run / "export" / "model.keras"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(images)),
                               first[0], rtol=1e-6, atol=1e-6)
    assert json.load(open(run / "export" / "export.json"))["weights"] == "final"


def test_a_run_directory_in_use_is_refused(finished_run):
    run, _ = finished_run
    before = sorted(os.listdir(run))
    with run_dir.RunLock(run):
        with pytest.raises(run_dir.RunInUseError) as error:
            experiment.train(tiny_config(run), verbose=0)
    assert str(error.value) == (
        f"--output_dir={run} is in use by process {os.getpid()}; wait for it "
        "to finish or choose another --output_dir.")
    assert sorted(os.listdir(run)) == before
    # Released: the same call now reports the finished run.
    assert experiment.train(tiny_config(run), verbose=0)["completed"] is True


def test_lock_and_leftovers_of_a_failed_start_do_not_block_a_new_run(tmp_path):
    run = tmp_path / "failed_start"
    run.mkdir()
    with pytest.raises(DatasetError):  # locks the existing, empty directory
        experiment.train(tiny_config(run, dataset="mnist"), verbose=0)
    assert os.listdir(run) == [".lock"]
    (run / ".flags.tmp99999999.cfg").write_text("--half")
    assert run_dir.run_state(tiny_config(run).resolved()) == "new"
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="holds no flags.cfg"):
        run_dir.run_state(tiny_config(run).resolved())


def test_stale_temporary_files_are_removed(tmp_path):
    run = tmp_path / "run"
    (run / "backup").mkdir(parents=True)
    (run / ".export.tmp123" / "saved_model").mkdir(parents=True)
    stale = [".sgd_best_accuracy.tmp26045.weights.h5",
             "ema_0.5_best_accuracy.tmp.weights.h5",
             ".history.tmp77.csv", "backup/multi_ema_000000000010.npz.tmp.npz",
             "backup/.epoch_3.tmp26045.weights.h5"]
    kept = ["history.csv", "summary.json", "sgd_last.weights.h5", ".lock",
            "ema_0.5_best_accuracy.weights.h5", "backup/epoch_3.weights.h5",
            "backup/training_metadata.json", "tmp.txt"]
    for name in stale + kept:
        (run / name).write_text("x")
    run_dir.remove_stale_temp_files(str(run))
    left = sorted(os.path.relpath(os.path.join(d, f), run)
                  for d, _, files in os.walk(run) for f in files)
    assert left == sorted(kept)
    assert not (run / ".export.tmp123").exists()


def test_json_files_are_strict(tmp_path):
    path = tmp_path / "s.json"
    run_dir.write_json(str(path), {"a": float("nan"), "b": [1.5, float("inf")],
                                   "c": {"d": float("-inf"), "e": "NaN"}})
    text = path.read_text()
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text

    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")

    assert json.loads(text, parse_constant=reject) == {
        "a": None, "b": [1.5, None], "c": {"d": None, "e": "NaN"}}


def test_diverged_run_stops_exports_nothing_and_says_so(tmp_path, monkeypatch):
    from zoo import evaluation

    run = tmp_path / "diverged"
    config = tiny_config(run, lr=1e6, warmup_epochs=0, epochs=2, export=True,
                         export_from="best_loss")
    with pytest.raises(experiment.TrainingDiverged,
                       match=r"diverged at epoch 0 \(optimizer step \d+\).*"
                             r"lower --lr \(this run has --lr=1000000.0\)"):
        experiment.train(config, verbose=0)

    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")

    summary = json.loads((run / "summary.json").read_text(), parse_constant=reject)
    assert summary["completed"] is True
    assert summary["diverged"]["epoch"] == 0 and summary["diverged"]["step"] >= 1
    assert summary["epochs_done"] == 0 and summary["sgd"] == {}
    assert not os.path.exists(run / "export")
    assert not os.path.exists(run / "backup")
    assert not [n for n in os.listdir(run) if n.endswith(".weights.h5")]
    # A rerun reports it again without loading data or training.
    monkeypatch.setattr(experiment, "load_dataset", None)
    with pytest.raises(experiment.TrainingDiverged, match="diverged at epoch 0"):
        experiment.train(config, verbose=0)
    with pytest.raises(evaluation.EvaluationError,
                       match=rf"^{run} diverged at epoch 0: .* lower --lr"):
        evaluation.load_runs([str(run)])


def test_finished_run_on_a_read_only_directory_is_reported(finished_run, monkeypatch):
    run, summary = finished_run
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: (
        False if os.path.abspath(path) == os.path.abspath(run) else access(path, mode)))
    # Held elsewhere: a reader that took the lock would fail.
    with run_dir.RunLock(run):
        assert experiment.train(tiny_config(run), verbose=0) == summary


def test_lock_on_a_directory_that_cannot_be_written(tmp_path):
    with pytest.raises(RunDirError, match=r"^--output_dir=\S+gone cannot be written "
                                          r"\(No such file or directory\); make it"):
        run_dir.lock_run_dir(str(tmp_path / "gone"))


@pytest.mark.all_backends
def test_config_checks_types_and_resolves_to_plain_numbers():
    with pytest.raises(experiment.ConfigError,
                       match=r"^--epochs=2\.5: must be an integer, not float$"):
        experiment.Config(output_dir="run", epochs=2.5).resolved()
    with pytest.raises(experiment.ConfigError,
                       match=r"^--epochs=True: must be an integer, not bool$"):
        experiment.Config(output_dir="run", epochs=True).resolved()
    with pytest.raises(experiment.ConfigError,
                       match=r"^--lr='0\.1': must be a number, not str$"):
        experiment.Config(output_dir="run", lr="0.1").resolved()
    config = experiment.Config(output_dir="run", seed=np.int64(3), lr=1,
                               width=np.float32(0.5)).resolved()
    assert (type(config.seed), type(config.lr), type(config.width)) == (int, float, float)
    assert "--seed=3\n" in config.to_flags()
    assert "--lr=1.0\n" in config.to_flags()
    assert "--width=0.5\n" in config.to_flags()

