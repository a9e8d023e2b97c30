"""A process that ends with the one that started it: Linux's parent-death signal. Standard library
only, so a helper process that uses it starts in a moment."""
from __future__ import annotations

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
