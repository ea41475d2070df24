"""Notices a JAX process of a run that stopped, and ends this one in one line.

When a process of a JAX multi-process run is killed, the others wait in
their next collective until Gloo times out, then abort natively (exit status
134, `Fatal Python error: Aborted` after a C++ traceback) about a minute
later; no Python exception is raised that `train.py` could turn into a
message. `watch_peers` connects the processes with one TCP connection each to
process 0 (a port chosen by process 0, announced to the others with a
collective; the others connect to the coordinator's host). A thread waits on
these connections: the operating system closes a killed process's
connection at once, so a connection that ends without the word `bye` means
that its process stopped (a process that leaves the watched block, whether
normally or by an exception, says `bye` first). The thread then prints one
line naming that process, removes this process's temporary directories and
ends it with status 1 (`os._exit`: the exit handlers would wait for the
stopped process). Process 0 tells the other processes which one stopped
before it ends, so that they name it too.

Nothing here measures time: a slow step never ends a run. A host that
vanishes (no connection reset) is noticed by TCP keepalive probes, which the
kernel answers however busy the process is, after about 2 minutes.
"""

import contextlib
import os
import selectors
import shutil
import socket
import sys
import threading

_BYE = b"bye\n"
_KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 6}


@contextlib.contextmanager
def watch_peers(process, stopped_message, temp_dirs):
    """Ends this process in one line if another of the run stops in the block.

    `process`: a `zoo.run.processes.Process` of a JAX run with several
    processes (`jax.distributed` initialized). Every process must enter the
    block (connecting is collective). If the connections cannot be made
    within `process.connect_timeout`, the run goes on unwatched. A stopped
    peer ends this process with the line `stopped_message(process, detail)`
    after removing the directories of `temp_dirs`.
    """
    watch = _Watch(process, stopped_message, temp_dirs)
    watch.start()
    try:
        yield
    finally:
        watch.stop()


class _Watch:
    def __init__(self, process, stopped_message, temp_dirs):
        self.process = process
        self.stopped_message = stopped_message
        self.temp_dirs = temp_dirs
        self.lock = threading.Lock()
        self.stopped = False
        self.peers = {}  # index -> socket
        self.left = set()  # the processes that said bye

    # --- Connecting ---

    def start(self):
        import numpy as np
        from jax.experimental import multihost_utils

        server = None
        port = 0
        if self.process.index == 0:
            try:
                server = _listen()
                port = server.getsockname()[1]
            except OSError:
                server = None
        # A collective, so every process takes part even when process 0 has no port.
        port = int(multihost_utils.broadcast_one_to_all(np.int32(port)))
        if not port:
            return
        timeout = self.process.connect_timeout
        if server is not None:
            server.settimeout(timeout)
            try:
                with server:
                    for _ in range(self.process.count - 1):
                        connection, _ = server.accept()
                        connection.settimeout(timeout)
                        index = int(_read_line(connection))
                        self.peers[index] = connection
            except (OSError, ValueError):
                pass  # the processes not connected go unwatched
        else:
            host = self.process.peers.split(",")[0].strip().rsplit(":", 1)[0].strip("[]")
            try:
                connection = socket.create_connection((host, port), timeout)
                connection.sendall(f"{self.process.index}\n".encode())
                self.peers[0] = connection
            except OSError:
                return
        for connection in self.peers.values():
            connection.settimeout(None)
            _keepalive(connection)
        if self.peers:
            threading.Thread(target=self._wait, name="keras_ema-watch-peers",
                             daemon=True).start()

    # --- Watching ---

    def _wait(self):
        selector = selectors.DefaultSelector()
        buffers = {}
        for index, connection in self.peers.items():
            selector.register(connection, selectors.EVENT_READ, index)
            buffers[index] = b""
        while len(buffers) > 0:
            for key, _ in selector.select():
                index = key.data
                try:
                    data = key.fileobj.recv(256)
                except OSError:  # reset, or keepalive probes unanswered
                    data = b""
                if data:
                    buffers[index] += data
                    *lines, buffers[index] = buffers[index].split(b"\n")
                    for line in lines:
                        if line == _BYE.strip():
                            self.left.add(index)
                        elif line.startswith(b"stopped "):  # told by process 0
                            self._end(int(line.split()[1]))
                    continue
                selector.unregister(key.fileobj)
                del buffers[index]
                if index not in self.left:
                    self._end(index)

    def _end(self, index):
        """Prints the line naming process `index`, ends this process (status 1)."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True  # for good: this thread ends the process
            for other, connection in self.peers.items():
                if other != index and other not in self.left:
                    with contextlib.suppress(OSError):
                        connection.sendall(f"stopped {index}\n".encode())
            message = self.stopped_message(self.process, f"task:{index}")
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            prog = os.path.basename(sys.argv[0] or "python")
            with contextlib.suppress(Exception):
                sys.stderr.write(f"{prog}: error: {message}\n")
                sys.stderr.flush()
            for path in list(self.temp_dirs):
                shutil.rmtree(path, ignore_errors=True)
            os._exit(1)

    def stop(self):
        """Leaves the watch: says bye; the others no longer watch this process."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            for connection in self.peers.values():
                with contextlib.suppress(OSError):
                    connection.sendall(_BYE)


def _listen():
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True,
                                    backlog=64)
    return socket.create_server(("", 0), backlog=64)


def _read_line(connection):
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(64)
        if not chunk or len(data) > 64:
            raise ValueError("no index")
        data += chunk
    return data.decode()


def _keepalive(connection):
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE.items():
        if hasattr(socket, name):
            with contextlib.suppress(OSError):
                connection.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
