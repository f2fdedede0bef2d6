"""One writer per output folder: `folder_lock(folder)` holds `folder/.lock` while a command writes there.

The lock is an exclusive `flock` on that file, which records the owner (pid, host, start time, command):
a second writer gets FolderInUseError naming the owner at once, and a lock whose owner was killed (the
kernel drops a dead process's flock) is taken over with a note. Locks are re-entrant within a process,
so the app can hold a folder for a whole command while the library locks the same folder again inside.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"
_HELD: dict[Path, int] = {}  # folders locked by this process -> nesting depth


class FolderInUseError(OSError):
    """Another process is writing the same output folder; the message names it and what to do."""


def _owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}


def _read_owner(descriptor: int) -> dict | None:
    try:
        data = json.loads(os.pread(descriptor, 4096, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def describe_owner(owner: dict | None) -> str:
    """`process N (started T)`, with the host when it is another machine's."""
    if not owner:
        return "another process"
    host = f" on {owner.get('host')}" if owner.get("host") != socket.gethostname() else ""
    return f"process {owner.get('pid')}{host} (started {owner.get('started')}: {owner.get('command')})"


def _in_use(folder: Path, owner: dict | None) -> FolderInUseError:
    return FolderInUseError(f"{folder} is in use by {describe_owner(owner)}; wait for it or pick another --out")


def check_not_in_use(folder: str | Path) -> None:
    """FolderInUseError now if another process holds `folder`'s lock: a probe for argument checks before any
    compute (it creates and changes nothing; `folder_lock` still decides when the command starts writing)."""
    folder = Path(folder)
    if not (folder / LOCK_FILE).is_file() or folder.resolve() in _HELD:
        return
    try:
        descriptor = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder, _read_owner(descriptor)) from None
    finally:
        os.close(descriptor)


def _acquire(folder: Path) -> int:
    path = folder / LOCK_FILE
    for _ in range(20):  # another process may unlink the file between our open and our flock: try again
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(descriptor)
            os.close(descriptor)
            raise _in_use(folder, owner) from None
        try:
            current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if not current:
            os.close(descriptor)
            continue
        previous = _read_owner(descriptor)
        if previous:  # a clean release unlinks the file: its owner was killed
            state = "is no longer running" if not _pid_alive(previous.get("pid")) else "no longer holds it"
            print(f"note: {folder} was locked by {describe_owner(previous)}, which {state}; taking the lock over",
                  file=sys.stderr)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(_owner_record()) + "\n").encode("utf-8"), 0)
        return descriptor
    raise FolderInUseError(f"could not lock {folder}: its lock file keeps changing; is another command starting there?")


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold `folder/.lock` (creating the folder) for the block; FolderInUseError if another process holds it.

    A folder this call created and that is still empty at the end is removed again."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    descriptor = _acquire(folder)
    _HELD[key] = 1
    try:
        yield folder
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(folder / LOCK_FILE)  # before the flock goes: a waiter then finds a fresh file
        os.close(descriptor)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
