"""One writer per folder: an advisory lock (fcntl.flock) on FOLDER/.lock while a process writes
there (a training run directory, a local shard output). The operating system releases it when the
holder exits, killed or not, so a dead holder never keeps it; the file keeps the last holder's line
(pid, host, what, since when) for the next one's refusal. Local disks; on S3 one writer per prefix
is the user's rule (docs/shards.md)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from medsapiens.errors import InputError
from medsapiens.io import storage

LOCK_NAME = ".lock"


@contextlib.contextmanager
def writer_lock(folder: Path, what: str):
    """Hold FOLDER/.lock for the body; a folder another live process holds is refused naming it."""
    folder = Path(folder)
    clash = storage.file_in_the_way(folder)
    if clash is not None:
        where = str(folder) if clash == folder else f"{folder}: {clash}"
        raise InputError(f"{where} is a file, not a folder: name a folder for the {what}")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise InputError(f"{folder} is in use by {holder}: one {what} writes there at a time; wait for it "
                             "to end, or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} ({what}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        yield  # the lock goes with the file's closing
