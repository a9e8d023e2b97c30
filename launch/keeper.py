"""The launcher's keeper: runs DeepSpeed's runner in a process group of its own, passes the
launcher's signals on to that whole group, and once the runner is gone lets nothing it started outlive
the grace period. Ctrl-C is passed on as SIGTERM, so the ranks stop at the step in progress after a
checkpoint, as on a scheduler's stop; a second Ctrl-C as SIGKILL, to stop at once. It also stops the
group when the launcher dies without a word (SIGKILL, the OOM killer), which no handler in the
launcher itself could do, and then removes the launcher's private directory (its hostfile and env
file, which may hold credentials) in the launcher's stead.

    python -m medsapiens.launch.keeper LAUNCHER_PID GRACE_S LAUNCH_DIR|- local|ssh COMMAND...

Over ssh, SIGUSR1 is passed on as SIGTERM: DeepSpeed's runner passes only SIGTERM on to the other
hosts (pdsh pkill), and the ranks stop after a checkpoint on either.

Standard library only (and `medsapiens.io.processes` and `medsapiens.errors`, which are too), so it starts
in a moment.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from medsapiens.errors import EXIT_STOPPED
from medsapiens.io import processes

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
POLL_S = 0.1


class Relay:
    """Ctrl-C, SIGTERM and SIGUSR1 (SLURM's warning signal), caught from creation on and passed on
    from the main flow only, so each one received is passed on once (a handler sending them could
    interrupt a send of the same signal and repeat it). Under SLURM the ranks also hear the step's
    signals directly; the trainer takes a repeated stop signal as one."""

    def __init__(self):
        self.received: list[int] = []
        self.sent = 0
        self.previous = {signum: signal.signal(signum, self._receive) for signum in FORWARDED_SIGNALS}

    def _receive(self, signum, frame) -> None:
        self.received.append(signum)

    def pass_on(self, send: Callable[[int], None]) -> None:
        while self.sent < len(self.received):
            signum = self.received[self.sent]
            self.sent += 1
            send(signum)

    def wait(self, child: subprocess.Popen, send: Callable[[int], None]) -> int:
        while True:
            self.pass_on(send)
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=POLL_S)

    def exit_status(self, status: int) -> int:
        """The child's failure; else 128 + the first signal passed on (a stop asked for: a scheduler's script
        requeues on it); else the child's status (128 + N when signal N ended it)."""
        failed = 0 < status < 128 and status != EXIT_STOPPED
        if self.received and not failed:
            return 128 + self.received[0]
        return status if status >= 0 else 128 - status

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def command(launcher_pid: int, grace_s: float, launch_dir: str | None, over_ssh: bool, argv: list[str]) -> list[str]:
    """The keeper's own command line, for the launcher to start."""
    return [sys.executable, "-m", "medsapiens.launch.keeper", str(launcher_pid), str(grace_s), launch_dir or "-",
            "ssh" if over_ssh else "local", *argv]


def keep(launcher_pid: int, grace_s: float, launch_dir: str | None, over_ssh: bool, argv: list[str]) -> int:
    relay = Relay()
    if not _end_with(launcher_pid):
        _clean_up_after(launch_dir)
        return 128 + signal.SIGTERM
    runner = subprocess.Popen(argv, start_new_session=True)

    interrupted = []

    def send(signum: int) -> None:
        if signum == signal.SIGINT:
            signum = signal.SIGKILL if interrupted else signal.SIGTERM
            interrupted.append(True)
        elif signum == signal.SIGUSR1 and over_ssh:
            signum = signal.SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signum)

    status = relay.wait(runner, send)
    deadline, left_running = time.monotonic() + grace_s, False
    while _group_alive(runner.pid):
        relay.pass_on(send)
        if time.monotonic() > deadline:
            send(signal.SIGKILL)
            left_running = True
            break
        time.sleep(POLL_S)
    if os.getppid() != launcher_pid:
        _clean_up_after(launch_dir)
    status = relay.exit_status(status)
    if left_running and status == 0:  # DeepSpeed's runner says 0 when its node launcher was killed (the OOM killer)
        print(f"medsapiens launch: processes of the job were still running {grace_s:g} s after DeepSpeed's runner "
              "ended; killed them: the job did not end cleanly", file=sys.stderr, flush=True)
        return 128 + signal.SIGKILL
    return status


def _end_with(launcher_pid: int) -> bool:
    """SIGTERM to this process when the launcher dies, however it dies (Linux), passed on as any
    SIGTERM is. False when the launcher is already gone."""
    if not processes.sigterm_when_parent_ends():
        print("medsapiens launch: this system cannot tell the job when its launcher dies; killing the launcher "
              "outright (SIGKILL) would leave the job running", file=sys.stderr, flush=True)
    return os.getppid() == launcher_pid


def _clean_up_after(launch_dir: str | None) -> None:
    """The launcher's private directory (hostfile, env file), which a launcher killed outright left."""
    if launch_dir is not None:
        shutil.rmtree(launch_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(keep(int(sys.argv[1]), float(sys.argv[2]), None if sys.argv[3] == "-" else sys.argv[3],
                  sys.argv[4] == "ssh", sys.argv[5:]))
