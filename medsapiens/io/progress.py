"""Progress bars that suit where they are written: on a terminal, redrawn as tqdm does; into a file (a
scheduler's job log), a line at most every 30 s instead of a carriage-return update ten times a second."""
from __future__ import annotations

import sys

FILE_INTERVAL_S = 30.0


def progress_bar(**options):
    from tqdm import tqdm

    interval = 0.1 if sys.stderr.isatty() else FILE_INTERVAL_S
    return tqdm(mininterval=interval, maxinterval=max(interval, 10.0), **options)
