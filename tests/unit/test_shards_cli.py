"""`medsapiens shards inspect` and `verify`, and the CLI's errors for bad arguments."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from medsapiens.launch.cli import main
from medsapiens.shards.phantoms import write_phantoms


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    roots = write_phantoms(root / "raw", n=4, seed=3, sets=["hand", "leg"])
    out = root / "shards"
    args = [a for name, path in roots.items() for a in ("--source", f"{name}={path}")]
    assert main(["shards", "build", *args, "--out", str(out), "--max-side", "128", "--workers", "1", "--no-progress"]) == 0
    return out


def test_inspect_reports_counts_sizes_spacing_and_draws_a_sheet(shard_dir, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert main(["shards", "inspect", str(shard_dir), "--sheet", str(sheet), "--n", "5"]) == 0
    printed = capsys.readouterr().out
    assert "inputs 8 = written 8 + rejected 0" in printed
    assert "hand: K=37" in printed and "leg: K=26" in printed
    assert "no pixel spacing; normalization {\"rule\": \"wrist_width\"" in printed
    assert "stored spacing mm/px x" in printed and "original width 260..260" in printed
    image = np.asarray(Image.open(sheet).convert("RGB"))
    assert image.shape == (2 * 256, 3 * 256, 3)  # 5 thumbnails: 3 columns, 2 rows
    red = (image[..., 0] > 200) & (image[..., 1] < 80) & (image[..., 2] < 80)
    assert red.sum() > 100  # landmarks are drawn


@pytest.mark.parametrize("sheet, n, message", [
    ("folder", "4", "--sheet {}: name the PNG file to write"),
    ("sheet.txt", "4", "--sheet {}: name the PNG file to write"),
    ("missing/sheet.png", "4", "--sheet {}: no folder"),
    ("sheet.png", "0", "--n must be at least 1, got 0"),
])
def test_a_sheet_that_cannot_be_written_is_refused_before_any_shard_is_read(shard_dir, tmp_path, capsys, sheet, n,
                                                                            message):
    (tmp_path / "folder").mkdir()
    path = tmp_path / sheet
    assert main(["shards", "inspect", str(shard_dir), "--sheet", str(path), "--n", n]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(path) in err, err


def test_verify_passes_then_names_a_corrupted_and_a_missing_shard(shard_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    shutil.copy(copy / "hand-train-000000.tar", copy / "hand-train-000099.tar")  # an earlier, larger build's
    assert main(["shards", "verify", str(copy)]) == 0
    printed = capsys.readouterr().out
    assert "8 samples verified, no problems" in printed
    assert "note: 1 tar file(s) beside the manifest are not in it" in printed and "hand-train-000099.tar" in printed
    manifest = json.loads((copy / "manifest.json").read_text())
    damaged, gone = manifest["shards"][0]["url"], manifest["shards"][1]["url"]
    data = bytearray((copy / damaged).read_bytes())
    data[700] ^= 0xFF  # inside the first PNG
    (copy / damaged).write_bytes(bytes(data))
    (copy / gone).unlink()
    assert main(["shards", "verify", str(copy)]) == 1
    printed = capsys.readouterr().out
    assert f"{damaged}: sha256" in printed and f"{gone}: missing" in printed
    shutil.copy(shard_dir / damaged, copy / damaged)
    assert main(["shards", "inspect", str(copy)]) == 1  # a missing shard fails inspect's check too
    assert f"{copy / gone}: missing, though {copy} lists it" in capsys.readouterr().err  # not a bare errno


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_path_without_a_manifest_is_a_usage_error_not_a_failed_check(tmp_path, capsys, command):
    assert main(["shards", command, str(tmp_path / "typo")]) == 2
    assert f"no manifest at {tmp_path / 'typo' / 'manifest.json'}" in capsys.readouterr().err


def test_verify_names_a_record_that_disagrees_with_the_manifest(shard_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    manifest["datasets"][manifest["shards"][0]["dataset"]]["splits"][manifest["shards"][0]["split"]] += 1
    manifest["totals"]["inputs"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["shards", "verify", str(copy)]) == 1
    assert "samples" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--source", "hand=."], "no landmark table"),
    (["--source", "spine=."], "name its reader: spine:coco=PATH"),
    (["--source", "hand=.", "--opt", "hand.colour=red"], "valid options: split, seed, val_fraction, test_fraction"),
    (["--source", "hand=.", "--opt", "leg.x=1"], "names dataset 'leg', which no --source builds"),
    (["--source", "hand:nope=."], "unknown reader 'nope'"),
    (["--source", "my_set:coco=."], "may hold only letters, digits and '-'"),
    (["--source", "hand:isbi2015=."], "reader 'isbi2015' reads 'head' landmarks"),
])
def test_bad_arguments_fail_with_a_clear_message(tmp_path, capsys, args, message):
    assert main(["shards", "build", *args, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_phantoms_command_writes_the_native_layouts(tmp_path, capsys):
    assert main(["shards", "phantoms", "--out", str(tmp_path), "--n", "2", "--sets", "head,chest"]) == 0
    assert len(list((tmp_path / "head" / "RawImage").rglob("*.bmp"))) == 2
    assert len(list((tmp_path / "chest" / "labels").glob("*.txt"))) == 2
    assert "--source head=" in capsys.readouterr().out
    assert main(["shards", "phantoms", "--out", str(tmp_path), "--sets", "foot"]) == 2


def test_a_carved_val_id_the_writer_rejects_leaves_a_build_that_verifies(tmp_path, capsys):
    raw = write_phantoms(tmp_path / "raw", n=8, seed=3, sets=["hand"])["hand"]
    build = ["shards", "build", "--source", f"hand={raw}", "--max-side", "128", "--workers", "1", "--no-progress"]
    assert main([*build, "--out", str(tmp_path / "clean")]) == 0
    carved = json.loads((tmp_path / "clean" / "manifest.json").read_text())["datasets"]["hand"]["source"]["validation"]
    table = raw / "all.csv"
    rows = table.read_text().splitlines()
    table.write_text("\n".join(f"{r.split(',')[0]},nan,{r.split(',', 2)[2]}" if r.startswith(f"{carved['ids'][0]},")
                               else r for r in rows) + "\n")
    capsys.readouterr()
    assert main([*build, "--out", str(tmp_path / "shards")]) == 0
    assert "(1 more rejected when written)" in capsys.readouterr().out
    record = json.loads((tmp_path / "shards" / "manifest.json").read_text())["datasets"]["hand"]["source"]["validation"]
    assert record["rejected_ids"] == carved["ids"][:1] and carved["ids"][0] not in record["ids"]
    assert main(["shards", "verify", str(tmp_path / "shards")]) == 0  # the build's own output passes its check


@pytest.mark.parametrize("held", ["[1, 2, 3]", "not json", '{"name": "my notes"}'])
def test_an_out_holding_another_manifest_is_refused_and_left_as_it_is(tmp_path, capsys, held):
    raw = write_phantoms(tmp_path / "raw", n=2, seed=3, sets=["leg"])["leg"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text(held)
    assert main(["shards", "build", "--source", f"leg={raw}", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert "manifest.json" in err and ("not a MedSapiens shard manifest" in err or "not valid JSON" in err)
    assert (tmp_path / "out" / "manifest.json").read_text() == held


def test_a_manifest_nested_too_deep_is_one_line(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    assert main(["shards", "verify", str(tmp_path)]) == 1  # the shards under check fail it
    assert "manifest.json: JSON nested too deep to read" in capsys.readouterr().err


def test_two_datasets_that_would_share_a_shard_name_are_refused_before_writing(tmp_path, capsys):
    for folder in ("c1", "c2"):
        root = tmp_path / folder
        root.mkdir()
        for i in range(3):
            Image.new("L", (40, 30), 100).save(root / f"{i}.png")
        (root / "ann.json").write_text(json.dumps({
            "images": [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in range(3)],
            "annotations": [{"image_id": i, "keypoints": [5, 5, 2, 9, 9, 2]} for i in range(3)],
            "categories": [{"id": 1, "keypoints": ["a", "b"]}]}))
    out = tmp_path / "out"
    assert main(["shards", "build", "--source", f"x:coco={tmp_path / 'c1' / 'ann.json'}", "--opt", "x.split=y-train",
                 "--source", f"x-y:coco={tmp_path / 'c2' / 'ann.json'}", "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "would both write shard x-y-train-000000.tar" in err and err.count("\n") == 1
    assert not list(out.glob("*.tar"))


@pytest.mark.parametrize("extra, message", [
    (["--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    (["--max-side", "8"], "--max-side must be at least 16, got 8"),
    (["--out-is-a-file"], "is a file; the shards need a folder"),
])
def test_build_options_that_cannot_work_are_named_one_by_one(tmp_path, capsys, extra, message):
    raw = write_phantoms(tmp_path / "raw", n=2, seed=3, sets=["leg"])["leg"]
    out = tmp_path / "out"
    if extra == ["--out-is-a-file"]:
        out.write_text("my notes")
        extra = []
    assert main(["shards", "build", "--source", f"leg={raw}", "--out", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
