"""Writing files so that a kill or a full disk never leaves half a file.

Every writer of the package (and of the experiment kit, which imports these)
writes `NAME.EXT` under the temporary name `.NAME.tmpPID.EXT` in the same
directory and renames it: the pid tells a killed process's leftover from a
live writer's file, and the rename is atomic on POSIX.
"""

import contextlib
import errno
import io
import os
import shutil


def temp_path(path: str) -> str:
    """The temporary name of `path` for this process: `.NAME.tmpPID.EXT`.

    `EXT` is `.weights.h5` for weight files (Keras insists on it), else the
    last extension.
    """
    directory, base = os.path.split(os.path.abspath(path))
    ext = ".weights.h5" if base.endswith(".weights.h5") else os.path.splitext(base)[1]
    stem = base[: len(base) - len(ext)]
    return os.path.join(directory, f".{stem}.tmp{os.getpid()}{ext}")


def is_disk_full(error) -> bool:
    """Whether `error`, or an error it wraps (h5py, TensorFlow), is ENOSPC."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == errno.ENOSPC:
            return True
        text = str(error)
        if "No space left on device" in text or "errno = 28" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(error, path):
    """`error`, or an `OSError(ENOSPC)` naming `path` if the disk is full."""
    if is_disk_full(error) and not (
        isinstance(error, OSError) and error.filename == path
    ):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return error


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields `temp_path(path)` to write; renames it onto `path` on success.

    The temporary file, or folder (a writer may make a directory there), is
    removed on every exit; a full disk is raised as an `OSError(ENOSPC)`
    naming `path` (see `disk_full_error`).
    """
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as error:
        raise disk_full_error(error, path) from None
    finally:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)


def write_weights(model, path: str):
    """`model.save_weights(path)`, built in memory and then written to `path`.

    On a full disk, h5py writing straight to the file raises from its
    destructors and then crashes the process (a segmentation fault); built in
    memory, the weights reach the disk through one plain write that fails
    with an ordinary `OSError`. Uses Keras' private `saving_lib` (read from
    Keras 3.15.1) and falls back to `model.save_weights` without it.
    """
    try:
        from keras.src.saving import saving_lib

        store = saving_lib.H5IOStore(io.BytesIO(), mode="w")
    except (ImportError, AttributeError, TypeError):  # another Keras layout
        model.save_weights(path, overwrite=True)
        return
    buffer = store.path_or_io
    try:
        saving_lib._save_state(model, weights_store=store, assets_store=None,
                               inner_path="", visited_saveables=set())
    finally:
        store.close()
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
