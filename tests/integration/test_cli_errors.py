"""A user's mistake gets one line naming the file or key and exit 2, never a traceback, and is
caught before anything slow starts."""
from __future__ import annotations

import os
import subprocess

import pytest
from conftest import CLI, DEMO_CONFIG, refused, refused_here


def test_predict_and_evaluate_name_what_is_missing(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    refused(["predict", "--bundle", str(tmp_path / "nobundle"), "--out", str(tmp_path / "o"), str(tmp_path)],
            "nobundle is not a bundle")
    refused_here(capsys, ["predict", "--bundle", str(tmp_path), "--out", str(tmp_path / "o"),
                          str(tmp_path / "none.png")], "no such file or folder", "none.png")
    refused_here(capsys, ["evaluate", "--bundle", str(tmp_path / "nobundle"), "--shards", str(tmp_path),
                          "--out", str(tmp_path / "e")], "nobundle")
    refused_here(capsys, ["evaluate", "--predictions", str(tmp_path / "p.json"), "--out", str(tmp_path / "e")],
                 "--predictions and --ground-truth together")
    refused_here(capsys, ["evaluate", "--predictions", str(tmp_path / "p.json"), "--ground-truth", str(tmp_path / "g.json"),
                          "--out", str(tmp_path / "e")], "ground-truth file not found", "g.json")


def test_pretrain_run_as_documented_and_export_of_a_folder_that_is_no_run(tmp_path, capsys):
    refused(["pretrain", "run", "--config", str(tmp_path / "missing.yaml")], "config file not found", "missing.yaml")
    refused_here(capsys, ["pretrain", "run", "--config", str(DEMO_CONFIG), "train.no_such_key=1"], "no_such_key")
    for given, what in ((tmp_path / "none.pth", "no such file"), ("", "no such file"), (tmp_path, "a folder")):
        refused_here(capsys, ["pretrain", "run", "--config", str(DEMO_CONFIG), f"run_dir={tmp_path / 'r'}",
                              f"model.checkpoint={given}"], f"model.checkpoint '{given}': {what}; give a Sapiens checkpoint")
    refused_here(capsys, ["pretrain", "export", str(tmp_path), "--out", str(tmp_path / "b")],
                 f"{tmp_path} is not a training run directory (no run.json")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text('{"stage": "pretrain"}')
    (tmp_path / "notes.txt").write_text("notes")
    refused_here(capsys, ["pretrain", "export", str(run_dir), "--out", str(run_dir)], f"--out {run_dir} holds run.json")
    refused_here(capsys, ["pretrain", "export", str(run_dir), "--out", str(tmp_path / "notes.txt")], "is a file; a bundle is a folder")
    (run_dir / "run.json").write_text('{"stage": "finetune"}')  # resumes as it stopped: no universal checkpoint
    refused_here(capsys, ["pretrain", "universal", str(run_dir)], f"{run_dir} is a finetune run, not a pretraining run")


def test_convert_and_verify_name_the_file_that_is_not_what_they_read(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("notes")
    refused_here(capsys, ["shards", "verify", str(tmp_path / "notes.txt")],
                 f"no manifest at {tmp_path}/notes.txt/manifest.json")
    for given, what in ((tmp_path / "none.pth", "no such file"), (tmp_path, "a folder")):
        out = str(tmp_path / "b.safetensors")
        refused_here(capsys, ["model", "convert", str(given), "--arch", "sapiens_tiny", "--out", out],
                     f"checkpoint {given}: {what}; give the Sapiens checkpoint file to convert")


def test_s3_without_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_ENDPOINT_URL="http://127.0.0.1:9")
    proc = subprocess.run([*CLI, "shards", "verify", "s3://medsapiens-test/shards"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("error: ") and "s3:// needs AWS credentials" in proc.stderr


@pytest.mark.timeout(300)
def test_finetune_checks_dataset_bundle_and_numbers_before_starting(phantom_shards, tmp_path, capsys):
    base = ["finetune", "--shards", str(phantom_shards), "--run-dir", str(tmp_path / "run")]
    refused([*base, "--dataset", "knee", "--init", "scratch"], "dataset 'knee' is not in the manifest")
    refused_here(capsys, [*base, "--dataset", "leg", "--bundle", str(tmp_path / "nobundle")], "nobundle is not a bundle")
    refused_here(capsys, [*base, "--dataset", "leg", "--init", "scratch", "--steps", "-1"], "--steps must be above 0")
    refused_here(capsys, [*base, "--dataset", "leg", "--init", "scratch", "--shots", "-2"], "--shots")
    refused_here(capsys, [*base, "--dataset", "leg", "--init", "scratch", "--batch-size", "0"], "--batch-size")
    refused_here(capsys, [*base, "--dataset", "leg", "--init", "scratch", "--seeds", "0,1,0"], "seeds (--seeds) lists seed(s) [0] more than once")
    refused_here(capsys, [*base, "--dataset", "leg", "--init", "scratch", "--steps", "5", "--epochs", "2"], "give --steps or --epochs")
    refused_here(capsys, [*base, "--dataset", "leg", "--init", "scratch", "data.val_split=train"], "data.val_split is the training split")
    refused_here(capsys, [*base, "--dataset", "leg", "--init", "scratch", "--shots", "5000"], "--shots 5000 asks for more images than 'leg'")
    refused_here(capsys, [*base, "--dataset", "leg", "--init", "scratch", "--reinit-head"],
                 "reinit_head is read only with init=bundle, and this run has init=scratch: leave it out")
    refused_here(capsys, [*base, "--dataset", "leg", "--init", "scratch", "data.temperature=3"],  # the stage's own word
                 "data.temperature: pretraining's mixture of datasets, which fine-tuning does not read")
    for missing, what in ((tmp_path / "none.pth", "no such file"), (tmp_path, "a folder")):
        refused_here(capsys, [*base, "--dataset", "leg", "--init", "sapiens", "--checkpoint", str(missing)],
                     f"model.checkpoint (--checkpoint) {missing}: {what}, where init 'sapiens' needs a Sapiens checkpoint")
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_only_user_errors_become_one_line_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import medsapiens.cli
    import medsapiens.launch.cli
    from medsapiens.errors import InputError, UserError, user_message
    from medsapiens.training.checkpoints import CheckpointError

    assert issubclass(CheckpointError, UserError) and isinstance(InputError("x"), ValueError)
    assert user_message(InputError("data.sigma must be a positive number")) == "data.sigma must be a positive number"
    assert user_message(ValueError("operands could not be broadcast")) is None

    def failing(error):
        def command(args):
            raise error
        return command

    for error, code in ((CheckpointError("run/checkpoints: no complete tag"), 2), (ValueError("a bug"), None)):
        monkeypatch.setattr(medsapiens.cli, "run_info", failing(error))
        if code is None:
            with pytest.raises(ValueError, match="a bug"):
                medsapiens.launch.cli.main(["model", "info", "--arch", "sapiens_tiny"])
        else:
            assert medsapiens.launch.cli.main(["model", "info", "--arch", "sapiens_tiny"]) == code
            assert capsys.readouterr().err == "error: run/checkpoints: no complete tag\n"


def test_a_user_error_is_written_in_one_write_so_ranks_lines_do_not_run_together(monkeypatch):
    """Under `python -u` (how DeepSpeed starts ranks) print wrote the text and its newline apart: two ranks'
    identical errors came out as one line."""
    import io

    from medsapiens.errors import InputError, run_command

    writes: list[str] = []

    class Unbuffered(io.StringIO):
        def write(self, text):
            writes.append(text)
            return len(text)

    monkeypatch.setattr("sys.stderr", Unbuffered())

    def refuse():
        raise InputError("no manifest at shardz/manifest.json")

    assert run_command(refuse) == 2
    assert writes == ["error: no manifest at shardz/manifest.json\n"]


def test_output_into_a_pipe_whose_reader_left_ends_quietly():
    """`medsapiens model info | head -4`: the reader closes the pipe before the command is done writing."""
    proc = subprocess.Popen([*CLI, "model", "info", "--arch", "sapiens_tiny"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before its first line: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""
