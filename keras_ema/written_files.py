"""The weight files a MultiEMA last wrote, so that a repeat is a hard link.

The same EMA at the same optimizer step saved again under another name (two
criteria that chose the same epoch) becomes a hard link to the first file,
as long as that file is still the one written (same inode, size and time).
"""

import os


def file_identity(path):
    """What tells whether `path` is still the file it was: inode, size, time."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class Pending:
    """The identity of a file a background writer writes, known once it is written."""

    def __init__(self):
        self.value = None


def link_to(entry, tmp: str) -> bool:
    """Links `tmp` to the file `entry`, `(path, identity)`, names if it is unchanged."""
    if entry is None:
        return False
    path, identity = entry
    if isinstance(identity, Pending):
        identity = identity.value
    if identity is None or file_identity(path) != identity:
        return False
    try:
        os.link(path, tmp)
    except OSError:  # no hard links on this file system: write it
        return False
    return True


class WrittenFiles:
    """`{key: (path, identity)}` of the files last written, per `key`."""

    def __init__(self):
        self._files = {}

    def clear(self):
        """Forgets every file (the weights they hold may have changed)."""
        self._files = {}

    def remember(self, key, path: str):
        """`path` was just written for `key`."""
        self._files[key] = (path, file_identity(path))

    def remember_pending(self, key, path: str) -> Pending:
        """`path` is being written for `key` (by a background writer)."""
        pending = Pending()
        self._files[key] = (path, pending)
        return pending

    def entry(self, key):
        """`(path, identity)` of the file last written for `key`, or `None`."""
        return self._files.get(key)

    def link(self, key, tmp: str) -> bool:
        """Links `tmp` to the file last written for `key` if it is still there."""
        return link_to(self._files.get(key), tmp)
