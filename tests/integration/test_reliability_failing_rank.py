"""One failing rank ends the job in bounded time, naming the cause: a bad validation sample read
by rank 1 alone stops both ranks in seconds, not after the distributed timeout (600 s here); an
error in a data worker ends its process; a rank that fails ends its process group before Python's exit."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time

import pytest
from conftest import (
    DEEPSPEED,
    change_shard_padding,
    deepspeed_module,
    free_port,
    pretrain_args,
    run,
    with_first_record_changed,
)


def add_bad_val_shard(shards):
    """A second head val shard (dealt to rank 1 by round-robin) whose first record has scale [0, 0]."""
    manifest = json.loads((shards / "manifest.json").read_text())
    index, entry = next((i, s) for i, s in enumerate(manifest["shards"]) if s["dataset"] == "head" and s["split"] == "val")
    data, bad_key = with_first_record_changed(shards / entry["url"], {"scale": [0, 0]})
    (shards / "head-val-bad.tar").write_bytes(data)
    manifest["shards"].insert(index + 1, {**entry, "url": "head-val-bad.tar", "bytes": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest()})
    manifest["datasets"]["head"]["splits"]["val"] += entry["samples"]
    manifest["totals"]["inputs"] += entry["samples"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return bad_key


@pytest.mark.timeout(240)
def test_a_bad_validation_sample_on_one_rank_ends_the_job_in_seconds(phantom_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(phantom_shards, shards)
    bad_key = add_bad_val_shard(shards)
    started = time.monotonic()
    proc = deepspeed_module("medsapiens.pretrain", 2, pretrain_args(
        shards, tmp_path / "run", "data.datasets=[head]", "train.max_steps=2", "train.val_every=2",
        "train.checkpoint_every=2", "train.dist_timeout_s=600"), timeout=200)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert f"sample {bad_key} of {shards / 'head-val-bad.tar'}" in proc.stderr
    assert "scale must be two positive numbers" in proc.stderr
    assert elapsed < 150, f"took {elapsed:.0f} s"


@pytest.mark.timeout(200)
def test_an_error_in_a_data_worker_ends_the_process(phantom_shards, tmp_path):
    """A training shard changed since its build, caught in the data worker: one line naming it, exit 2,
    in seconds. The workers ignore SIGTERM (the rank checkpoints on it), so a rank that left them to
    Python's exit waited for them forever."""
    shards = tmp_path / "shards"
    shutil.copytree(phantom_shards, shards)
    change_shard_padding(shards, "head", "train")
    args = pretrain_args(shards, tmp_path / "run", "data.datasets=[head]", "train.max_steps=20")
    assert "data.workers=1" in args
    proc = run([sys.executable, "-m", "medsapiens.pretrain", *args], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the shard changed since it was built" in proc.stderr


STOP_SIGNALS_WHILE_WORKERS_START = """
import os, signal, sys, threading, time
from medsapiens.data.pipeline import DataConfig, TrainStream, train_batches
from medsapiens.io import manifest

received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))  # as the trainer's StopSignals
stream = TrainStream(manifest.load(sys.argv[1]), DataConfig(micro_batch=2, workers=0, shuffle_buffer=2), ["head"],
                     (96, 128), seed=0, rank=0)
done = threading.Event()

def scheduler():  # SIGTERM to the whole job, over and over, as the launcher and DeepSpeed send it
    while not done.is_set():
        os.killpg(0, signal.SIGTERM)
        time.sleep(0.002)

threading.Thread(target=scheduler, daemon=True).start()
steps = sum(1 for _ in train_batches(stream, 0, 16, segment_steps=1, grad_accum=1, workers=2))
done.set()
print(steps, "steps", len(received) > 0)
"""


@pytest.mark.timeout(120)
def test_stop_signals_while_data_workers_start_reach_the_rank_and_kill_no_worker(phantom_shards):
    """New workers start at every segment; a stop signal in a worker's first milliseconds, before it
    ignores them, used to kill it (torch's handler) and the rank with it, instead of a checkpoint."""
    proc = run([sys.executable, "-c", STOP_SIGNALS_WHILE_WORKERS_START, str(phantom_shards)], 100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["16", "steps", "True"]


RANK_FAILING_WHILE_GLOO_OWES_A_DECREF = """
import io, os, sys, time
import torch, torch.distributed as dist
from medsapiens import distributed
from medsapiens.errors import UserError, run_command


class HeldOutput(io.StringIO):
    # stderr, written out only once Python finalises: a write in between would give up the GIL.
    def __del__(self, write=os.write):
        write(2, self.getvalue().encode())


sys.stderr = HeldOutput()


def work():
    with distributed.distributed_job(60):
        if distributed.rank() == 0:
            time.sleep(0.3)  # rank 1's all-reduce ends once rank 0 joins it: after rank 1 dropped its handle
        sys.setswitchinterval(30)  # no thread takes the GIL from this one unless it gives it up
        total = torch.ones(4)
        handle = dist.all_reduce(total, async_op=True)
        del handle  # gloo's worker thread holds the last reference to the work and its tensor
        deadline = time.monotonic() + 1  # the all-reduce ends meanwhile: the worker waits for the GIL
        while time.monotonic() < deadline:
            pass
        raise UserError(f"rank {distributed.rank()} failed after an all-reduce")


sys.exit(run_command(work))
"""


@pytest.mark.timeout(120)
def test_a_failing_rank_ends_its_process_group_before_python_exits(tmp_path):
    """A rank that failed left its gloo process group to Python's exit. Gloo's worker thread drops
    a collective's tensors after the collective is done; one with a Python object needs the GIL,
    and a thread that gets it once Python is finalising is ended mid-destructor: `terminate called
    without an active exception`, SIGABRT, and the launcher exited 250, not 2 (a failed start, both
    ranks raising right after rank 0's broadcast, did so about once in six). Here rank 1 holds the
    GIL from the moment its worker asks for it to its exit, so without the group's teardown rank 1
    aborts every time; with it, the worker is done and joined first."""
    script = tmp_path / "failing_rank.py"
    script.write_text(RANK_FAILING_WHILE_GLOO_OWES_A_DECREF)
    proc = run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(script)], timeout=100)
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: rank 1 failed after an all-reduce" in proc.stderr
