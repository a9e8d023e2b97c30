"""Processes: helpers that end with the one that started them (Linux's parent-death signal), ones born
with signals blocked, stop signals taken as Ctrl-C, and the end of a command's process. Standard
library only, so a helper process that uses it starts in a moment."""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import sys
import threading
from typing import NoReturn

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


@contextlib.contextmanager
def ended_like_ctrl_c(signals=(signal.SIGTERM, signal.SIGHUP)):
    """Within, `signals` (a scheduler's time limit, `docker stop`, a closed terminal) end the command as
    Ctrl-C does, through its `finally` blocks, which record what is done, instead of killing it on the
    spot. A signal ignored (SIGHUP under nohup) stays ignored; outside the main thread, where no handler
    can be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    ignored = {signum for signum in signals if signal.getsignal(signum) == signal.SIG_IGN}  # nohup's SIGHUP
    previous = {signum: signal.signal(signum, interrupt) for signum in signals if signum not in ignored}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_process(code: int) -> NoReturn:
    """End this process with `code` as Python's exit does (non-daemon threads joined, atexit handlers
    run, buffered output flushed, Python's and C's), less its last part: the teardown of every module
    and object, which guarantees nothing (Python does not promise to finalize what lives until exit)
    and, with torch, timm and DeepSpeed loaded, costs each command, and each rank of a job, 1-2 s of
    CPU. For the end of an entry point, once everything it writes is closed."""
    threading._shutdown()  # what Python's own exit runs first: threading's exit hooks, then the joins
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone, a stream closed: nothing to tell
            stream.flush()
    ctypes.CDLL(None).fflush(None)
    os._exit(code)
