"""One writer at a time in an output folder: a POSIX record lock on ``.clipes/lock`` naming its holder."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from rich.console import Console

from .files import OutputError
from .layout import STATE

__all__ = ["folder_lock", "lock_state", "release_lock", "take_lock"]

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: runs are not locked
    fcntl = None


def take_lock(folder: Path) -> IO[str] | None:
    """Lock ``folder`` for this process (``folder/.clipes/lock``), or say who holds it; None without fcntl.

    The lock is a POSIX record lock (``lockf``): it belongs to this process alone, so the DataLoader
    workers it forks do not hold it (a ``flock`` is shared with them and outlived a killed run while
    an orphaned worker lived), and the kernel drops it when the process ends, however it ends. The
    file names the holder while it runs and is emptied on release: a name left in it is a run that
    was killed, whose lock is taken over with a note.
    """
    if fcntl is None:
        return None
    path = folder / STATE / "lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until released
    except OSError as e:
        raise OutputError(f"cannot write to {folder}: {e.strerror or e}") from e
    try:
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise OutputError(f"{folder} is being written by another clipes run ({holder}); wait for it to "
                              "finish or choose another --out") from None
        raise OutputError(f"cannot lock {folder} for this run: {e.strerror or e}; choose an --out on a "  # no locks
                          "local disk") from e
    f.seek(0)
    left = f.read().split()
    if len(left) == 2 and left[0] == "pid" and left[1].isdigit() and int(left[1]) != os.getpid():
        Console(stderr=True).print(f"note: the run that held {folder} (pid {left[1]}) was stopped before it "
                                   "finished; taking over its lock", highlight=False, soft_wrap=True, markup=False)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def lock_state(folder: Path) -> str | None:
    """How ``folder``'s writer left it, reading only: "held (pid N)" while a run writes it, "stopped (pid N)"
    when the run that held it was killed, None when it ended in order (or no run ever locked it)."""
    path = folder / STATE / "lock"
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError:
        return None
    with f:
        holder = " ".join(f.read().split())
        if fcntl is not None:
            try:  # a shared lock, taken and let go at once: refused while a writer holds the folder
                fcntl.lockf(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.lockf(f.fileno(), fcntl.LOCK_UN)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    return f"held ({holder or 'another process'})"
    return f"stopped ({holder})" if holder else None


def release_lock(held: IO[str] | None) -> None:
    """Empty the lock file (this run ended in order) and let go of the lock."""
    if held is None:
        return
    try:
        held.seek(0)
        held.truncate()
    except OSError:
        pass  # the lock goes with the file's closing all the same
    held.close()


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One writer at a time in ``folder``: a second clipes run into it is refused with a message."""
    held = take_lock(folder)
    try:
        yield
    finally:
        release_lock(held)
