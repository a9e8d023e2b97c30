"""A run directory is not code: a pickle payload in a DeepSpeed checkpoint file never runs on
`pretrain export`, on a resume, or on fine-tuning with that run directory; export and resume stop
with one line naming the checkpoint and what the file asked to import, a fine-tuning there is
refused by its settings before reading anything."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import CLI, REPO, SMALL_RUN, deepspeed_module, pretrain_args, run

from medsapiens.training import checkpoints


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def poisoned(two_rank_run, tmp_path_factory):
    """A copy of a real run whose model-state files carry a payload; complete.json lists the new
    sizes, as a careful attacker would write it."""
    root = tmp_path_factory.mktemp("poisoned")
    run_dir, marker = root / "run", root / "payload-ran"
    shutil.copytree(two_rank_run, run_dir)
    for tag_dir in (run_dir / "checkpoints").glob("step_*"):
        path = tag_dir / "mp_rank_00_model_states.pt"
        with checkpoints.weights_only_loading(path):  # DeepSpeed's own state types, nothing else
            state = torch.load(path, weights_only=True)
        state["extra"] = Payload(marker)
        torch.save(state, path)
        listed = json.loads((tag_dir / "complete.json").read_text())
        listed[path.name] = path.stat().st_size
        (tag_dir / "complete.json").write_text(json.dumps(listed))
    return run_dir, marker


def assert_refused(proc, marker):
    assert proc.returncode != 0
    assert not marker.exists(), "the payload ran"
    assert "refused to load" in proc.stderr and "posix.system" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "step_00000004" in proc.stderr  # names the checkpoint


@pytest.mark.timeout(120)
def test_export_refuses_the_payload(poisoned, tmp_path):
    run_dir, marker = poisoned
    proc = run([*CLI, "pretrain", "export", str(run_dir), "--out", str(tmp_path / "bundle")], 100)
    assert_refused(proc, marker)
    assert not (tmp_path / "bundle").exists()


@pytest.mark.timeout(120)
def test_resume_refuses_the_payload(poisoned, phantom_shards):
    run_dir, marker = poisoned
    proc = deepspeed_module("medsapiens.pretrain", 2, pretrain_args(phantom_shards, run_dir, *SMALL_RUN), timeout=100)
    assert_refused(proc, marker)  # on as many ranks as saved it, else refused for that before any file is read


@pytest.mark.timeout(120)
def test_finetune_with_that_run_dir_refuses_the_payload(poisoned, phantom_shards):
    run_dir, marker = poisoned
    proc = run([*CLI, "finetune", "--config", str(REPO / "launch/experiments/demo_finetune.yaml"),
                "--shards", str(phantom_shards), "--run-dir", str(run_dir), "--dataset", "head", "--init", "scratch",
                "model.trunk_width=32", "data.workers=0", "train.max_steps=6", "train.checkpoint_every=2",
                "train.val_every=2"], 100)
    assert proc.returncode != 0 and not marker.exists(), "the payload ran"
    # another stage's run: refused by its settings, before any of its files is read
    assert f"{run_dir} holds a run with other settings" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_the_types_deepspeed_stores_still_load(two_rank_run):
    """The allow-list is enough for every file DeepSpeed wrote (model states and each rank's optimizer)."""
    from medsapiens.training.checkpoints import weights_only_loading

    files = sorted((two_rank_run / "checkpoints" / "step_00000004").glob("*.pt"))
    assert len(files) == 3
    with weights_only_loading("test"):
        for path in files:
            assert isinstance(torch.load(path, weights_only=False), dict)  # forced to weights_only


@pytest.mark.timeout(60)
def test_a_payload_given_as_model_checkpoint_never_runs(tmp_path):
    """User-supplied weights (`model.checkpoint`, `model convert`, `finetune --init sapiens`) are read
    with weights_only=True, else, as an mmengine checkpoint's extra objects need, by the restricted
    unpickler: the weights load, the payload stays an inert placeholder."""
    from medsapiens.model.weights import read_tensors

    marker = tmp_path / "payload-ran"
    path = tmp_path / "sapiens.pth"
    torch.save({"state_dict": {"x": torch.ones(1)}, "extra": Payload(marker)}, path)
    tensors, _ = read_tensors(path)
    assert list(tensors) == ["x"] and tensors["x"].item() == 1.0
    assert not marker.exists()
