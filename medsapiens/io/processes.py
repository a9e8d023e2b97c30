"""Helper processes: one that ends with the one that started it (Linux's parent-death signal), and
ones born with signals blocked. Standard library only, so a helper process that uses it starts in a
moment."""
from __future__ import annotations

import contextlib
import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2)


def sigterm_when_parent_ends() -> bool:
    """Ask for SIGTERM to this process when the parent's thread that started it ends, however it ends.
    False where the system offers no such signal (not Linux, or the request was refused). The parent
    may have ended before the request was in place: callers compare `os.getppid()` with its pid."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) == 0


@contextlib.contextmanager
def children_born_blocking(signals):
    """Processes started inside inherit `signals` blocked (the mask survives fork and exec), so one that
    comes before a child has set its own handling waits for it instead of killing the child (or
    printing its KeyboardInterrupt traceback). This thread gets any that came meanwhile once the block
    ends; other threads were never blocked."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
