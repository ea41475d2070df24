"""The start-up that the command lines share; imports nothing heavy.

The CLIs parse their flags before they import Keras and TensorFlow, so
`--help` and a bad flag answer at once. TensorFlow's start-up lines (CUDA
probing on a machine without a GPU, oneDNN, CPU features) tell a user
nothing to act on: they are hidden unless the user set TF_CPP_MIN_LOG_LEVEL.

Ctrl-C and SIGTERM end every command line with one line, `SCRIPT: stopped
by SIGINT; ...`, and exit status 130 (143 for SIGTERM), from the moment the
script imports this module (`handle_interrupts`): also while TensorFlow is
imported, which takes seconds. Only the standard library is imported here
(absl when flags are parsed), so `dev.py` and the benchmarks use it too.
"""

import contextlib
import importlib.util
import os
import signal
import sys

# Whether the user chose TensorFlow's C++ log level; if not, errors and below
# are hidden (`3`), and so is what TensorFlow prints while its libraries load.
USER_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")
# The exit status of a process stopped by a signal, as a shell reports it.
EXIT_STATUS = {"SIGINT": 130, "SIGTERM": 143}
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What `stopped` prints: the script's name and what the user may do.
_stop_line = {"script": os.path.basename(sys.argv[0] or "python"), "advice": ""}
# The name of the first signal `handle_interrupts` raised for, once one came.
_received = []


# === Ctrl-C and SIGTERM ===


def _raise_interrupt(signum, frame):
    """SIGTERM ends a command line like Ctrl-C: `finally` blocks run, files stay whole."""
    name = signal.Signals(signum).name
    if not _received:
        _received.append(name)
    raise KeyboardInterrupt(name)


def _interrupt_behind(error):
    """The `KeyboardInterrupt` that `error` stands for, or `None`.

    A handler's `KeyboardInterrupt` raised while TensorFlow's C++ code had
    called back into Python can come out of that code as another exception:
    a signal during a `tf.function`'s first call (its tracing) ends about one
    time in six as `SystemError: Objects/listobject.c:338: bad argument to
    internal function`. Once a signal came, whatever exception then ends
    the command is that signal's doing.
    """
    if isinstance(error, KeyboardInterrupt):
        return error
    return KeyboardInterrupt(_received[0]) if _received else None


def handle_interrupts(script: str, advice: str = ""):
    """From now on SIGINT and SIGTERM end the process with one line.

    Both raise `KeyboardInterrupt("SIGINT")` / `("SIGTERM")`, so `finally`
    blocks and context managers clean up; `run` (or `main_of`) then prints
    `SCRIPT: stopped by SIGNAL; ADVICE` and exits with 130 or 143. An
    interrupt outside them (at the script's top level) ends the same way.

    Args:
        script: str. The name the line starts with, e.g. `"train.py"`.
        advice: str. What the user may do, e.g. "rerun the same command to
            resume.". Defaults to `""`.
    """
    _stop_line.update(script=script, advice=advice)
    for signum in _SIGNALS:
        signal.signal(signum, _raise_interrupt)
    previous = sys.excepthook

    def excepthook(kind, value, traceback):
        interrupt = _interrupt_behind(value)
        if interrupt is not None:
            sys.stdout.flush()
            print(_stop_message(interrupt), file=sys.stderr, flush=True)
            os._exit(_exit_status(interrupt))  # the stack has unwound already
        previous(kind, value, traceback)

    sys.excepthook = excepthook


def _how(interrupt) -> str:
    how = str(interrupt)
    return how if how in EXIT_STATUS else "SIGINT"


def _exit_status(interrupt) -> int:
    return EXIT_STATUS[_how(interrupt)]


def _stop_message(interrupt) -> str:
    advice = _stop_line["advice"]
    return (f"{_stop_line['script']}: stopped by {_how(interrupt)}"
            + (f"; {advice}" if advice else "."))


def stopped(interrupt: KeyboardInterrupt):
    """Prints the one line of `handle_interrupts` and exits with 130 or 143."""
    for signum in _SIGNALS:  # a second Ctrl-C does not cut the line
        signal.signal(signum, signal.SIG_IGN)
    sys.stdout.flush()
    print(_stop_message(interrupt), file=sys.stderr, flush=True)
    sys.exit(_exit_status(interrupt))


def fail(message: str):
    """Exits with status 1 and `message`, unless a signal came first.

    An error raised after Ctrl-C or SIGTERM (a file read cut short, which a
    loader then calls damaged) is the signal's doing: the command ends as
    `stopped` says instead.
    """
    if _received:
        stopped(KeyboardInterrupt(_received[0]))
    sys.exit(message)


def main_of(main):
    """`main` whose `KeyboardInterrupt` ends as `stopped` says (argparse scripts)."""
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (KeyboardInterrupt, Exception) as error:
            interrupt = _interrupt_behind(error)
            if interrupt is None:
                raise
            stopped(interrupt)

    return guarded


@contextlib.contextmanager
def interrupts_deferred():
    """Holds SIGINT and SIGTERM back meanwhile; one that came is raised after.

    For writing a set of result files that belong together: each is atomic,
    and with this an interrupt leaves all of them new or all of them old.
    """
    received = []
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    for signum in _SIGNALS:
        signal.signal(signum, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt(signal.Signals(received[0]).name)


# === Start-up and flags ===


@contextlib.contextmanager
def quiet_start_up():
    """Sends file descriptor 2 to /dev/null meanwhile, unless the user set the level.

    TensorFlow logs its start-up lines in C++ before its logging reads
    TF_CPP_MIN_LOG_LEVEL, so only this hides them. TensorFlow itself is
    imported here when installed, also on JAX, where Keras imports it later
    for its data pipeline and would print them then. A Python exception
    raised inside still reaches the user: it is printed after the block.
    """
    if USER_LOG_LEVEL:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        if importlib.util.find_spec("tensorflow") is not None:
            import tensorflow  # noqa: F401
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def parse_flags(argv):
    """absl's flag parsing, but `-h` is `--help`, and help exits with 0, not 1.

    A bad flag (a value of the wrong type, out of its bounds, not among its
    choices) or a flag file that is not text exits with status 1 and one
    line, `SCRIPT: error: --flag=value: why`, as the scripts' own checks do.
    """
    from absl import flags

    script = os.path.basename(argv[0])
    argv = [argv[0]] + ["--help" if a == "-h" else a for a in argv[1:]]
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = " ".join(str(error).split())
        message = message[len("flag "):] if message.startswith("flag ") else message
        sys.exit(f"{script}: error: {message}; see --help")
    except UnicodeDecodeError as error:
        path = _undecodable_flag_file(argv[1:])
        sys.exit(f"{script}: error: --flagfile={path or '?'}: not a text file "
                 f"({error.reason} at byte {error.start}); pass a file of "
                 "--name=value lines, such as configs/demo.cfg")
    except SystemExit as exit_:
        # absl exits with 1 after printing the help.
        if exit_.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise


def _is_flag(arg, name):
    """Whether command-line argument `arg` sets flag `name` (`--name=..`, `-name ..`)."""
    flag = arg.partition("=")[0]
    return flag.startswith("-") and flag.lstrip("-") == name


def flag_files(args) -> list:
    """`(index, path)` of each `--flagfile=PATH` (or `--flagfile PATH`) in `args`."""
    files = []
    for i, arg in enumerate(args):
        if not _is_flag(arg, "flagfile"):
            continue
        if "=" in arg:
            files.append((i, os.path.expanduser(arg.partition("=")[2])))
        elif i + 1 < len(args):
            files.append((i, os.path.expanduser(args[i + 1])))
    return files


def replayed_run(args, output_dir: str) -> str:
    """The run directory of `train.py ARGS`: where a run's flags.cfg given sits.

    A run's flags.cfg records the `--output_dir` it was written in; once the
    run is copied or moved, that names another directory, and
    `--flagfile=COPY/flags.cfg` would train there. The run is where its
    flags.cfg is: returns COPY when the last `--flagfile` of `args` is a
    run's flags.cfg (beside its summary.json, history.csv, backup/ or
    .lock), no `--output_dir` follows it in `args`, and `output_dir` (the
    parsed value) is the one it records. Otherwise returns `output_dir`.
    """
    from zoo.run.config import read_flags

    files = flag_files(args)
    if not files:
        return output_dir
    index, path = files[-1]
    run = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) != "flags.cfg" or not any(
            os.path.exists(os.path.join(run, name))
            for name in ("summary.json", "history.csv", "backup", ".lock")):
        return output_dir
    if any(_is_flag(arg, "output_dir") for arg in args[index + 1:]):
        return output_dir
    try:
        recorded = read_flags(path).get("output_dir")
    except ValueError:  # not text: the run's own checks report it
        return output_dir
    if recorded != output_dir or os.path.realpath(recorded) == os.path.realpath(run):
        return output_dir
    return run


def _undecodable_flag_file(args, depth=0):
    """The first flag file of `args` (or nested in one) that is not text."""
    for _, path in flag_files(args):
        try:
            with open(path) as f:
                lines = [line.strip() for line in f]
        except UnicodeDecodeError:
            return path
        except OSError:
            continue
        nested = depth < 10 and _undecodable_flag_file(lines, depth + 1)
        if nested:
            return nested
    return None


def run(main):
    """`absl.app.run(main)` with `parse_flags`, a Ctrl-C or SIGTERM ending in `stopped`."""
    from absl import app

    main_of(app.run)(main, flags_parser=parse_flags)
