#!/usr/bin/env python3
"""Sets up a local virtual environment and runs the demo or the tests.

    python3 dev.py demo    # the paper's protocol on the embedded digits data
    python3 dev.py test    # the test suite, TensorFlow backend then JAX
    python3 dev.py train ARGS       # train.py ARGS inside .venv/
    python3 dev.py evaluate ARGS    # evaluate.py ARGS inside .venv/
    python3 dev.py structure        # file sizes, import circles, private API

Only `python3` is needed: the first run creates `.venv/` and installs the
package with every extra (TensorFlow, JAX, the kit's datasets and tools,
pytest) there; later runs reuse it until pyproject.toml changes.
"""

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import venv

import _cli  # the standard library only

if __name__ == "__main__":  # Ctrl-C and SIGTERM: one line, non-zero status
    _cli.handle_interrupts("dev.py")

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
PYTHON = os.path.join(VENV, "bin", "python")
STAMP = os.path.join(VENV, ".keras-ema-installed")


def _run(args, cwd=ROOT, **env):
    """The exit status of `args`; an interrupt is passed on to it, not cut short.

    The command (train.py, evaluate.py, pytest, pip) ends an interrupt in its
    own words; dev.py then exits with 130 (143 for SIGTERM) and says nothing
    more. `subprocess.call` would kill it a quarter of a second in.
    """
    environment = dict(os.environ, **env)
    with subprocess.Popen(args, cwd=cwd, env=environment) as process:
        try:
            return process.wait()
        except KeyboardInterrupt as interrupt:
            how = str(interrupt) if str(interrupt) in _cli.EXIT_STATUS else "SIGINT"
            process.send_signal(getattr(signal, how))
            process.wait()
            sys.exit(_cli.EXIT_STATUS[how])


def ensure_environment():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        wanted = hashlib.sha256(f.read()).hexdigest()
    if os.path.exists(STAMP) and open(STAMP).read() == wanted:
        return
    if not os.path.exists(PYTHON):
        print(f"Creating the virtual environment {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    print("Installing keras-ema and its dependencies into .venv/ (3 GB: 2-4 "
          "minutes from a package cache, several more to download)", flush=True)
    pip = [PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # Editable: keras_ema from this checkout; zoo/ is imported from it too.
    if _run(pip + ["-e", ".[tensorflow,jax,data,zoo,test]"]) != 0:
        sys.exit("pip install failed: see the messages above.")
    with open(STAMP, "w") as f:
        f.write(wanted)


def demo(extra):
    if os.path.exists(os.path.join(ROOT, "train.py")):
        args = ["train.py", "--flagfile=configs/demo.cfg"]
    else:
        args = ["examples/quickstart.py"]
    return _run([PYTHON] + args + extra)


def train(extra):
    """train.py with `extra`, in the caller's directory."""
    return _run([PYTHON, os.path.join(ROOT, "train.py")] + extra, cwd=None)


def evaluate(extra):
    """evaluate.py with `extra`, in the caller's directory."""
    return _run([PYTHON, os.path.join(ROOT, "evaluate.py")] + extra, cwd=None)


def structure(extra):
    """Prints the measures of `tests/structure.py` (lines, longest functions,
    import circles, private framework API)."""
    return _run([PYTHON, os.path.join("tests", "structure.py")] + extra)


def _run_together(commands, cwd=ROOT):
    """The exit statuses of `commands`, `[(args, env, title)]`, run side by side.

    The first prints as it runs; each other one's output is held in a
    temporary file and printed after its title, in turn, once the ones
    before it have ended.
    An interrupt is passed on to every one still running, as `_run` does.
    """
    import tempfile

    processes, held = [], []

    def show(out, title):
        out.seek(0)
        sys.stdout.write(f"\n{title}\n" + out.read())
        sys.stdout.flush()

    try:
        for index, (args, env, _) in enumerate(commands):
            out = None if index == 0 else tempfile.TemporaryFile("w+")
            held.append(out)
            processes.append(subprocess.Popen(
                args, cwd=cwd, env=dict(os.environ, **env), stdout=out,
                stderr=None if out is None else subprocess.STDOUT))
        codes = []
        for process, out, (_, _, title) in zip(processes, held, commands):
            codes.append(process.wait())
            if out is not None:
                show(out, title)
                out.close()
        return codes
    except KeyboardInterrupt as interrupt:
        how = str(interrupt) if str(interrupt) in _cli.EXIT_STATUS else "SIGINT"
        for process in processes:
            if process.poll() is None:
                process.send_signal(getattr(signal, how))
        for process, out, (_, _, title) in zip(processes, held, commands):
            process.wait()
            if out is not None and not out.closed:
                show(out, title)
        sys.exit(_cli.EXIT_STATUS[how])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for out in held:
            if out is not None and not out.closed:
                out.close()


def test(extra):
    """The suite on TensorFlow, and the backend-independent tests on JAX.

    On 2 or more cores the two passes run side by side, the JAX one's output
    printed after the TensorFlow one's; `-n 0` in `extra` runs each pass in
    one process.
    """
    quiet = {"TF_CPP_MIN_LOG_LEVEL": "3"}
    cores = os.cpu_count() or 1
    # Test files spread over processes (pytest-xdist), each file in one.
    # Files handed out in collection order (tests/conftest.py puts the
    # longest first), not by their number of tests.
    tf_workers = ["-n", str(min(4, cores)), "--dist", "loadfile", "--no-loadscope-reorder"]
    jax_workers = ["-n", str(min(2, cores)), "--dist", "loadfile", "--no-loadscope-reorder"]
    tf_pass = ([PYTHON, "-m", "pytest", "-q"] + tf_workers + extra,
               dict(quiet, KERAS_BACKEND="tensorflow"), "")
    jax_pass = ([PYTHON, "-m", "pytest", "-q", "-m", "all_backends and not own_backend"]
                + jax_workers + extra,
                dict(quiet, KERAS_BACKEND="jax"), "The backend-independent tests again, on JAX:")
    with _jax_cache(tf_pass, jax_pass):
        if cores < 2:
            code = _run(tf_pass[0], **tf_pass[1])
            print(f"\n{jax_pass[2]}", flush=True)
            return _run(jax_pass[0], **jax_pass[1]) or code
        print("The backend-independent tests run on JAX alongside; their results "
              "follow the TensorFlow ones.", flush=True)
        codes = _run_together([tf_pass, jax_pass])
    return next((code for code in codes if code), 0)


@contextlib.contextmanager
def _jax_cache(*passes):
    """One JAX compilation cache folder for every pass (tests/conftest.py),
    removed at the end: the TensorFlow pass's JAX subprocesses and the JAX
    pass compile the same programs."""
    import shutil
    import tempfile

    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the caller's own
        yield
        return
    folder = tempfile.mkdtemp(prefix="keras-ema-tests-jax-cache-")
    try:
        for _, env, _ in passes:
            env["JAX_COMPILATION_CACHE_DIR"] = folder
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv):
    commands = {"demo": demo, "test": test, "train": train, "evaluate": evaluate,
                "structure": structure}
    if len(argv) < 2 or argv[1] not in commands:
        sys.exit(f"usage: python3 dev.py {{{'|'.join(commands)}}} [args...]")
    ensure_environment()
    return commands[argv[1]](argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
