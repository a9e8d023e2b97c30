"""`medsapiens model info` and `medsapiens model convert`."""
import subprocess
import sys

import torch
from conftest import largest_micro_batches
from sapiens_checkpoints import released_state

from medsapiens.launch.cli import main
from medsapiens.model import ARCHS, build_backbone, count_params, forward_flops, memory_estimate
from medsapiens.model.cost import GPU_MEMORY_GIB, largest_micro_batch
from medsapiens.model.weights import read_tensors


def test_info_prints_the_computed_numbers(capsys):
    assert main(["model", "info", "--arch", "sapiens_tiny", "--img-size", "256", "192",
                 "--trunk-width", "64", "--heads", "19"]) == 0
    out = capsys.readouterr().out
    counted = count_params("sapiens_tiny", (256, 192), 64, 19)
    assert counted.backbone == sum(p.numel() for p in build_backbone("sapiens_tiny", (256, 192)).parameters())
    assert f"backbone {counted.backbone:,}" in out and f"decoder {counted.decoder:,}" in out
    assert f"total {forward_flops('sapiens_tiny', (256, 192), 64, 19).total / 1e9:.2f}" in out
    assert "activations per image, checkpointed" in out


def test_info_prints_the_largest_micro_batch_per_gpu(capsys):
    rows = largest_micro_batches(capsys, "sapiens_2b")
    memory = memory_estimate("sapiens_2b", (1024, 768), 768, 19, precision="bf16")
    assert rows["one GPU, checkpointed"] == [largest_micro_batch(memory, gib, checkpointing=True)
                                             for gib in GPU_MEMORY_GIB.values()]
    assert rows["one GPU, checkpointed"][0] == 0 < rows["8 GPUs, ZeRO-3, checkpointed"][0]  # 2b on 40 GB: ZeRO-3
    assert 32 <= rows["one GPU, checkpointed"][2]  # measured: micro-batch 32 fits one H200 (88.1 GiB)


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["model", "info", "--arch", "sapiens_9b"]) == 2
    assert "unknown arch 'sapiens_9b'" in capsys.readouterr().err
    assert main(["model", "info", "--arch", "sapiens_tiny", "--img-size", "250", "192"]) == 2
    assert "250x192" in capsys.readouterr().err


def test_convert_writes_a_backbone_with_its_provenance(tmp_path, capsys):
    checkpoint, out = tmp_path / "sapiens_tiny_clean.pth", tmp_path / "tiny.safetensors"
    torch.save({"backbone." + k: v for k, v in released_state(ARCHS["sapiens_tiny"]).items()}, checkpoint)
    assert main(["model", "convert", str(checkpoint), "--arch", "sapiens_tiny", "--out", str(out)]) == 0
    assert "ignored (1): backbone.cls_token" in capsys.readouterr().out
    tensors, metadata = read_tensors(out)
    assert tensors.keys() == build_backbone("sapiens_tiny").state_dict().keys()
    assert tensors["pos_embed"].shape == (1, 4096, 192)
    assert metadata["arch"] == "sapiens_tiny" and metadata["pos_embed_grid"] == "64x64"
    assert metadata["source"] == "sapiens_tiny_clean.pth" and len(metadata["source_sha256"]) == 64
    written = out.read_bytes()
    assert main(["model", "convert", str(checkpoint), "--arch", "sapiens_tiny", "--out", str(out)]) == 2
    assert f"--out {out} exists; pass --force to replace it" in capsys.readouterr().err
    assert main(["model", "convert", str(checkpoint), "--arch", "sapiens_small", "--out", str(out), "--force"]) == 2
    assert "in the checkpoint but" in capsys.readouterr().err and out.read_bytes() == written
    assert main(["model", "convert", str(checkpoint), "--arch", "sapiens_tiny", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: name the file BACKBONE.safetensors" in capsys.readouterr().err
    deeper = tmp_path / "new" / "folder" / "tiny.safetensors"
    assert main(["model", "convert", str(checkpoint), "--arch", "sapiens_tiny", "--out", str(deeper)]) == 0
    again, again_metadata = read_tensors(deeper)
    assert again_metadata == metadata and all(torch.equal(again[k], t) for k, t in tensors.items())
    assert not list(deeper.parent.glob(".*"))  # no temporary left


def test_a_checkpoint_missing_a_tensor_is_one_line_naming_it(tmp_path, capsys):
    state = released_state(ARCHS["sapiens_tiny"])
    del state["layers.2.ln2.bias"]
    checkpoint, out = tmp_path / "missing.pth", tmp_path / "tiny.safetensors"
    torch.save(state, checkpoint)
    assert main(["model", "convert", str(checkpoint), "--arch", "sapiens_tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{checkpoint} does not fit sapiens_tiny: missing (1): blocks.2.norm2.bias" in err
    assert not out.exists()


def test_cli_registration_imports_no_torch():
    code = "import sys, medsapiens.launch.cli; medsapiens.launch.cli.build_parser(); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_convert_reads_a_non_square_table_at_the_input_size_given(tmp_path, capsys):
    """A pose checkpoint trained at 1024x768: a cls slot and a 64x48 grid, which its 3073 rows cannot tell."""
    state = {"backbone." + k: v for k, v in released_state(ARCHS["sapiens_tiny"]).items()}
    state["backbone.pos_embed"] = torch.randn(1, 1 + 64 * 48, 192)
    checkpoint, out = tmp_path / "pose.pth", tmp_path / "pose.safetensors"
    torch.save(state, checkpoint)
    convert = ["model", "convert", str(checkpoint), "--arch", "sapiens_tiny", "--out", str(out)]
    assert main(convert) == 2
    assert "give the input size it was trained at: `medsapiens model convert --img-size H W`" in capsys.readouterr().err
    assert main([*convert, "--img-size", "1024", "1024"]) == 2 and not out.exists()
    assert "its pos_embed's 3073 tokens are not a 64x64 grid (the recorded or given one)" in capsys.readouterr().err
    assert main([*convert, "--img-size", "1024", "768"]) == 0
    tensors, metadata = read_tensors(out)
    assert metadata["pos_embed_grid"] == "64x48" and torch.equal(tensors["pos_embed"], state["backbone.pos_embed"][:, 1:])
