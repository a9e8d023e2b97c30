"""Fine-tuning, evaluation and prediction on phantom shards with sapiens_tiny on CPU."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    CLI,
    FINETUNE_CONFIG,
    cli_here,
    deepspeed_module,
    finetune_args,
    losses,
    run,
    unlisted_on,
    write_dicom,
)
from safetensors.torch import load_file

from medsapiens import config as configlib
from medsapiens.errors import InputError
from medsapiens.evaluate.evaluate import EvalOptions, evaluate_model
from medsapiens.finetune.config import FinetuneConfig
from medsapiens.finetune.subset import draw_keys
from medsapiens.finetune.train import evaluation_splits, initial_model
from medsapiens.io import manifest as manifestlib
from medsapiens.io.manifest import ManifestError
from medsapiens.io.shard_tar import file_digest
from medsapiens.model import bundle as bundlelib


def untrained_leg_mre(bundle_dir, shards) -> float:
    """MRE of the start of a leg fine-tuning (the bundle's trunk, a fresh leg head), before any step."""
    cfg = configlib.load(FinetuneConfig, FINETUNE_CONFIG, ["dataset=leg", f"bundle={bundle_dir}"])
    manifest = manifestlib.load(shards)
    torch.manual_seed(0)
    model, model_cfg, _ = initial_model(cfg, manifest.landmark_set("leg"))
    bundle = bundlelib.Bundle(model_cfg, {"leg": manifest.landmark_set("leg")})
    report = evaluate_model(model.eval(), bundle, manifest, "leg", "test", Path(cfg.run_dir) / "untrained",
                            EvalOptions(flip_test=False))
    return report["mre"]


@pytest.mark.timeout(300)
def test_finetuning_a_new_dataset_from_a_bundle_lowers_its_mre(head_hand_bundle, phantom_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = untrained_leg_mre(head_hand_bundle, phantom_shards)
    run_dir = tmp_path / "leg"
    proc = run([*CLI, "finetune", *finetune_args(phantom_shards, run_dir, "--bundle", str(head_hand_bundle),
                                                 "--dataset", "leg", "--steps", "120")], 240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "eval" / "test" / "report.json").read_text())
    assert report["mre"] < 0.7 * before, (report["mre"], before)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["origin"]["reused_head"] is False and info["origin"]["init"] == "bundle"
    model, bundle = bundlelib.load(run_dir / "bundle")
    assert bundle.heads == {"leg": 26} and bundle.provenance["stage"] == "finetune"
    best = json.loads((run_dir / "best.json").read_text())
    assert bundle.provenance["checkpoint"] == best["tag"]  # the best validated checkpoint became the bundle
    assert info["selection"]["split"] == "val" == bundle.provenance["selection"]["split"]
    ran = yaml.safe_load((run_dir / "config.yaml").read_text())  # resolved: steps, precision, warm-up as they ran
    assert bundle.provenance["config"] == ran and ran["train"]["precision"] in ("fp32", "bf16")
    assert info["evaluation_splits"] == ["test"]
    assert best["validation"]["leg"]["split"] == "val"
    assert report["evaluated_on"] == "test" and report["selected_on"]["split"] == "val" and report["flip_test"]
    assert "test: leg: MRE" in proc.stdout and str(run_dir / "bundle") in proc.stdout


@pytest.mark.timeout(300)
def test_few_shot_seeds_reuse_the_head_and_report_mean_and_std(head_hand_bundle, phantom_shards, tmp_path):
    run_dir = tmp_path / "head"
    def seeds_run(*more):
        return run([*CLI, "finetune", *finetune_args(phantom_shards, run_dir, "--bundle", str(head_hand_bundle),
                                                     "--dataset", "head", "--shots", "3", "--seeds", "0,1", "--steps",
                                                     "10", "train.val_every=5", "train.checkpoint_every=5", *more)], 240)

    stopped = seeds_run("train.stop_after=5")  # a time-limited job: nothing final until the schedule's end
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert f"{run_dir}/seed_0: stopped before the schedule's end (train.stop_after), no bundle or evaluation yet; " \
        "seed(s) 1 not started; rerun the command with train.stop_after raised or dropped to go on" in stopped.stdout
    assert not (run_dir / "seed_0" / "bundle").exists() and not (run_dir / "seed_1").exists()
    assert not (run_dir / "summary.json").exists()
    proc = seeds_run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 5" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["splits"]) == ["test1", "test2"]  # ISBI 2015's two test splits, each summarised
    for split, numbers in summary["splits"].items():
        per_seed = [json.loads((run_dir / f"seed_{s}" / "eval" / split / "report.json").read_text()) for s in (0, 1)]
        mres = [r["mre"] for r in per_seed]
        assert numbers["mre"]["values"] == pytest.approx(mres)
        assert numbers["mre"]["mean"] == pytest.approx(np.mean(mres)) and numbers["mre"]["std"] == pytest.approx(np.std(mres))
        assert numbers["sdr"]["2"]["mean"] == pytest.approx(np.mean([r["sdr"]["2"] for r in per_seed]))
        assert f"{split}: 2 seeds: MRE {numbers['mre']['mean']:.3f} +- " in proc.stdout
    subsets = [json.loads((run_dir / f"seed_{s}" / "subset" / "subset.json").read_text())["keys"] for s in (0, 1)]
    assert len(subsets[0]) == 3 and subsets[0] != subsets[1]
    provenance = json.loads((run_dir / "seed_0" / "bundle" / "config.json").read_text())["provenance"]
    assert provenance["evaluation_splits"] == ["test1", "test2"] and provenance["manifest"] == {
        "location": str(phantom_shards), "sha256": manifestlib.load(phantom_shards).digest, "few_shot_keys": subsets[0]}
    assert yaml.safe_load((run_dir / "seed_1" / "config.yaml").read_text())["train"]["seed"] == 1  # draws and trains
    subset_manifest = manifestlib.load(run_dir / "seed_0" / "subset")
    splits = subset_manifest.datasets["head"].splits
    assert splits["train"] == 3 and splits["test1"] == manifestlib.load(phantom_shards).datasets["head"].splits["test1"]
    assert json.loads((run_dir / "seed_0" / "run.json").read_text())["origin"]["reused_head"] is True
    assert "note: 3 training image(s) in a batch of 8 (micro-batch 8 x 1 rank(s)): each batch repeats them" in proc.stderr
    assert f"summary: {run_dir}/summary.json" in proc.stdout


def test_a_subset_of_relatively_named_shards_keeps_its_val_and_test_shards(phantom_shards, tmp_path, monkeypatch):
    from medsapiens.data.pipeline import read_shard
    from medsapiens.finetune.subset import few_shot_manifest

    monkeypatch.chdir(phantom_shards.parent)
    whole = manifestlib.load("shards")
    subset = few_shot_manifest(whole, "leg", 2, 0, tmp_path / "subset")
    assert subset.datasets["leg"].splits["train"] == 2
    for shard in subset.shards:
        assert len(list(read_shard(subset, shard))) == shard.samples
    # a run whose data.train_split is another split draws from that one and keeps train whole
    other = few_shot_manifest(whole, "leg", 1, 0, tmp_path / "other", split="val")
    assert other.datasets["leg"].splits == {**whole.datasets["leg"].splits, "val": 1}
    assert [s["__key__"][:8] for s in read_shard(other, other.shards_for("leg", "val")[0])] == ["leg_val_"]


def test_shot_draws_depend_on_seed_only():
    keys = [f"head_train_{i:03d}" for i in range(40)]
    assert draw_keys(keys, 5, 0) == draw_keys(list(reversed(keys)), 5, 0)
    assert draw_keys(keys, 5, 0) != draw_keys(keys, 5, 1)
    with pytest.raises(ValueError, match="more images than the train split has"):
        draw_keys(keys, 41, 0)


def test_a_bundle_start_keeps_its_head_unless_asked_to_start_it_afresh(head_hand_bundle, phantom_shards):
    bundled = load_file(str(head_hand_bundle / "model.safetensors"))
    head_set = manifestlib.load(phantom_shards).landmark_set("head")
    for reinit in (False, True):
        cfg = configlib.load(FinetuneConfig, FINETUNE_CONFIG, ["dataset=head", f"bundle={head_hand_bundle}",
                                                              f"reinit_head={str(reinit).lower()}"])
        model, _, origin = initial_model(cfg, head_set)
        state = model.state_dict()
        assert origin["reused_head"] is not reinit and model.dataset_ids == ["head"]
        assert torch.equal(state["decoder.trunk.0.conv.weight"], bundled["decoder.trunk.0.conv.weight"])
        assert torch.equal(state["decoder.heads.head.weight"], bundled["decoder.heads.head.weight"]) is not reinit
    renamed = replace(head_set, names=(*head_set.names[:-1], "elsewhere"))
    for other in (renamed, manifestlib.load(phantom_shards).landmark_set("hand")):  # shards whose "head" is another's
        for reinit in (False, True):
            cfg = configlib.load(FinetuneConfig, FINETUNE_CONFIG, ["dataset=head", f"bundle={head_hand_bundle}",
                                                                  f"reinit_head={str(reinit).lower()}"])
            if reinit:
                assert initial_model(cfg, other)[0].decoder.num_landmarks == {"head": other.num_landmarks}
                continue
            with pytest.raises(ManifestError, match=r"has a (head for 'head' on other landmarks than the shards' "
                               r"\(landmark 18: 'articulare' in the bundle, 'elsewhere'|19-landmark head for 'head', the shards have 37)"
                               r".*--reinit-head"):
                initial_model(cfg, other)


@pytest.mark.timeout(300)
def test_lora_trains_only_adapters_and_decoder(head_hand_bundle, phantom_shards, tmp_path):
    run_dir = tmp_path / "lora"
    def lora_run(folder, *more):
        return run([*CLI, "finetune", *finetune_args(phantom_shards, folder, "--bundle", str(head_hand_bundle),
                                                     "--dataset", "hand", "--lora", "--steps", "6", "train.val_every=3",
                                                     "train.checkpoint_every=3", "train.log_every=1", *more)], 240)

    proc = lora_run(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stopped and resumed half-way, LoRA's dropout draws what it drew in the run that went through
    assert lora_run(tmp_path / "halves", "train.stop_after=3").returncode == 0
    assert not (tmp_path / "halves" / "bundle").exists()
    assert lora_run(tmp_path / "halves").returncode == 0
    assert losses(tmp_path / "halves") == losses(run_dir)
    before = load_file(str(head_hand_bundle / "model.safetensors"))
    after = load_file(str(run_dir / "bundle" / "model.safetensors"))
    depth, c = 4, 192  # sapiens_tiny
    lora = depth * ((4 * c + 4 * 3 * c) + (8 * c + 8 * c))  # qkv: A (4 x C) + B (3C x 4); proj: A (8 x C) + B (C x 8)
    decoder = sum(v.numel() for k, v in after.items() if k.startswith("decoder."))
    assert json.loads((run_dir / "run.json").read_text())["trainable_parameters"] == lora + decoder
    frozen = [k for k in before if k.startswith("backbone.") and "attn.qkv" not in k and "attn.proj" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["backbone.blocks.0.attn.qkv.weight"], after["backbone.blocks.0.attn.qkv.weight"])
    assert not torch.equal(before["decoder.trunk.0.conv.weight"], after["decoder.trunk.0.conv.weight"])
    assert set(after) == set(before) - {k for k in before if k.startswith("decoder.heads.head.")}


@pytest.mark.timeout(300)
def test_two_rank_finetune_from_a_raw_sapiens_checkpoint(phantom_shards, tmp_path):
    from sapiens_checkpoints import released_state

    from medsapiens.model import get_arch

    checkpoint = tmp_path / "sapiens_tiny_epoch_1_clean.pth"
    torch.save(released_state(get_arch("sapiens_tiny")), checkpoint)
    run_dir = tmp_path / "chest"
    args = ["--config", str(FINETUNE_CONFIG), f"data.shards={phantom_shards}", f"run_dir={run_dir}", "dataset=chest",
            "init=sapiens", f"model.checkpoint={checkpoint}", "model.trunk_width=32", "shots=4", "train.max_steps=6",
            "train.val_every=3", "train.checkpoint_every=3", "data.workers=0", "data.micro_batch=4"]
    first = deepspeed_module("medsapiens.finetune", 2, [*args, "train.stop_after=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    stale = unlisted_on(1, "step_00000003")  # rank 1 alone does not list the checkpoint
    proc = deepspeed_module("medsapiens.finetune", 2, args, env=stale)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 3" in proc.stderr
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["origin"] == {"init": "sapiens", "checkpoint": str(checkpoint),
                                                          "checkpoint_sha256": file_digest(checkpoint)[0]}
    assert info["start_sha256"] == file_digest(checkpoint)[0]  # a resume from the file replaced since is refused
    report = json.loads((run_dir / "eval" / "test" / "report.json").read_text())
    assert report["unit"] == "px" and report["images"] == manifestlib.load(phantom_shards).datasets["chest"].splits["test"]


@pytest.mark.timeout(120)
def test_finetune_refuses_bad_starts_clearly(phantom_shards, tmp_path):
    proc = run([*CLI, "finetune", *finetune_args(phantom_shards, tmp_path / "x", "--dataset", "leg", "--init", "sapiens")], 60)
    assert proc.returncode != 0 and "needs a Sapiens checkpoint (the key model.checkpoint=FILE; `medsapiens finetune` also takes --checkpoint FILE)" in proc.stderr
    proc = run([*CLI, "finetune", *finetune_args(phantom_shards, tmp_path / "x", "--dataset", "knee", "--init", "scratch",
                                                 "--steps", "2")], 120)
    assert proc.returncode != 0 and "dataset 'knee' is not in the manifest" in proc.stderr


def test_the_evaluated_splits_are_chosen_and_checked_before_training(phantom_shards):
    """`auto` reports ISBI 2015's two test sets each; test1+test2 scores them as one, as `evaluate --split` does."""
    manifest = manifestlib.load(phantom_shards)
    assert evaluation_splits(manifest, "head", "auto") == ["test1", "test2"]
    assert evaluation_splits(manifest, "head", "test1+test2") == ["test1+test2"]
    with pytest.raises(ManifestError, match=r"dataset 'head' has no 'test1\+tset2' split to evaluate \(splits: "):
        evaluation_splits(manifest, "head", "test1+tset2")
    with pytest.raises(InputError, match=r"--eval-split test2\+test2: name a split, or distinct splits joined by '\+'"):
        evaluation_splits(manifest, "head", "test2+test2")


def test_evaluate_names_a_dataset_the_shards_lack_before_its_splits(phantom_shards):
    from medsapiens.evaluate.evaluate import check_split

    manifest = manifestlib.load(phantom_shards)
    with pytest.raises(ManifestError, match=re.escape(f"dataset 'knee' is not in the manifest at {manifest.location}; "
                                                      f"it has: {', '.join(sorted(manifest.datasets))}")):
        check_split(manifest, "knee", "test", bundle=None)
    with pytest.raises(ManifestError, match=re.escape("dataset 'head' has no 'tset' samples (splits: test1 ")):
        check_split(manifest, "head", "tset", bundle=None)


def isbi_truth(raw_head: Path, image: Path) -> np.ndarray:
    senior, junior = (np.loadtxt(raw_head / "AnnotationsByMD" / who / f"{image.stem}.txt", delimiter=",", max_rows=19)
                      for who in ("400_senior", "400_junior"))
    return (senior + junior) / 2


@pytest.mark.timeout(500)
def test_predict_on_phantom_images_lands_near_the_truth(head_expert, phantom_shards, tmp_path, capsys):
    raw_head = phantom_shards.parent / "raw" / "head"
    images = sorted((raw_head / "RawImage" / "Test1Data").glob("*.bmp"))
    out = tmp_path / "pred"
    proc = cli_here(capsys, ["predict", "--bundle", str(head_expert / "bundle"), "--out", str(out), "--overlays",
                             str(raw_head / "RawImage" / "Test1Data")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_truth = np.stack([isbi_truth(raw_head, p) for p in (raw_head / "RawImage" / "TrainingData").glob("*.bmp")])
    mean_shape = train_truth.mean(axis=0)  # the best guess that ignores the image
    errors, baseline = [], []
    for image in images:
        result = json.loads((out / f"{image.stem}.json").read_text())
        truth = isbi_truth(raw_head, image)
        errors.append(np.linalg.norm(np.array(result["landmarks"]) - truth, axis=1).mean())
        baseline.append(np.linalg.norm(mean_shape - truth, axis=1).mean())
        assert result["size"] == [480, 600] and (out / "overlays" / f"{image.stem}.png").exists()
    assert np.mean(errors) < 0.6 * np.mean(baseline), (np.mean(errors), np.mean(baseline))
    assert np.mean(errors) < 30  # px of a 480 x 600 image
    scored = json.loads((out / "predictions.json").read_text())
    assert scored["dataset"] == "head" and set(scored["landmarks"]) == {p.stem for p in images}


@pytest.mark.timeout(120)
def test_a_16_bit_image_and_its_8_bit_export_give_the_same_landmarks(head_expert, phantom_shards, tmp_path, capsys):
    """A trained model, the same radiograph as 8-bit, 16-bit and 10-bit-in-16 PNG: landmarks within
    1 px at the model's input scale (96 x 128 for these 480 x 600 images)."""
    from PIL import Image

    image = sorted((phantom_shards.parent / "raw" / "head" / "RawImage" / "Test1Data").glob("*.bmp"))[0]
    eight = np.asarray(Image.open(image).convert("L"), dtype=np.float64)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(eight.astype(np.uint8)).save(inputs / "eight.png")
    Image.fromarray((eight * 257).astype(np.uint16)).save(inputs / "sixteen.png")
    Image.fromarray(np.rint(eight * 1023 / 255).astype(np.uint16)).save(inputs / "ten.png")
    out = tmp_path / "out"
    proc = cli_here(capsys, ["predict", "--bundle", str(head_expert / "bundle"), "--out", str(out), str(inputs)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    landmarks = json.loads((out / "predictions.json").read_text())["landmarks"]
    for other in ("sixteen", "ten"):
        moved = np.linalg.norm(np.subtract(landmarks[other], landmarks["eight"]), axis=1) * 96 / 480
        assert moved.max() < 1, (other, moved.max())


@pytest.mark.timeout(120)
def test_predict_reads_dicom_spacing_and_lists_failures(head_expert, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    pixels = np.random.default_rng(0).integers(0, 4000, (300, 240)).astype(np.uint16).tobytes()
    write_dicom(inputs / "scan.dcm", 300, 240, pixels, bits_stored=12, PixelSpacing=[0.2, 0.1])  # row, column
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    proc = cli_here(capsys, ["predict", "--bundle", str(head_expert / "bundle"), "--out", str(out), str(inputs)])
    assert proc.returncode == 0  # one input failed: listed, the run completes
    result = json.loads((out / "scan.json").read_text())
    assert result["spacing_mm"] == [0.1, 0.2] and "PixelSpacing" in result["spacing_source"]
    assert np.allclose(result["landmarks_mm"], np.array(result["landmarks"]) * [0.1, 0.2], atol=1e-2)
    failures = json.loads((out / "failures.json").read_text())
    assert [f["image"] for f in failures] == [str(inputs / "broken.png")] and failures[0]["reason"] == "unreadable_image"
    assert "broken.png" in proc.stderr
    nothing = cli_here(capsys, ["predict", "--bundle", str(head_expert / "bundle"), "--out", str(tmp_path / "none"),
                                str(inputs / "broken.png")])
    assert nothing.returncode == 1 and "error: none of the 1 input(s) could be predicted" in nothing.stderr
    assert json.loads((tmp_path / "none" / "failures.json").read_text())[0]["reason"] == "unreadable_image"


@pytest.mark.timeout(200)
def test_evaluate_writes_reports_and_agrees_with_prediction_files(head_expert, phantom_shards, tmp_path, capsys):
    out = tmp_path / "eval"
    proc = cli_here(capsys, ["evaluate", "--bundle", str(head_expert / "bundle"), "--shards", str(phantom_shards),
                             "--split", "test1", "--out", str(out), "--overlays", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("mre", "mre_std_landmarks", "mre_std_images", "sdr", "per_landmark", "worst", "unit",
                "sdr_convention", "protocol"):
        assert key in report
    assert report["unit"] == "mm" and set(report["sdr"]) == {"2", "2.5", "3", "4"}
    assert len(report["per_landmark"]) == 19 and len(list((out / "overlays").glob("*.png"))) == 3
    assert "MRE" in proc.stdout and (out / "report.md").exists() and (out / "per_image.csv").exists()
    # The same images scored from prediction files (predict on the raw BMPs, ground truth from the txt files)
    raw_head = phantom_shards.parent / "raw" / "head"
    pred_dir = tmp_path / "pred"
    assert cli_here(capsys, ["predict", "--bundle", str(head_expert / "bundle"), "--out", str(pred_dir),
                             str(raw_head / "RawImage" / "Test1Data")]).returncode == 0
    ids = sorted(json.loads((pred_dir / "predictions.json").read_text())["landmarks"])
    truth = {"dataset": "head", "landmarks": {i: isbi_truth(raw_head, Path(f"{i}.bmp")).tolist() for i in ids}}
    (tmp_path / "gt.json").write_text(json.dumps(truth))
    files = tmp_path / "files"
    assert cli_here(capsys, ["evaluate", "--predictions", str(pred_dir / "predictions.json"), "--ground-truth",
                             str(tmp_path / "gt.json"), "--out", str(files)]).returncode == 0
    from_files = json.loads((files / "report.json").read_text())
    assert from_files["images"] == report["images"]
    assert from_files["mre"] == pytest.approx(report["mre"], rel=0.05)  # shards store images resized to 128 px


@pytest.mark.timeout(200)
def test_an_image_of_the_split_rejected_at_the_build_is_counted_in_its_evaluation(head_expert, phantom_shards, tmp_path,
                                                                                  capsys):
    """A test image the build rejects (a landmark outside it) would otherwise leave the split smaller
    without a word: the manifest counts it per split, the evaluation says so."""
    from medsapiens.shards.build import BuildOptions, build
    from medsapiens.shards.plan import SourceSpec

    raw = tmp_path / "head"
    shutil.copytree(phantom_shards.parent / "raw" / "head", raw)
    for who in ("senior", "junior"):
        notes = raw / "AnnotationsByMD" / f"400_{who}" / "151.txt"
        lines = notes.read_text().splitlines()
        notes.write_text("\n".join(["99999,99999", *lines[1:]]) + "\n")
    shards = tmp_path / "shards"
    build([SourceSpec("head", str(raw))], BuildOptions(out=str(shards), max_side=128, shard_size=8, workers=1,
                                                       progress=False))
    rejected = [json.loads(line) for line in (shards / "rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["split"], r["reason"]) for r in rejected] == [("151", "test1", "landmark_outside_image")]
    out = tmp_path / "eval"
    proc = cli_here(capsys, ["evaluate", "--bundle", str(head_expert / "bundle"), "--shards", str(shards),
                             "--split", "test1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["rejected_at_build"] == 1 and "; 1 more rejected at the shards' build)" in proc.stdout
    assert "Not in these numbers: 1 image(s) of this split rejected" in (out / "report.md").read_text()
