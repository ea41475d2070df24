"""train.py and evaluate.py as a newcomer first meets them: --help, log lines."""

import dataclasses
import os
import sys

import pytest
import subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _without_log_level():
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_exits_zero_without_importing_tensorflow_or_keras(script, flag):
    result = subprocesses.run(
        [sys.executable, "-X", "importtime", os.path.join(ROOT, script), flag],
        cwd=ROOT, env=_without_log_level(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--output_dir" in result.stdout
    # -X importtime writes one line per imported module to stderr.
    imported = [line.rsplit("|", 1)[-1].strip()
                for line in result.stderr.splitlines() if "import time:" in line]
    assert "absl.flags" in imported  # the check itself sees imports
    # train.py imports Config's module, which imports no Keras.
    light = ("zoo", "zoo.run", "zoo.run.config")
    heavy = [m for m in imported if m.split(".")[0] in
             ("tensorflow", "keras", "jax", "zoo", "keras_ema") and m not in light]
    assert heavy == []
    other = [line for line in result.stderr.splitlines() if "import time:" not in line]
    assert other == []


def _train_flags():
    """train.py's flags, defined into a fresh FlagValues by its own code."""
    from absl import flags

    from zoo.run import config

    flag_values = flags.FlagValues()
    config.define_flags(flag_values)
    return flag_values


def test_help_lists_every_config_field_and_its_choices():
    from zoo.run.config import Config

    result = subprocesses.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    for field in dataclasses.fields(Config):
        assert f"--{field.name}:" in text or f"--[no]{field.name}:" in text, field.name
    # Written out here, not read from Config: the choices a user must see.
    for name, choices in {
        "model": "resnet18|resnet34|wrn28_10|vgg16",
        "averaging": "ema|sema|belay",
        "mixed_precision": "|mixed_float16|mixed_bfloat16",
        "distribution": "none|mirrored|multiworker|data_parallel",
        "export_from": "final|best_accuracy|best_loss",
    }.items():
        assert f"--{name}: <{choices}>:" in text, name
    assert "--connect_timeout:" in text
    assert "(an integer in the range [0, 4294967295])" not in text  # Config says why


def test_flag_defaults_are_config_defaults_and_parse_back():
    from zoo.run.config import Config
    from zoo.run.config import config_from_flags

    flag_values = _train_flags()
    flag_values(["train.py"])
    config = config_from_flags(flag_values)
    assert config == Config()
    assert flag_values["output_dir"].default is None  # required on the command line
    assert config.ema_decays == (0.968, 0.984, 0.992, 0.996, 0.998)
    flag_values = _train_flags()
    flag_values(["train.py", "--output_dir=run", "--model=vgg16", "--noema_warmup",
                 "--ema_decays=0.5,0.25", "--mixed_precision=mixed_bfloat16",
                 "--seed=7", "--width=0.5"])
    config = config_from_flags(flag_values)
    assert (config.output_dir, config.model, config.ema_warmup, config.ema_decays,
            config.mixed_precision, config.seed, config.width) == (
        "run", "vgg16", False, (0.5, 0.25), "mixed_bfloat16", 7, 0.5)
    # The flag file written for a run parses back to the same Config, by the
    # flags (what --flagfile=RUN/flags.cfg does) and by the reader.
    from zoo.run.config import read_flags_text

    text = config.to_flags()
    flag_values = _train_flags()
    flag_values(["train.py"] + text.split())
    assert config_from_flags(flag_values) == config
    assert Config.from_flags(read_flags_text(text)) == config


def test_config_names_what_the_library_and_the_models_define():
    import keras_ema
    import zoo.models
    from zoo.run import config

    assert config.DEFAULT_DECAYS == keras_ema.DEFAULT_DECAYS
    assert config.MODELS == tuple(zoo.models.MODELS)


@pytest.mark.parametrize("flag, message", [
    ("--model=resnet50", "--model=resnet50: value should be one of <resnet18|"),
    ("--epochs=0", "--epochs=0: 0 is not a positive integer"),
    ("--averaging=swa", "--averaging=swa: value should be one of <ema|sema|belay>"),
    ("--lr=fast", "--lr=fast: could not convert string to float: 'fast'"),
])
def test_bad_flag_is_one_line_without_keras(tmp_path, flag, message):
    result = subprocesses.run(
        [sys.executable, "-X", "importtime", os.path.join(ROOT, "train.py"),
         "--output_dir=out", flag],
        cwd=tmp_path, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "import time:" not in line]
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"train.py: error: {message}")
    assert lines[0].endswith("; see --help")
    imported = [line.rsplit("|", 1)[-1].strip()
                for line in result.stderr.splitlines() if "import time:" in line]
    assert "absl.flags" in imported
    assert not [m for m in imported if m.split(".")[0] in ("keras", "tensorflow")]
    assert not (tmp_path / "out").exists()
