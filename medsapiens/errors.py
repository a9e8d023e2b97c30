"""The errors a user can fix, and the one rule that turns any error into an exit status.

Library code raises `UserError` (or a subclass) for input it cannot use: a missing or malformed
file, a bad config value, a manifest, bundle or checkpoint that does not check out. Its message
names the file, key or sample and what to do. Every entry point (the `medsapiens` command and the
rank entry points `python -m medsapiens.pretrain` / `medsapiens.finetune`) runs its work through
`run_command`: a user-level error prints one line and sets the exit status; anything else is a bug
and keeps its traceback. A plain `ValueError` is a bug too: code never catches it to mean "bad input".

Exit statuses, the same for every command:
    0   done
    1   the data failed a check (`shards verify`/`inspect` found problems, `shards build` rejected
        inputs under --strict or could not write, `predict` predicted no image)
    2   the command could not run as given (`UserError`: bad flag, config, file; a diverged run)
    75  a stop signal (SIGTERM, SIGUSR1) ended the run after a complete checkpoint: rerun to resume
    130 Ctrl-C (128 + SIGINT), with no traceback: whoever pressed it knows why
    141 the reader of its output went (128 + SIGPIPE: `| head`), with no traceback
"""
from __future__ import annotations

import os
import sys

EXIT_CHECK_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_STOPPED = 75  # sysexits' "try again"
EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT
EXIT_BROKEN_PIPE = 141  # the shell's status for a process ended by SIGPIPE

# Files the user named that are not there or not readable: the OS message names the path.
FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError"}  # botocore's, matched by name: no import
OUT_OF_MEMORY_ERROR = "OutOfMemoryError"  # torch's (torch.OutOfMemoryError), matched by name: no import


class UserError(Exception):
    """Input the user can fix; the message names the file, key or sample."""


class InputError(UserError, ValueError):
    """A value or file given by the user that cannot be used (the generic kind)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file that cannot be used: incomplete, missing, non-finite, or holding more than weights."""


class Stopped(UserError):
    """A stop signal (SIGTERM, SIGUSR1) ended the run after a complete checkpoint: rerun to resume."""

    exit_code = EXIT_STOPPED
    prefix = ""


class CheckFailed(UserError):
    """The data the command was asked to check or build did not pass: it ran, the data is the problem."""

    exit_code = EXIT_CHECK_FAILED


class DivergedError(UserError):
    """Training reached a non-finite loss or gradient: the settings (lr, data) need changing."""


def exit_code(exc: BaseException) -> int:
    """The exit status of a command that ended on the user-level exception `exc`."""
    return getattr(exc, "exit_code", EXIT_USER_ERROR)


def user_line(exc: BaseException) -> str:
    """What a command prints for the user-level exception `exc`: `error: ...`, or a stop's own line."""
    return f"{getattr(exc, 'prefix', 'error: ')}{user_message(exc)}"


def user_message(exc: BaseException) -> str | None:
    """The one line to print for `exc`, or None when it is a bug (keep the traceback)."""
    if type(exc).__name__ in CREDENTIAL_ERRORS:
        return (f"{exc}: s3:// needs AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "or ~/.aws/credentials)")
    if is_out_of_memory(exc):
        return (f"out of GPU memory ({torch_memory_report(exc)}): lower the batch (data.micro_batch for training, "
                "with train.grad_accum to keep the global batch; --batch-size for evaluate, predict and calibrate)")
    return str(exc) if isinstance(exc, (UserError, *FILE_ERRORS)) else None


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error, or the same failure as CUDA, cuBLAS, NCCL or a compiler wrapping
    it reports it: as text."""
    text = str(exc)
    return type(exc).__name__ == OUT_OF_MEMORY_ERROR or (
        isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text))


def torch_memory_report(exc: BaseException) -> str:
    """What an out-of-memory message says of the allocation and the GPU: the first three sentences of
    its line that says "out of memory" (torch's own goes on with general advice; a wrapper's starts
    with its own words)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = next((line for line in lines if "out of memory" in line.lower()), lines[0] if lines else "")
    return ". ".join(line.split(". ")[:3]).rstrip(".") or "no detail"


def run_command(work, *args) -> int:
    """The one exit rule of every entry point: `work(*args)` returns an exit status (None is 0); a
    user-level error prints its one line on stderr and returns its status; a bug propagates."""
    try:
        return int(work(*args) or 0)
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of our output went (`| head`): stop quietly, as a command killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or Python's exit flush complains again
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # noqa: BLE001 - sorted by user_message: one line for the user's mistake, else raise
        if user_message(exc) is None:
            raise
        say(user_line(exc))
        return exit_code(exc)


def say(line: str) -> None:
    """One line on stderr in one write: under `python -u` (DeepSpeed's ranks) print writes the text and its
    newline apart, and two ranks' lines ran together."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()
