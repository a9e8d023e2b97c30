"""Pretraining through the real DeepSpeed launcher: 2 CPU ranks on gloo, ZeRO-2 and ZeRO-3,
TensorBoard read back, checkpoints, exact resume, universal checkpoints, export."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, cli_here, deepspeed_module, losses, pretrain_args, run, stale_copy_on, unlisted_on
from safetensors.torch import load_file, save_file

from medsapiens import config as configlib
from medsapiens.distributed import TORCH_THREADS
from medsapiens.errors import UserError
from medsapiens.io import manifest as manifestlib
from medsapiens.model import bundle as bundlelib
from medsapiens.training.engine import OptimConfig, lr_factor

STEPS = 12
SHARED_MEMORY = Path("/dev/shm")  # where POSIX shm_open names live on Linux


def config_args(shards, run_dir, *extra) -> list[str]:
    return pretrain_args(shards, run_dir, f"train.max_steps={STEPS}", "train.checkpoint_every=6", "train.val_every=6",
                         "train.keep_last=1", *extra)


@pytest.fixture(scope="module")
def zero2_run(phantom_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    extensions = run_dir.parent / "torch_extensions"  # where DeepSpeed would compile an op
    shared_memory = set(SHARED_MEMORY.glob("deepspeed_*"))
    proc = deepspeed_module("medsapiens.pretrain", 2, config_args(phantom_shards, run_dir),
                            env={"TORCH_EXTENSIONS_DIR": str(extensions), "OMP_NUM_THREADS": None})  # not the workers' 1
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not extensions.exists() and "built successfully" not in proc.stdout + proc.stderr  # no C++ compiler used
    assert set(SHARED_MEMORY.glob("deepspeed_*")) <= shared_memory  # nor DeepSpeed's shared-memory all-reduce
    (run_dir.parent / "job.log").write_text(proc.stderr)
    return run_dir


@pytest.fixture(scope="module")
def stopped_at_6(phantom_shards, tmp_path_factory) -> tuple[Path, str]:
    """The zero2_run's schedule stopped at step 6 by train.stop_after, with what it printed; tests copy it."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    proc = deepspeed_module("medsapiens.pretrain", 2, config_args(phantom_shards, run_dir, "train.stop_after=6"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stderr


def copy_of(stopped_at_6, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_6[0], run_dir)
    return run_dir


@pytest.mark.timeout(300)
def test_two_ranks_zero2_train_log_checkpoint_and_export(zero2_run, phantom_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    alone = run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], 60, env={"OMP_NUM_THREADS": None})
    share = max(1, int(alone.stdout) // 2)  # the 2 ranks share torch's own count
    assert (f"micro-batch 4 x accumulation 1 x 2 rank(s) = global batch 8, {share} CPU thread(s) per rank"
            in (zero2_run.parent / "job.log").read_text())
    by_step = losses(zero2_run)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert sum(by_step[s] for s in (10, 11, 12)) < sum(by_step[s] for s in (1, 2, 3))  # the loss falls
    events = EventAccumulator(str(zero2_run / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss/total", "loss/head", "loss/hand", "loss/chest", "lr/backbone", "lr/decoder",
                "train/grad_norm", "perf/samples_per_s", "perf/data_wait_fraction", "val/head/mre_mm",
                "val/hand/sdr_10mm", "val/chest/mre_px"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("val/head/mre_mm")] == [6, 12]
    per_rank, all_ranks = events.Scalars("perf/samples_per_s"), events.Scalars("perf/samples_per_s_all_ranks")
    assert [2 * e.value for e in per_rank] == pytest.approx([e.value for e in all_ranks])  # ranks step in lockstep
    panels = {t.split("/")[-1] for t in events.Tags()["images"] if t.startswith("val/head/")}
    carved = manifestlib.load(phantom_shards).datasets["head"].source["validation"]["ids"]
    assert panels and panels <= set(carved)  # each panel named by its val sample's id
    decoder_lr, backbone_lr = events.Scalars("lr/decoder")[3].value, events.Scalars("lr/backbone")[3].value
    assert backbone_lr == pytest.approx(decoder_lr * 0.85**5, rel=1e-5)  # embeddings: depth 4 + 1 layers below
    optim = configlib.from_dict(OptimConfig, yaml.safe_load((zero2_run / "config.yaml").read_text())["optim"])
    used = [optim.lr * lr_factor(update, optim, STEPS) for update in range(STEPS)]  # the lr each update used
    assert [e.value for e in events.Scalars("lr/decoder")] == pytest.approx(used, rel=1e-6)
    checkpoints = zero2_run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000012"
    assert not (checkpoints / "step_00000006").exists()  # keep_last=1 pruned it
    assert json.loads((zero2_run / "run.json").read_text())["world_size"] == 2

    out = tmp_path / "bundle"
    export = run([sys.executable, "-m", "medsapiens.launch.cli", "pretrain", "export", str(zero2_run), "--out", str(out)], 120)
    assert export.returncode == 0
    for notice in ("Setting accelerator to CPU", "No CUDA runtime is found"):  # no news on a CPU machine
        assert notice not in export.stderr
    model, bundle = bundlelib.load(out)
    assert bundle.heads == {"head": 19, "hand": 37, "chest": 6}
    assert bundle.provenance["steps"] == STEPS and bundle.provenance["validation"]["step"] == STEPS
    heat = model.heatmaps(torch.zeros(2, 3, 128, 96), "hand")
    assert heat.shape == (2, 37, 32, 24)


@pytest.mark.timeout(300)
def test_resume_continues_the_same_losses(zero2_run, stopped_at_6, phantom_shards, tmp_path):
    stopped, printed = stopped_at_6
    assert f"stopped at step 6 (train.stop_after); a rerun into {stopped} resumes from checkpoint step_00000006" \
        in printed
    run_dir = copy_of(stopped_at_6, tmp_path)
    assert max(losses(run_dir)) == 6
    with open(run_dir / "metrics.jsonl", "a") as f:  # as if the job had died writing step 9, past its checkpoint
        f.write('{"step": 7, "loss/total": 99.0}\n{"step": 8, "loss/total": 99.0}\n{"step": 9, "loss/to')
    stale = unlisted_on(1, "step_00000006")  # rank 1 alone does not list the checkpoint
    second = deepspeed_module("medsapiens.pretrain", 2, config_args(phantom_shards, run_dir), env=stale)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 6" in second.stderr
    assert "finished at step 12; last validation: head MRE " in second.stderr and " mm (val), hand MRE " in second.stderr
    assert f"next: medsapiens pretrain export {run_dir} --out BUNDLE_DIR" in second.stderr
    resumed, whole = losses(run_dir), losses(zero2_run)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "loss/total" in r) == list(range(1, STEPS + 1))  # redone steps once
    for step in range(7, STEPS + 1):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-7), step


@pytest.mark.timeout(420)
def test_universal_checkpoint_resumes_at_another_world_size(stopped_at_6, phantom_shards, tmp_path):
    run_dir = copy_of(stopped_at_6, tmp_path)
    as_is = run([sys.executable, "-m", "medsapiens.pretrain", *config_args(phantom_shards, run_dir)], 180)
    assert as_is.returncode == 2 and "Traceback" not in as_is.stderr, as_is.stderr[-3000:]
    assert (f"error: checkpoint {run_dir}/checkpoints/step_00000006 was saved by 2 rank(s), this run has 1: "
            "ZeRO's optimizer states resume only on as many ranks as saved them; rerun on 2 rank(s), or convert it "
            f"with `medsapiens pretrain universal {run_dir}`, then rerun with --resume universal") in as_is.stderr
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2  # refused before anything was written
    convert = run([sys.executable, "-m", "medsapiens.launch.cli", "pretrain", "universal", str(run_dir)], 180)
    assert convert.returncode == 0, convert.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest_universal").read_text() == "step_00000006_universal"
    universal = [sys.executable, "-m", "medsapiens.pretrain", "--resume", "universal"]
    other_lr = run([*universal, *config_args(phantom_shards, run_dir, "optim.lr=1e-2")], 180)
    assert other_lr.returncode == 2 and "optim.lr: 0.002 there, 0.01 now" in other_lr.stderr
    one_rank = run([*universal, *config_args(phantom_shards, run_dir, "data.micro_batch=8")], 180)  # the global batch kept
    assert one_rank.returncode == 0, one_rank.stderr[-3000:]
    assert "resumed from step 6" in one_rank.stderr
    alone = os.environ.get("OMP_NUM_THREADS") or TORCH_THREADS
    assert f"x 1 rank(s) = global batch 8, {alone} CPU thread(s) per rank" in one_rank.stderr
    by_step = losses(run_dir)
    assert set(range(1, STEPS + 1)) <= set(by_step)
    assert by_step[7] < 2 * by_step[6]  # trained weights were loaded, not a fresh start
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 1
    newest = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if not p.name.endswith("_universal"))[-1]
    # the same command again (a requeued job) goes on from the newest checkpoint, saved on as many ranks
    again = run([*universal, *config_args(phantom_shards, run_dir, "data.micro_batch=8")], 180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"--resume universal: checkpoint {newest}, newer than the universal step_00000006_universal, was saved by "
            "1 rank(s), as many as now: resuming it as --resume auto does") in again.stderr
    assert f"resumed from step {STEPS}" in again.stderr and f"finished at step {STEPS} already" in again.stderr
    stale = deepspeed_module("medsapiens.pretrain", 2, ["--resume", "universal", *config_args(phantom_shards, run_dir)])
    assert stale.returncode == 2 and "Traceback" not in stale.stderr, stale.stderr[-3000:]  # it would redo 7..
    assert (f"error: {run_dir}: its universal checkpoint is step_00000006_universal, older than its newest checkpoint "
            f"{newest}: convert that one with `medsapiens pretrain universal {run_dir}`") in stale.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_universal_resume_counts_each_adam_step_once(tmp_path, zero):
    """Adam's bias correction reads each parameter's step: after a universal resume every state has its own,
    a float32 where the fused update reads it, advanced by one per update (ZeRO-3's loader hands all its
    partitions one tensor, which each sub-group's update advanced again)."""
    out, config = tmp_path / "steps.json", REPO / "medsapiens" / "training" / "deepspeed" / f"{zero}.json"
    proc = run([sys.executable, str(REPO / "tests" / "ds_universal_step.py"), str(out), str(tmp_path), str(config)],
               240, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(out.read_text())
    assert steps["states"] > 1 and steps["step_tensors"] == steps["states"] and steps["dtypes"] == ["torch.float32"]
    assert steps["loaded"] == [3.0] * steps["states"] and steps["after_one_update"] == [4.0] * steps["states"]


@pytest.mark.timeout(300)
def test_a_resume_from_a_replaced_model_checkpoint_is_refused(phantom_shards, tmp_path):
    """The run records the sha256 of the weights it started from; the same path holding other weights
    since is another run's start, and the bundle would name a start the file no longer holds."""
    import hashlib

    from medsapiens.model import build_backbone, save_backbone

    start = tmp_path / "init.safetensors"
    torch.manual_seed(0)
    save_backbone(build_backbone("sapiens_tiny", (128, 96)), start, "test: weights A")
    args = pretrain_args(phantom_shards, tmp_path / "run", f"model.checkpoint={start}", "train.max_steps=4",
                         "train.checkpoint_every=2", "train.val_every=2", "train.precision=auto")
    first = run([sys.executable, "-m", "medsapiens.pretrain", *args, "train.stop_after=2"], 180)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["precision"] == "fp32"  # `auto` as this CPU machine has it: a GPU resume would differ
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["start_sha256"]
    assert recorded == hashlib.sha256(start.read_bytes()).hexdigest()
    torch.manual_seed(1)
    save_backbone(build_backbone("sapiens_tiny", (128, 96)), start, "test: weights B, at the same path")
    again = run([sys.executable, "-m", "medsapiens.pretrain", *args], 180)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert (f"started from other weights (sha256 {recorded[:12]}, now" in again.stderr
            and "the file it started from was replaced since" in again.stderr)


@pytest.mark.timeout(300)
def test_resume_none_starts_over_with_the_earlier_run_moved_aside_whole(two_rank_run, phantom_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_run, run_dir)
    earlier = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    args = pretrain_args(phantom_shards, run_dir, "train.max_steps=6", "train.checkpoint_every=2", "train.val_every=2",
                         "train.keep_last=1", "optim.lr=5e-4", "train.stop_after=4", "train.log_every=3")
    afresh = run([sys.executable, "-m", "medsapiens.pretrain", "--resume", "none", *args], 180)
    assert afresh.returncode == 0, afresh.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and f"moved the earlier run in {run_dir} to {aside[0]}" in afresh.stderr
    assert sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == earlier
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000004"]
    # a checkpoint (2) and the stop (4) log their parts of a window: a run resumed there starts a new one
    assert sorted(losses(run_dir)) == [2, 3, 4] and "resumed" not in afresh.stderr

    # the same stop again: the run is there already, and does not train past it to the end
    again = run([sys.executable, "-m", "medsapiens.pretrain", *args], 180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 4 already, not before train.stop_after (4): nothing trained" in again.stderr
    assert sorted(losses(run_dir)) == [2, 3, 4]


@pytest.mark.timeout(300)
def test_export_replaces_nothing_without_force_and_a_rerun_changes_nothing(two_rank_run, tmp_path, capsys):
    out, notes = tmp_path / "bundle", tmp_path / "notes"

    def export(where, *extra):
        return cli_here(capsys, ["pretrain", "export", str(two_rank_run), "--out", str(where), *extra])

    def contents(where):
        return {p.name: p.read_bytes() for p in where.iterdir()}

    assert export(out).returncode == 0
    calibrated = bundlelib.read_config(out)
    head = calibrated.landmark_sets["head"]
    calibrated.calibration = {"head": {"coverage": 0.9, "split": "val", "images": 12, "unit": head.unit,
                                       "radii": [2.0] * head.num_landmarks}}
    bundlelib.write_config(out, calibrated)
    before = contents(out)

    rerun = export(out)
    assert rerun.returncode == 0 and f"{out} already holds this export: left as is" in rerun.stdout
    assert contents(out) == before

    older = export(out, "--tag", "step_00000002")
    assert older.returncode == 2 and "Traceback" not in older.stderr
    assert (f"error: {out} already holds a bundle (pretrain checkpoint step_00000004 of {two_rank_run.resolve()}, "
            f"calibrated for head): left untouched; pass --force to replace it with step_00000002 of {two_rank_run}"
            ) in older.stderr
    assert contents(out) == before
    finetuned = bundlelib.read_config(out)  # a fine-tuned bundle records no run directory
    finetuned.provenance = {"stage": "finetune", "checkpoint": "step_00000020"}
    bundlelib.write_config(out, finetuned)
    assert (f"error: {out} already holds a bundle (finetune checkpoint step_00000020 of a finetune run, calibrated "
            "for head): left untouched") in export(out).stderr
    bundlelib.write_config(out, calibrated)

    weights = load_file(out / bundlelib.WEIGHTS)
    name = next(iter(weights))
    save_file({**weights, name: weights[name] + 1}, out / bundlelib.WEIGHTS)
    tampered = contents(out)
    other_weights = export(out)
    assert other_weights.returncode == 2
    assert f"error: {out} holds step_00000004 of this run with other weights" in other_weights.stderr
    assert contents(out) == tampered

    assert export(out, "--tag", "step_00000002", "--force").returncode == 0
    replaced = bundlelib.read_config(out)
    assert replaced.provenance["checkpoint"] == "step_00000002" and not replaced.calibration

    notes.mkdir()
    (notes / bundlelib.CONFIG).write_text('{"my": "notes"}')
    foreign = export(notes)
    assert foreign.returncode == 2
    assert f"error: {notes} holds config.json, not a readable bundle (" in foreign.stderr
    assert "): left untouched; give another --out, or pass --force" in foreign.stderr
    assert contents(notes) == {bundlelib.CONFIG: b'{"my": "notes"}'}


@pytest.mark.timeout(300)
def test_two_ranks_zero3_trains_and_exports(phantom_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = deepspeed_module("medsapiens.pretrain", 2, config_args(
        phantom_shards, run_dir, "train.deepspeed=launch/deepspeed/zero3.json", "train.max_steps=4",
        "train.checkpoint_every=4", "train.val_every=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ZeRO-3" in proc.stderr
    out = tmp_path / "bundle"
    assert run([sys.executable, "-m", "medsapiens.launch.cli", "pretrain", "export", str(run_dir), "--out", str(out)], 120).returncode == 0
    model, bundle = bundlelib.load(out)
    assert bundle.provenance["steps"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.timeout(300)
def test_one_rank_with_2b_equals_two_ranks_with_b(phantom_shards, tmp_path):
    script = str(REPO / "tests" / "ds_first_step.py")
    zero2 = "zero2"
    single = run([sys.executable, script, str(phantom_shards), str(tmp_path / "one"), "8", zero2], 180)
    assert single.returncode == 0, single.stderr[-3000:]
    from conftest import DEEPSPEED, free_port
    double = run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script, str(phantom_shards),
                  str(tmp_path / "two"), "8", zero2], 240)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    grads_one, grads_two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert grads_one.keys() == grads_two.keys()
    for name in grads_one:
        assert torch.allclose(grads_two[name], grads_one[name], rtol=1e-4, atol=1e-9), name
    assert grads_one["decoder.heads.hand.weight"].abs().sum() > 0


ENGINES_LEFT = """
import gc, sys, weakref
from medsapiens.pretrain.__main__ import main
from medsapiens.training import engine as enginelib

made, build = [], enginelib.Engine.__init__
def recording(self, *args, **kwargs):
    build(self, *args, **kwargs)
    made.extend((weakref.ref(self.ds), weakref.ref(self.optimizer)))
enginelib.Engine.__init__ = recording
assert main(sys.argv[1:]) == 0
gc.collect()
print("engine objects left:", sum(ref() is not None for ref in made), "of", len(made))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_run_gives_its_engine_back_as_it_returns(phantom_shards, tmp_path, zero):
    """Fine-tuning seeds train one run after another in one process: each run's DeepSpeed engine,
    optimizer states and buckets must be gone once it returns, or a GPU holds one set per run."""
    args = pretrain_args(phantom_shards, tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=2",
                         "train.val_every=2", f"train.deepspeed={zero}")
    proc = run([sys.executable, "-c", ENGINES_LEFT, *args], 240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine objects left: 0 of 2" in proc.stdout


@pytest.mark.timeout(300)
def test_compiled_model_gives_the_eager_loss_gradients_and_names(phantom_shards, tmp_path):
    script = str(REPO / "tests" / "ds_first_step.py")
    zero2 = "zero2"
    for name, extra in (("eager", []), ("compiled", ["compile"])):
        proc = run([sys.executable, script, str(phantom_shards), str(tmp_path / name), "4", zero2, *extra], 240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "No CUDA runtime is found" not in proc.stderr  # compiling CPU kernels: no news on a CPU machine
    eager, compiled = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("eager", "compiled"))
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    grads_eager, grads_compiled = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("eager", "compiled"))
    assert grads_compiled.keys() == grads_eager.keys()  # compiled in place: no _orig_mod. prefix in checkpoints
    for name in grads_eager:
        assert torch.allclose(grads_compiled[name], grads_eager[name], rtol=1e-3, atol=1e-7), name


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override, message", [
    ("data.datasets=[head, knee]", "dataset(s) ['knee']"),
    ("data.shards=/nonexistent/shards", "no manifest at /nonexistent/shards/manifest.json"),
    ("data.val_split=vall", "data.val_split='vall' is a split of none of the datasets trained (head: test1, test2, train, val; "),
])
def test_preflight_stops_with_a_clear_message_before_deepspeed_starts(phantom_shards, tmp_path, override, message,
                                                                      monkeypatch):
    """Read on every rank before the process group: a wrong path is told at once, not after DeepSpeed's minute."""
    from medsapiens.pretrain import train as pretraining
    from medsapiens.pretrain.config import PretrainConfig

    monkeypatch.setattr(pretraining, "distributed_job", lambda *_: pytest.fail("DeepSpeed started first"))
    args = config_args(phantom_shards, tmp_path / "run", override)
    with pytest.raises(UserError, match=re.escape(message)):
        pretraining.run(configlib.load(PretrainConfig, args[1], args[2:]))
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(180)
def test_ranks_that_read_another_manifest_are_refused_before_the_engine(phantom_shards, tmp_path):
    """A host with a stale copy of the shards at the same path would train on other data, or hang where its
    heads or schedule differ: every rank checks that it read what rank 0 read."""
    manifest = json.loads((phantom_shards / "manifest.json").read_text())
    manifest["datasets"]["head"]["source"]["copied"] = "last week"
    stale = tmp_path / "stale-manifest.json"
    stale.write_text(json.dumps(manifest))
    run_dir = tmp_path / "run"
    proc = deepspeed_module("medsapiens.pretrain", 2, config_args(phantom_shards, run_dir),
                            env=stale_copy_on(1, phantom_shards / "manifest.json", stale))
    assert proc.returncode == 2
    assert re.search(r"error: the ranks do not start alike: rank 1 on \S+: shard manifest sha256 [0-9a-f]{12} \(rank 0: "
                     r"sha256 [0-9a-f]{12}\); each host must read the same files at the same paths", proc.stderr)
    assert "DeepSpeed ZeRO-" not in proc.stderr and not (run_dir / "checkpoints").exists()


@pytest.mark.timeout(120)
def test_preflight_names_an_unreachable_shard(phantom_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(phantom_shards, shards)
    victim = sorted(shards.glob("hand-train-*.tar"))[0]
    victim.unlink()
    proc = run([sys.executable, "-m", "medsapiens.pretrain", *config_args(shards, tmp_path / "run")], 100)
    assert proc.returncode != 0
    assert f"shard {victim} listed in" in proc.stderr and "unreachable" in proc.stderr


@pytest.mark.timeout(180)
def test_an_interrupted_run_says_where_a_rerun_resumes(phantom_shards, tmp_path):
    import os
    import signal
    import subprocess
    import time

    run_dir = tmp_path / "run"
    args = pretrain_args(phantom_shards, run_dir, "train.max_steps=10000", "train.checkpoint_every=2",
                         "train.val_every=10000", "data.workers=0")
    # SIGINT as at a terminal, whatever the test inherited (a background job starts with it ignored)
    proc = subprocess.Popen([sys.executable, "-m", "medsapiens.pretrain", *args], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 150
    while not (run_dir / "checkpoints" / "latest").is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and err.rstrip().endswith("interrupted"), err[-3000:]
    line = next(line for line in err.splitlines() if line.startswith("stopped at step "))
    assert f"; a rerun into {run_dir} resumes from checkpoint step_0000000" in line


@pytest.mark.timeout(420)
def test_sigterm_to_one_rank_stops_both_at_one_step_after_a_checkpoint_and_the_rerun_is_the_same_run(phantom_shards,
                                                                                                    tmp_path):
    import signal
    import subprocess

    import psutil
    from conftest import DEEPSPEED, free_port

    from medsapiens.errors import EXIT_STOPPED
    from medsapiens.training import checkpoints

    def args(run_dir):
        return pretrain_args(phantom_shards, run_dir, "train.max_steps=40", "train.checkpoint_every=20",
                             "train.val_every=20", "train.keep_last=3")

    whole = deepspeed_module("medsapiens.pretrain", 2, args(tmp_path / "whole"), timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir = tmp_path / "stopped"
    job = subprocess.Popen([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "medsapiens.pretrain",
                            *args(run_dir)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").is_file() or max(losses(run_dir), default=0) < 3:
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.2)
    ranks = sorted((p for p in psutil.Process(job.pid).children(recursive=True)
                    if "--local_rank=1" in " ".join(p.cmdline())), key=lambda p: p.pid)
    ranks[0].send_signal(signal.SIGTERM)  # rank 1 alone, as a scheduler's kill of one process would
    _, err = job.communicate(timeout=120)
    assert job.returncode == EXIT_STOPPED, err[-3000:]
    line = next(line for line in err.splitlines() if "by a stop signal" in line)
    step = int(line.split("stopped at step ")[1].split(" ")[0])
    assert 3 <= step < 20  # inside the first segment: the rerun must replay it to the step
    tag = checkpoints.checkpoint_tag(step)
    assert checkpoints.latest_tag(run_dir / "checkpoints") == tag and f"checkpoint {tag}" in line
    rerun = deepspeed_module("medsapiens.pretrain", 2, args(run_dir), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {step}" in rerun.stderr
    resumed, reference = losses(run_dir), losses(tmp_path / "whole")
    assert sorted(resumed) == list(range(1, 41))
    for later in range(step + 1, 41):
        assert resumed[later] == pytest.approx(reference[later], rel=1e-5, abs=1e-7), later
