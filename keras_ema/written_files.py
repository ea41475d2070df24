"""The weight files a MultiEMA last wrote, so that a repeat is a hard link.

The same EMA at the same optimizer step saved again under another name (two
criteria that chose the same epoch) becomes a hard link to the first file,
as long as that file is still the one written (same inode, size and time).
"""

import os


def _file_identity(path):
    """What tells whether `path` is still the file it was: inode, size, time."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class WrittenFiles:
    """`{key: (path, identity)}` of the files last written, per `key`."""

    def __init__(self):
        self._files = {}

    def clear(self):
        """Forgets every file (the weights they hold may have changed)."""
        self._files = {}

    def remember(self, key, path: str):
        """`path` was just written for `key`."""
        self._files[key] = (path, _file_identity(path))

    def link(self, key, tmp: str) -> bool:
        """Links `tmp` to the file last written for `key` if it is still there."""
        path, identity = self._files.get(key, (None, None))
        if path is None or _file_identity(path) != identity:
            return False
        try:
            os.link(path, tmp)
        except OSError:  # no hard links on this file system: write it
            return False
        return True
