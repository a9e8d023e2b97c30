"""A rerun continues a run only as that run: its settings, its shards; a fresh start over an attempt
that left no checkpoint logs each step once."""
import json
from dataclasses import replace

import pytest
from conftest import DEMO_CONFIG

from medsapiens import config as configlib
from medsapiens import distributed
from medsapiens.errors import InputError
from medsapiens.finetune.config import FinetuneConfig
from medsapiens.finetune.train import default_run_dir
from medsapiens.model import bundle as bundlelib
from medsapiens.pretrain.config import PretrainConfig
from medsapiens.training.checkpoints import CheckpointError
from medsapiens.training.run import check_same_run, settled_resume
from medsapiens.training.telemetry import Telemetry
from medsapiens.training.trainer import RESOLVED_CONFIG, RESOLVED_DEEPSPEED, RUN_INFO

DIGEST = "a" * 64


@pytest.fixture
def saved_run(tmp_path):
    cfg = configlib.load(PretrainConfig, DEMO_CONFIG, [f"run_dir={tmp_path}"])
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    configlib.save(cfg, tmp_path / RESOLVED_CONFIG)
    (tmp_path / RUN_INFO).write_text(json.dumps({"manifest": {"sha256": DIGEST}}))
    return tmp_path, cfg


def test_a_universal_resume_may_change_only_the_per_rank_batch(saved_run):
    run_dir, cfg = saved_run
    check_same_run(run_dir, replace(cfg, data=replace(cfg.data, micro_batch=2)), "universal", DIGEST)
    with pytest.raises(InputError, match=r"optim.lr: 0.001 there, 0.05 now\): rerun with its settings to resume it "
                                         r"\(resuming on another number of ranks, only data.micro_batch, train.grad_accum"):
        check_same_run(run_dir, replace(cfg, optim=replace(cfg.optim, lr=0.05)), "universal", DIGEST)
    with pytest.raises(InputError, match=r"data.micro_batch: 8 there, 2 now\): rerun with its settings to resume it "
                                         r"\(a pretraining run changes these through `medsapiens pretrain universal "):
        check_same_run(run_dir, replace(cfg, data=replace(cfg.data, micro_batch=2)), "auto", DIGEST)
    with pytest.raises(InputError, match=r"optim.lr: 0.001 there, 0.05 now\): rerun with its settings to resume it, or"):
        check_same_run(run_dir, replace(cfg, data=replace(cfg.data, micro_batch=2), optim=replace(cfg.optim, lr=0.05)),
                       "auto", DIGEST)


def test_a_resume_compares_only_the_keys_its_run_reads(saved_run):
    """The demo trains on a cosine schedule: milestones saved there (by an override no longer taken) or given
    now change nothing, while the cosine floor it does read must be the same."""
    run_dir, cfg = saved_run
    assert cfg.optim.schedule == "cosine"
    check_same_run(run_dir, replace(cfg, optim=replace(cfg.optim, milestones=(0.5,), gamma=0.5)), "auto", DIGEST)
    with pytest.raises(InputError, match=r"optim.min_lr_factor: .* there, 0.5 now"):
        check_same_run(run_dir, replace(cfg, optim=replace(cfg.optim, min_lr_factor=0.5)), "auto", DIGEST)
    with pytest.raises(InputError, match=r"optim.schedule: 'cosine' there, 'step' now"):
        check_same_run(run_dir, replace(cfg, optim=replace(cfg.optim, schedule="step", milestones=(0.5,))), "auto", DIGEST)


def test_a_universal_resume_keeps_the_global_batch_the_run_trained_at(saved_run):
    """Two ranks of 8 trained it: one rank of 8 would halve the batch under the same steps and lr schedule."""
    run_dir, cfg = saved_run
    (run_dir / RUN_INFO).write_text(json.dumps({"manifest": {"sha256": DIGEST}, "world_size": 2}))
    with pytest.raises(InputError, match=rf"{run_dir} trained at a global batch of 16 \(8 x 1 x 2 rank\(s\)\); this resume "
                                         r"would train at 8 \(8 x 1 x 1 rank\(s\)\): data.micro_batch x train.grad_accum "
                                         r"= 16 keeps it on 1 rank\(s\)"):
        check_same_run(run_dir, cfg, "universal", DIGEST)
    check_same_run(run_dir, replace(cfg, train=replace(cfg.train, grad_accum=2)), "universal", DIGEST)
    check_same_run(run_dir, replace(cfg, data=replace(cfg.data, micro_batch=16)), "universal", DIGEST)


def test_a_resume_at_another_precision_than_the_run_trained_at_is_refused(saved_run):
    """`auto` is saved as what it meant where the run started (bf16 on a GPU): resuming that run where
    it means fp32 (a CPU machine) is another run."""
    run_dir, cfg = saved_run
    gpu_run = replace(cfg, train=replace(cfg.train, precision="bf16"))
    configlib.save(gpu_run, run_dir / RESOLVED_CONFIG)
    check_same_run(run_dir, gpu_run, "auto", DIGEST)
    with pytest.raises(InputError, match="train.precision: 'bf16' there, 'fp32' now"):
        check_same_run(run_dir, replace(cfg, train=replace(cfg.train, precision="fp32")), "auto", DIGEST)
    configlib.save(replace(cfg, train=replace(cfg.train, precision="auto")), run_dir / RESOLVED_CONFIG)  # saved unresolved
    check_same_run(run_dir, replace(cfg, train=replace(cfg.train, precision="fp32")), "auto", DIGEST)


@pytest.mark.parametrize("resume", ["auto", "universal"])
def test_a_resume_on_another_shard_manifest_is_refused_before_anything_is_written(saved_run, resume):
    run_dir, cfg = saved_run
    with pytest.raises(CheckpointError, match=f"trained on another shard manifest \\(sha256 {DIGEST[:12]}, now bbbb"):
        check_same_run(run_dir, cfg, resume, "b" * 64)
    check_same_run(run_dir, cfg, "none", "b" * 64)  # a fresh start compares nothing


def test_a_resume_from_other_starting_weights_is_refused(saved_run):
    run_dir, cfg = saved_run
    (run_dir / RUN_INFO).write_text(json.dumps({"manifest": {"sha256": DIGEST}, "start_sha256": "c" * 64}))
    check_same_run(run_dir, cfg, "auto", DIGEST, "c" * 64)
    with pytest.raises(CheckpointError, match="started from other weights \\(sha256 cccccccccccc, now dddddddddddd: "
                                              "the file it started from was replaced since\\)"):
        check_same_run(run_dir, cfg, "auto", DIGEST, "d" * 64)


def test_shards_and_starting_weights_found_elsewhere_resume_when_their_sha256_is_the_runs(saved_run):
    """Moved from S3 to local disk, or spelled with a trailing slash: the content decides, as for run_dir."""
    run_dir, cfg = saved_run
    (run_dir / RUN_INFO).write_text(json.dumps({"manifest": {"sha256": DIGEST}, "start_sha256": "c" * 64}))
    configlib.save(replace(cfg, model=replace(cfg.model, checkpoint="/models/sapiens.pth")), run_dir / RESOLVED_CONFIG)
    moved = replace(cfg, data=replace(cfg.data, shards="/local/copy/"), model=replace(cfg.model, checkpoint="s.pth"))
    check_same_run(run_dir, moved, "auto", DIGEST, "c" * 64)
    with pytest.raises(InputError, match=r"model.checkpoint: '/models/sapiens.pth' there, 's.pth' now"):
        check_same_run(run_dir, moved, "auto", DIGEST, "d" * 64)
    with pytest.raises(InputError, match=rf"data.shards: {cfg.data.shards!r} there, '/local/copy/' now"):
        check_same_run(run_dir, moved, "auto", "b" * 64, "c" * 64)


def test_the_default_fine_tuning_directory_is_found_again_by_a_rerun_that_resumes_and_not_by_other_settings(
        phantom_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("bundle", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / bundlelib.WEIGHTS).write_bytes(name.encode())
    (tmp_path / "alias").symlink_to(tmp_path / "bundle")
    data = replace(FinetuneConfig().data, shards=str(phantom_shards))
    cfg = FinetuneConfig(dataset="leg", bundle="bundle", data=data)
    resumes = [replace(cfg, train=replace(cfg.train, stop_after=500, log_every=5)), replace(cfg, eval_split="test1"),
               replace(cfg, flip_test=False, calibration_coverage=0.0), replace(cfg, resume="none"),
               replace(cfg, bundle=str(tmp_path / "alias")),  # the same weights by another path
               replace(cfg, model=replace(cfg.model, checkpoint="unread.pth"))]  # init bundle reads no checkpoint
    others = [replace(cfg, optim=replace(cfg.optim, lr=1e-2)), replace(cfg, shots=5), replace(cfg, shot_seed=1),
              replace(cfg, seeds=[0, 1]), replace(cfg, train=replace(cfg.train, max_steps=100)),
              replace(cfg, bundle="other"), replace(cfg, train=replace(cfg.train, precision="bf16"))]
    one_rank = default_run_dir(cfg)
    assert {default_run_dir(c) for c in resumes} == {one_rank}
    assert len({default_run_dir(c) for c in [cfg, *others]}) == 1 + len(others)
    assert default_run_dir(replace(cfg, shots=5)).startswith("runs/finetune/leg-bundle-5shot-")
    monkeypatch.setattr(distributed, "world_size", lambda: 4)  # the same command on 4 ranks: another epoch schedule
    assert default_run_dir(cfg) != one_rank


def test_a_universal_rerun_goes_on_from_the_runs_own_newer_checkpoint_at_the_same_ranks_and_batch(saved_run):
    """The run resumed from step 2's conversion on one rank and saved step 4 there: the same command
    again resumes step 4; at another per-rank batch it keeps asking for the newest's conversion."""
    run_dir, cfg = saved_run
    ckpt_dir = run_dir / "checkpoints"
    (ckpt_dir / "step_00000002_universal").mkdir()
    (ckpt_dir / "latest_universal").write_text("step_00000002_universal")
    shard = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    (ckpt_dir / "step_00000004").mkdir()
    (ckpt_dir / "step_00000004" / shard).write_bytes(b"x")
    (ckpt_dir / "step_00000004" / "complete.json").write_text(json.dumps({shard: 1}))
    assert settled_resume(run_dir, cfg, "universal") == "auto"
    assert settled_resume(run_dir, replace(cfg, data=replace(cfg.data, micro_batch=2)), "universal") == "universal"
    (ckpt_dir / "latest_universal").write_text("step_00000004_universal")  # converted again: loaded as asked
    assert settled_resume(run_dir, cfg, "universal") == "universal"


def test_a_resume_under_another_zero_stage_of_the_same_json_file_is_refused(saved_run, tmp_path_factory):
    """The file's name is the setting saved: editing its stage between reruns went unnoticed."""
    run_dir, cfg = saved_run
    own = tmp_path_factory.mktemp("user") / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg = replace(cfg, train=replace(cfg.train, deepspeed=str(own)))
    configlib.save(cfg, run_dir / RESOLVED_CONFIG)
    (run_dir / RESOLVED_DEEPSPEED).write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}}))
    check_same_run(run_dir, cfg, "auto", DIGEST)
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(InputError, match=rf"{run_dir} trained under ZeRO stage 2 \(deepspeed.json\); train.deepspeed "
                                         rf"{own} now asks for stage 1: a checkpoint does not resume under another stage"):
        check_same_run(run_dir, cfg, "auto", DIGEST)
    check_same_run(run_dir, cfg, "none", DIGEST)  # a fresh start compares nothing


def test_a_fresh_start_over_an_attempt_without_checkpoint_logs_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for lr in (1e30, 1e-3):
        telemetry = Telemetry(tmp_path, True, start_step=0)
        telemetry.scalars(1, {"lr": lr})
        telemetry.scalars(2, {"lr": lr})
        telemetry.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in rows] == [(1, 1e-3), (2, 1e-3)]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [(1, pytest.approx(1e-3)), (2, pytest.approx(1e-3))]


def test_a_last_metrics_line_cut_short_by_a_crash_is_left_out_and_a_resume_drops_it(tmp_path):
    from medsapiens.training.trainer import validation_at

    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "val/head/mre": 3.0}\n{"step": 4, "loss/total": 1.0}\n'
                                            '{"step": 6, "val/head/mr')  # the disk filled up mid-write
    assert validation_at(tmp_path, 6) == {"step": 2, "val/head/mre": 3.0}  # as `pretrain export` reads it
    Telemetry(tmp_path, True, start_step=4).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 2, "val/head/mre": 3.0}\n{"step": 4, "loss/total": 1.0}\n'


def test_options_and_overrides_mix_in_any_order():
    from medsapiens.pretrain.__main__ import build_parser

    args = build_parser().parse_intermixed_args(["--config", "F.yaml", "a=1", "--resume", "none", "b=2"])
    assert (args.config, args.resume, args.overrides) == ("F.yaml", "none", ["a=1", "b=2"])


def test_a_run_that_selects_on_val_but_validates_once_says_so():
    """`--steps 100` with the recipe's val_every 500: one validation, at the end, so nothing is selected."""
    from medsapiens.training.engine import TrainConfig
    from medsapiens.training.run import one_validation_note

    short = TrainConfig(max_steps=100, val_every=500, checkpoint_every=500)
    assert one_validation_note(True, short) == (" (one validation in this 100-step run, at its end: train.val_every "
                                                "is 500, so the last checkpoint is the one kept)")
    assert one_validation_note(False, short) == ""  # pretraining, or no val split: nothing is selected
    assert one_validation_note(True, replace(short, val_every=50, checkpoint_every=50)) == ""
