"""The exclusive lock of a run directory: one process trains in it at a time.

`zoo.run.run_dir.locked` takes it for a training run.
"""

import os

from zoo.run.errors import RunDirError
from zoo.run.errors import RunInUseError

LOCK_FILE = ".lock"


class RunLock:
    """An exclusive lock on a run directory, held until `release` or exit.

    `fcntl.flock` on `RUN/.lock`: the operating system drops it when the
    process ends, however it ends, so a killed run never leaves a stale
    lock. The file holds the pid of the holder. On systems without `fcntl`
    no lock is taken.
    """

    def __init__(self, run):
        self.path = os.path.join(run, LOCK_FILE)
        self._fd = None

    def acquire(self):
        """Takes the lock; raises RunInUseError naming the holder's pid."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        run = os.path.dirname(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError(
                f"--output_dir={run} cannot be written ({error.strerror}); "
                "make it writable or choose another --output_dir."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunInUseError(
                f"--output_dir={run} is in use by process {holder}; wait for "
                "it to finish or choose another --output_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self):
        """Drops the lock (the file stays: removing it would race)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def lock_run_dir(run: str) -> RunLock:
    """Locks the existing directory `run` for this process; see `RunLock`.

    Raises:
        RunInUseError: another process holds the lock.
    """
    return RunLock(run).acquire()
