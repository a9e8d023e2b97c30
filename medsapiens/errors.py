"""The errors a user can fix, and the one rule that turns any error into what a command prints.

Library code raises `UserError` (or a subclass) for input it cannot use: a missing or malformed
file, a bad config value, a manifest, bundle or checkpoint that does not check out. Its message
names the file, key or sample and what to do. Every entry point (the `medsapiens` command and the
rank entry points the DeepSpeed launcher starts) prints `user_message(exc)` as one line and exits 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_STOPPED = 75  # a stop signal ended the run after a complete checkpoint (sysexits' "try again")

# Files the user named that are not there or not readable: the OS message names the path.
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError"}  # botocore's, matched by name: no import


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
    return str(exc) if isinstance(exc, (UserError, *FILE_ERRORS)) else None
