"""A full disk is one line naming the path and "no space left", temporary files are removed, and
the rerun recovers once space is freed (the torn checkpoint is removed at its start). Each test
mounts a small tmpfs (root only; skipped where mounting is not allowed)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import DEMO_CONFIG, run

from medsapiens.training import checkpoints


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 60 MiB at tmp_path/disk; `remount(size)` changes its size."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield disk, remount
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave_bytes: int) -> None:
    import shutil

    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(bytes(max(0, free - leave_bytes)))


def test_a_file_write_on_a_full_disk_is_one_line_and_leaves_no_temporary(small_disk, head_hand_bundle):
    from medsapiens.errors import InputError
    from medsapiens.io import storage
    from medsapiens.model import bundle as bundlelib

    disk, _ = small_disk
    fill(disk, 64 << 10)
    with pytest.raises(InputError, match=f"writing {disk / 'manifest.json'}: no space left on its device"):
        storage.write_bytes(str(disk / "manifest.json"), bytes(1 << 20))
    model, bundle = bundlelib.load(head_hand_bundle)
    with pytest.raises(InputError, match=f"writing {disk / 'bundle'}: no space left on its device"):
        bundlelib.save(disk / "bundle", model, bundle)
    assert sorted(p.name for p in disk.rglob("*") if p.is_file()) == ["filler"]


@pytest.mark.timeout(300)
def test_a_checkpoint_save_on_a_full_disk_is_one_line_and_the_rerun_recovers(small_disk, phantom_shards):
    disk, remount = small_disk
    args = [sys.executable, "-m", "medsapiens.pretrain", "--config", str(DEMO_CONFIG), f"data.shards={phantom_shards}",
            f"run_dir={disk / 'run'}", "data.micro_batch=4", "data.workers=0", "model.trunk_width=32",
            "train.max_steps=6", "train.checkpoint_every=2", "train.val_every=100", "train.keep_last=1"]
    full = run(args, 200)
    assert full.returncode == 2 and "Traceback" not in full.stderr
    line = full.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: writing {disk / 'run' / 'checkpoints'}/step_0000000")
    # ENOSPC as such, or torch's writer's errno-less error, kept on the line for the rare other cause
    assert re.search(r"no space left on its device(; free| \(\d+ KiB free; the writer said: \[enforce fail)", line), line
    ckpt = disk / "run" / "checkpoints"
    torn = [t for t in checkpoints.tags(ckpt) if t not in checkpoints.complete_tags(ckpt)]
    assert torn  # what the full disk left
    remount("400m")
    rerun = run(args, 200)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"removed the incomplete checkpoint(s) {', '.join(torn)}" in rerun.stderr
    assert checkpoints.latest_tag(ckpt) == "step_00000006"
