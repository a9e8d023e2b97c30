"""Protocols a paper's numbers depend on: no selection on a test split, the published schedule."""
from __future__ import annotations

import sys

import pytest
from conftest import CLI, DEMO_CONFIG, REPO, run

from medsapiens import config as configlib
from medsapiens.training.engine import OptimConfig, TrainConfig, lr_factor, resolve_warmup
from medsapiens.training.run import schedule_text, scheduled

EXPERIMENTS = REPO / "launch" / "experiments"


@pytest.mark.parametrize("images, batch, steps_per_epoch, warmup_steps",
                         [(130, 8, 17, 500), (195, 8, 25, 500), (5, 8, 1, 42), (550, 8, 69, 500)])
def test_published_schedule_in_steps(images, batch, steps_per_epoch, warmup_steps):
    """210 epochs, x0.1 at epochs 170 and 200, 500 warm-up steps (a fifth of a run shorter than 2500)."""
    train, text = scheduled(TrainConfig(epochs=210.0, max_steps=0), images, batch)
    assert train.max_steps == 210 * steps_per_epoch
    optim, _ = resolve_warmup(OptimConfig(), train.max_steps)
    assert optim.warmup_steps == warmup_steps
    factors = [lr_factor(step, optim, train.max_steps) for step in range(train.max_steps)]
    # mmengine's LinearLR(begin=0, end=W): total_iters = W - 1, so its last step, W - 1, is at the base lr
    warmup = [optim.warmup_factor + (1 - optim.warmup_factor) * min(1.0, s / (optim.warmup_steps - 1))
              for s in range(train.max_steps)]
    decay = [f / w for f, w in zip(factors, warmup, strict=True)]  # the step decay, even inside the warm-up
    assert decay.index(pytest.approx(0.1)) == 170 * steps_per_epoch
    assert decay.index(pytest.approx(0.01)) == 200 * steps_per_epoch and decay[-1] == pytest.approx(0.01)
    assert factors[0] == pytest.approx(0.001) and factors[1] == pytest.approx(0.001 + 0.999 / (warmup_steps - 1))
    assert factors[warmup_steps - 1] == 1.0 > factors[warmup_steps - 2]  # mmengine's last warm-up step: the base lr
    described = schedule_text(optim, text, train.max_steps)
    assert f"{images} training images / global batch {batch}" in described
    assert f"lr x0.1 after steps {170 * steps_per_epoch}, {200 * steps_per_epoch}" in described
    assert "never applied" not in described


def test_a_short_run_shortens_an_unset_warmup_and_says_so():
    optim, note = resolve_warmup(OptimConfig(), 20)
    assert optim.warmup_steps == 4 and "the published 500 shortened to a fifth of this 20-step run" in note
    text = schedule_text(optim, "20 steps (global batch 8)", 20, note)
    assert "warm-up 4 steps from x0.001 (the published 500 shortened" in text
    assert "lr x0.1 after steps 17, 20 (1 of them at the run's last step or later: never applied)" in text
    assert lr_factor(4, optim, 20) == 1.0  # the lr is reached before the first drop
    assert lr_factor(16, optim, 20) == 1.0 and lr_factor(17, optim, 20) == 0.1 == lr_factor(19, optim, 20)


def test_an_explicit_warmup_wins_with_a_warning_past_the_first_drop():
    assert resolve_warmup(OptimConfig(warmup_steps=3), 20) == (OptimConfig(warmup_steps=3), "")
    optim, note = resolve_warmup(OptimConfig(warmup_steps=500), 20)
    assert optim.warmup_steps == 500 and "warning: optim.warmup_steps reaches the first lr drop at step 17" in note
    cosine = OptimConfig(warmup_steps=21, schedule="cosine")  # the base lr at step 20, past a 20-step run
    assert resolve_warmup(cosine, 20)[1] == " (warning: optim.warmup_steps outlasts the 20-step run: the lr never reaches its base)"
    assert resolve_warmup(cosine, 21)[1] == "" and lr_factor(20, cosine, 21) == 1.0


def test_a_fraction_of_a_run_is_the_step_it_means_not_the_next():
    """0.14 epochs x 50 steps, or a milestone of 0.14 in a 50-step run, is 7 steps, not the 8 that floating
    point's 7.000000000000001 rounds up to: a short schedule trains and drops the lr where the config says."""
    train, text = scheduled(TrainConfig(epochs=0.14, max_steps=0), 400, 8)
    assert train.max_steps == 7 and text.endswith("= 7 steps")
    optim = OptimConfig(warmup_steps=1, milestones=(0.14, 1.0))
    assert [lr_factor(step, optim, 50) for step in (6, 7)] == [1.0, pytest.approx(0.1)]
    assert "lr x0.1 after steps 7, 50" in schedule_text(optim, "50 steps", 50)


def test_max_steps_stay_when_no_epochs_are_given():
    train, text = scheduled(TrainConfig(max_steps=77), 130, 8)
    assert train.max_steps == 77 and text == "77 steps (global batch 8)"


def test_shipped_finetune_config_is_the_published_schedule():
    from medsapiens.finetune.config import FinetuneConfig

    for cfg in (FinetuneConfig(), configlib.load(FinetuneConfig, EXPERIMENTS / "medsapiens_0.3b_finetune.yaml")):
        assert cfg.train.epochs == 210 and cfg.optim.schedule == "step"
        assert resolve_warmup(cfg.optim, 210 * 17)[0].warmup_steps == 500  # ISBI's head: 17 steps an epoch
        assert [round(m * 210) for m in cfg.optim.milestones] == [170, 200] and cfg.flip_test


@pytest.mark.timeout(120)
@pytest.mark.parametrize("split", ["test", "test1"])
def test_a_config_asking_to_validate_on_a_test_split_is_refused(phantom_shards, tmp_path, split):
    pretrain = run([sys.executable, "-m", "medsapiens.pretrain", "--config", str(DEMO_CONFIG), f"data.shards={phantom_shards}",
                    f"run_dir={tmp_path / 'p'}", f"data.val_split={split}"], 90)
    finetune = run([*CLI, "finetune", "--config", str(EXPERIMENTS / "demo_finetune.yaml"), "--shards", str(phantom_shards),
                    "--dataset", "head", "--init", "scratch", "--run-dir", str(tmp_path / "f"), f"data.val_split={split}"], 90)
    for proc in (pretrain, finetune):
        assert proc.returncode != 0
        assert f"data.val_split={split!r} is a test split" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p" / "checkpoints").exists() and not (tmp_path / "f").exists()
