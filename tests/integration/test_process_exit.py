"""The end of every command's process (`exit_process`): what Python's exit guarantees still happens,
the teardown of every module and object does not."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import atexit, ctypes, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from medsapiens.io.processes import exit_process

    out = Path(sys.argv[1])

    def late_writer():
        time.sleep(0.3)
        (out / "thread").write_text("done")

    class Teardown:
        def __del__(self):
            (out / "teardown").write_text("ran")

    KEPT_UNTIL_EXIT = Teardown()
    threading.Thread(target=late_writer).start()  # not a daemon: exit waits for it
    pool = ThreadPoolExecutor(1)
    pool.submit(int)  # an idle worker left running: threading's exit hook wakes it to end
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    print("python's buffer", end="")
    ctypes.CDLL(None).printf(b"C's buffer")
    sys.stderr.write("to stderr")
    exit_process(3)
""")


@pytest.mark.timeout(60)
def test_the_end_of_a_command_keeps_what_exit_guarantees_and_skips_the_teardown(tmp_path):
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # which unbuffers C's stdio too
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=30,
                          env=buffered)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "python's bufferC's buffer"  # both block-buffered into a pipe, both flushed
    assert proc.stderr == "to stderr"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()  # module globals are not finalized
