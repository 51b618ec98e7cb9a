"""Cell claims: a running ``mtk run`` holds a lock on the cell it attacks, so a second ``mtk run`` of the same grid
(another lane on this machine, or a machine sharing the folder) takes the next free cell instead of the same one.

The lock is an ``flock`` on ``<run folder>/claim.lock``: the kernel drops it when its process ends, kill -9 included,
so there is no stale claim to clean up. The file names the holder (host, pid, since) while it runs, for ``mtk status``,
which reads it without locking (a status query never makes a starting run skip its cell).
"""

import contextlib
import fcntl
import json
import os
import pathlib
import socket

from toolkit.artifacts import now

LOCK = "claim.lock"


@contextlib.contextmanager
def claim(folder, wait=False):
    """Yields True while this process holds ``folder``'s claim, False (at once) when another process holds it.
    ``wait=True`` blocks until the claim is free instead (used around building a defense)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": now()}))
            handle.flush()
            yield True
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def holder(folder):
    """Who holds ``folder``'s claim ({host, pid, since}), or None: no claim file, released, or its process on this host
    is gone (killed). A holder on another host is taken as live."""
    path = pathlib.Path(folder) / LOCK
    try:
        who = json.loads(path.read_text() or "null")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not who or who.get("host") != socket.gethostname():
        return who or None
    try:
        os.kill(who["pid"], 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return who
