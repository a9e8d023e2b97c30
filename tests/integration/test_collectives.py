"""The GPU path's device rules, checked on CPU: every collective's tensors on the device its backend
serves (NCCL: the rank's GPU), the rank's GPU current before the process group starts, every
collective in one module, no DeepSpeed op compiled for the optimizer; and each rank's share of the
node's CPU cores."""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import REPO, run

from medsapiens import distributed
from medsapiens.errors import InputError, UserError
from medsapiens.model.cost import PRECISIONS
from medsapiens.training.engine import OptimConfig, TrainConfig, deepspeed_config

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_to_all", "barrier",
               "broadcast", "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "scatter", "scatter_object_list", "send", "recv", "monitored_barrier"}
SOURCES = ("medsapiens", "pretrain", "finetune", "evaluate", "launch", "shards", "bench")
ACCELERATOR = torch.device("meta")  # stands for the rank's GPU: a device that is not the CPU


class Reached(Exception):
    """The fake collective was handed its tensors on the right device."""


def nccl_like(tensor: torch.Tensor) -> None:
    """NCCL's own check: a tensor off the rank's GPU has no backend."""
    if tensor.device != ACCELERATOR:
        raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
    raise Reached


@pytest.fixture
def under_nccl(monkeypatch):
    """torch.distributed as NCCL shows it to rank 0 of 2, with `ACCELERATOR` as the rank's GPU."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed, "collective_device", lambda: ACCELERATOR)


def test_sum_across_ranks_hands_nccl_a_tensor_on_the_gpu(under_nccl, monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: nccl_like(tensor))
    with pytest.raises(Reached):
        distributed.sum_across_ranks({"head": (1.5, 3)}, ["head", "hand"])


def test_object_broadcasts_stage_their_bytes_on_the_gpu(under_nccl, monkeypatch):
    def broadcast_object_list(objects, src=None, group=None, device=None, **kwargs):
        nccl_like(torch.empty(0, device=device))

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    with pytest.raises(Reached):
        distributed.broadcast_from_rank0([None])
    with pytest.raises(Reached):
        distributed.decide_on_rank0(lambda: None)


def test_collective_device_and_barrier_follow_the_backend(monkeypatch):
    assert distributed.collective_device() == torch.device("cpu")  # no process group
    barriers = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda device_ids=None, **kwargs: barriers.append(device_ids))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device() == torch.device("cpu")
    distributed.barrier()
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert distributed.collective_device() == torch.device("cuda", 1)
    distributed.barrier()
    assert barriers == [None, [1]]


def test_the_rank_gpu_is_current_before_the_process_group_starts(monkeypatch):
    import deepspeed

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(deepspeed, "init_distributed",
                        lambda dist_backend, timeout: calls.append(("init_process_group", dist_backend)))
    # the CPU's switch reads DeepSpeed's table of compatible ops, which on a GPU would probe every CUDA op
    monkeypatch.setattr(distributed, "without_deepspeed_inference_all_reduce", lambda: calls.append(("cpu switch",)))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    for name, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    assert distributed.init_distributed(60) == (1, 2)
    assert calls == [("set_device", 1), ("init_process_group", "nccl")]


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_ranks_of_a_node_share_its_cores_unless_omp_num_threads_says_otherwise(monkeypatch, torch_threads):
    """Every rank started with torch's own count (here 8 threads) would take all the node's cores."""
    monkeypatch.setattr(distributed, "TORCH_THREADS", 8)
    for name in ("OMP_NUM_THREADS", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(3)  # as a caller of the stage's Python API may have
    assert distributed.share_cores() == 3  # a process alone keeps its count
    for local_ranks, share in (("2", 4), ("3", 2), ("16", 1), ("2", 4)):  # the last: a second start in one process
        monkeypatch.setenv("LOCAL_SIZE", local_ranks)
        assert distributed.share_cores() == distributed.share_cores() == torch.get_num_threads() == share, local_ranks
    torch.set_num_threads(6)
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # the user's choice
    assert distributed.share_cores() == 6


def test_use_device_makes_a_gpu_current(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert distributed.use_device("cuda:3") == torch.device("cuda", 3)
    assert distributed.use_device("cpu") == torch.device("cpu")
    assert current == [3]


def collective_calls(path: Path) -> list[str]:
    """`dist.X(...)` / `torch.distributed.X(...)` calls of a collective X in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{node.func.attr}")
    return found


def test_only_the_distributed_module_calls_collectives():
    files = [p for d in SOURCES for p in (REPO / d).rglob("*.py")] + list((REPO / "tests").glob("ds_*.py"))
    calls = [c for p in files if p != REPO / "medsapiens" / "distributed.py" for c in collective_calls(p)]
    assert calls == []
    assert len(collective_calls(REPO / "medsapiens" / "distributed.py")) >= 4  # the scan does see calls


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("zero_json", sorted((REPO / "medsapiens" / "training" / "deepspeed").glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_zero_config_asks_for_pytorchs_fused_adamw(zero_json, cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for offload in (False, True):
        cfg = deepspeed_config(TrainConfig(deepspeed=str(zero_json), offload=offload, precision="bf16"),
                               OptimConfig(lr=1e-3), micro_batch=4)
        assert cfg["optimizer"]["type"] == "AdamW"
        assert cfg["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1,
                                              "torch_adam": True, "fused": True}
        offloaded = [cfg["zero_optimization"][k] for k in ("offload_optimizer", "offload_param") if k in cfg["zero_optimization"]]
        assert [o["pin_memory"] for o in offloaded] == [cuda] * len(offloaded)  # pinned on a GPU: full-speed copies
        assert offloaded or not offload


def test_a_users_json_is_told_which_of_its_settings_the_experiment_config_replaces(tmp_path, capsys):
    """DeepSpeed documents gradient_clipping and the batch keys in its JSON; the experiment config sets
    them, so a value there that differs is named, not dropped unseen (a preset's are placeholders)."""
    preset = json.loads((REPO / "medsapiens" / "training" / "deepspeed" / "zero2.json").read_text())
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({**preset, "gradient_clipping": 0.5, "gradient_accumulation_steps": "auto"}))
    cfg = deepspeed_config(TrainConfig(deepspeed=str(mine), grad_accum=2), OptimConfig(grad_clip=1.0), micro_batch=3)
    assert (cfg["gradient_clipping"], cfg["gradient_accumulation_steps"], cfg["train_micro_batch_size_per_gpu"]) == (1.0, 2, 3)
    note = capsys.readouterr().err
    assert f"note: train.deepspeed {mine}: the experiment config sets " in note and "gradient_clipping 0.5 by optim.grad_clip=1.0" in note
    assert "gradient_accumulation_steps" not in note and f"{preset['train_micro_batch_size_per_gpu']!r} by data.micro_batch=3" in note
    deepspeed_config(TrainConfig(deepspeed="zero2"), OptimConfig(), micro_batch=4)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("zero_json", sorted((REPO / "medsapiens" / "training" / "deepspeed").glob("*.json")), ids=lambda p: p.stem)
def test_compile_is_refused_with_zero3_whose_hooks_break_every_graph(zero_json):
    stage = json.loads(zero_json.read_text())["zero_optimization"]["stage"]
    train = TrainConfig(deepspeed=str(zero_json), compile=True)
    if stage == 3:
        with pytest.raises(InputError, match="train.compile with ZeRO-3"):
            deepspeed_config(train, OptimConfig(), micro_batch=4)
    else:
        assert deepspeed_config(train, OptimConfig(), micro_batch=4)["zero_optimization"]["stage"] == stage


@pytest.mark.timeout(300)
def test_the_engine_builds_no_deepspeed_op_for_any_zero_stage(tmp_path):
    out = tmp_path / "ops.json"
    configs = sorted(str(p) for p in (REPO / "medsapiens" / "training" / "deepspeed").glob("*.json"))
    proc = run([sys.executable, str(REPO / "tests" / "ds_engine_ops.py"), str(out), *configs], 280,
               env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["built"] == []
    assert [row["zero"] for row in result["rows"]] == configs
    for row in result["rows"]:
        assert (row["optimizer"], row["fused"]) == ("torch.optim.adamw.AdamW", True), row
        assert row["loss"] > 0
        # fp32 too: a master copy and Adam's m and v, and the step's fp32 gradient partition, as the estimate counts
        assert row["master_is_a_copy"] and abs(row["bytes_per_param"] + 4 - PRECISIONS["fp32"]["optimizer"]) < 0.01


@pytest.mark.parametrize("cuda, computes_bf16, resolved", [(False, False, "fp32"), (True, False, "fp32"),
                                                           (True, True, "bf16")])
def test_precision_auto_is_bf16_only_on_a_gpu_that_computes_in_it(monkeypatch, cuda, computes_bf16, resolved):
    from medsapiens.training.engine import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: computes_bf16 or including_emulation)
    assert resolve_precision("auto") == resolved  # a V100 has no bf16 units: emulated, nothing is gained
    assert resolve_precision("bf16") == "bf16"


@pytest.mark.parametrize("computes_bf16", [False, True])
def test_bf16_asked_of_a_gpu_that_only_emulates_it_is_warned_about(monkeypatch, computes_bf16):
    from medsapiens.training.engine import emulated_bf16_warning

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: computes_bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    warning = emulated_bf16_warning("bf16")
    if computes_bf16:
        assert warning is None
    else:
        assert warning == ("warning: train.precision bf16 on a Tesla V100-SXM2-32GB, which only emulates bf16 (slower "
                           "than fp32): train.precision=auto trains in fp32 there")
    assert emulated_bf16_warning("fp32") is None


def test_a_zero_stage_whose_checkpoints_no_export_reads_is_refused_before_training(tmp_path):
    from medsapiens.training.engine import check_zero_stage

    with pytest.raises(InputError, match=r"^train.deepspeed zero1: ZeRO-1 checkpoints leave out frozen weights \(with "
                                         r"LoRA, the backbone's\), so the run could not be exported; use zero2 or zero3$"):
        check_zero_stage(TrainConfig(deepspeed="zero1"), frozen_weights=True)
    for preset in ("zero1", "zero2", "zero3", "zero3_offload"):
        check_zero_stage(TrainConfig(deepspeed=preset), frozen_weights=preset != "zero1")
    for text, message in (('{"zero_optimization": {"stage": 0}}', "ZeRO stage 0 writes checkpoints no export can read"),
                          ("{}", "ZeRO stage 0 writes checkpoints no export can read"),
                          ('{"zero_optimization": {"stage": "1"}}', "zero_optimization.stage must be 0, 1, 2 or 3, got '1'"),
                          ("[1]", "not a DeepSpeed config"), ("{", "not valid JSON")):
        (tmp_path / "ds.json").write_text(text)
        with pytest.raises(InputError, match=message):
            check_zero_stage(TrainConfig(deepspeed=str(tmp_path / "ds.json")), frozen_weights=False)


def _see_the_run_dir(rank: int, store: str, folders: list[str], outcomes: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        distributed.check_shared_folder(Path(folders[rank]), "run_dir")
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        dist.destroy_process_group()
    Path(outcomes, str(rank)).write_text(outcome)


@pytest.mark.timeout(120)
def test_a_run_dir_some_rank_does_not_share_is_refused_on_every_rank(tmp_path):
    """Multi-node ranks must write their checkpoint files into one folder: a run directory local to each
    host (the same path, another disk) is refused at start, naming the rank, not at the first checkpoint."""
    import socket

    import torch.multiprocessing as mp

    host = socket.gethostname()
    for case, folders in (("shared", [tmp_path / "run"] * 2), ("local", [tmp_path / "run", tmp_path / "copy"])):
        outcomes = tmp_path / f"outcomes-{case}"
        outcomes.mkdir()
        mp.spawn(_see_the_run_dir, args=(str(tmp_path / f"store-{case}"), [str(f) for f in folders], str(outcomes)),
                 nprocs=2)
        said = [(outcomes / str(rank)).read_text() for rank in (0, 1)]
        if case == "shared":
            assert said == ["ok", "ok"]
            assert not list((tmp_path / "run").iterdir())  # the probe is gone
        else:
            assert said[0] == said[1] == (
                f"UserError: run_dir {tmp_path / 'run'} is not one folder shared by every rank: rank 1 on {host} "
                "(cannot see the file rank 0 wrote there); put it on a file system every host mounts at that path")


def test_ranks_an_mpi_launcher_started_without_rank_are_refused(monkeypatch):
    """mpirun and DeepSpeed's openmpi and mvapich runners set no RANK: each process would be rank 0 of its own
    one-rank job, all training in one run directory."""
    monkeypatch.delenv("RANK", raising=False)
    for name in distributed.OTHER_LAUNCHERS_WORLD_SIZE:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # a shell of `srun -n 4 --pty bash`: this process runs alone
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")  # `mpirun -n 1`
    distributed.check_no_other_launcher()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(UserError, match=re.escape("this process is one of 4 started by an MPI launcher, which sets no "
                                                  "RANK (OMPI_COMM_WORLD_SIZE): each would train alone as rank 0")):
        distributed.init_distributed(60)
    assert not dist.is_initialized()


def test_a_host_whose_gpus_cuda_cannot_use_is_refused_unless_the_cpu_is_asked_for(monkeypatch, tmp_path):
    """A driver older than torch's CUDA: the rank would train on the CPU (beside GPU hosts, on gloo, waiting
    out the timeout of their NCCL collectives)."""
    import socket

    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()  # the driver's control file: not a GPU
    monkeypatch.setattr(distributed, "NVIDIA_DEVICE_FILES", str(tmp_path / "nvidia[0-9]*"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", lambda: (_ for _ in ()).throw(
        RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nPlease update it.")))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError) as refused:
        distributed.init_distributed(60)
    assert str(refused.value) == (
        f"{socket.gethostname()} has 1 NVIDIA GPU(s) ({tmp_path}/nvidia[0-9]*) that CUDA cannot use (The NVIDIA driver "
        "on your system is too old (found version 11040).): the run would train on the CPU; mend the driver or install "
        "a torch for its CUDA, or set MEDSAPIENS_ALLOW_CPU=1 to train on the CPU")
    assert not dist.is_initialized()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # as DeepSpeed's launcher sets it for each rank, on a CPU too
    with pytest.raises(UserError):
        distributed.check_gpus_usable()
    monkeypatch.setenv("MEDSAPIENS_ALLOW_CPU", "1")
    distributed.check_gpus_usable()  # the CPU asked for, by launched ranks too
    monkeypatch.delenv("MEDSAPIENS_ALLOW_CPU")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    distributed.check_gpus_usable()  # the GPUs hidden from a process started alone
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    (tmp_path / "nvidia0").unlink()
    distributed.check_gpus_usable()  # a host without NVIDIA GPUs
