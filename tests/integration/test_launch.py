"""`medsapiens launch`: the deepspeed command for this machine, a hostfile and a SLURM allocation
(--dry-run), the env file for ranks on other hosts (content, mode, no secret in any output), config
checks before launching, Ctrl-C, and one real 2-rank CPU pretraining run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import DEEPSPEED, REPO

from medsapiens import config as configlib
from medsapiens.errors import InputError, UserError
from medsapiens.launch import launcher
from medsapiens.launch.cli import main
from medsapiens.launch.rank_env import RANK_PREFIXES
from medsapiens.pretrain.config import PretrainConfig
from medsapiens.training.engine import deepspeed_file

DEMO = str(REPO / "launch/experiments/demo.yaml")
DEMO_FINETUNE = str(REPO / "launch/experiments/demo_finetune.yaml")
SECRET, TOKEN, KEY_ID = "wJalrXUtnFEMI-not-a-real-secret", "FQoGZXIvYXdzEJr-session", "AKIAEXAMPLEKEYID"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No variables of the caller's shell or SLURM job leak in; home and cwd hold no .deepspeed_env."""
    for name in list(os.environ):
        if name.startswith((*RANK_PREFIXES, "SLURM", "DS_ENV_FILE")):
            monkeypatch.delenv(name)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def s3_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    monkeypatch.setenv("HF_TOKEN", "hf-not-for-the-ranks")


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# three nodes\nnode-a slots=4\nnode-b slots=4\nnode-c slots=2\n")
    return path


@pytest.fixture
def remote_tools(monkeypatch, tmp_path):
    """pdsh and ssh for a launch over ssh: pdsh is only looked for; ssh logs the host it is asked to reach
    and answers for every host but those named down-*, as ssh does for a name it cannot resolve."""
    tools = tmp_path / "remote-tools"
    tools.mkdir()
    (tools / "pdsh").write_text("#!/bin/sh\nexit 0\n")
    (tools / "ssh").write_text(f"""#!{sys.executable}
import sys
host = sys.argv[-2]
with open({str(tools / "ssh.log")!r}, "a") as log:
    log.write(host + "\\n")
if host.startswith("down-"):
    sys.exit(f"ssh: Could not resolve hostname {{host}}: Name or service not known")
""")
    for tool in ("pdsh", "ssh"):
        (tools / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    return tools / "ssh.log"


def launch(capsys, *args) -> tuple[int, str, str]:
    status = main(["launch", *args])
    out, err = capsys.readouterr()
    return status, out, err


def printed_command(out: str) -> str:
    lines = out.splitlines()
    return lines[lines.index("command:") + 1].strip()


def section(out: str, title: str) -> list[str]:
    """The indented lines under the line starting with `title`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    block = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        block.append(line.strip())
    return block


@pytest.mark.timeout(60)
def test_local_dry_run_prints_the_exact_command(capsys, tmp_path):
    status, out, _ = launch(capsys, "pretrain", "--config", DEMO, "--gpus", "2", "--master-port", "29123",
                            "--dry-run", "train.max_steps=4", "data.datasets=[head, hand]")
    assert status == 0
    assert out.splitlines()[0] == "medsapiens launch pretrain: this machine, 2 rank(s), master 127.0.0.1:29123"
    assert out.splitlines()[1] == ("the overrides change: data.datasets ['head', 'hand', 'chest'] -> ['head', 'hand']; "
                                   "train.max_steps 800 -> 4")  # as the ranks will read them
    assert printed_command(out) == (f"{DEEPSPEED} --hostfile /dev/null --num_gpus 2 --master_port 29123 --module medsapiens.pretrain --config {DEMO} "
                                    "train.max_steps=4 'data.datasets=[head, hand]'")
    status, out, _ = launch(capsys, "pretrain", "--config", DEMO, "--dry-run", "--resume", "universal")
    port = int(out.splitlines()[0].rsplit(":", 1)[1])  # a free port, picked here
    assert "the overrides change" not in out
    assert 1024 < port < 65536
    assert printed_command(out) == f"{DEEPSPEED} --hostfile /dev/null --master_port {port} --module medsapiens.pretrain --config {DEMO} --resume universal"
    unset = tmp_path / "unset.yaml"  # valid only with its override: nothing to compare it with
    unset.write_text(Path(DEMO).read_text().replace("max_steps: 800", "max_steps: ???"))
    status, out, err = launch(capsys, "pretrain", "--config", str(unset), "--dry-run", "train.max_steps=4")
    assert status == 0 and "the overrides change" not in out, err


def one_gpu_machine(monkeypatch, visible: str | None = None) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible.split(",")) if visible else 1)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


@pytest.mark.timeout(60)
def test_ranks_past_the_gpus_are_refused_and_visible_devices_are_kept(capsys, monkeypatch, tmp_path):
    from medsapiens.distributed import local_gpu

    one_gpu_machine(monkeypatch)
    status, _, err = launch(capsys, "pretrain", "--config", DEMO, "--gpus", "2", "--dry-run")
    assert status == 2 and err.strip() == "error: --gpus 2: this machine has 1 GPU(s); give --gpus 1 or fewer"
    demo = tmp_path / "demo"
    (demo / "shards").mkdir(parents=True)
    (demo / "demo.json").write_text("{}")
    assert main(["demo", "--ranks", "2", "--fresh", "--out", str(demo)]) == 2  # the demo's own flag named
    assert capsys.readouterr().err.strip() == "error: --ranks 2: this machine has 1 GPU(s); give --ranks 1 or fewer"
    assert (demo / "shards").is_dir()  # checked before --fresh deletes anything
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank another launcher started past the GPUs
    with pytest.raises(UserError, match=r"^local rank 1 has no GPU: this node shows 1; start at most 1 rank\(s\) per node$"):
        local_gpu()
    # DeepSpeed ignores and drops CUDA_VISIBLE_DEVICES given --num_gpus: the runner gets the first --gpus of them
    one_gpu_machine(monkeypatch, "4,5,6")
    status, out, _ = launch(capsys, "pretrain", "--config", DEMO, "--gpus", "2", "--master-port", "29123", "--dry-run")
    assert status == 0 and out.splitlines()[0] == ("medsapiens launch pretrain: this machine, 2 rank(s) on GPUs 4,5, "
                                                   "master 127.0.0.1:29123")
    assert printed_command(out) == (f"CUDA_VISIBLE_DEVICES=4,5 {DEEPSPEED} --hostfile /dev/null --master_port 29123 --module "
                                    f"medsapiens.pretrain --config {DEMO}")
    status, _, err = launch(capsys, "pretrain", "--config", DEMO, "--gpus", "4", "--dry-run")
    assert status == 2 and "--gpus 4: this machine has 3 GPU(s) (CUDA_VISIBLE_DEVICES=4,5,6)" in err
    status, out, _ = launch(capsys, "pretrain", "--config", DEMO, "--dry-run")  # one rank per GPU, as DeepSpeed counts
    assert status == 0 and "global batch: 3 rank(s) x micro-batch 8 x accumulation 1 = 24 (" in out
    # UUIDs, which DeepSpeed's runner drops (and cannot parse without --num_gpus): its ranks use GPUs 0, 1, ...
    one_gpu_machine(monkeypatch, "GPU-8f2c")
    all_gpus = ["8f2c"]  # a container showing only its own GPU, with the variable or without
    monkeypatch.setattr(launcher, "gpus_seen", lambda environ: ["8f2c"] if "CUDA_VISIBLE_DEVICES" in environ else all_gpus)
    for flags in (["--gpus", "1"], []):
        status, out, _ = launch(capsys, "pretrain", "--config", DEMO, *flags, "--master-port", "29123", "--dry-run")
        assert status == 0 and printed_command(out).startswith(
            f"{DEEPSPEED} --hostfile /dev/null --num_gpus 1 --master_port 29123 ")
    tail = (" by UUID, which DeepSpeed's launcher cannot pass on: its ranks would run on GPUs 0, 1, ... of the machine, "
            "perhaps not those; list them by index (CUDA_VISIBLE_DEVICES=2,3). A MIG slice, which only a UUID names, "
            "takes one process started without the launcher (python -m medsapiens.pretrain)")
    for every, why in ((["07aa", "3b1e", "8f2c", "c4d0"], "names 1 GPU(s), not the 4 a process here sees without it,"),
                       (["07aa"], "names 1 GPU(s), not the 1 a process here sees without it,"),  # another (a MIG slice)
                       (None, "names GPUs that cannot be matched with those a process here sees without it")):
        all_gpus = every
        for flags in (["--gpus", "1"], []):
            status, _, err = launch(capsys, "pretrain", "--config", DEMO, *flags, "--dry-run")
            assert status == 2 and err.strip() == f"error: CUDA_VISIBLE_DEVICES=GPU-8f2c {why}{tail}"
    assert main(["demo", "--out", str(demo)]) == 2 and "CUDA_VISIBLE_DEVICES=GPU-8f2c names" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_hostfile_dry_run_prints_command_env_file_names_and_no_secret(capfd, monkeypatch, s3_env, hostfile,
                                                                     remote_tools):
    # PyTorch's GPU settings go to the other hosts too (the out-of-memory line advises the allocator's);
    # the GPUs DeepSpeed assigns on each host and this machine's paths do not
    for name, value in {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCH_NCCL_BLOCKING_WAIT": "1",
                        "CUDA_LAUNCH_BLOCKING": "1", "CUDA_VISIBLE_DEVICES": "2,3", "TORCH_HOME": "/home/me/.torch"}.items():
        monkeypatch.setenv(name, value)
    status, out, err = launch(capfd, "pretrain", "--config", DEMO, "--hostfile", str(hostfile), "--nodes", "2",
                              "--dry-run", "train.max_steps=10")
    assert status == 0, err
    assert out.splitlines()[0] == \
        f"medsapiens launch pretrain: 2 host(s) from {hostfile}, 8 rank(s), master node-a:29500"
    assert printed_command(out) == (
        f"DS_ENV_FILE=LAUNCH_DIR/deepspeed_env {DEEPSPEED} --hostfile {hostfile} --num_nodes 2 "
        f"--master_addr node-a --master_port 29500 --log_level warning --module medsapiens.pretrain --config {DEMO} "
        "train.max_steps=10")
    assert section(out, "env file LAUNCH_DIR/deepspeed_env") == [
        "AWS_ACCESS_KEY_ID=<set>", "AWS_ENDPOINT_URL=http://127.0.0.1:9000", "AWS_REGION=eu-west-1",
        "AWS_SECRET_ACCESS_KEY=<set>", "AWS_SESSION_TOKEN=<set>", "CUDA_LAUNCH_BLOCKING=1", "NCCL_DEBUG=WARN",
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", "TORCH_NCCL_BLOCKING_WAIT=1"]
    for secret in (SECRET, TOKEN, KEY_ID):
        assert secret not in out + err
    assert not Path("LAUNCH_DIR").exists()  # a dry run writes nothing


@pytest.mark.timeout(60)
def test_an_ssh_launch_from_a_folder_holding_another_medsapiens_is_refused(capsys, monkeypatch, tmp_path, hostfile,
                                                                          remote_tools):
    """DeepSpeed's ssh launch puts the working directory first on every rank's PYTHONPATH: its medsapiens/ (a
    checkout's root, the package installed not editable) would be imported by every rank, holding no stage."""
    (tmp_path / "checkout" / "medsapiens").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "checkout")
    status, _, err = launch(capsys, "pretrain", "--config", DEMO, "--hostfile", str(hostfile), "--dry-run")
    assert status == 2 and err.strip() == (
        f"error: {tmp_path / 'checkout'} holds a medsapiens/ folder other than the installed package, which "
        "DeepSpeed's ssh launch would put first on every rank's import path: launch from another folder")
    monkeypatch.chdir(REPO)  # the package's own checkout, installed editable: its medsapiens/ is the one run
    assert launch(capsys, "pretrain", "--config", DEMO, "--hostfile", str(hostfile), "--dry-run")[0] == 0


@pytest.mark.timeout(60)
def test_hostfile_gpus_above_a_hosts_slots_is_refused(capsys, hostfile):
    status, _, err = launch(capsys, "pretrain", "--config", DEMO, "--hostfile", str(hostfile), "--gpus", "3",
                            "--dry-run")
    assert status == 2 and "--gpus 3 is more than" in err and "node-c (slots=2)" in err
    hostfile.write_bytes(b"node-a slots=4\nn\xffde slots=4\n")
    status, _, err = launch(capsys, "pretrain", "--config", DEMO, "--hostfile", str(hostfile), "--dry-run")
    assert status == 2 and err.strip() == f"error: {hostfile}: not UTF-8 text (byte 16); expected lines 'HOST slots=N'"


def slurm_node(monkeypatch, node_id: int, job_id: str = "73581") -> None:
    nodes = ["gpu-01", "gpu-02", "gpu-07"]
    monkeypatch.setenv("SLURM_JOB_ID", job_id)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-[01-02,07]")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu-[01-02,07]")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")
    monkeypatch.setenv("SLURM_NODEID", str(node_id))
    monkeypatch.setenv("SLURMD_NODENAME", nodes[node_id])
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # as SLURM sets it where jobs are confined to their GPUs
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")  # srun --ntasks-per-node=1: one launcher, not one rank


@pytest.mark.timeout(60)
def test_slurm_dry_run_agrees_across_nodes_but_for_the_node_rank(capsys, monkeypatch):
    outputs = []
    for node_id in range(3):
        slurm_node(monkeypatch, node_id)
        monkeypatch.setenv("SLURM_GPUS", "12")  # `--gpus 12`, 4 on each node
        status, out, err = launch(capsys, "pretrain", "--config", DEMO, "--slurm", "--dry-run")
        assert status == 0, err
        outputs.append(out)
    port = launcher.slurm_port("73581")
    assert launcher.SLURM_PORT_BASE <= port < launcher.SLURM_PORT_BASE + launcher.SLURM_PORT_SPAN
    for node_id, out in enumerate(outputs):
        host = ["gpu-01", "gpu-02", "gpu-07"][node_id]
        assert out.splitlines()[0] == (f"medsapiens launch pretrain: 3 SLURM node(s) x 4 = 12 rank(s), "
                                       f"master gpu-01:{port}, this is node {node_id} ({host})")
        assert section(out, "hostfile LAUNCH_DIR/hostfile") == ["gpu-01 slots=4", "gpu-02 slots=4", "gpu-07 slots=4"]
        assert printed_command(out) == (
            f"{DEEPSPEED} --hostfile LAUNCH_DIR/hostfile --no_ssh --node_rank {node_id} --master_addr gpu-01 "
            f"--master_port {port} --module medsapiens.pretrain --config {DEMO}")
    slurm_node(monkeypatch, 0, job_id="73582")
    _, out, err = launch(capsys, "finetune", "--config", DEMO_FINETUNE, "--slurm", "--dry-run", "--gpus", "2",
                         "dataset=leg", "bundle=b")
    assert f"master gpu-01:{launcher.slurm_port('73582')}," in out and launcher.slurm_port("73582") != port, err
    assert "3 SLURM node(s) x 2 = 6 rank(s)" in out and "--module medsapiens.finetune" in printed_command(out)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0,5,7")  # the 2 ranks' GPUs 0 and 1 are the job's
    status, out, err = launch(capsys, "pretrain", "--config", DEMO, "--slurm", "--dry-run", "--gpus", "2")
    assert status == 0, err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    status, _, err = launch(capsys, "pretrain", "--config", DEMO, "--slurm", "--dry-run", "--gpus", "8")
    assert status == 2 and err.strip() == ("error: --gpus 8, but SLURM gave each node 4 GPU(s) (SLURM_GPUS_ON_NODE); "
                                           "give --gpus 4 or fewer, or ask SLURM for more (--gpus-per-node)")


@pytest.mark.timeout(60)
def test_slurm_ranks_per_node_fall_back_to_tasks_per_node(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "cpu1")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "3")
    _, out, _ = launch(capsys, "pretrain", "--config", DEMO, "--slurm", "--dry-run")
    assert "1 SLURM node(s) x 3 = 3 rank(s)" in out
    assert ("warning: SLURM_GPUS_ON_NODE is not set, so the ranks per node are SLURM_NTASKS_PER_NODE=3 (one launcher "
            "task per node in the shipped sbatch): on GPU nodes ask SLURM for the GPUs (--gpus-per-node) or pass "
            "--gpus N") in out
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    _, out, _ = launch(capsys, "pretrain", "--config", DEMO, "--slurm", "--dry-run")
    assert "1 SLURM node(s) x 8 = 8 rank(s)" in out and "warning" not in out


@pytest.mark.timeout(60)
def test_the_plan_flags_placeholders_and_gives_the_global_batch(capsys, monkeypatch):
    recipe = str(REPO / "launch" / "experiments" / "sapiens_0.3b.yaml")
    slurm_node(monkeypatch, 0)
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    status, out, err = launch(capsys, "pretrain", "--config", recipe, "--slurm", "--dry-run")
    assert status == 0, err
    assert ("warning: placeholder(s) left in the config: model.checkpoint=/path/to/sapiens_0.3b_epoch_1600_clean.pth, "
            "data.shards=s3://YOUR-BUCKET/medsapiens/shards") in out
    assert ("global batch: 24 rank(s) x micro-batch 2 x accumulation 1 = 48 (the published recipe's is 8; optim.lr "
            "0.0005 is as configured, scale it (or data.micro_batch) if you mean to keep the recipe)") in out
    status, out, _ = launch(capsys, "pretrain", "--config", recipe, "--gpus", "4", "--dry-run",
                            "data.shards=/data/shards", "model.checkpoint=null")
    assert "placeholder" not in out and "global batch: 4 rank(s) x micro-batch 2 x accumulation 1 = 8 (the " \
        "published recipe's)" in out
    finetune = str(REPO / "launch" / "experiments" / "medsapiens_0.3b_finetune.yaml")
    status, out, _ = launch(capsys, "finetune", "--config", finetune, "--gpus", "4", "--dry-run",
                            "data.shards=/data/shards", "bundle=/runs/bundle", "dataset=leg")
    assert status == 0 and "placeholder" not in out  # a bundle start does not read model.checkpoint


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change, message", [
    ({"SLURM_STEP_NUM_TASKS": None, "SLURM_STEP_NODELIST": None}, "not an srun step"),
    ({"SLURM_STEP_NUM_TASKS": "12"}, "srun started 12 tasks on 3 node(s)"),
    ({"SLURMD_NODENAME": "gpu-07"}, "SLURM_NODEID=1 names gpu-02, but this is gpu-07"),
    ({"SLURM_GPUS_ON_NODE": None, "SLURM_NTASKS_PER_NODE": None}, "pass --gpus N"),
    ({"SLURM_STEP_NODELIST": "gpu-[01-02"}, "a '[' is never closed"),
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set"),
    ({"SLURM_GPUS": "10"}, "SLURM gave the job 10 GPUs (SLURM_GPUS) over 3 node(s), 4 on gpu-02: not as many on "
                           "each"),
    ({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, "SLURM gave this job GPUs 4,5,6,7 on gpu-02 (CUDA_VISIBLE_DEVICES), but "
                                          "DeepSpeed's launcher starts its 4 ranks there on GPUs 0..3, not all of them "
                                          "the job's"),
])
def test_slurm_misconfigurations_fail_before_launching(capsys, monkeypatch, change, message):
    slurm_node(monkeypatch, 1)
    for name, value in change.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    status, out, err = launch(capsys, "pretrain", "--config", DEMO, "--slurm", "--dry-run")
    assert status == 2 and message in err and "command:" not in out


def fake_deepspeed(tmp_path: Path) -> Path:
    """Records what a real `deepspeed` would be given (argv, the env file and its modes), exits 3."""
    script = tmp_path / "fake-deepspeed"
    script.write_text(f"""#!{sys.executable}
import json, os, stat, sys
from pathlib import Path
env_file = Path(os.environ["DS_ENV_FILE"])
record = dict(argv=sys.argv[1:], env_file=str(env_file), lines=env_file.read_text().splitlines(),
              mode=stat.S_IMODE(env_file.stat().st_mode), dir_mode=stat.S_IMODE(env_file.parent.stat().st_mode))
Path({str(tmp_path / "record.json")!r}).write_text(json.dumps(record))
sys.exit(3)
""")
    script.chmod(0o755)
    return script


@pytest.mark.timeout(60)
def test_env_file_is_private_merges_the_users_and_no_output_shows_a_secret(capfd, monkeypatch, tmp_path,
                                                                            s3_env, hostfile, remote_tools):
    monkeypatch.setattr(launcher, "deepspeed_executable", lambda: str(fake_deepspeed(tmp_path)))
    user_file = Path(".deepspeed_env")
    user_file.write_text("# mine\nNCCL_DEBUG=INFO\nMY_FLAG=1\nDB_URL=postgres://me:hunter2@db/x\n")
    status, out, err = launch(capfd, "pretrain", "--config", DEMO, "--hostfile", str(hostfile))
    assert status == 3  # the launcher's exit status is forwarded
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["mode"] == 0o600 and record["dir_mode"] == 0o700
    assert record["lines"] == [f"AWS_ACCESS_KEY_ID={KEY_ID}", "AWS_ENDPOINT_URL=http://127.0.0.1:9000",
                               "AWS_REGION=eu-west-1", f"AWS_SECRET_ACCESS_KEY={SECRET}",
                               f"AWS_SESSION_TOKEN={TOKEN}", "NCCL_DEBUG=INFO", "MY_FLAG=1",
                               "DB_URL=postgres://me:hunter2@db/x"]
    assert record["argv"][:2] == ["--hostfile", str(hostfile)]
    assert not Path(record["env_file"]).parent.exists()  # removed after the run
    assert user_file.read_text() == "# mine\nNCCL_DEBUG=INFO\nMY_FLAG=1\nDB_URL=postgres://me:hunter2@db/x\n"  # untouched
    assert f"NCCL_DEBUG=INFO  (from {Path.cwd() / '.deepspeed_env'})" in out
    assert f"DB_URL=<set>  (from {Path.cwd() / '.deepspeed_env'})" in out  # a password in a URL
    for secret in (SECRET, TOKEN, KEY_ID, "hunter2"):
        assert secret not in out + err
    assert sorted(remote_tools.read_text().split()) == ["node-a", "node-b", "node-c"]  # each reached before the launch


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["abc$HOME", "abc%hdef"])  # the remote shell's $, pdsh's %h
def test_a_value_the_remote_shell_would_expand_is_refused_without_showing_it(capsys, monkeypatch, hostfile, remote_tools,
                                                                               value):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", value)
    status, out, err = launch(capsys, "pretrain", "--config", DEMO, "--hostfile", str(hostfile), "--dry-run")
    assert status == 2 and "AWS_SECRET_ACCESS_KEY: its value holds a character" in err
    assert value not in out + err


def outward_addresses() -> list[str]:
    """This machine's address on its default route, if it has one (a UDP connect sends nothing)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return []
        return [probe.getsockname()[0]]


def test_an_address_names_this_machine_only_if_one_of_its_interfaces_holds_it():
    from medsapiens.launch import hosts

    assert hosts.holds_address("127.0.0.1") and all(map(hosts.holds_address, outward_addresses()))
    for elsewhere in ("203.0.113.254", "0.0.0.0", "224.0.0.1", "255.255.255.255"):  # any can be bound to
        assert not hosts.holds_address(elsewhere), elsewhere
    assert not hosts.is_this_machine("203.0.113.254") and not hosts.holds_address("gpu-a")


@pytest.mark.timeout(60)
def test_one_host_elsewhere_is_reached_over_ssh_and_one_here_runs_here(capsys, tmp_path, remote_tools):
    """DeepSpeed starts a single host's ranks on the launching machine, whichever host it names."""
    import socket

    elsewhere, here = tmp_path / "elsewhere", tmp_path / "here"
    elsewhere.write_text("gpu-a slots=2\ngpu-b slots=2\n")
    status, out, err = launch(capsys, "pretrain", "--config", DEMO, "--hostfile", str(elsewhere), "--nodes", "1",
                              "--dry-run")
    assert status == 0, err
    assert " --log_level warning --force_multi --module " in printed_command(out) and "env file LAUNCH_DIR" in out
    assert "--no_ssh_check" not in out
    for name in (socket.gethostname(), "127.0.1.1", *outward_addresses()):  # Debian's /etc/hosts: 127.0.1.1
        here.write_text(f"{name} slots=2\n")
        status, out, err = launch(capsys, "pretrain", "--config", DEMO, "--hostfile", str(here), "--dry-run")
        assert status == 0, err
        assert "--force_multi" not in out and "the ranks inherit this environment" in out
        assert " --no_ssh_check " in printed_command(out)  # DeepSpeed would ssh here to check a hostfile


@pytest.mark.timeout(60)
def test_a_launch_over_ssh_without_pdsh_is_refused_in_one_line(capsys, monkeypatch, hostfile):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no pdsh on it
    status, _, err = launch(capsys, "pretrain", "--config", DEMO, "--hostfile", str(hostfile), "--dry-run")
    assert status == 2 and err.strip() == ("error: a launch over ssh needs pdsh on this machine (DeepSpeed starts "
                                           "the ranks of every host with pdsh over ssh): install it (e.g. apt install "
                                           "pdsh), or launch with --slurm")


@pytest.mark.timeout(60)
def test_a_launch_over_ssh_refuses_unreachable_hosts_and_arguments_the_remote_shell_would_change(
        capsys, monkeypatch, tmp_path, remote_tools):
    monkeypatch.setattr(launcher, "deepspeed_executable", lambda: str(fake_deepspeed(tmp_path)))
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-a slots=1\ndown-b slots=1\ndown-c slots=1\n")
    status, _, err = launch(capsys, "pretrain", "--config", DEMO, "--hostfile", str(hosts))
    assert status == 2 and err.strip() == (
        "error: cannot reach 2 of the 3 host(s) by ssh without a password, as the launch needs (down-b: ssh: Could "
        "not resolve hostname down-b: Name or service not known; down-c: ssh: Could not resolve hostname down-c: "
        "Name or service not known)")
    assert not (tmp_path / "record.json").exists()  # DeepSpeed never started
    for override, shown in (("run_dir=runs/{a,b}", "'run_dir=runs/{a,b}'"),  # brace expansion: two arguments there
                            ("run_dir=runs/exp(lr=2e-4)", "'run_dir=runs/exp(lr=2e-4)'"),
                            ("run_dir=runs/$USER x", "'run_dir=runs/$USER x'"),
                            ("run_dir=runs/x_%n", "'run_dir=runs/x_%n'")):  # pdsh writes each host's number for %n
        status, _, err = launch(capsys, "pretrain", "--config", DEMO, "--hostfile", str(hosts), "--dry-run", override)
        assert status == 2 and err.startswith(f"error: {shown}: a launch over ssh passes it to the hosts' shell"), err
    status, out, err = launch(capsys, "pretrain", "--config", DEMO, "--hostfile", str(hosts), "--dry-run",
                              "data.datasets=[head, hand]", "data.shards=s3://b/p")  # double-quoted, as it is
    assert status == 0, err


@pytest.mark.timeout(60)
def test_config_errors_stop_the_launch_before_any_rank(capsys, tmp_path):
    status, out, err = launch(capsys, "pretrain", "--config", DEMO, "train.max_stepz=3")
    assert status == 2 and "unknown config key(s) train.max_stepz" in err and out == ""
    status, _, err = launch(capsys, "pretrain", "--config", DEMO, "train.deepspeed=zero5")
    assert status == 2 and "train.deepspeed: file not found: zero5 (presets: zero1, zero2, zero3, zero3_offload)" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    status, _, err = launch(capsys, "finetune", "--config", str(broken), "--dry-run")
    assert status == 2 and f"{broken}: not valid YAML" in err
    status, _, err = launch(capsys, "finetune", "--config", DEMO, "--dry-run", "not-an-override")
    assert status == 2 and "'not-an-override' is not of the form key=value" in err
    status, _, err = launch(capsys, "pretrain", "--config", DEMO, "--nodes", "2", "--dry-run")
    assert status == 2 and "--nodes 2 needs --hostfile or --slurm" in err


EXPERIMENTS = sorted((REPO / "launch/experiments").glob("*.yaml"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_experiment_loads_as_its_stage_config(path):
    from medsapiens.finetune.config import FinetuneConfig

    cfg = configlib.load(FinetuneConfig if "finetune" in path.name else PretrainConfig, path)
    assert deepspeed_file(cfg.train.deepspeed).is_file()


@pytest.mark.timeout(60)
def test_a_run_saved_with_the_former_preset_path_resumes_under_the_preset_name(tmp_path):
    """Runs written when the presets lived in launch/deepspeed/ name them by that path in config.yaml."""
    from medsapiens.training.run import RESOLVED_CONFIG, check_same_run

    cfg = configlib.load(PretrainConfig, REPO / "launch/experiments/demo.yaml", [f"run_dir={tmp_path}"])
    assert cfg.train.deepspeed == "zero2"
    assert deepspeed_file("launch/deepspeed/zero3.json") == deepspeed_file("zero3")
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    saved = configlib.to_dict(cfg)
    saved["train"]["deepspeed"] = "launch/deepspeed/zero2.json"
    (tmp_path / RESOLVED_CONFIG).write_text(yaml.safe_dump(saved))
    check_same_run(tmp_path, cfg, "auto", "")
    saved["train"]["deepspeed"] = "launch/deepspeed/zero3.json"
    (tmp_path / RESOLVED_CONFIG).write_text(yaml.safe_dump(saved))
    with pytest.raises(InputError, match="train.deepspeed: 'zero3' there, 'zero2' now"):
        check_same_run(tmp_path, cfg, "auto", "")


@pytest.mark.timeout(60)
def test_the_sapiens_recipes_differ_only_in_size_dependent_keys():
    configs = {size: configlib.to_dict(configlib.load(PretrainConfig, REPO / f"launch/experiments/sapiens_{size}.yaml"))
               for size in ("0.3b", "0.6b", "1b", "2b")}
    assert {size: (c["model"]["arch"], c["model"]["grad_checkpointing"], c["train"]["deepspeed"])
            for size, c in configs.items()} == {
        "0.3b": ("sapiens_0.3b", False, "zero2"), "0.6b": ("sapiens_0.6b", False, "zero2"),
        "1b": ("sapiens_1b", True, "zero3"), "2b": ("sapiens_2b", True, "zero3")}
    recipe = configs["0.3b"]
    assert recipe["model"]["img_size"] == [1024, 768] and recipe["data"]["datasets"] == ["head", "hand", "chest", "leg"]
    assert recipe["train"]["precision"] == "bf16" and recipe["data"]["sigma"] == 3.0
    assert recipe["optim"]["milestones"] == pytest.approx([170 / 210, 200 / 210])
    for size, c in configs.items():
        for section_name in ("data", "optim"):
            assert c[section_name] == recipe[section_name], (size, section_name)
        assert c["train"] | {"deepspeed": None} == recipe["train"] | {"deepspeed": None}
        assert c["run_dir"] == f"runs/sapiens_{size}/pretrain" and size in c["model"]["checkpoint"]


CTRL_C_CHILD = """
import signal, subprocess, sys, time
from pathlib import Path
# The stand-in for DeepSpeed's runner handles SIGINT itself, as the runner does, whatever the test
# inherited (a background job, e.g. on CI, starts with SIGINT ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
# A 'rank' that ignores the signals, as a stuck one would: only the launcher's clean-up can stop it.
rank = subprocess.Popen([sys.executable, "-c", "import signal, time; [signal.signal(s, signal.SIG_IGN) for s in "
                         "(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]; time.sleep(60)"])
Path(sys.argv[1]).write_text(str(rank.pid))
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL],
                         ids=["INT", "TERM", "USR1", "KILL"])
def test_a_signal_to_the_launcher_stops_every_process_it_started(tmp_path, signum):
    """Even a launcher killed outright (SIGKILL, the OOM killer) leaves nothing running: its keeper
    passes a SIGTERM on, kills what is left after the grace period, and removes the launcher's
    private directory, which the launcher can no longer do."""
    pid_file, launch_dir = tmp_path / "rank.pid", tmp_path / "launch"
    (launch_dir / "hostfile").parent.mkdir()
    (launch_dir / "hostfile").write_text("localhost slots=1\n")
    harness = (f"import os, sys\nfrom medsapiens.launch.launcher import run_command\n"
               f"sys.exit(run_command([sys.executable, '-c', {CTRL_C_CHILD!r}, {str(pid_file)!r}], os.environ, "
               f"stop_grace_s=1.0, launch_dir={str(launch_dir)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", harness], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    rank = int(pid_file.read_text())
    proc.send_signal(signum)
    assert proc.wait(timeout=40) == (-signum if signum == signal.SIGKILL else 128 + signum)
    deadline = time.monotonic() + 10
    while _alive(rank) or (signum == signal.SIGKILL and launch_dir.exists()):
        assert time.monotonic() < deadline, f"left behind: rank alive {_alive(rank)}, {launch_dir.exists()=}"
        time.sleep(0.1)
    assert launch_dir.is_dir() == (signum != signal.SIGKILL)  # else the launcher's own clean-up removes it


RECORDING_RUNNER = """
import signal, sys, time
from pathlib import Path
log = Path(sys.argv[1])
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
    signal.signal(signum, lambda n, frame: log.open("a").write(signal.Signals(n).name + "\\n"))
log.write_text("started\\n")
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_ctrl_c_reaches_the_job_as_sigterm_and_a_second_one_stops_it_at_once(tmp_path):
    """The first Ctrl-C stops the ranks as a scheduler would (a checkpoint at the step in progress,
    no KeyboardInterrupt inside DeepSpeed's hooks); the second does not wait for it."""
    log = tmp_path / "signals"
    harness = (f"import os, sys\nfrom medsapiens.launch.launcher import run_command\n"
               f"sys.exit(run_command([sys.executable, '-c', {RECORDING_RUNNER!r}, {str(log)!r}], os.environ, "
               f"stop_grace_s=30.0))")
    proc = subprocess.Popen([sys.executable, "-c", harness], env={**os.environ, "PYTHONPATH": str(REPO)})

    def wait_for(lines: list[str]) -> None:
        deadline = time.monotonic() + 20
        while not log.exists() or log.read_text().split() != lines:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text() if log.exists() else "no log"
            time.sleep(0.1)

    wait_for(["started"])
    proc.send_signal(signal.SIGINT)
    wait_for(["started", "SIGTERM"])
    time.sleep(0.5)
    assert proc.poll() is None  # the job is still stopping: the launcher waits for it
    second = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 128 + signal.SIGINT
    assert time.monotonic() - second < 15  # not the 30 s grace: killed at once
    assert log.read_text().split() == ["started", "SIGTERM"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("over_ssh, heard", [(False, "SIGUSR1"), (True, "SIGTERM")])
def test_sigusr1_reaches_the_job_as_sigterm_over_ssh(tmp_path, over_ssh, heard):
    """DeepSpeed's runner passes only SIGTERM on to the other hosts (pdsh pkill): SLURM's warning signal
    to a launch over ssh would stop this machine's processes alone."""
    log = tmp_path / "signals"
    harness = (f"import os, sys\nfrom medsapiens.launch.launcher import run_command\n"
               f"sys.exit(run_command([sys.executable, '-c', {RECORDING_RUNNER!r}, {str(log)!r}], os.environ, "
               f"stop_grace_s=1.0, over_ssh={over_ssh}))")
    proc = subprocess.Popen([sys.executable, "-c", harness], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 20
    while not log.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    for signum, lines in ((signal.SIGUSR1, ["started", heard]), (signal.SIGINT, ["started", heard, "SIGTERM"])):
        proc.send_signal(signum)
        while log.read_text().split() != lines:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # a second Ctrl-C: the recording runner stops on nothing else
    assert proc.wait(timeout=20) == 128 + signal.SIGUSR1


LEAVES_A_CHILD = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runner_status, status", [(0, 128 + signal.SIGKILL), (1, 1)])
def test_a_job_whose_processes_outlive_the_runner_does_not_end_with_status_0(tmp_path, runner_status, status):
    """DeepSpeed's runner exits 0 when its node launcher is killed outright (the OOM killer), leaving the ranks."""
    harness = (f"import os, sys\nfrom medsapiens.launch.launcher import run_command\n"
               f"sys.exit(run_command([sys.executable, '-c', {LEAVES_A_CHILD!r}, '{runner_status}'], os.environ, "
               f"stop_grace_s=1.0))")
    proc = subprocess.run([sys.executable, "-c", harness], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == status
    assert ("still running 1 s after DeepSpeed's runner ended; killed them" in proc.stderr) == (runner_status == 0)


def test_a_failure_outranks_the_stop_signal_in_the_exit_status():
    """A scheduler's script requeues on 128 + the signal: a crash while stopping must not read as a clean stop."""
    from medsapiens.errors import EXIT_STOPPED
    from medsapiens.launch.keeper import Relay

    relay = Relay()
    try:
        relay.received.append(signal.SIGUSR1)
        assert [relay.exit_status(s) for s in (0, EXIT_STOPPED, -signal.SIGTERM, 143, 1)] == [138, 138, 138, 138, 1]
    finally:
        relay.restore()


@pytest.fixture(scope="module")
def phantom_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    assert main(["shards", "phantoms", "--out", str(root / "raw"), "--n", "12"]) == 0
    assert main(["shards", "build", "--source", f"head={root / 'raw/head'}", "--source", f"hand={root / 'raw/hand'}",
                 "--out", str(root / "shards"), "--max-side", "128", "--no-progress"]) == 0
    return root / "shards"


def tiny_run(shards: Path, run: Path) -> list[str]:
    return [f"data.shards={shards}", f"run_dir={run}", "data.datasets=[head,hand]", "train.max_steps=4",
            "train.val_every=4", "train.checkpoint_every=4", "data.workers=0", "train.dist_timeout_s=120"]


def assert_complete_checkpoint(run: Path) -> None:
    latest = (run / "checkpoints/latest").read_text().strip()
    assert latest == "step_00000004" and (run / "checkpoints" / latest).is_dir()


@pytest.mark.timeout(180)
def test_real_two_rank_cpu_launch_leaves_a_complete_checkpoint(monkeypatch, tmp_path, phantom_shards):
    """Launched from a folder holding a `medsapiens/` of its own, as a checkout's root is where the package is
    installed (not editable): `python -m medsapiens...` imported that folder, which holds no stage."""
    checkout = tmp_path / "checkout"
    (checkout / "medsapiens").mkdir(parents=True)
    (checkout / "medsapiens" / "__init__.py").write_text("raise ImportError('the working directory was imported')\n")
    monkeypatch.chdir(checkout)  # the keeper and the ranks run `python -m medsapiens...` from here
    status = main(["launch", "pretrain", "--config", str(REPO / "launch/experiments/demo.yaml"), "--gpus", "2",
                   *tiny_run(phantom_shards, tmp_path / "run")])
    assert status == 0
    assert_complete_checkpoint(tmp_path / "run")


@pytest.mark.timeout(180)
def test_real_launch_on_two_simulated_slurm_nodes_without_ssh(tmp_path, phantom_shards):
    """Two launchers on this machine play the two nodes of an srun step (`localhost` and `127.0.0.1`),
    one rank each: node ranks, master address and port must agree for the ranks to meet."""
    job = {"SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": "localhost,127.0.0.1",
           "SLURM_STEP_NODELIST": "localhost,127.0.0.1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_GPUS_ON_NODE": "1",
           "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "medsapiens.launch.cli", "launch", "pretrain", "--slurm", "--config",
               "launch/experiments/demo.yaml", *tiny_run(phantom_shards, tmp_path / "run")]
    nodes = [subprocess.Popen(command, cwd=REPO, env={**os.environ, **job, "SLURM_NODEID": str(node)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=150)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[1][-3000:]
    assert "this is node 1 (127.0.0.1)" in outputs[1] and "dist_world_size=2" in outputs[1]
    assert_complete_checkpoint(tmp_path / "run")


@pytest.mark.timeout(240)
def test_sigusr1_to_a_real_launch_stops_every_rank_after_a_checkpoint(tmp_path, phantom_shards):
    """As SLURM's --signal=USR1 does before the time limit: the launcher passes it on, the ranks agree
    on a step, checkpoint there and exit; nothing of the job is left running."""
    import psutil

    from medsapiens.training import checkpoints

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "medsapiens.launch.cli", "launch", "pretrain", "--config", "launch/experiments/demo.yaml",
               "--gpus", "2", f"data.shards={phantom_shards}", f"run_dir={run_dir}", "data.datasets=[head,hand]",
               "train.max_steps=400", "train.checkpoint_every=200", "train.val_every=400", "train.log_every=1",
               "data.workers=1", "data.micro_batch=4", "model.trunk_width=32", "train.dist_timeout_s=120"]
    job = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 150
    while not (run_dir / "metrics.jsonl").is_file() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.2)
    started = psutil.Process(job.pid).children(recursive=True)  # runner, ranks, data workers
    job.send_signal(signal.SIGUSR1)
    out = job.communicate(timeout=120)[0]
    assert job.returncode == 128 + signal.SIGUSR1, out[-3000:]
    line = next(line for line in out.splitlines() if "by a stop signal" in line)
    step = int(line.split("stopped at step ")[1].split(" ")[0])
    assert checkpoints.latest_tag(run_dir / "checkpoints") == checkpoints.checkpoint_tag(step)
    time.sleep(0.5)
    assert started and not [p.pid for p in started if _alive(p.pid)]
