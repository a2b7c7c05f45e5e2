"""One process at a time in a directory: an exclusive `fcntl.flock` on a lock file inside it.

`hpd distill` and `hpd experiment` lock their output directory for the whole invocation (a
second run on the same `--out` is refused, naming the holder), and a teacher being trained into
the cache is locked while it trains (a second run that needs the same teacher waits for it, then
reuses it). The kernel drops a `flock` when the process that holds it ends, however it ends
(kill -9 included), so a dead holder never blocks the next run and there is no stale-lock
guessing. The holder's pid, host and start time are written into the lock file for the message;
they are cleared when it releases the lock (and simply overwritten by the next holder after a
kill). The lock file stays: removing it would let a waiter hold a lock on a deleted file while a
newcomer locks a new one.

A `flock` belongs to the open file: child processes started with `spawn` (the experiment's
workers) do not inherit it and must not take it again; they run inside the parent's lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

from .jsonfiles import writing

LOCK_NAME = ".hpd.lock"


class LockedError(RuntimeError):
    """A directory that another process holds: the message names it (pid, host, start time)."""


def _describe(path):
    try:
        with open(path) as handle:
            holder = json.loads(handle.read() or "null")
    except (OSError, ValueError):
        holder = None
    if not isinstance(holder, dict):
        return "another process (it has not written its pid yet)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}"
            f"{', ' + holder['command'] if holder.get('command') else ''})")


class DirectoryLock:
    """An exclusive lock on `directory`, held until `release()` (or the end of a `with` block, or
    of the process)."""

    def __init__(self, directory, handle):
        self.directory, self.path, self._handle = directory, os.path.join(directory, LOCK_NAME), handle

    def release(self):
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        try:
            handle.seek(0)
            handle.truncate()  # no holder any more; done while still holding the lock
            handle.flush()
        except OSError:
            pass  # a full disk cannot keep the lock from being released
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_directory(directory, *, wait=False, on_wait=None, command=None):
    """Take the exclusive lock of `directory` (created if absent). Held by another process: raise
    `LockedError` naming the holder, or with `wait`, call `on_wait(message)` once and block until
    it is released. `command` (say "hpd distill") goes into the holder's description."""
    path = os.path.join(directory, LOCK_NAME)
    with writing(path):
        os.makedirs(directory, exist_ok=True)
        handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(path)
            if not wait:
                raise LockedError(f"{directory} is in use by {holder}; wait for that run to finish or use "
                                  f"another directory") from None
            if on_wait is not None:
                on_wait(f"{directory} is in use by {holder}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        if command:
            holder["command"] = command
        with writing(path):
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(holder))
            handle.flush()
    except BaseException:
        handle.close()  # closing the file drops the lock if it was taken
        raise
    return DirectoryLock(directory, handle)


def die_with_parent(parent_pid):
    """Have the kernel kill this process when its parent dies (Linux; elsewhere a no-op). For
    worker processes that write inside a directory their parent holds: a killed parent releases
    the lock, and its workers must not go on writing beside the next holder."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)
