"""What a careless user types: one line naming the value, nothing written.

Each case is a row of the README's troubleshooting table.
"""

import json
import os
import re
import sys

import numpy as np
import pytest
import subprocesses

from zoo import evaluation
from zoo.run import experiment
from zoo.data import DatasetError
from zoo.run.run_dir import RunDirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), dataset="digits", width=0.0625,
                    epochs=1, warmup_epochs=0, ema_decays=(0.5,), ema_period=1)
    settings.update(overrides)
    return experiment.Config(**settings)


def image_folder(root, classes=("a", "b"), broken=False):
    from PIL import Image

    for split in ("train", "test"):
        for c in classes:
            os.makedirs(root / split / c)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / c / "x.png")
    if broken:
        (root / "train" / classes[0] / "broken.png").write_bytes(b"not an image")
    return f"folder:{root}"


CASES = [
    # (what, overrides, error type, message pattern)
    ("unknown dataset", dict(dataset="mnist"), DatasetError,
     r"^Unknown dataset 'mnist'\. Known: digits, "),
    ("unknown model", dict(model="resnet50"), experiment.ConfigError,
     r"^--model=resnet50: unknown model; use one of resnet18, "),
    ("zero epochs", dict(epochs=0), experiment.ConfigError, r"^--epochs=0: must be >= 1$"),
    ("negative learning rate", dict(lr=-0.1), experiment.ConfigError, r"^--lr=-0.1: must be > 0$"),
    ("decay 1.0", dict(ema_decays=(0.9, 1.0)), experiment.ConfigError,
     r"^--ema_decays=0.9,1.0: decay 1.0 is outside \(0, 1\)$"),
    ("decay 0", dict(ema_decays=(0.0,)), experiment.ConfigError,
     r"^--ema_decays=0.0: decay 0.0 is outside \(0, 1\)$"),
    ("noise rate 1.5", dict(label_noise="symmetric:1.5"), DatasetError,
     r"noise rate must be a number in \[0, 1\)\. Received: label_noise='symmetric:1\.5'"),
    ("CIFAR-N label set on digits", dict(label_noise="worse"), DatasetError,
     r"^Label set 'worse' belongs to cifar10n"),
    ("seed above numpy's range", dict(seed=2**32), experiment.ConfigError,
     r"^--seed=4294967296: must be in \[0, 4294967295\] \(numpy's seed range\)$"),
    ("negative seed", dict(seed=-1), experiment.ConfigError, r"^--seed=-1: must be in \[0, "),
    ("infinite width", dict(width=float("inf")), experiment.ConfigError,
     r"^--width=inf: must be a finite number$"),
    ("huge width", dict(width=1e9), experiment.ConfigError,
     r"^--width=1000000000.0: must be in \(0, 16\] \(1 is the paper's width\)$"),
    ("NaN weight decay", dict(weight_decay=float("nan")), experiment.ConfigError,
     r"^--weight_decay=nan: must be a finite number >= 0, or paper for the paper's "
     r"value \(1e-4 ResNet, 5e-4 WRN and VGG\)$"),
    ("negative weight decay", dict(weight_decay=-1.0), experiment.ConfigError,
     r"^--weight_decay=-1.0: must be a finite number >= 0, or paper"),
    ("infinite weight decay in a flag file", dict(weight_decay="-inf"),
     experiment.ConfigError, r"^--weight_decay=-inf: must be a finite number >= 0"),
    ("infinite learning rate", dict(lr=float("inf")), experiment.ConfigError,
     r"^--lr=inf: must be a finite number$"),
    ("NaN momentum", dict(momentum=float("nan")), experiment.ConfigError,
     r"^--momentum=nan: must be a finite number$"),
    ("momentum 1", dict(momentum=1.0), experiment.ConfigError,
     r"^--momentum=1.0: must be in \[0, 1\)$"),
    ("NaN validation fraction", dict(val_fraction=float("nan")), experiment.ConfigError,
     r"^--val_fraction=nan: must be a finite number$"),
    ("infinite BELAY coupling", dict(belay_coupling=float("-inf")), experiment.ConfigError,
     r"^--belay_coupling=-inf: must be a finite number$"),
    ("NaN EMA decay", dict(ema_decays=(float("nan"),)), experiment.ConfigError,
     r"^--ema_decays=nan: nan is not a finite number$"),
    ("infinite EMA decay among others", dict(ema_decays=(0.9, float("inf"))),
     experiment.ConfigError, r"^--ema_decays=0.9,inf: inf is not a finite number$"),
    ("NaN export decay", dict(ema_decays=(0.5,), export_decay=float("nan")),
     experiment.ConfigError, r"^--export_decay=nan: must be a finite number$"),
    ("image size on a TFDS dataset", dict(image_size=32), experiment.ConfigError,
     r"^--image_size=32: resizes folder: and tiny_imagenet images only; leave it 0 "
     r"for this dataset$"),
    ("negative image size", dict(image_size=-1), experiment.ConfigError,
     r"^--image_size=-1: must be in \[0, 1024\]; 0 keeps the stored size$"),
    ("data_dir of a dataset that reads none", dict(data_dir="/nonexistent"),
     experiment.ConfigError,
     r"^--data_dir=/nonexistent: --dataset=digits reads no data directory \(only "
     r"the TFDS datasets and tiny_imagenet do\); leave it empty$"),
    ("data_dir of an image folder", dict(dataset="folder:/data", data_dir="/data"),
     experiment.ConfigError, r"^--data_dir=/data: --dataset=folder:/data reads no "),
    ("decays equal within rounding", dict(ema_decays=(0.9, 0.9000000000000001)),
     experiment.ConfigError,
     r"^--ema_decays=0\.9,0\.9000000000000001: decays 0\.9 and 0\.9000000000000001 "
     r"differ by less than 1e-06, the precision decays are printed with: they "
     r"are one EMA; give decays that differ in their first 6 decimals$"),
    ("decays closer than printed, unsorted", dict(ema_decays=(0.9995, 0.998, 0.9994996)),
     experiment.ConfigError, r"decays 0\.9994996 and 0\.9995 differ by less than 1e-06"),
    ("EMA period longer than the run", dict(ema_period=1000), experiment.ConfigError,
     r"^--ema_period=1000 is longer than the run \(1 epoch x 9 steps = 9 optimizer "
     r"steps\), so the EMAs would never be updated; use --ema_period<=9 or more "
     r"--epochs\.$"),
    ("distribution of the other backend", dict(distribution="data_parallel"),
     experiment.ConfigError, r"^--distribution=data_parallel: needs KERAS_BACKEND=jax"),
]


@pytest.mark.parametrize("what, overrides, error, pattern", CASES,
                         ids=[c[0] for c in CASES])
def test_train_settings(tmp_path, what, overrides, error, pattern):
    import keras

    if "distribution" in overrides and keras.backend.backend() == "jax":
        pytest.skip("data_parallel is valid on JAX")
    run = tmp_path / "run"
    with pytest.raises(error, match=pattern) as info:
        experiment.train(config(run, **overrides), verbose=0)
    assert "\n" not in str(info.value)
    assert not run.exists()


def test_ema_period_up_to_the_run_length_is_accepted():
    from types import SimpleNamespace

    # 130 examples in batches of 64: 3 steps per epoch, 6 in 2 epochs.
    data = SimpleNamespace(x_train=np.zeros((130, 1)))
    experiment._check_period(config("unused", epochs=2, batch_size=64, ema_period=6), data)
    with pytest.raises(experiment.ConfigError, match=r"^--ema_period=7 is longer than "
                       r"the run \(2 epochs x 3 steps = 6 optimizer steps\)"):
        experiment._check_period(config("unused", epochs=2, batch_size=64, ema_period=7),
                                 data)


@pytest.mark.parametrize("what", ["missing", "empty", "one class", "corrupt file"])
def test_image_folders(tmp_path, what):
    if what == "missing":
        name, pattern = f"folder:{tmp_path / 'nope'}", r"does not exist"
    elif what == "empty":
        (tmp_path / "data").mkdir()
        name, pattern = f"folder:{tmp_path / 'data'}", r"has no train/ folder"
    elif what == "one class":
        name, pattern = image_folder(tmp_path / "data", ("a",)), r"has a single class \('a'\)"
    else:
        name = image_folder(tmp_path / "data", broken=True)
        pattern = r"Cannot decode .*broken\.png as an image .* Remove or replace the file"
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match=pattern) as info:
        experiment.train(config(run, dataset=name), verbose=0)
    assert "\n" not in str(info.value)
    assert not run.exists()


def test_mixed_image_sizes_name_the_flag_that_resizes_them(tmp_path):
    from PIL import Image

    name = image_folder(tmp_path / "data")
    odd = tmp_path / "data" / "test" / "b" / "y.png"
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(odd)
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match=r"y\.png is 10x12 but .* is 8x8\. Pass "
                       r"--image_size=64 to train.py \(image_size=64 to load_dataset\) "
                       r"to resize all images\.$"):
        experiment.train(config(run, dataset=name), verbose=0)
    assert not run.exists()
    summary = experiment.train(config(run, dataset=name, image_size=6, batch_size=2),
                               verbose=0)
    assert summary["completed"]
    assert "--image_size=6\n" in (run / "flags.cfg").read_text()
    assert experiment.Config.from_flags({"image_size": "6"}).image_size == 6


def test_image_size_left_at_zero_is_not_written_so_older_runs_resume():
    flags = config("run").resolved().to_flags()
    assert "image_size" not in flags
    assert experiment.Config.from_flags({}).image_size == 0


def test_output_dir_is_a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(RunDirError, match=r"--output_dir=.*notes\.txt is a file"):
        experiment.train(config(path), verbose=0)
    assert path.read_text() == "mine"


def test_output_dir_below_a_file(tmp_path):
    from zoo.run import run_dir

    path = tmp_path / "notes.txt"
    path.write_text("mine")
    below = path / "runs" / "run"
    message = (f"^--output_dir={re.escape(str(below))} cannot be created: "
               f"{re.escape(str(path))} is a file, not a directory; choose "
               r"another --output_dir\.$")
    with pytest.raises(RunDirError, match=message):
        experiment.train(config(below), verbose=0)
    # evaluate.py checks its --output_dir with the same function before it
    # evaluates anything.
    with pytest.raises(RunDirError, match=r"cannot be created: .*notes\.txt is a file"):
        run_dir.check_output_dir(str(path / "results"))
    assert path.read_text() == "mine"
    assert os.listdir(tmp_path) == ["notes.txt"]


def _old_layout_run(root):
    run = root / "old"
    run.mkdir()
    (run / "flags.cfg").write_text(config(run).resolved().to_flags())
    for name in ("history.csv", "sgd_last.weights.h5"):
        (run / name).write_text("")
    (run / "summary.json").write_text(json.dumps({"layout_version": 0, "completed": True}))
    return run


def test_run_directory_of_an_older_layout(tmp_path):
    run = _old_layout_run(tmp_path)
    before = sorted(os.listdir(run))
    with pytest.raises(RunDirError, match=r"holds a run of layout version 0; this version writes 1"):
        experiment.train(config(run), verbose=0)
    with pytest.raises(evaluation.EvaluationError, match=r"has layout version 0, this version reads 1"):
        evaluation.load_runs([str(run)])
    assert sorted(os.listdir(run)) == before


def test_evaluate_without_runs():
    with pytest.raises(evaluation.EvaluationError, match=r"^No run directories given"):
        evaluation.load_runs([])


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--lr=inf", "--seed=4294967296", "--weight_decay=nan"])
def test_out_of_range_flag_prints_one_line_and_writes_nothing(tmp_path, flag):
    result = subprocesses.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--output_dir=out",
         "--epochs=1", "--warmup_epochs=0", flag],
        cwd=tmp_path, capture_output=True, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(f"train.py: error: {flag}: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_non_numeric_flag_exits_nonzero(tmp_path):
    result = subprocesses.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--output_dir=out", "--lr=fast"],
        cwd=tmp_path, capture_output=True, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode != 0
    assert "--lr=fast" in result.stderr
    assert not (tmp_path / "out").exists()


def test_damaged_flags_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "flags.cfg").write_bytes(b"--model=\xff\xfe\x00resnet18\n")
    with pytest.raises(RunDirError, match=(
            r"flags\.cfg is damaged \(not text: .*\); restore it, or rerun with "
            r"--output_dir=NEW to train again$")) as info:
        experiment.train(config(run), verbose=0)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(run)) == ["flags.cfg"]
