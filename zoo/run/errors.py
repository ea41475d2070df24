"""The errors of a run directory, in a module that imports nothing of the kit.

`zoo.run.config` (a damaged flag file) and `zoo.run.run_dir` (everything
else) raise them; `zoo.run.run_dir` re-exports them, the names to catch.
"""


class RunDirError(ValueError):
    """A run directory is missing, incomplete or of another layout."""


class DamagedFileError(RunDirError):
    """A file of a run directory does not read back; the message says what to do."""

    def __init__(self, path, reason, remedy=""):
        self.path = path
        self.reason = " ".join(str(reason).split())
        message = f"{path} is damaged ({self.reason})"
        super().__init__(message + (f"; {remedy}" if remedy else "."))


class DiskFullError(RunDirError):
    """The disk filled up while a run file was written (its temporary file removed)."""

    def __init__(self, path):
        self.path = path
        super().__init__(
            f"No space left on device while writing {path}; free some space "
            "and rerun the same command."
        )


class RunInUseError(RunDirError):
    """Another live process trains in the run directory."""
