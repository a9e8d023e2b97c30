"""README "Reproducing the MedSapiens table": the same commands, with the shipped experiment
configs, on phantom shards with a tiny model (sapiens_tiny at 128x96, a few steps)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import CLI, REPO, free_port, run
from safetensors.torch import load_file

from medsapiens.io.shard_tar import file_digest
from medsapiens.model import get_arch, load_backbone

EXPERIMENTS = REPO / "launch" / "experiments"
DEPTH, C = 4, 192  # sapiens_tiny
LORA_PARAMS = DEPTH * ((4 * C + 3 * C * 4) + (8 * C + C * 8))  # qkv A (4, C) + B (3C, 4); proj A (8, C) + B (C, 8)


def tiny(shards, checkpoint, run_dir) -> list[str]:
    """What makes the published configs run in seconds here; everything else stays as shipped."""
    return [f"data.shards={shards}", f"run_dir={run_dir}", f"model.checkpoint={checkpoint}", "model.arch=sapiens_tiny",
            "model.img_size=[128,96]", "model.trunk_width=32", "data.workers=0", "train.epochs=3",
            "optim.warmup_steps=2", "train.val_limit=8", "train.dist_timeout_s=120"]


def launch(stage: str, config: str, gpus: int, overrides: list[str]):
    return run([*CLI, "launch", stage, "--config", str(EXPERIMENTS / config), "--gpus", str(gpus),
                "--master-port", str(free_port()), *overrides], 300)


@pytest.fixture(scope="module")
def sapiens_tiny(tmp_path_factory):
    from sapiens_checkpoints import released_state

    path = tmp_path_factory.mktemp("weights") / "sapiens_tiny_epoch_1_clean.pth"
    torch.save(released_state(get_arch("sapiens_tiny")), path)
    return path


@pytest.fixture(scope="module")
def medsapiens_stage(phantom_shards, sapiens_tiny, tmp_path_factory):
    """The multi-dataset LoRA stage through the launcher on 2 ranks, exported to a bundle."""
    root = tmp_path_factory.mktemp("medsapiens")
    proc = launch("pretrain", "medsapiens_0.3b_lora.yaml", 2, tiny(phantom_shards, sapiens_tiny, root / "pretrain"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = run([*CLI, "pretrain", "export", str(root / "pretrain"), "--out", str(root / "bundle")], 120)
    assert export.returncode == 0, export.stderr[-3000:]
    return root, proc


@pytest.mark.timeout(400)
def test_multi_dataset_lora_stage_trains_only_adapters_and_decoder(medsapiens_stage, sapiens_tiny):
    root, proc = medsapiens_stage
    info = json.loads((root / "pretrain" / "run.json").read_text())
    decoder = sum(v.numel() for k, v in load_file(str(root / "bundle" / "model.safetensors")).items()
                  if k.startswith("decoder."))
    assert info["lora"] is True and info["trainable_parameters"] == LORA_PARAMS + decoder
    assert info["selection"]["split"] is None  # pretraining selects nothing: the last checkpoint is exported
    assert "schedule: 3 epochs x" in proc.stderr and "(LoRA + decoder)" in proc.stderr
    # the bundle holds the merged backbone: every weight but the adapted ones is the released one
    start = {f"backbone.{k}": v for k, v in load_backbone("sapiens_tiny", str(sapiens_tiny), (128, 96)).state_dict().items()}
    after = load_file(str(root / "bundle" / "model.safetensors"))
    adapted = [k for k in start if k.endswith(("attn.qkv.weight", "attn.proj.weight"))]
    assert len(adapted) == 2 * DEPTH
    assert all(torch.equal(start[k], after[k]) for k in start if k not in adapted)
    assert all(not torch.equal(start[k], after[k]) for k in adapted)
    # adapters at the base lr, as MedSapiens (its layer decay never reaches them): the decoder's lr
    rows = [json.loads(line) for line in (root / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "lr/lora" in r]
    assert logged and all(r["lr/lora"] == r["lr/decoder"] for r in logged) and "lr/backbone" not in logged[0]


@pytest.mark.timeout(600)
def test_the_rows_of_the_medsapiens_table(medsapiens_stage, phantom_shards, sapiens_tiny, tmp_path):
    root, _ = medsapiens_stage
    bundle = root / "bundle"
    # "MedSapiens": the multi-dataset model on each dataset's test split, as is
    out = tmp_path / "medsapiens" / "leg"
    proc = run([*CLI, "evaluate", "--bundle", str(bundle), "--shards", str(phantom_shards), "--dataset", "leg",
                "--split", "test", "--out", str(out)], 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["flip_test"] is True and report["evaluated_on"] == "test"
    assert report["selected_on"]["stage"] == "pretrain" and report["selected_on"]["split"] is None

    # "MedSapiens + LoRA": per-dataset LoRA fine-tuning from that bundle, the head started afresh
    run_dir = tmp_path / "medsapiens_lora" / "leg"
    proc = launch("finetune", "medsapiens_0.3b_finetune.yaml", 1,
                  [*tiny(phantom_shards, sapiens_tiny, run_dir), "dataset=leg", f"bundle={bundle}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["origin"]["init"] == "bundle" and info["origin"]["reused_head"] is False
    assert info["selection"]["split"] == "val" and info["lora"] is True
    report = json.loads((run_dir / "eval" / "test" / "report.json").read_text())
    assert report["selected_on"]["split"] == "val" and report["evaluated_on"] == "test" and report["flip_test"]
    assert "checkpoint selected on the 'val' split" in (run_dir / "eval" / "test" / "report.md").read_text()
    trained = load_file(str(run_dir / "bundle" / "model.safetensors"))
    pretrained = load_file(str(bundle / "model.safetensors"))
    assert not torch.equal(trained["decoder.heads.leg.weight"], pretrained["decoder.heads.leg.weight"])

    # "Sapiens-0.3B + LoRA": the same fine-tuning from the released backbone, no multi-dataset stage
    run_dir = tmp_path / "sapiens_lora" / "leg"
    proc = launch("finetune", "medsapiens_0.3b_finetune.yaml", 1,
                  [*tiny(phantom_shards, sapiens_tiny, run_dir), "dataset=leg", "init=sapiens"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["origin"] == {"init": "sapiens", "checkpoint": str(sapiens_tiny),
                              "checkpoint_sha256": file_digest(sapiens_tiny)[0]} and info["lora"] is True
    assert json.loads((run_dir / "eval" / "test" / "report.json").read_text())["images"] > 0
