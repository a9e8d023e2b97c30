"""`latest` never names a half-written checkpoint: a tag counts only once every rank has confirmed
its files and their sizes (`complete.json`); a resume, an export and a fine-tuning export take the
newest complete tag and pass over a damaged newer one."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import DEEPSPEED, REPO, SMALL_RUN, deepspeed_module, free_port, losses, pretrain_args
from medsapiens import checkpoints


def fake_tag(ckpt_dir, step, files: dict[str, bytes], complete=True):
    tag_dir = ckpt_dir / checkpoints.checkpoint_tag(step)
    tag_dir.mkdir(parents=True)
    for name, data in files.items():
        (tag_dir / name).write_bytes(data)
    if complete:
        (tag_dir / "complete.json").write_text(json.dumps({n: len(d) for n, d in files.items()}))
    return tag_dir


@pytest.mark.timeout(30)
def test_only_tags_whose_files_match_their_record_are_complete(tmp_path):
    files = {"mp_rank_00_model_states.pt": b"x" * 10, "zero_pp_rank_1_mp_rank_00_optim_states.pt": b"y" * 20}
    fake_tag(tmp_path, 2, files)
    fake_tag(tmp_path, 4, files, complete=False)  # a rank never confirmed
    torn = fake_tag(tmp_path, 6, files)
    (torn / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"y" * 12)  # truncated after the fact
    (tmp_path / "latest").write_text("step_00000006")  # what DeepSpeed itself would have written
    assert checkpoints.complete_tags(tmp_path) == ["step_00000002"]
    assert checkpoints.latest_tag(tmp_path) == "step_00000002"
    (tmp_path / "step_00000002" / "mp_rank_00_model_states.pt").unlink()
    assert not checkpoints.has_checkpoint(tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match="no complete checkpoint in"):
        checkpoints.latest_tag(tmp_path)


@pytest.mark.timeout(30)
def test_a_garbled_record_is_not_complete(tmp_path):
    tag_dir = fake_tag(tmp_path, 2, {"a.pt": b"1"})
    for text in ("", "[1, 2]", "{not json", "{}"):
        (tag_dir / "complete.json").write_text(text)
        assert checkpoints.complete_tags(tmp_path) == []


@pytest.mark.timeout(300)
def test_resume_falls_back_past_a_truncated_shard_and_redoes_the_same_steps(two_rank_run, phantom_shards, tmp_path):
    record = json.loads((two_rank_run / "checkpoints" / "step_00000004" / "complete.json").read_text())
    assert sorted(record) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                              "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # both ranks confirmed
    assert (two_rank_run / "checkpoints" / "latest").read_text() == "step_00000004"
    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_run, run_dir)
    shard = run_dir / "checkpoints" / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size * 2 // 3)  # as a rank frozen mid-save leaves it
    proc = deepspeed_module("pretrain", 2, pretrain_args(phantom_shards, run_dir, *SMALL_RUN), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "passing over the incomplete checkpoint(s) step_00000004" in proc.stderr
    assert "resumed from step 2" in proc.stderr
    redone, original = losses(run_dir), losses(two_rank_run)
    for step in (3, 4):
        assert redone[step] == pytest.approx(original[step], rel=1e-5, abs=1e-7), step
    assert checkpoints.latest_tag(run_dir / "checkpoints") == "step_00000004"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"


def rank_process(launcher_pid: int, rank: int, within_s: float):
    import psutil

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if f"--local_rank={rank}" in child.cmdline():
                    return child
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process within {within_s} s")


@pytest.mark.timeout(300)
def test_a_rank_frozen_mid_save_never_makes_latest_name_that_checkpoint(phantom_shards, tmp_path):
    """SIGSTOP rank 1 the moment its optimizer shard of step 4 appears (mid-write, as a rank
    stalled on a slow disk); rank 0 must not name step 4 complete. Kill the job; the rerun resumes
    from the newest complete checkpoint and finishes."""
    run_dir = tmp_path / "run"
    args = pretrain_args(phantom_shards, run_dir, *SMALL_RUN)
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain", *args]
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rank1 = rank_process(job.pid, 1, 60)
        shard = run_dir / "checkpoints" / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        deadline = time.monotonic() + 120
        while not shard.exists() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.001)
        rank1.send_signal(signal.SIGSTOP)
        assert shard.exists(), "the job never reached the step-4 save"
        time.sleep(5)  # rank 0 has long finished its own files by now
        ckpt_dir = run_dir / "checkpoints"
        assert (ckpt_dir / "latest").read_text() == "step_00000002"
        assert checkpoints.complete_tags(ckpt_dir) == ["step_00000002"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
        log.close()
    proc = deepspeed_module("pretrain", 2, pretrain_args(phantom_shards, run_dir, *SMALL_RUN), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "passing over the incomplete checkpoint(s) step_00000004" in proc.stderr
    assert "resumed from step 2" in proc.stderr
    assert checkpoints.latest_tag(run_dir / "checkpoints") == "step_00000004"
