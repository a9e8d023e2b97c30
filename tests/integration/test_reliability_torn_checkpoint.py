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
import sys
import time

import pytest
from conftest import DEEPSPEED, REPO, SMALL_RUN, deepspeed_module, free_port, losses, pretrain_args, run

from medsapiens.training import checkpoints


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
def test_each_rank_checks_the_files_of_the_chosen_checkpoint_it_loads(tmp_path):
    """Rank 0 chooses the checkpoint; a rank that cannot read its share of it says which file and why."""
    files = {"mp_rank_00_model_states.pt": b"x" * 10, "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"y" * 20,
             "zero_pp_rank_1_mp_rank_00_optim_states.pt": b"z" * 20}
    tag_dir = fake_tag(tmp_path, 2, files)
    assert [checkpoints.unloadable(tmp_path, "step_00000002", rank) for rank in (0, 1)] == [None, None]
    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"z" * 5)  # an older copy on rank 1's host
    assert checkpoints.unloadable(tmp_path, "step_00000002", 0) is None  # rank 0 never reads rank 1's partition
    assert checkpoints.unloadable(tmp_path, "step_00000002", 1) == \
        "zero_pp_rank_1_mp_rank_00_optim_states.pt missing or of another size"
    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"z" * 20)
    listing = os.listdir
    with pytest.MonkeyPatch.context() as stale:  # the folder listed from a stale cache, as DeepSpeed lists it
        stale.setattr(checkpoints.os, "listdir", lambda path: [n for n in listing(path) if "model_states" not in n])
        assert checkpoints.unloadable(tmp_path, "step_00000002", 1) == \
            "mp_rank_00_model_states.pt not in its listing of the folder (a stale cache?)"
    (tag_dir / "complete.json").write_text("{not json")
    assert checkpoints.unloadable(tmp_path, "step_00000002", 0).startswith("complete.json unreadable: ")
    assert checkpoints.unloadable(tmp_path, "step_00000004_universal", 0) == "no such folder"


@pytest.mark.timeout(30)
def test_pruning_drops_torn_tags_no_rank_will_finish_and_keeps_the_best(tmp_path):
    files = {"mp_rank_00_model_states.pt": b"x" * 10}
    for step, complete in ((2, True), (4, False), (6, True), (8, True), (10, False)):
        fake_tag(tmp_path, step, files, complete)
    checkpoints.prune(tmp_path, 8, keep_last=1, keep={"step_00000002"})
    # step 4: torn by a killed job, older than the save that just completed; step 10: newer, may still be written
    assert checkpoints.tags(tmp_path) == ["step_00000002", "step_00000008", "step_00000010"]


@pytest.mark.timeout(30)
def test_a_garbled_record_is_not_complete(tmp_path):
    tag_dir = fake_tag(tmp_path, 2, {"a.pt": b"1"})
    for text in ("", "[1, 2]", "{not json", "{}"):
        (tag_dir / "complete.json").write_text(text)
        assert checkpoints.complete_tags(tmp_path) == []


@pytest.mark.timeout(30)
def test_a_record_that_cannot_be_read_deletes_nothing(tmp_path, monkeypatch):
    """An I/O error reading `complete.json` (a flaky network file system) says nothing about the
    checkpoint: it is an error naming the tag, not an incomplete tag to delete."""
    import errno
    from pathlib import Path

    tag_dir = fake_tag(tmp_path, 2, {"a.pt": b"1"})
    read_text = Path.read_text

    def failing(path, *args, **kwargs):
        if path.name == "complete.json":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", failing)
    with pytest.raises(checkpoints.CheckpointError, match="cannot tell whether it is complete"):
        checkpoints.remove_incomplete(tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match="step_00000002"):
        checkpoints.prune(tmp_path, 4, keep_last=1)
    assert tag_dir.is_dir() and (tag_dir / "a.pt").is_file()


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
    proc = deepspeed_module("medsapiens.pretrain", 2, pretrain_args(phantom_shards, run_dir, *SMALL_RUN), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removed the incomplete checkpoint(s) step_00000004" in proc.stderr
    assert "resumed from step 2" in proc.stderr
    redone, original = losses(run_dir), losses(two_rank_run)
    for step in (3, 4):
        assert redone[step] == pytest.approx(original[step], rel=1e-5, abs=1e-7), step
    assert checkpoints.latest_tag(run_dir / "checkpoints") == "step_00000004"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"


def with_fault(kind: str, step: int, rank: int = 1) -> dict:
    """Environment for a job whose `rank` meets `kind` (tests/fault_site) when saving its step's optimizer shard."""
    return {"PYTHONPATH": str(REPO / "tests" / "fault_site"), "MEDSAPIENS_FAULT": kind, "MEDSAPIENS_FAULT_RANK": str(rank),
            "MEDSAPIENS_FAULT_FILE": f"{checkpoints.checkpoint_tag(step)}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"}


def stopped_rank(launcher_pid: int, rank: int, within_s: float):
    """The rank's process once it is stopped (by its fault), failing after `within_s`."""
    import psutil

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if f"--local_rank={rank}" in child.cmdline() and child.status() == psutil.STATUS_STOPPED:
                    return child
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} was not stopped within {within_s} s")


@pytest.mark.timeout(300)
def test_a_rank_frozen_mid_save_never_makes_latest_name_that_checkpoint(phantom_shards, tmp_path):
    """Rank 1 stops (SIGSTOP) with two thirds of its step-4 optimizer shard written, as a rank
    stalled on a slow disk; rank 0 must not name step 4 complete. Kill the job; the rerun resumes
    from the newest complete checkpoint and finishes."""
    run_dir = tmp_path / "run"
    args = pretrain_args(phantom_shards, run_dir, *SMALL_RUN)
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "medsapiens.pretrain", *args]
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                           env={**os.environ, **with_fault("freeze", 4)})
    try:
        stopped_rank(job.pid, 1, 180)
        time.sleep(5)  # rank 0 has long finished its own files by now
        ckpt_dir = run_dir / "checkpoints"
        assert (ckpt_dir / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
        assert (ckpt_dir / "latest").read_text() == "step_00000002"
        assert checkpoints.complete_tags(ckpt_dir) == ["step_00000002"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
        log.close()
    proc = deepspeed_module("medsapiens.pretrain", 2, pretrain_args(phantom_shards, run_dir, *SMALL_RUN), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removed the incomplete checkpoint(s) step_00000004" in proc.stderr
    assert "resumed from step 2" in proc.stderr
    assert checkpoints.latest_tag(run_dir / "checkpoints") == "step_00000004"


@pytest.mark.timeout(300)
def test_a_rank_killed_ends_the_job_in_seconds_and_the_rerun_resumes_with_the_same_losses(two_rank_run, phantom_shards,
                                                                                          tmp_path):
    """SIGKILL rank 1 as it starts its step-4 save: the job ends within a minute, not after the
    distributed timeout (600 s here), and the rerun redoes steps 3-4 with the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    started = time.monotonic()
    killed = deepspeed_module("medsapiens.pretrain", 2, pretrain_args(phantom_shards, run_dir, *SMALL_RUN, "train.dist_timeout_s=600"),
                              timeout=240, env=with_fault("kill", 4))
    elapsed = time.monotonic() - started
    assert killed.returncode != 0 and elapsed < 120, (killed.returncode, elapsed)
    assert checkpoints.complete_tags(run_dir / "checkpoints") == ["step_00000002"]
    rerun = deepspeed_module("medsapiens.pretrain", 2, pretrain_args(phantom_shards, run_dir, *SMALL_RUN), timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step 2" in rerun.stderr
    redone, original = losses(run_dir), losses(two_rank_run)
    for step in (1, 2, 3, 4):
        assert redone[step] == pytest.approx(original[step], rel=1e-5, abs=1e-7), step


@pytest.mark.timeout(200)
def test_a_crash_with_data_workers_ends_the_process_without_a_launcher_to_kill_it(phantom_shards, tmp_path):
    """A crash (an error that is no user mistake) in one process started without a launcher, as on a
    single GPU: it exits with its traceback. The data workers ignore SIGTERM so that the rank can
    checkpoint on a stop signal; an exit that still waited on them would wait forever."""
    args = pretrain_args(phantom_shards, tmp_path / "run", *SMALL_RUN)
    assert "data.workers=1" in args
    proc = run([sys.executable, "-m", "medsapiens.pretrain", *args], timeout=120, env=with_fault("raise", 4, rank=0))
    assert proc.returncode == 1, proc.returncode
    assert "RuntimeError: simulated crash saving" in proc.stderr
    assert "stopped at step 4" in proc.stderr
