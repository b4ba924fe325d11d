"""One writer per run directory (layer L6): an OS lock on ``<directory>/.flowkern-lock``.

The lock is ``flock(2)`` on a small file inside the directory: exclusive, never waited for (a second writer is
refused at once) and released by the operating system when the holding process exits, however it exits (SIGKILL
included), so a dead run never leaves a stale lock (at most a stale file, which the next writer takes over). The
holder writes its pid and command line into the file, so a refused process can say who holds the directory, and
deletes the file when it lets go (an acquirer checks that the file it locked is still the one in the directory).
Within one process the lock is re-entrant (the CLI holds the run directory while the trainer's checkpoint writes take
it again). Platforms without ``fcntl`` (Windows) get no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_FILE", "RunDirectoryBusy", "hold", "try_hold"]

LOCK_FILE = ".flowkern-lock"

_held: dict[str, list[int]] = {}  # lock file (resolved) -> [fd, depth], this process only


class RunDirectoryBusy(ValueError):
    """Another process holds the run directory's lock (a ValueError: the CLI reports it in one line)."""


def _forget_after_fork() -> None:
    # a forked child shares the parent's lock; it must neither report it as its own nor release it
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _lock_path(directory: str | os.PathLike) -> str:
    return os.path.join(os.path.realpath(directory), LOCK_FILE)


def _acquire(directory: str | os.PathLike) -> str | None:
    """Take the lock (re-entrant); None if taken, else a description of the holder."""
    path = _lock_path(directory)
    if path in _held:
        _held[path][1] += 1
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            return holder
        except OSError:
            os.close(fd)
            raise
        try:  # the holder we waited out may have deleted the file we locked: lock the one in the directory
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    record = {"pid": os.getpid(), "command": " ".join(sys.argv) or sys.executable, "since": time.strftime("%c")}
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[path] = [fd, 1]
    return None


def _describe_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
        return f"process {int(record['pid'])} ({record['command']}, since {record['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _release(directory: str | os.PathLike) -> None:
    path = _lock_path(directory)
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[path]
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: whoever opened it meanwhile sees it gone and retries
        os.close(entry[0])  # closing the only descriptor releases the flock


@contextlib.contextmanager
def hold(directory: str | os.PathLike, *, what: str = "run directory") -> Iterator[None]:
    """Hold ``directory``'s lock for the ``with`` block (the directory must exist); RunDirectoryBusy if another
    process holds it, naming that process."""
    holder = _acquire(directory)
    if holder is not None:
        raise RunDirectoryBusy(
            f"{what} {directory} is in use by {holder}: one writer per run directory (wait for it to finish, or "
            "stop it)"
        )
    try:
        yield
    finally:
        _release(directory)


@contextlib.contextmanager
def try_hold(directory: str | os.PathLike) -> Iterator[bool]:
    """Hold the lock if nobody else does; yields whether it is held (False also for a read-only directory)."""
    try:
        holder = _acquire(directory)
    except OSError:
        holder = "unwritable"
    try:
        yield holder is None
    finally:
        if holder is None:
            _release(directory)
