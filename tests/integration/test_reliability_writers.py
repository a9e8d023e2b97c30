"""One writer per folder: a run directory or a local shard output that a live process writes to is
refused to a second writer in one line naming the holder; a dead holder keeps nothing."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import CLI, DEMO_CONFIG, REPO, run

from medsapiens.errors import InputError
from medsapiens.io.locks import LOCK_NAME, writer_lock


def build(raw, out) -> subprocess.CompletedProcess:
    return run([*CLI, "shards", "build", "--source", f"head={raw / 'head'}", "--out", str(out), "--max-side", "64",
                "--workers", "1", "--no-progress"], 120)


@pytest.mark.timeout(240)
def test_a_second_writer_is_refused_naming_the_live_holder(phantom_shards, tmp_path):
    raw, out, run_dir = phantom_shards.parent / "raw", tmp_path / "shards", tmp_path / "run"
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    with writer_lock(out, "shards build"):
        refused = build(raw, out)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"{out} is in use by {holder} (shards build, since " in refused.stderr
        assert not (out / "manifest.json").exists()
    assert build(raw, out).returncode == 0  # released with its holder

    with writer_lock(run_dir, "fine-tuning"):
        finetune = run([*CLI, "finetune", "--config", str(REPO / "launch/experiments/demo_finetune.yaml"),
                        "--shards", str(phantom_shards), "--dataset", "head", "--init", "scratch", "--steps", "2",
                        "--run-dir", str(run_dir), "model.trunk_width=32", "data.workers=0"], 120)
        pretrain = run([sys.executable, "-m", "medsapiens.pretrain", "--config", str(DEMO_CONFIG),
                        f"data.shards={phantom_shards}", f"run_dir={run_dir}"], 120)
    for proc in (finetune, pretrain):
        assert proc.returncode == 2 and f"{run_dir} is in use by {holder}" in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # neither wrote anything


@pytest.mark.timeout(120)
def test_a_killed_holder_keeps_nothing(phantom_shards, tmp_path):
    out = tmp_path / "shards"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from medsapiens.io.locks import writer_lock\n"
                               "with writer_lock(Path(sys.argv[1]), 'shards build'):\n"
                               "    print('held', flush=True); time.sleep(600)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert build(phantom_shards.parent / "raw", out).returncode == 2
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    time.sleep(0.2)
    assert build(phantom_shards.parent / "raw", out).returncode == 0


@pytest.mark.timeout(120)
def test_a_run_directory_that_is_a_file_is_refused_in_one_line_naming_it(phantom_shards, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for run_dir, flags in ((afile, ["--resume", "none"]), (afile / "sub", [])):  # without the flag: the lock below
        proc = run([*CLI, "finetune", "--config", str(REPO / "launch/experiments/demo_finetune.yaml"), "--shards",
                    str(phantom_shards), "--dataset", "head", "--init", "scratch", "--steps", "1", "--run-dir", str(run_dir),
                    "model.trunk_width=32", "data.workers=0", *flags], 60)
        where = str(afile) if run_dir == afile else f"{run_dir}: {afile}"
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
            f"error: {where} is a file, not a folder: name a folder for the fine-tuning"), proc.stderr[-2000:]
    with pytest.raises(InputError, match=f"{afile} is a file, not a folder: name a folder for the training run"):
        with writer_lock(afile, "training run"):
            pass
    assert afile.read_text() == "mine"
