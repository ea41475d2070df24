"""Damaged run files, a full disk, a read-only run directory.

A rerun of the same command recovers whenever the data to recover exists
(the older backup, the copy of history.csv), else stops with one line naming
the file and what to do. Each case is a row of the README's troubleshooting
table.
"""

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import uuid

import keras
import numpy as np
import pytest
import subprocesses
from conftest import read_history
from conftest import read_summary
from conftest import tiny_config

from zoo import evaluation
from zoo.run import experiment
from zoo.run import run_dir
from zoo.run.run_dir import RunDirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "epoch,lr,loss,val_loss\n"
ROWS = "0,0.1,2.5,2.25\n1,0.05,1.5,1.25\n"


# === Reading history.csv (pure Python) ===


def write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return str(path)


@pytest.mark.all_backends
def test_atomic_path_removes_a_temporary_folder_and_names_a_full_disk(tmp_path):
    from keras_ema import files

    target = tmp_path / "export"
    # A writer that made a folder at the temporary name, then failed.
    with pytest.raises(RuntimeError, match="writer failed"):
        with files.atomic_path(str(target)) as tmp:
            os.makedirs(os.path.join(tmp, "inner"))
            raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == []
    # A full disk: the library raises OSError(ENOSPC) naming the file, the
    # kit DiskFullError naming it; no temporary file is left.
    path = str(tmp_path / "summary.json")
    with pytest.raises(OSError) as info:
        with files.atomic_path(path) as tmp:
            write(tmp, "{")
            raise OSError(errno.ENOSPC, "No space left on device", tmp)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, path)
    with pytest.raises(run_dir.DiskFullError,
                       match=r"^No space left on device while writing .*summary\.json;"):
        with run_dir.atomic_path(path) as tmp:
            write(tmp, "{")
            raise OSError(errno.ENOSPC, "No space left on device", tmp)
    assert os.listdir(tmp_path) == []
    with run_dir.atomic_path(path) as tmp:
        write(tmp, "{}")
    assert os.listdir(tmp_path) == ["summary.json"]


@pytest.mark.all_backends
def test_read_history_reads_a_whole_file(tmp_path):
    path = write(tmp_path / "history.csv", HEADER + ROWS)
    assert run_dir.read_history(path) == [
        {"epoch": 0, "lr": 0.1, "loss": 2.5, "val_loss": 2.25},
        {"epoch": 1, "lr": 0.05, "loss": 1.5, "val_loss": 1.25},
    ]
    assert run_dir.read_history(path, epochs=1) == [
        {"epoch": 0, "lr": 0.1, "loss": 2.5, "val_loss": 2.25}]
    assert run_dir.read_history(path, epochs=0) == []


DAMAGED_HISTORIES = [
    # (what, text, epochs, reason)
    ("number cut in half", HEADER + ROWS[:-3], None,
     r"the row of epoch 1 is cut short \(no line end\)"),
    ("blank cell", HEADER + "0,0.1,2.5,2.25\n1,0.05,,1.25\n", None,
     r"the row of epoch 1 has loss='', not a number"),
    ("missing cells", HEADER + "0,0.1,2.5,2.25\n1,0.05\n", None,
     r"the row of epoch 1 has 2 cells, the header 4"),
    ("garbage", HEADER + "0,0.1,2.5,2.25\n1,0.05,x1.5,1.25\n", None,
     r"epoch 1 has loss='x1\.5', not a number"),
    ("epochs out of order", HEADER + "0,0.1,2.5,2.25\n2,0.05,1.5,1.25\n", None,
     r"row 2 has epoch 2, expected 1"),
    ("too few rows", HEADER + ROWS, 3, r"2 rows, the resumed run needs 3"),
    ("no header", "", None, r"no header line with an epoch column"),
    ("NUL bytes", HEADER + "0,0.1,2.5\0\0\0,2.25\n", None, r"stray bytes"),
]


@pytest.mark.all_backends
@pytest.mark.parametrize("what, text, epochs, reason", DAMAGED_HISTORIES,
                         ids=[c[0] for c in DAMAGED_HISTORIES])
def test_read_history_names_the_damage(tmp_path, what, text, epochs, reason):
    path = write(tmp_path / "history.csv", text)
    with pytest.raises(run_dir.DamagedFileError, match=reason) as info:
        run_dir.read_history(path, epochs, remedy="do this")
    message = str(info.value)
    assert message.startswith(f"{path} is damaged (") and message.endswith("; do this")
    assert "\n" not in message


@pytest.mark.all_backends
def test_read_history_of_random_bytes(tmp_path):
    path = write(tmp_path / "history.csv", bytes(range(256)) * 4, mode="wb")
    with pytest.raises(run_dir.DamagedFileError, match=r"history\.csv is damaged \(not text"):
        run_dir.read_history(path)


@pytest.mark.all_backends
def test_only_the_rows_a_resume_keeps_must_be_whole(tmp_path):
    # The cut last row is dropped by a run resuming at epoch 1.
    path = write(tmp_path / "history.csv", HEADER + ROWS[:-3])
    assert run_dir.read_history(path, epochs=1)[0]["loss"] == 2.5


@pytest.mark.all_backends
def test_read_json_names_the_file(tmp_path):
    path = write(tmp_path / "summary.json", '{"completed": tr')
    with pytest.raises(run_dir.DamagedFileError,
                       match=r"summary\.json is damaged \(not JSON: .*\); rerun it$"):
        run_dir.read_json(path, "rerun it")


# === Temporary files ===


@pytest.mark.all_backends
def test_temporary_names_carry_the_pid(tmp_path):
    from keras_ema import files

    pid = os.getpid()
    for name, expected in [
        ("ema_0.5_best_accuracy.weights.h5", f".ema_0.5_best_accuracy.tmp{pid}.weights.h5"),
        ("curves.png", f".curves.tmp{pid}.png"),
        ("multi_ema_step000000000012.npz", f".multi_ema_step000000000012.tmp{pid}.npz"),
        ("history.csv", f".history.tmp{pid}.csv"),
    ]:
        path = str(tmp_path / name)
        assert files.temp_path(path) == str(tmp_path / expected)
        match = run_dir.TEMP_NAME.match(expected)
        assert match and int(match.group("pid")) == pid


@pytest.mark.all_backends
def test_a_failed_ema_write_leaves_no_file(tmp_path, monkeypatch):
    import keras

    from keras_ema import multi_ema

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    ema = multi_ema.MultiEMA((0.5,), period=1, backup_dir=str(tmp_path), verbose=0)
    model.fit(np.ones((4, 3)), np.ones((4, 2)), epochs=1, verbose=0, callbacks=[ema])
    before = sorted(os.listdir(tmp_path))

    def full_disk(model, path, include_optimizer=True):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(multi_ema, "write_weights", full_disk)
    target = str(tmp_path / "ema_0.5.weights.h5")
    with pytest.raises(OSError) as info:
        ema.save_weights(0.5, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == target
    monkeypatch.setattr(multi_ema.np, "savez", lambda path, **arrays: full_disk(None, path))
    with pytest.raises(OSError) as info:
        ema._save_backup()
    assert info.value.errno == errno.ENOSPC and "multi_ema_step" in info.value.filename
    assert sorted(os.listdir(tmp_path)) == before


# === MultiEMA's state files ===


def _fitted_ema(backup, epochs=2):
    import keras

    from keras_ema import MultiEMA

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    ema = MultiEMA((0.5, 0.9), period=1, warmup=False, backup_dir=backup, verbose=0)
    x = np.random.default_rng(0).normal(size=(8, 3))
    model.fit(x, x[:, :2], batch_size=4, epochs=epochs, verbose=0, callbacks=[ema])
    return model, ema


@pytest.mark.all_backends
def test_ema_state_files_damaged_or_missing_are_named(tmp_path):
    from keras_ema.multi_ema import MultiEMA

    backup = str(tmp_path / "backup")
    model, ema = _fitted_ema(backup)
    files = sorted(os.listdir(backup))
    assert files == ["multi_ema_step000000000002.npz", "multi_ema_step000000000004.npz"]
    assert ema.backup_steps() == [2, 4]
    newest = os.path.join(backup, files[1])
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    assert ema.backup_steps() == [2]

    fresh = MultiEMA((0.5, 0.9), period=1, warmup=False, backup_dir=backup, verbose=0)
    fresh._build(model)
    shadows = [np.array(s) for s in fresh.get_state()["shadows"]]
    with pytest.raises(ValueError, match=r"^MultiEMA state file .*004\.npz is damaged \("):
        fresh._restore_backup(4)
    # Nothing was overwritten, and a step without a file is refused, not
    # silently restarted from the current weights.
    for a, b in zip(shadows, fresh.get_state()["shadows"]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"no saved state at optimizer step 3 .*holds steps 2, 4"):
        fresh._restore_backup(3)
    assert fresh._restore_backup(0) is False
    assert fresh._restore_backup(2) is True and fresh.step == 2


# === Resuming a damaged run ===


@pytest.fixture
def runs(finished_run, stopped_run):
    """A finished run and the same run stopped at the start of epoch 2 of 0..2.

    Trained once for the session (tests/conftest.py): damage copies only.
    """
    return finished_run[0], stopped_run


def copy_of(run, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    return copy


def assert_same_results(run, clean, summary):
    assert read_history(run) == read_history(clean)
    clean_summary = read_summary(clean)
    for key in ("sgd", "ema", "epochs_done", "completed"):
        assert summary[key] == clean_summary[key], key
    assert not [n for n in os.listdir(run) if run_dir.TEMP_NAME.match(n)]


def backup_file(run, prefix):
    backup = os.path.join(run, "backup")
    return sorted(os.path.join(backup, n) for n in os.listdir(backup)
                  if n.startswith(prefix))


def garble(path, keep=0.5):
    """Cuts `path` to `keep` of its size and appends random bytes."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))
        f.seek(0, 2)
        f.write(np.random.default_rng(0).bytes(64))


def test_the_backup_keeps_two_epochs_and_the_history(runs):
    _, stopped = runs
    backup = os.path.join(stopped, "backup")
    metadata = json.load(open(os.path.join(backup, "training_metadata.json")))
    assert metadata["backups"] == [
        {"epoch": 2, "weights": "epoch_2.weights.h5"},
        {"epoch": 1, "weights": "epoch_1.weights.h5"},
    ]
    assert sorted(n for n in os.listdir(backup) if n.endswith(".h5")) == [
        "epoch_1.weights.h5", "epoch_2.weights.h5"]
    assert len(backup_file(stopped, "multi_ema_step")) == 2
    assert open(os.path.join(backup, "history.csv")).read() == open(
        os.path.join(stopped, "history.csv")).read()


def blank_ema_cells(text):
    lines = text.splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    cells = lines[-1].rstrip("\n").split(",")
    cells = ["" if name.startswith("ema_") else c for name, c in zip(header, cells)]
    return "".join(lines[:-1]) + ",".join(cells) + "\n"


HISTORY_DAMAGE = {
    "number cut in half": lambda text: text[:-3],
    "blank EMA cells": blank_ema_cells,
    "random bytes": lambda text: "\x00\x81garbage\xff" * 20,
}


def damage_history(run, what):
    path = os.path.join(run, "history.csv")
    text = open(path, encoding="latin-1").read()
    write(path, HISTORY_DAMAGE[what](text).encode("latin-1"), mode="wb")
    return path


@pytest.mark.parametrize("what", sorted(HISTORY_DAMAGE))
def test_each_history_damage_is_restored_from_the_backup_copy(runs, tmp_path, what,
                                                              capsys):
    # The step of a resume that reads the history, for each kind of damage
    # (read_history's tests above name each); the resume after it is the
    # same for all, run end to end below.
    from zoo.run.backup import AtomicBackupAndRestore

    clean, stopped = runs
    run = copy_of(stopped, tmp_path)
    path = damage_history(run, what)
    backup = AtomicBackupAndRestore(os.path.join(run, "backup"), history_path=path)
    backup._restore_history(2)
    assert read_history(run) == read_history(clean)[:2]
    assert f"{path} was damaged (" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["number cut in half"])
def test_damaged_history_is_restored_from_the_backup_copy(runs, tmp_path, what):
    clean, stopped = runs
    run = copy_of(stopped, tmp_path)
    damage_history(run, what)
    summary = experiment.train(tiny_config(run), verbose=0)
    assert_same_results(run, clean, summary)


def test_damaged_history_and_copy_resume_from_the_older_epoch(runs, tmp_path, capsys):
    clean, stopped = runs
    run = copy_of(stopped, tmp_path)
    for path in (os.path.join(run, "history.csv"), os.path.join(run, "backup", "history.csv")):
        write(path, open(path).read()[:-3])
    summary = experiment.train(tiny_config(run), verbose=0)
    assert_same_results(run, clean, summary)
    assert "Resuming from epoch 1, the newest backup that reads back whole" in (
        capsys.readouterr().out)


def test_damaged_history_without_a_copy_is_one_line(runs, tmp_path):
    _, stopped = runs
    run = copy_of(stopped, tmp_path)
    for path in (os.path.join(run, "history.csv"), os.path.join(run, "backup", "history.csv")):
        write(path, "epoch,loss\n0,\x00\x00\n")
    with pytest.raises(RunDirError, match=(
            r"^Cannot resume from .*backup: .*history\.csv \(stray bytes\); .*"
            r"history\.csv \(stray bytes\); remove .*backup to restart the run from "
            r"scratch\.$")) as info:
        experiment.train(tiny_config(run), verbose=0)
    assert "\n" not in str(info.value)
    assert open(os.path.join(run, "history.csv")).read() == "epoch,loss\n0,\x00\x00\n"


def test_damaged_summary_of_an_unfinished_run_is_rewritten(runs, tmp_path):
    clean, stopped = runs
    run = copy_of(stopped, tmp_path)
    path = os.path.join(run, "summary.json")
    write(path, open(path).read()[:40])
    summary = experiment.train(tiny_config(run), verbose=0)
    assert_same_results(run, clean, summary)
    assert read_summary(run) == summary


def test_damaged_files_of_a_finished_run_are_one_line(runs, tmp_path):
    clean, _ = runs
    run = copy_of(clean, tmp_path)
    path = os.path.join(run, "history.csv")
    write(path, open(path).read()[:-3])
    with pytest.raises(evaluation.EvaluationError, match=(
            r"history\.csv is damaged \(the row of epoch 2 is cut short .*\); restore "
            r"it from a copy, or retrain the run with --flagfile=.*flags\.cfg "
            r"--output_dir=NEW$")):
        evaluation.load_runs([run])
    path = os.path.join(run, "summary.json")
    write(path, open(path).read()[:40])
    for call in (lambda: experiment.train(tiny_config(run), verbose=0),
                 lambda: evaluation.load_runs([run])):
        with pytest.raises((RunDirError, evaluation.EvaluationError), match=(
                r"summary\.json is damaged \(not JSON: .*\); the run has finished "
                r"and its backup is gone, so it cannot be rewritten: restore it "
                r"from a copy, or retrain")) as info:
            call()
        assert "\n" not in str(info.value)


def test_damaged_weights_of_a_finished_run_are_one_line(runs, tmp_path):
    clean, _ = runs
    run = copy_of(clean, tmp_path)
    garble(os.path.join(run, "sgd_last.weights.h5"))
    evaluator = evaluation.Evaluator(evaluation.load_runs([run]), bn_recompute=False,
                                     log=lambda *args: None)
    with pytest.raises(RunDirError, match=(
            r"^.*sgd_last\.weights\.h5 is damaged \(.*\); restore it from a copy, or "
            r"retrain the run with --flagfile=.*flags\.cfg --output_dir=NEW$")) as info:
        evaluator.model(evaluator.runs[0], "baseline")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("what", ["newest weights", "newest EMA state", "metadata"])
def test_damaged_backup_resumes_from_the_older_epoch(runs, tmp_path, what, capsys):
    clean, stopped = runs
    run = copy_of(stopped, tmp_path)
    metadata = os.path.join(run, "backup", "training_metadata.json")
    if what == "newest weights":
        garble(backup_file(run, "epoch_2")[0])
    elif what == "newest EMA state":
        garble(backup_file(run, "multi_ema_step")[-1])
    else:
        write(metadata, '{"epoch": 2, "weig')
    summary = experiment.train(tiny_config(run), verbose=0)
    assert_same_results(run, clean, summary)
    out = capsys.readouterr().out
    if what.startswith("newest"):
        assert "Resuming from epoch 1, the newest backup that reads back whole" in out
    elif what == "metadata":
        assert "training_metadata.json (rebuilt from the weights files present)" in out


def test_an_unrecoverable_backup_is_one_line(runs, tmp_path):
    _, stopped = runs
    run = copy_of(stopped, tmp_path)
    for path in backup_file(run, "epoch_"):
        garble(path)
    write(os.path.join(run, "backup", "training_metadata.json"), "\x00" * 10)
    with pytest.raises(RunDirError, match=(
            r"^Cannot resume from .*backup: .*training_metadata\.json \(rebuilt from "
            r"the weights files present\); .*epoch_2\.weights\.h5 \(.*\); "
            r".*epoch_1\.weights\.h5 \(.*\); remove .*backup to restart the run "
            r"from scratch\.$")) as info:
        experiment.train(tiny_config(run), verbose=0)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_cli_damaged_files_are_one_line_without_traceback(runs, tmp_path):
    clean, stopped = runs
    run = copy_of(stopped, tmp_path)
    for path in backup_file(run, "multi_ema_step"):
        garble(path)
    flags = [f"--flagfile={os.path.join(run, 'flags.cfg')}", f"--output_dir={run}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    finished = str(tmp_path / "finished")
    shutil.copytree(clean, finished)
    path = os.path.join(finished, "summary.json")
    write(path, "{")
    # The two commands work on different directories: they run side by side.
    commands = [[sys.executable, os.path.join(ROOT, "train.py"), *flags],
                [sys.executable, os.path.join(ROOT, "evaluate.py"), finished]]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
                 for command in commands]
    try:
        train_err, evaluate_err = (err for _, _, err in subprocesses.communicate(processes))
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert processes[0].returncode == 1
    assert "Traceback" not in train_err
    last = train_err.strip().splitlines()[-1]
    assert last.startswith(f"train.py: error: Cannot resume from {run}/backup: ")
    assert "multi_ema_step" in last and "is damaged" in last
    assert processes[1].returncode == 1 and "Traceback" not in evaluate_err
    assert evaluate_err.strip().splitlines()[-1] == (
        f"evaluate.py: error: {path} is damaged (not JSON: Expecting property name "
        "enclosed in double quotes: line 1 column 2 (char 1)); the run has finished "
        "and its backup is gone, so it cannot be rewritten: restore it from a copy, "
        f"or retrain the run with --flagfile={finished}/flags.cfg --output_dir=NEW")


# === Full disk and read-only run directories (real mounts, as root) ===


@contextlib.contextmanager
def tmpfs(path, size):
    os.makedirs(path)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                 str(path)], capture_output=True, text=True)
    except OSError:
        result = None
    if result is None or result.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_run_directory_fails_before_loading_data(runs, tmp_path, monkeypatch):
    clean, stopped = runs
    # A finished run needs no writing: it is reported, as on a writable disk.
    with tmpfs(tmp_path / f"done{uuid.uuid4().hex[:6]}", "32m") as run:
        shutil.copytree(clean, run, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", run], check=True)
        assert experiment.train(tiny_config(run), verbose=0) == read_summary(clean)
    # The run directory itself is the read-only mount; its parent is writable.
    with tmpfs(tmp_path / f"ro{uuid.uuid4().hex[:6]}", "32m") as run:
        shutil.copytree(stopped, run, dirs_exist_ok=True)
        before = sorted(os.listdir(run))
        mount = run
        subprocess.run(["mount", "-o", "remount,ro", mount], check=True)

        def no_data(*args, **kwargs):
            raise AssertionError("the data was loaded before the check")

        monkeypatch.setattr(experiment, "load_dataset", no_data)
        with pytest.raises(RunDirError, match=(
                rf"^{run} is not writable \(Read-only file system\); make it writable, "
                r"or copy the run to a writable place and rerun with "
                r"--output_dir=COPY\.$")):
            experiment.train(tiny_config(run), verbose=0)
        assert sorted(os.listdir(run)) == before


@pytest.mark.slow
def test_full_disk_is_one_line_and_a_rerun_with_space_recovers(runs, tmp_path):
    clean, _ = runs
    with tmpfs(tmp_path / f"full{uuid.uuid4().hex[:6]}", "4200k") as mount:
        run = os.path.join(mount, "run")
        flags = write(tmp_path / "flags.cfg", tiny_config(run).resolved().to_flags())
        command = [sys.executable, os.path.join(ROOT, "train.py"), f"--flagfile={flags}"]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
        result = subprocesses.run(command, capture_output=True, text=True, env=env)
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"train.py: error: No space left on device while writing {run}/")
        assert last.endswith("; free some space and rerun the same command.")
        written = os.path.join(run, "history.csv")
        assert os.path.exists(written), "the disk filled before the first epoch ended"
        leftovers = [os.path.join(d, n) for d, _, names in os.walk(run) for n in names
                     if run_dir.TEMP_NAME.match(n)]
        assert not leftovers

        subprocess.run(["mount", "-o", "remount,size=64m", mount], check=True)
        result = subprocesses.run(command, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Resuming" in result.stdout
        summary = read_summary(run)
        assert summary["completed"] is True
        assert read_history(run) == read_history(clean)


def _weights_arrays(path):
    import h5py

    arrays = {}
    with h5py.File(path) as f:
        f.visititems(lambda k, v: arrays.__setitem__(k, v[()])
                     if isinstance(v, h5py.Dataset) else None)
    return arrays


def test_damaged_weights_of_an_earlier_epoch_are_named(runs, tmp_path):
    # A chosen epoch's file damaged while the run was stopped: before the run
    # is marked completed and its backup removed (they come after this check
    # in experiment._fit), the file is named in one line. Before, the run was
    # completed with the damaged file kept.
    from zoo.data import load_dataset

    clean, _ = runs
    run = copy_of(clean, tmp_path)
    summary = read_summary(run)
    record = summary["ema"]["0.5"]["best_loss"]
    record["epoch"] = 0  # a chosen epoch that no backup keeps
    garble(os.path.join(run, record["weights"]))
    config = tiny_config(run).resolved()
    data = load_dataset("digits", val_fraction=config.val_fraction, seed=config.seed)
    with pytest.raises(run_dir.DamagedFileError, match=(
            r"^.*/ema_0\.5_best_loss\.weights\.h5 is damaged \(.*\); it holds "
            r"epoch 0, which the backup no longer keeps: restore the file from a "
            r"copy and rerun the same command, or retrain with "
            r"--flagfile=.*flags\.cfg --output_dir=NEW$")) as info:
        experiment._check_named_files(config, data, run, summary, None, None)
    assert "\n" not in str(info.value)


class _StopAfterTraining(keras.callbacks.Callback):
    """Raises after the last epoch, as a kill in the results phase would."""

    def on_train_end(self, logs=None):
        raise KeyboardInterrupt("after training")


def test_damaged_weights_of_the_last_epoch_are_rewritten(runs, tmp_path, capsys):
    clean, stopped = runs
    run = copy_of(stopped, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        experiment.train(tiny_config(run), verbose=0, callbacks=[_StopAfterTraining()])
    names = ["ema_0.8_last.weights.h5", "sgd_last.weights.h5"]
    for name in names:
        garble(os.path.join(run, name))
    capsys.readouterr()
    summary = experiment.train(tiny_config(run), verbose=0)
    assert_same_results(run, clean, summary)
    out = capsys.readouterr().out
    for name in names:
        assert f"{name} was damaged; rewritten from the last epoch's state." in out
        got, want = (_weights_arrays(os.path.join(r, name)) for r in (run, clean))
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}:{key}")


def test_a_weights_only_file_loads_quietly_into_a_trained_model(tmp_path):
    import warnings

    import h5py
    import keras

    def trained():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
        model.fit(np.ones((4, 3)), np.ones((4, 2)), epochs=1, verbose=0)
        return model

    source, target = trained(), trained()
    path = str(tmp_path / "w.weights.h5")
    run_dir.save_weights(source, path, include_optimizer=False)
    with h5py.File(path, "r") as f:
        assert "optimizer" not in f
    momentum = [keras.ops.convert_to_numpy(v) for v in target.optimizer.variables]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_dir.load_weights(target, path)
    for a, b in zip(source.weights, target.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))
    for value, v in zip(momentum, target.optimizer.variables):
        np.testing.assert_array_equal(value, keras.ops.convert_to_numpy(v))
