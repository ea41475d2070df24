"""Waiting for the tests' subprocesses: a deadline only a hang can miss.

A fixed wall-clock timeout fails a test on a busy machine (2 cores under a
load of 10 run the suite 10x slower) although nothing is wrong. Here a
process counts as hung only when, for `STALL` seconds in a row, neither it
nor any process waited for with it has used CPU time (`/proc/PID/stat`) or
written output. A process that waits for a peer which computes is not hung:
the peer's CPU time grows. Where `/proc` is missing, the wall clock is used,
`STALL` times 10.
"""

import os
import subprocess
import threading
import time

STALL = 180  # seconds without CPU time or output: a hang
CPU_PROGRESS = 0.5  # seconds of CPU time that count as progress
LIMIT = 4 * 3600  # seconds: a last bound on a process that spins forever


def cpu_seconds(pid):
    """CPU time used by `pid` and its waited-for children; `None` if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    # After the name: state is field 3, utime..cstime are fields 14-17.
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def communicate(processes, stall=STALL, limit=LIMIT):
    """Waits for all; returns `[(returncode, stdout, stderr)]`.

    Kills every one still running and raises `TimeoutError` when none has
    used `CPU_PROGRESS` seconds of CPU time or written anything for `stall`
    seconds (or after `limit` seconds in all). Outputs not piped are `None`.
    """
    outputs = [{"stdout": [], "stderr": []} for _ in processes]
    readers = []
    for p, out in zip(processes, outputs):
        for name in out:
            stream = getattr(p, name)
            if stream is not None:
                thread = threading.Thread(target=_read, args=(stream, out[name]),
                                          daemon=True)
                thread.start()
                readers.append(thread)
    try:
        _wait(processes, outputs, stall, limit)
        for thread in readers:
            thread.join()
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, out in zip(processes, outputs):
        texts = [(out[name][0][:0].join(out[name]) if out[name] else
                  ("" if getattr(p, "text_mode", True) else b""))
                 if getattr(p, name) is not None else None
                 for name in ("stdout", "stderr")]
        results.append((p.returncode, *texts))
    return results


def run(args, stall=STALL, capture_output=True, text=True, check=False, **kwargs):
    """`subprocess.run(args, ...)` with a deadline only a hang can miss.

    Returns a `subprocess.CompletedProcess`; `check=True` raises
    `subprocess.CalledProcessError` on a non-zero status.
    """
    pipe = subprocess.PIPE if capture_output else None
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    process = subprocess.Popen(args, stdout=kwargs.pop("stdout", pipe),
                               stderr=kwargs.pop("stderr", pipe), text=text, **kwargs)
    ((code, out, err),) = communicate([process], stall)
    if check and code:
        raise subprocess.CalledProcessError(code, args, out, err)
    return subprocess.CompletedProcess(args, code, out, err)


def _read(stream, chunks):
    for line in stream:
        chunks.append(line)
    stream.close()


def _wait(processes, outputs, stall, limit):
    start = last_progress = time.monotonic()
    last = None
    while any(p.poll() is None for p in processes):
        now = time.monotonic()
        cpu = [cpu_seconds(p.pid) for p in processes if p.poll() is None]
        if None in cpu:
            stall_now = 10 * stall  # no /proc: the wall clock, generously
            state = None
        else:
            stall_now = stall
            state = (sum(cpu), sum(len(c) for out in outputs for c in out.values()))
        if state is not None and (last is None or state[0] - last[0] >= CPU_PROGRESS
                                  or state[1] != last[1]):
            last_progress, last = now, state
        if now - last_progress > stall_now or now - start > limit:
            raise TimeoutError(
                f"{len(processes)} process(es) made no progress (CPU time or "
                f"output) for {now - last_progress:.0f} s: hung; killed")
        time.sleep(0.5)
