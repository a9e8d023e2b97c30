"""Fine-tuning runs do what they say: a run directory named by the settings by default, a rerun resumes only
with the same settings, a short run's warm-up is shortened, and the saved config is the model that
trained."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import CLI, REPO, refused_here, run

from medsapiens.errors import EXIT_STOPPED
from medsapiens.model import bundle as bundlelib

SHORT = ("--steps", "6", "train.val_every=3", "train.checkpoint_every=3", "data.workers=0", "train.val_limit=4")


def finetune_cli(shards, bundle, *extra) -> list[str]:
    return ["finetune", "--bundle", str(bundle), "--shards", str(shards), "--dataset", "leg", *SHORT, *extra]


def finetune(shards, bundle, *extra, cwd: Path | None = None, env: dict | None = None):
    return run([*CLI, *finetune_cli(shards, bundle, *extra)], 240, env=env, **({"cwd": cwd} if cwd else {}))


@pytest.mark.timeout(600)
def test_the_readme_examples_run_one_after_another_in_one_directory(head_hand_bundle, phantom_shards, tmp_path):
    full = finetune(phantom_shards, head_hand_bundle, cwd=tmp_path)
    lora = finetune(phantom_shards, head_hand_bundle, "--lora", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    assert lora.returncode == 0, lora.stderr[-3000:]
    runs = sorted((tmp_path / "runs" / "finetune").iterdir())
    assert [r.name.rsplit("-", 1)[0] for r in runs] == ["leg-bundle", "leg-bundle-lora"]
    # 6 steps: the published 500-step warm-up, shortened to a fifth of the run
    assert "warm-up 2 steps from x0.001 (the published 500 shortened to a fifth of this 6-step run" in full.stderr
    for run_dir, proc in zip(runs, (full, lora), strict=True):
        assert f"run directory: runs/finetune/{run_dir.name}" in proc.stderr
        assert f"report (test): runs/finetune/{run_dir.name}/eval/test/report.md" in proc.stdout
        assert (run_dir / "eval" / "test" / "report.md").is_file()
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        trained = json.loads((run_dir / "run.json").read_text())
        assert saved["model"]["arch"] == "sapiens_tiny" == bundlelib.read_config(run_dir / "bundle").model.arch
        assert saved["model"]["img_size"] == [128, 96] and saved["optim"]["warmup_steps"] == 2
        assert trained["origin"]["init"] == "bundle"


@pytest.mark.timeout(600)
def test_a_stop_signal_in_the_last_step_waits_for_the_same_command_which_finds_its_run(head_hand_bundle,
                                                                                      phantom_shards, tmp_path):
    """No --run-dir: the default directory is named by the settings that train, so the rerun a stop asks for
    resumes there; a signal during the last step stops the job before the export (a scheduler's kill would
    cut that short)."""
    preempted = {"PYTHONPATH": str(REPO / "tests" / "fault_site"), "MEDSAPIENS_FAULT_RANK": "0",
                 "MEDSAPIENS_FAULT_SIGTERM_AT_BACKWARD": "6"}
    stopped = finetune(phantom_shards, head_hand_bundle, cwd=tmp_path, env=preempted)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    [run_dir] = (tmp_path / "runs" / "finetune").iterdir()
    assert (f"stopped after step 6, the schedule's last, by a stop signal; checkpoint step_00000006 in "
            f"runs/finetune/{run_dir.name}/checkpoints is complete; rerun the same command to go on") in stopped.stderr
    assert not (run_dir / "bundle").exists() and not (run_dir / "eval").exists()
    again = finetune(phantom_shards, head_hand_bundle, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs" / "finetune").iterdir()] == [run_dir.name]
    assert "resumed from step 6" in again.stderr and "finished at step 6 already" in again.stderr
    assert (run_dir / "eval" / "test" / "report.md").is_file()


@pytest.mark.timeout(600)
def test_a_rerun_resumes_only_with_the_same_settings(head_hand_bundle, phantom_shards, tmp_path, capsys):
    run_dir = tmp_path / "ft"
    first = finetune(phantom_shards, head_hand_bundle, "--run-dir", str(run_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    config = (run_dir / "config.yaml").read_text()

    refused_here(capsys, ["pretrain", "export", str(run_dir), "--out", str(tmp_path / "b")],
                 f"{run_dir} is a finetune run, not a pretraining run")
    refused_here(capsys, finetune_cli(phantom_shards, head_hand_bundle, "--run-dir", str(run_dir), "optim.lr=1e-2"),
                 f"{run_dir} holds a run with other settings (optim.lr: 0.0005 there, 0.01 now)")
    assert (run_dir / "config.yaml").read_text() == config

    alias = tmp_path / "the-same-bundle"
    alias.symlink_to(head_hand_bundle)  # the bundle named otherwise: its sha256 is the run's
    same = finetune(phantom_shards, alias, "--run-dir", str(run_dir), "train.log_every=2",
                    "calibration_coverage=0", "flip_test=false")
    assert same.returncode == 0, same.stderr[-3000:]
    assert "resumed from step 6" in same.stderr  # neither log_every nor what is evaluated after changes what trains
    assert "calibration skipped" in first.stderr and "calibration skipped" not in same.stderr
    assert ("finished at step 6 already: nothing to train (a longer schedule is another run: start it in another "
            "run directory, or with --resume none); no validation in this run") in same.stderr
    config = (run_dir / "config.yaml").read_text()

    afresh = finetune(phantom_shards, head_hand_bundle, "--run-dir", str(run_dir), "--resume", "none", "optim.lr=1e-2")
    assert afresh.returncode == 0, afresh.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("ft.replaced-")]
    assert len(aside) == 1 and (aside[0] / "config.yaml").read_text() == config  # the earlier run, kept whole
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.01
    assert "resumed" not in afresh.stderr


@pytest.mark.timeout(600)
def test_a_resume_keeps_its_few_shot_draw_and_a_val_split_nobody_has_is_refused(head_hand_bundle, phantom_shards,
                                                                                tmp_path, capsys):
    run_dir = tmp_path / "ft"
    first = finetune(phantom_shards, head_hand_bundle, "--run-dir", str(run_dir), "--shots", "3", "--seed", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    kept = {name: (run_dir / name).read_bytes() for name in ("subset/subset.json", "subset/manifest.json", "run.json")}
    info = json.loads(kept["run.json"])  # what a resume holds the bundle to
    weights = hashlib.sha256((head_hand_bundle / bundlelib.WEIGHTS).read_bytes()).hexdigest()
    assert info["start_sha256"] == info["origin"]["bundle_sha256"] == weights
    refused_here(capsys, finetune_cli(phantom_shards, head_hand_bundle, "--run-dir", str(run_dir), "--shots", "4",
                                      "--seed", "2"),
                 f"{run_dir} holds a run on 3 images drawn with seed 1 from shards sha256 ",
                 "this run asks for 4 with seed 2 from ")
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept  # refused before anything was rewritten

    refused_here(capsys, finetune_cli(phantom_shards, head_hand_bundle, "--run-dir", str(tmp_path / "typo"),
                                      "data.val_split=vall"),
                 "error: data.val_split='vall' is a split of none of the datasets trained (leg: ")


@pytest.mark.timeout(120)
def test_a_model_key_contradicting_the_bundle_is_refused(head_hand_bundle, phantom_shards, tmp_path, capsys):
    stderr = refused_here(capsys, finetune_cli(phantom_shards, head_hand_bundle, "--run-dir", str(tmp_path / "ft"),
                                               "model.arch=sapiens_0.3b", "model.img_size=[256,192]",
                                               "model.grad_checkpointing=true", "model.checkpoint=/w/sapiens.pth"),
                          "model.arch='sapiens_0.3b' (the bundle's: 'sapiens_tiny')",
                          "model.img_size=[256, 192] (the bundle's: [128, 96])")
    assert "grad_checkpointing" not in stderr and "sapiens.pth" not in stderr  # neither contradicts
    assert not (tmp_path / "ft").exists()
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / bundlelib.CONFIG).write_bytes((head_hand_bundle / bundlelib.CONFIG).read_bytes())
    refused_here(capsys, finetune_cli(phantom_shards, weightless), f"{weightless} is not a bundle: no model.safetensors")


@pytest.mark.timeout(600)
def test_a_resume_whose_recorded_best_is_gone_chooses_the_best_again(head_hand_bundle, phantom_shards, tmp_path):
    """A resume that fell back past a removed newest checkpoint reads an older record, whose best that removed
    save may have pruned for its own: the best is chosen again, and the export never names a deleted tag."""
    run_dir = tmp_path / "ft"
    preempted = {"PYTHONPATH": str(REPO / "tests" / "fault_site"), "MEDSAPIENS_FAULT_RANK": "0",
                 "MEDSAPIENS_FAULT_SIGTERM_AT_BACKWARD": "4"}
    stopped = finetune(phantom_shards, head_hand_bundle, "--run-dir", str(run_dir), env=preempted)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    ckpt_dir = run_dir / "checkpoints"
    assert json.loads((run_dir / "best.json").read_text())["tag"] == "step_00000003"  # step 4's record names it
    shutil.rmtree(ckpt_dir / "step_00000003")  # as the prune for a newer best whose save was then torn
    again = finetune(phantom_shards, head_hand_bundle, "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 4" in again.stderr
    assert ("the best validation checkpoint it records, step_00000003, is gone: the best is chosen again from the "
            "validations to come") in again.stderr
    assert json.loads((run_dir / "best.json").read_text())["tag"] == "step_00000006"
    assert bundlelib.read_config(run_dir / "bundle").provenance["checkpoint"] == "step_00000006"
