"""The start-up that train.py and evaluate.py share; imports nothing heavy.

The CLIs parse their flags before they import Keras and TensorFlow, so
`--help` and a bad flag answer at once. TensorFlow's start-up lines (CUDA
probing on a machine without a GPU, oneDNN, CPU features) tell a user
nothing to act on: they are hidden unless the user set TF_CPP_MIN_LOG_LEVEL.
"""

import contextlib
import importlib.util
import os
import sys

from absl import app
from absl import flags

# Whether the user chose TensorFlow's C++ log level; if not, errors and below
# are hidden (`3`), and so is what TensorFlow prints while its libraries load.
USER_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")


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
    choices) exits with status 1 and one line, `SCRIPT: error: --flag=value:
    why`, as the scripts' own checks do.
    """
    argv = [argv[0]] + ["--help" if a == "-h" else a for a in argv[1:]]
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = " ".join(str(error).split())
        message = message[len("flag "):] if message.startswith("flag ") else message
        sys.exit(f"{os.path.basename(argv[0])}: error: {message}; see --help")
    except SystemExit as exit_:
        # absl exits with 1 after printing the help.
        if exit_.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise


def run(main):
    """`absl.app.run(main)` with `parse_flags`."""
    app.run(main, flags_parser=parse_flags)
