"""Seconds from the end of a command's work to the end of its process, with what a training rank has
loaded (torch, timm, DeepSpeed, the model code): Python's own exit against `exit_process`, which every
entry point ends with. Runs alternate, side by side in one run.

    python bench/process_exit.py [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time
from pathlib import Path
import deepspeed, timm, torch  # noqa: F401
import medsapiens.model  # noqa: F401
from medsapiens.io.processes import exit_process
Path(sys.argv[2]).write_text(repr(time.time()))
sys.exit(0) if sys.argv[1] == "python" else exit_process(0)
"""
ENDINGS = ("python", "exit_process")


def exit_seconds(ending: str, stamp: Path) -> float:
    subprocess.run([sys.executable, "-c", CHILD, ending, str(stamp)], check=True, capture_output=True)
    return time.time() - float(stamp.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each ending, alternating")
    runs = parser.parse_args().runs
    seconds: dict[str, list[float]] = {ending: [] for ending in ENDINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            for ending in ENDINGS:
                seconds[ending].append(exit_seconds(ending, Path(tmp) / "stamp"))
    medians = {ending: statistics.median(values) for ending, values in seconds.items()}
    for ending, values in seconds.items():
        print(f"{ending:>12}: median {medians[ending]:.2f} s to exit ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"Python's exit takes {medians['python'] / medians['exit_process']:.1f}x as long as exit_process "
          f"({medians['python'] - medians['exit_process']:.2f} s more per process)")


if __name__ == "__main__":
    main()
