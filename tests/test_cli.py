"""train.py and evaluate.py as a newcomer first meets them: --help, log lines."""

import dataclasses
import os
import subprocess
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
    # train.py imports Config's module, evaluate.py the evaluations' names
    # and help: neither imports Keras.
    light = ("zoo", "zoo.run", "zoo.run.config", "zoo.evals")
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
    # The paper's weight decay is a word, resolved per model; 0 is a number.
    assert config.weight_decay == "paper"
    assert config.resolved().weight_decay == 5e-4
    for text, value in (("0", 0.0), ("1e-4", 1e-4), ("paper", "paper")):
        flag_values = _train_flags()
        flag_values(["train.py", f"--weight_decay={text}"])
        assert flag_values["weight_decay"].value == value
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
    # Negative used to mean the paper's value: a typo trained with another.
    ("--weight_decay=-1", "--weight_decay=-1: must be a finite number >= 0, or "
     "paper for the paper's value (1e-4 ResNet, 5e-4 WRN and VGG)"),
    ("--weight_decay=-inf", "--weight_decay=-inf: must be a finite number >= 0"),
    ("--weight_decay=nan", "--weight_decay=nan: must be a finite number >= 0"),
    ("--weight_decay=papr", "--weight_decay=papr: must be a finite number >= 0"),
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


# === Ctrl-C, SIGTERM and flag files: one line, never a traceback ===

# Starts SCRIPT as `python SCRIPT ARGS` would, printing a marker line when it
# looks for TensorFlow, which it then imports (seconds): a signal sent after
# the marker arrives during the start-up.
_MARK_TENSORFLOW_IMPORT = """
import importlib.abc, runpy, sys
class Mark(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow":
            sys.meta_path.remove(self)
            print("importing tensorflow", flush=True)
        return None
sys.meta_path.insert(0, Mark())
sys.path.insert(0, sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
STOPPED = {
    "train.py": "; what was trained is kept: rerun the same command to resume.",
    "evaluate.py": "; results.md, results.json and the figures are written all "
                   "or none: rerun the same command.",
    "benchmarks/posthoc.py": ".",
}
ARGS = {"train.py": ["--output_dir=out", "--epochs=1"],
        "evaluate.py": ["run", "--output_dir=out"],
        "benchmarks/posthoc.py": ["--params=0.1"]}
# Deadlines that only a hang reaches, however loaded the machine.
HANG = 600


def _start(args, cwd, wrapper=None):
    command = [sys.executable] + (["-c", wrapper, ROOT] if wrapper else []) + args
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))


def _signal_after(process, marker, signum):
    """Sends `signum` once `process` printed a line containing `marker`."""
    import signal
    import threading

    timer = threading.Timer(HANG, process.kill)  # a hang fails, never blocks
    timer.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if marker in line:
                process.send_signal(signum)
                break
        else:
            pytest.fail(f"never printed {marker!r}: {''.join(lines)[-2000:]}")
        out, err = process.communicate()
    finally:
        timer.cancel()
    assert process.returncode != -signal.SIGKILL, "hung after the signal"
    return "".join(lines) + out, err


@pytest.mark.slow
@pytest.mark.parametrize("script", list(STOPPED))
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_signal_while_tensorflow_imports_is_one_line(tmp_path, script, name):
    import signal

    if "tensorflow" not in sys.modules and script.startswith("benchmarks"):
        pytest.skip("the benchmark imports TensorFlow only on its backend")
    process = _start([os.path.join(ROOT, script)] + ARGS[script], tmp_path,
                     _MARK_TENSORFLOW_IMPORT)
    out, err = _signal_after(process, "importing tensorflow", getattr(signal, name))
    assert process.returncode == {"SIGINT": 130, "SIGTERM": 143}[name], err[-3000:]
    assert err.strip().splitlines() == [f"{script}: stopped by {name}{STOPPED[script]}"]
    assert "=== Data ===" not in out and "params" not in out  # still starting
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_signal_while_evaluating_is_one_line_and_writes_nothing(
        tmp_path, finished_run, name):
    import signal

    run, _ = finished_run
    # A linear probe of a million epochs: the signal surely finds it running.
    process = _start([os.path.join(ROOT, "evaluate.py"), run, "--evals=transfer",
                      "--transfer_dataset=digits", "--probe_epochs=1000000",
                      f"--output_dir={tmp_path / 'results'}"], tmp_path)
    out, err = _signal_after(process, "linear probe of", getattr(signal, name))
    assert process.returncode == {"SIGINT": 130, "SIGTERM": 143}[name], err[-3000:]
    assert err.strip().splitlines()[-1:] == [
        f"evaluate.py: stopped by {name}{STOPPED['evaluate.py']}"]
    assert "Traceback" not in err
    assert not (tmp_path / "results").exists()


_DEV_RUNS_A_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import _cli
_cli.handle_interrupts("dev.py")
import dev
child = ("import signal, sys, time\\n"
         "def stop(signum, frame):\\n"
         "    print('child stopped by', signum, flush=True)\\n"
         "    sys.exit(5)\\n"
         "signal.signal(signal.SIGTERM, stop)\\n"
         "print('child', __import__('os').getpid(), 'ready', flush=True)\\n"
         "time.sleep(300)\\n")
dev._run([sys.executable, "-c", child])
"""


def test_dev_py_passes_an_interrupt_on_to_its_command(tmp_path):
    import signal

    process = _start([], tmp_path, _DEV_RUNS_A_CHILD)
    out, err = _signal_after(process, "ready", signal.SIGTERM)
    child = int(out.split()[1])
    try:
        os.kill(child, 0)
        still_running = True  # dev.py died and left it behind
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        still_running = False
    assert (process.returncode, err) == (143, ""), err[-2000:]
    assert f"child stopped by {int(signal.SIGTERM)}" in out
    assert not still_running


# A main whose SIGTERM comes out of a call as another exception, as out of
# TensorFlow's C++ code that had called back into Python when the handler
# raised: a signal during a tf.function's first call (its tracing) ends about
# one time in six as `SystemError: Objects/listobject.c:338: bad argument to
# internal function` (train.py, SIGTERM at the end of its first epoch).
_INTERRUPT_MANGLED = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import _cli
_cli.handle_interrupts("demo.py", "rerun it.")

def main(argv=None):
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    except KeyboardInterrupt:
        raise SystemError("bad argument to internal function") from None

def fails(argv=None):
    raise SystemError("a real error")

def damaged(argv=None):  # a load cut short by the signal, called damaged
    try:
        main()
    except SystemError as error:
        _cli.fail(f"demo.py: error: file.h5 is damaged ({{error}})")

def really_damaged(argv=None):
    _cli.fail("demo.py: error: file.h5 is damaged (truncated)")

{call}
"""


@pytest.mark.parametrize("call", ["_cli.run(main)", "_cli.main_of(main)()", "main()",
                                  "_cli.run(damaged)"])
def test_an_interrupt_that_comes_out_as_another_exception_is_one_line(tmp_path, call):
    process = _start([], tmp_path, _INTERRUPT_MANGLED.format(call=call))
    out, err = process.communicate(timeout=HANG)
    assert (process.returncode, err) == (143, "demo.py: stopped by SIGTERM; rerun it.\n"), err


@pytest.mark.parametrize("call", ["_cli.run(fails)", "_cli.main_of(fails)()"])
def test_an_error_without_a_signal_is_not_an_interrupt(tmp_path, call):
    process = _start([], tmp_path, _INTERRUPT_MANGLED.format(call=call))
    out, err = process.communicate(timeout=HANG)
    assert process.returncode == 1
    assert err.strip().splitlines()[-1] == "SystemError: a real error", err


def test_an_error_line_without_a_signal_is_that_line(tmp_path):
    process = _start([], tmp_path, _INTERRUPT_MANGLED.format(call="_cli.run(really_damaged)"))
    out, err = process.communicate(timeout=HANG)
    assert (process.returncode, err) == (1, "demo.py: error: file.h5 is damaged (truncated)\n")


def test_interrupt_while_results_are_written_comes_after_the_last_file(tmp_path):
    import signal

    import _cli

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _cli._raise_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt, match="^SIGTERM$"):
            with _cli.interrupts_deferred():
                (tmp_path / "a").write_text("a")
                os.kill(os.getpid(), signal.SIGTERM)
                (tmp_path / "b").write_text("b")
        assert sorted(os.listdir(tmp_path)) == ["a", "b"]
        # The handler is back: the next signal raises at once.
        with pytest.raises(KeyboardInterrupt, match="^SIGTERM$"):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_flag_file_that_is_not_text_is_one_line(tmp_path, script):
    (tmp_path / "flags.cfg").write_bytes(bytes(range(256)) * 4)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), "--flagfile=flags.cfg"],
        cwd=tmp_path, capture_output=True, text=True, timeout=HANG,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"{script}: error: --flagfile=flags.cfg: not a text file (invalid "
        "start byte at byte 128); pass a file of --name=value lines, such as "
        "configs/demo.cfg"]


# === --flagfile=RUN/flags.cfg of a copied or moved run ===


def _run_files(run, output_dir):
    run.mkdir()
    (run / "flags.cfg").write_text(f"--output_dir={output_dir}\n--epochs=3\n")
    (run / "summary.json").write_text("{}")
    return str(run / "flags.cfg")


def test_flags_of_a_moved_run_name_the_directory_they_sit_in(tmp_path):
    import _cli

    original = str(tmp_path / "original")
    flags = _run_files(tmp_path / "copy", original)
    copy = str(tmp_path / "copy")
    assert _cli.replayed_run([f"--flagfile={flags}"], original) == copy
    assert _cli.replayed_run(["--flagfile", flags, "--epochs=3"], original) == copy
    # An --output_dir after the flag file, or another flag file that sets
    # one, decides; so does a flag file that is not a run's.
    assert _cli.replayed_run([f"--flagfile={flags}", f"--output_dir={original}"],
                             original) == original
    assert _cli.replayed_run([f"--flagfile={flags}", "--output_dir=new"], "new") == "new"
    assert _cli.replayed_run([f"--flagfile={flags}"], "elsewhere") == "elsewhere"
    config = tmp_path / "configs"
    config.mkdir()
    (config / "flags.cfg").write_text(f"--output_dir={original}\n")
    assert _cli.replayed_run([f"--flagfile={config / 'flags.cfg'}"], original) == original
    # The run in place: its own directory.
    flags = _run_files(tmp_path / "in_place", str(tmp_path / "in_place"))
    assert _cli.replayed_run([f"--flagfile={flags}"], str(tmp_path / "in_place")) == str(
        tmp_path / "in_place")


@pytest.mark.slow
def test_flag_file_of_a_moved_run_replays_that_run(tmp_path, finished_run):
    import shutil

    run, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    gone = tmp_path / "gone"  # where the run was trained, moved away since
    text = (copy / "flags.cfg").read_text().replace(f"--output_dir={run}\n",
                                                    f"--output_dir={gone}\n")
    (copy / "flags.cfg").write_text(text)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), f"--flagfile={copy}/flags.cfg"],
        cwd=tmp_path, capture_output=True, text=True, timeout=HANG,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"The run is in {copy}, where its flags.cfg is, not in {gone}" in result.stdout
    assert f"{copy} holds a completed run; nothing to do" in result.stdout
    assert not gone.exists()
