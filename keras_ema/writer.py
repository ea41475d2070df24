"""Writing a run's files in a background thread, in order, while training goes on.

`BackgroundWriter` is a context manager around `model.fit`: meanwhile, the
writers that support it (MultiEMA's best files and state file, the
experiment kit's weights, history, summary and backup) keep what they
write at the epoch end, read and left on its device (`_backend.Reader`:
no copy on TensorFlow, an asynchronous device copy on JAX), and hand the rest to
one writer thread: the copy to the host, building the file (serializing)
and putting it on disk. Without an active writer (the
default, and on any thread other than the one that opened it) `submit` runs
the job at once, exactly as before.

The guarantees of writing in place hold:

- Jobs run one at a time in the order they were submitted, each still
  writing under a temporary name and renaming (`keras_ema.files`), so the
  files on disk at any instant are those of an earlier instant of the same
  sequence written in the loop: a kill at any moment leaves what a kill a
  little earlier would have left. A backup's commit (its metadata) is
  submitted after the files it names and is therefore written only once they
  are whole.
- The first job that fails stops the writer: later jobs are dropped (a
  commit never follows a failed file), and the error is raised on the
  training thread at its next `submit` (the next epoch end), at `drain`, or
  when the context exits, as the same exception the write raises in place
  (a full disk: `OSError(ENOSPC)` naming the file, or the kit's
  `DiskFullError`).
- Leaving the context, also through an exception or Ctrl-C, waits for the
  submitted jobs: the files of every epoch that ended are whole. The thread
  is not a daemon, so an interrupted wait still lets it finish.
"""

import os
import queue
import threading

import keras

from keras_ema import _backend
from keras_ema import files
from keras_ema import _keras_private
from keras_ema import written_files

_STOP = object()
_ACTIVE = []  # the open writers, innermost last


class BackgroundWriter:
    """Runs submitted jobs one at a time, in order, in a writer thread.

    Use as a context manager around `model.fit`; see the module docstring.
    """

    def __init__(self):
        self._jobs = queue.Queue()
        self._error = None
        self._owner = None
        self._thread = None

    # === The training thread ===

    def __enter__(self):
        self._owner = threading.current_thread()
        self._thread = threading.Thread(target=self._work,
                                        name="keras_ema-writer")
        self._thread.start()
        _ACTIVE.append(self)
        return self

    def __exit__(self, kind, error, traceback):
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._jobs.put(_STOP)  # first, so the thread ends whatever happens
        self._thread.join()
        failure = self._error
        # The writer's error first, as it would have stopped the run in
        # place; an interrupt (Ctrl-C, SIGTERM) stays what it is.
        if failure is not None and failure is not error and (
                error is None or isinstance(error, Exception)):
            raise failure
        return False

    def submit(self, job, *args, **kwargs):
        """Queues `job(*args, **kwargs)`; raises the error of a failed job first."""
        self.check()
        self._jobs.put((job, args, kwargs))

    def check(self):
        """Raises the error of the job that failed, if one failed."""
        if self._error is not None:
            raise self._error

    def drain(self):
        """Waits until every submitted job ran; raises the error of a failed one."""
        self._jobs.join()
        self.check()

    # === The writer thread ===

    def _work(self):
        failed = False
        while True:
            item = self._jobs.get()
            try:
                if item is _STOP:
                    return
                if failed:  # after a failure nothing more is written
                    continue
                job, args, kwargs = item
                try:
                    job(*args, **kwargs)
                except BaseException as error:  # raised on the training thread
                    self._error = error
                    failed = True
            finally:
                self._jobs.task_done()


def active():
    """The writer open on the calling thread, or `None`."""
    if _ACTIVE and _ACTIVE[-1]._owner is threading.current_thread():
        return _ACTIVE[-1]
    return None


def submit(job, *args, **kwargs):
    """`job(*args, **kwargs)`: by the active writer in order, else now."""
    writer = active()
    if writer is None:
        job(*args, **kwargs)
    else:
        writer.submit(job, *args, **kwargs)


def drain():
    """Waits for the active writer's jobs (none: nothing to do); raises its error."""
    writer = active()
    if writer is not None:
        writer.drain()


# === Values frozen at the epoch end, copied to the host by the writer ===


def to_host(value):
    """A numpy array of a frozen value (`keras_ema._backend.Reader`'s, or a
    function of no arguments giving one), in any thread."""
    if callable(value) and not isinstance(value, keras.Variable):
        return value()
    return keras.ops.convert_to_numpy(value)


def weights_snapshot(model, include_optimizer=True, values=None):
    """`model.save_weights`'s file as it is now, to build later in any thread.

    Returns a function of no arguments giving the bytes `write_weights`
    writes, or `None` when this Keras lays its saving out otherwise or a
    layer saves a computed value in place of one of `values`. `values` maps
    `id(variable)` to the value to save in place of the variable's own (an
    EMA: a function of no arguments giving a numpy array). The variables
    are read now, left on their device (`keras_ema._backend.Reader`), and
    copied to the host when the file is built. See
    `keras_ema._keras_private.weights_snapshot`.
    """
    return _keras_private.weights_snapshot(model, include_optimizer, values,
                                           _backend.Reader, to_host)


def write_snapshot(build, path):
    """Writes the bytes of `build()` to `path` and syncs them to disk."""
    data = build()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_weights(model, path, include_optimizer=True, atomic_path=None,
                 values=None):
    """Writes `model`'s weights to `path` atomically: in order by the writer, else now.

    With an active writer, a host copy is taken now and the file is built and
    written by the writer thread; without one (or where Keras' saving is laid
    out otherwise, after waiting for the writer) it is written at once, as
    `keras_ema.files.write_weights` writes it. `atomic_path` is the context
    manager giving the temporary name (`keras_ema.files.atomic_path` by
    default; the experiment kit passes its own, which names a full disk).
    """
    atomic_path = atomic_path or files.atomic_path
    writer = active()
    build = weights_snapshot(model, include_optimizer, values) if writer else None
    if build is None:
        if writer is not None:
            writer.drain()
        with atomic_path(path) as tmp:
            files.write_weights(model, tmp, include_optimizer)
        return
    writer.submit(_write_atomically, atomic_path, path, build)


def _write_atomically(atomic_path, path, build):
    with atomic_path(path) as tmp:
        write_snapshot(build, tmp)


# === MultiEMA's weights files ===


def save_ema_weights(model, averaged, written, key, path):
    """`MultiEMA.save_weights` by the active writer; `False` if it must be done now.

    `averaged` pairs each averaged variable of `model` with its EMA value
    (a function of no arguments giving a numpy array, such as
    `_backend.Reader.rows` gives, called in the writer thread);
    the file holds `model`'s weights with those values in place. Like the
    in-place code, the same EMA at the same optimizer step saved again
    under another name becomes a hard link to the first file (made by the
    writer once that file is whole, and only while it is unchanged; else,
    or where hard links fail, the bytes are written). `written`, the
    callback's `WrittenFiles`, is kept on the training thread only.
    """
    writer = active()
    if writer is None:
        return False
    values = {id(v): _as_dtype(value, v.dtype) for v, value in averaged}
    build = weights_snapshot(model, include_optimizer=False, values=values)
    if build is None:
        writer.drain()
        return False
    prior = written.entry(key)
    identity = written.remember_pending(key, path)

    def job():
        with files.atomic_path(path) as tmp:
            if not written_files.link_to(prior, tmp):
                write_snapshot(build, tmp)
        identity.value = written_files.file_identity(path)

    writer.submit(job)
    return True


def _as_dtype(row, dtype):
    """`row()` (a numpy array) cast to `dtype`, made when called."""

    def value():
        array = row()
        if keras.backend.standardize_dtype(array.dtype) == dtype:
            return array
        return keras.ops.convert_to_numpy(keras.ops.cast(array, dtype))

    return value


