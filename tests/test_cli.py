"""train.py and evaluate.py as a newcomer first meets them: --help, log lines."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _without_log_level():
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_exits_zero_without_importing_tensorflow_or_keras(script, flag):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(ROOT, script), flag],
        cwd=ROOT, env=_without_log_level(), capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--output_dir" in result.stdout
    # -X importtime writes one line per imported module to stderr.
    imported = [line.rsplit("|", 1)[-1].strip()
                for line in result.stderr.splitlines() if "import time:" in line]
    assert "absl.flags" in imported  # the check itself sees imports
    heavy = [m for m in imported if m.split(".")[0] in
             ("tensorflow", "keras", "jax", "zoo", "keras_ema")]
    assert heavy == []
    other = [line for line in result.stderr.splitlines() if "import time:" not in line]
    assert other == []


def test_train_flag_defaults_are_config_defaults():
    # train.py repeats Config's defaults so that --help needs no Keras.
    code = (
        "import dataclasses, json, sys\n"
        "sys.argv = ['train.py']\n"
        "import train\n"
        "print(json.dumps(sorted(vars(train._D).items())))\n"
        "print(json.dumps(sorted((n, train.FLAGS[n].default) for n in "
        "vars(train._D))))\n"
        "print(json.dumps(train.FLAGS['connect_timeout'].default))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-2000:]
    from zoo.experiment import DEFAULT_CONNECT_TIMEOUT
    from zoo.experiment import Config

    lines = result.stdout.splitlines()
    repeated = dict(json.loads(lines[0]))
    flag_defaults = dict(json.loads(lines[1]))
    assert json.loads(lines[2]) == DEFAULT_CONNECT_TIMEOUT
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    del fields["output_dir"]  # required: no default on the command line
    assert set(repeated) == set(fields)
    for name, default in fields.items():
        if isinstance(default, tuple):
            assert tuple(repeated[name]) == default, name
            assert tuple(float(v) for v in flag_defaults[name]) == default, name
        else:
            assert repeated[name] == default, name
            assert flag_defaults[name] == default, name
