"""Bad numbers in a config are refused before any rank starts, in one line naming the key:
by `medsapiens launch --dry-run` (the same check runs again in each stage's preflight)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DEMO_CONFIG, REPO

from medsapiens.finetune.train import MIXTURE_KEYS
from medsapiens.launch.cli import main

FINETUNE_DEMO = REPO / "launch/experiments/demo_finetune.yaml"


@pytest.fixture(scope="module")
def finetune_config(tmp_path_factory):
    """The demo's fine-tuning config with what `medsapiens demo` adds as flags (the dataset, the bundle)."""
    path = tmp_path_factory.mktemp("config") / "finetune.yaml"
    path.write_text(FINETUNE_DEMO.read_text() + "dataset: leg\nbundle: runs/demo/bundle\n")
    return path

BAD = [
    ("optim.lr=-0.001", "optim.lr must be a positive number, got -0.001"),
    ("optim.lr=0", "optim.lr must be a positive number, got 0"),
    ("optim.lr=.nan", "optim.lr: expected a finite number, got nan"),
    ("train.epochs=.inf", "train.epochs: expected a finite number, got inf"),
    ("train.epochs=0", "give train.epochs > 0 or train.max_steps >= 1"),  # the file's max_steps replaced, as ranks read it
    ("train.max_steps=-5", "train.max_steps must be at least 0, got -5"),
    ("train.max_steps=0", "give train.epochs > 0 or train.max_steps >= 1"),
    ("data.micro_batch=0", "must be at least 1, got 0"),  # finetune names its flag --batch-size too
    ("train.grad_accum=0", "train.grad_accum must be at least 1, got 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be at least 1, got 0"),
    ("train.log_every=0", "train.log_every must be at least 1, got 0"),
    ("model.img_size=[130, 96]", "image size 130x96 must be positive multiples of 16"),
    ("model.img_size=[0, 96]", "image size 0x96 must be positive multiples of 16"),
    ("optim.schedule=linear", "optim.schedule must be one of step, cosine, constant"),
    ("data.sigma=-1", "data.sigma must be a positive number"),
    ("train.seed=-1", "train.seed must be a seed from 0 to 4294967295, got -1"),
    ("train.seed=1e20", "train.seed must be a seed from 0 to 4294967295, got 100000000000000000000"),
    ("data.temperature=0", "data.temperature must be a positive number"),
    ("data.weights={head: -1}", "data.weights must be non-negative numbers, not all 0"),
    ("data.datasets=[head, head]", "data.datasets lists ['head'] more than once"),
    ("lora.qkv_rank=0", "lora.qkv_rank must be at least 1, got 0"),
    ("lora.dropout=1.5", "lora.dropout must be in [0, 1), got 1.5"),
    ("data.augment.scale_range=[0, 0]", "data.augment.scale_range must be [low, high] with 0 < low <= high"),
    ("data.augment.flip_prob=5", "data.augment.flip_prob is a probability, in [0, 1]"),
    ("data.augment.margin=0.5", "data.augment.margin must be a number from 1 to 4, got 0.5"),
    ("optim.milestones=[170, 200]", "optim.milestones are fractions of the run, ascending in (0, 1]"),
    ("train.val_limit=-1", "train.val_limit must be at least 0, got -1"),
    ("train.val_panels=-1", "train.val_panels must be at least 0, got -1"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s must be at least 1, got 0"),
    ("run_dir=.", "run_dir must name a folder of the run's own, not the current folder or one above it; got '.'"),
    ("run_dir=..", "not the current folder or one above it; got '..'"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_number_refused_by_dry_run(capsys, finetune_config, stage, override, message):
    config = DEMO_CONFIG if stage == "pretrain" else finetune_config
    status = main(["launch", stage, "--config", str(config), "--dry-run", override])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    key = override.partition("=")[0]
    assert err.count("\n") == 1 and err.startswith(f"error: override {key}: ")  # not the file
    if stage == "finetune" and key.removeprefix("data.") in MIXTURE_KEYS:
        message = f"{key}: pretraining's mixture of datasets, which fine-tuning does not read"
    assert message in err


@pytest.mark.timeout(60)
def test_an_empty_run_dir_is_refused_by_pretraining_and_chosen_by_fine_tuning(capsys, finetune_config):
    """Pretraining would write into the current folder; fine-tuning chooses runs/finetune/<...>."""
    assert main(["launch", "pretrain", "--config", str(DEMO_CONFIG), "--dry-run", "run_dir="]) == 2
    assert "run_dir must name a folder of the run's own, not the current folder or one above it; got ''" in \
        capsys.readouterr().err
    assert main(["launch", "pretrain", "--config", str(DEMO_CONFIG), "--dry-run", f"run_dir={Path.cwd()}"]) == 2
    assert main(["launch", "finetune", "--config", str(finetune_config), "--dry-run", "run_dir="]) == 0


@pytest.mark.timeout(60)
def test_launch_finetune_checks_the_stage_before_any_rank_starts(capsys):
    """What a fine-tuning rank would refuse at once (no dataset, no bundle) is refused by the launcher,
    naming the config key, as launch takes no --dataset flag."""
    assert main(["launch", "finetune", "--config", str(FINETUNE_DEMO), "--gpus", "2"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {FINETUNE_DEMO}: no dataset given (the key dataset=ID; "
                                               "`medsapiens finetune` also takes --dataset ID)")
    assert main(["launch", "finetune", "--config", str(FINETUNE_DEMO), "--dry-run", "dataset=leg"]) == 2
    assert capsys.readouterr().err.strip() == ("error: init 'bundle' needs a bundle (the key bundle=DIR; `medsapiens "
                                               "finetune` also takes --bundle DIR)")


@pytest.mark.timeout(60)
def test_an_override_the_run_would_not_read_is_refused_by_dry_run(capsys):
    """The demo trains on a cosine schedule: milestones given there would change nothing."""
    assert main(["launch", "pretrain", "--config", str(DEMO_CONFIG), "--dry-run", "optim.milestones=[0.5, 0.9]"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("error: override optim.milestones: optim.milestones is read only with optim.schedule=step, "
                                 "and this run has optim.schedule=cosine: leave it out, or set optim.schedule=step\n")


@pytest.mark.timeout(60)
def test_max_steps_zero_is_fine_with_epochs(capsys):
    status = main(["launch", "pretrain", "--config", str(DEMO_CONFIG), "--dry-run", "train.max_steps=0",
                   "train.epochs=2"])
    assert status == 0, capsys.readouterr().err
