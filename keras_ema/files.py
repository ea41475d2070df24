"""Writing files so that a kill or a full disk never leaves half a file.

Every writer of the package (and of the experiment kit, which imports these)
writes `NAME.EXT` under the temporary name `.NAME.tmpPID.EXT` in the same
directory and renames it: the pid tells a killed process's leftover from a
live writer's file, and the rename is atomic on POSIX. `TEMP_NAME` and
`parse_temp_name` read such a name back.

Public to the experiment kit (`zoo/` imports it), with a stable interface;
the module is to be renamed `keras_ema.files` (RENAME.md).
"""

import contextlib
import errno
import os
import re
import shutil


def temp_path(path: str) -> str:
    """The temporary name of `path` for this process: `.NAME.tmpPID.EXT`.

    `EXT` is `.weights.h5` for weight files and `.lora.h5` for LoRA files
    (Keras and keras-hub insist on them), else the last extension.
    """
    directory, base = os.path.split(os.path.abspath(path))
    ext = next((e for e in (".weights.h5", ".lora.h5") if base.endswith(e)),
               os.path.splitext(base)[1])
    stem = base[: len(base) - len(ext)]
    return os.path.join(directory, f".{stem}.tmp{os.getpid()}{ext}")


# `.NAME.tmpPID.EXT`, the temporary name `temp_path` gives `NAME.EXT`.
TEMP_NAME = re.compile(r"^\.(?P<stem>.+)\.tmp(?P<pid>\d+)(?P<ext>(\.[^/]*)?)$")


def parse_temp_name(name: str):
    """`(NAME.EXT, PID)` of a temporary name `.NAME.tmpPID.EXT`, else `None`."""
    match = TEMP_NAME.match(name)
    if not match:
        return None
    return match.group("stem") + match.group("ext"), int(match.group("pid"))


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

    The caller writes a file or a directory under the temporary name. A
    directory replaces an existing `path` directory (the old one is moved
    aside under `temp_path(path) + ".old"` and removed after the rename, so
    `path` is missing only between two renames). The temporary file or
    directory is removed on every exit; a full disk is raised as an
    `OSError(ENOSPC)` naming `path` (see `disk_full_error`).
    """
    tmp = temp_path(path)
    try:
        yield tmp
        _replace(tmp, path)
    except Exception as error:
        raise disk_full_error(error, path) from None
    finally:
        _remove(tmp)


def _replace(tmp: str, path: str):
    """`os.replace(tmp, path)`, also when both are directories."""
    if not (os.path.isdir(tmp) and os.path.isdir(path)
            and not os.path.islink(path)):
        os.replace(tmp, path)
        return
    old = tmp + ".old"
    _remove(old)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


def _remove(path: str):
    """Removes the file, link or directory tree `path` if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _h5_weights_bytes(model, include_optimizer=True):
    """`_keras_private.h5_weights_bytes`, imported when first needed (this
    module does not import Keras)."""
    from keras_ema import _keras_private

    return _keras_private.h5_weights_bytes(model, include_optimizer)


def write_weights(model, path: str, include_optimizer: bool = True):
    """`model.save_weights(path)`, built in memory and then written to `path`.

    On a full disk, h5py writing straight to the file raises from its
    destructors and then crashes the process (a segmentation fault); built in
    memory, the weights reach the disk through one plain write that fails
    with an ordinary `OSError`. Falls back to `model.save_weights` where
    Keras' internals differ (see `_keras_private.h5_weights_bytes`).

    `include_optimizer=False` writes the model's weights only, without the
    optimizer's variables (momentum: as many bytes again for SGD); the file
    loads with `model.load_weights` all the same, which then leaves the
    optimizer as it is. The fallback always includes them.
    """
    data = _h5_weights_bytes(model, include_optimizer)
    if data is None:
        model.save_weights(path, overwrite=True)
        return
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
