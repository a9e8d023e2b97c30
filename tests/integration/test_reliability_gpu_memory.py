"""A GPU too small for what was asked is one line, not a traceback per rank: a training step names its
step, its micro-batch, torch's report and the largest micro-batch `medsapiens model info` fits on
that GPU, with what to change; any other command out of GPU memory says which batch to lower."""
from __future__ import annotations

import sys

import pytest
import torch
import yaml
from conftest import DEMO_CONFIG, REPO, largest_micro_batches, run

from medsapiens.errors import is_out_of_memory, run_command, torch_memory_report, user_line
from medsapiens.model import ModelConfig, memory_estimate
from medsapiens.model.cost import GPU_MEMORY_GIB
from medsapiens.training import checkpoints
from medsapiens.training.engine import OptimConfig, TrainConfig, deepspeed_config
from medsapiens.training.memory import MemoryPlan, memory_plan, out_of_memory

REPORT = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 39.49 GiB of which 1.10 GiB "
          "is free. Including non-PyTorch memory, this process has 38.38 GiB memory in use. If reserved but "
          "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
TORCH_SAYS = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 39.49 GiB of which 1.10 GiB is free"


def test_a_step_out_of_gpu_memory_names_what_model_info_fits_on_that_gpu(capsys):
    fits = largest_micro_batches(capsys, "sapiens_0.3b")
    assert fits["one GPU"][0] < 16 <= fits["one GPU"][1]  # 16 (the GPU acceptance run's) fits 80 GB, not 40
    estimate = memory_estimate("sapiens_0.3b", (1024, 768), 768, 19, "bf16")
    eager, checkpointed = MemoryPlan(estimate, False, zero=2, ranks=1), MemoryPlan(estimate, True, zero=2, ranks=1)
    advice = "lower data.micro_batch (raise train.grad_accum to keep the global batch)"
    on_40_gb = "by the estimate of `medsapiens model info` on this 40.0 GiB GPU"
    error = out_of_memory(7, 16, torch.OutOfMemoryError(REPORT), eager, GPU_MEMORY_GIB["40 GB"])
    assert user_line(error) == (
        f"error: out of GPU memory at step 7 with data.micro_batch 16 ({TORCH_SAYS}); {on_40_gb}, at most "
        f"{fits['one GPU'][0]} fit, {fits['one GPU, checkpointed'][0]} with model.grad_checkpointing=true: {advice} or "
        "set model.grad_checkpointing=true")
    assert str(out_of_memory(7, 64, torch.OutOfMemoryError(REPORT), checkpointed, GPU_MEMORY_GIB["40 GB"])).endswith(
        f"{on_40_gb}, at most {fits['one GPU, checkpointed'][0]} fit: {advice}")
    fitting = fits["one GPU"][0]  # the estimate says it fits: something else holds memory
    assert f"at most {fitting} fit, {fits['one GPU, checkpointed'][0]} with model.grad_checkpointing=true (so more " \
           "memory was in use than estimated: another process on this GPU, or fragmentation" in \
           str(out_of_memory(7, fitting, torch.OutOfMemoryError(REPORT), eager, GPU_MEMORY_GIB["40 GB"]))
    too_big = MemoryPlan(memory_estimate("sapiens_2b", (1024, 768), 768, 19, "bf16"), True, zero=2, ranks=1)
    assert str(out_of_memory(1, 1, torch.OutOfMemoryError(REPORT), too_big, GPU_MEMORY_GIB["40 GB"])).endswith(
        f"{on_40_gb}, the weights, gradients and optimizer states alone do not fit (ZeRO-2 over 1 GPU(s)): shard them "
        "over more GPUs with train.deepspeed=zero3, or keep the optimizer states in host memory with train.offload=true")


def test_out_of_memory_reported_as_text_is_recognised_and_its_report_found():
    compiled = RuntimeError(f"backend='inductor' raised:\nOutOfMemoryError: {REPORT}\n\nSet TORCHDYNAMO_VERBOSE=1")
    nccl = RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version 2.21.5\n"
                        "Last error:\nCuda failure 'out of memory'")
    cublas = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert all(map(is_out_of_memory, (torch.OutOfMemoryError(""), compiled, nccl, cublas)))
    assert not any(map(is_out_of_memory, (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate "
                                                       "8 GB"), ValueError("out of memory"))))
    assert torch_memory_report(compiled) == f"OutOfMemoryError: {TORCH_SAYS}"
    assert torch_memory_report(nccl) == "Cuda failure 'out of memory'"


def test_the_estimate_is_left_out_where_it_would_mislead(tmp_path):
    model = ModelConfig(arch="sapiens_0.3b", img_size=(1024, 768), grad_checkpointing=True)

    def plan(lora=False, **train):
        return memory_plan(model, 19, "bf16", 3, deepspeed_config(TrainConfig(**train), OptimConfig(), 16), lora)

    assert plan(deepspeed="zero3") == MemoryPlan(memory_estimate("sapiens_0.3b", (1024, 768), 768, 19, "bf16"),
                                                 True, zero=3, ranks=1)
    assert plan(lora=True) is None  # the estimate counts every parameter as training
    assert plan(deepspeed="zero3", offload=True) is None and plan(deepspeed="zero3_offload") is None  # states on the host
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}')
    assert plan(deepspeed=str(tmp_path / "ds.json")) is not None  # DeepSpeed's spelling of no offload


def test_any_command_out_of_gpu_memory_is_one_line_naming_the_batch_to_lower(capsys):
    def predicting(oom):
        raise oom

    cublas = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    for oom in (torch.OutOfMemoryError(REPORT), torch.cuda.OutOfMemoryError(""), RuntimeError(cublas)):
        assert run_command(predicting, oom) == 2
    lines = capsys.readouterr().err.splitlines()
    advice = ("lower the batch (data.micro_batch for training, with train.grad_accum to keep the global batch; "
              "--batch-size for evaluate, predict and calibrate)")
    assert lines == [f"error: out of GPU memory ({report}): {advice}" for report in (TORCH_SAYS, "no detail", cublas)]
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError keeps its traceback
        run_command(predicting, RuntimeError("a bug"))


@pytest.mark.timeout(180)
def test_a_training_step_out_of_memory_ends_the_run_in_one_line_and_says_where_a_rerun_resumes(phantom_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "-m", "medsapiens.pretrain", "--config", str(DEMO_CONFIG), f"data.shards={phantom_shards}",
                f"run_dir={run_dir}", "data.micro_batch=4", "data.workers=0", "model.trunk_width=32",
                "train.max_steps=6", "train.checkpoint_every=2", "train.val_every=100"], 150,
               env={"PYTHONPATH": str(REPO / "tests" / "fault_site"), "MEDSAPIENS_FAULT_RANK": "0",
                    "MEDSAPIENS_FAULT_OOM_AT_BACKWARD": "4"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    *_, where, error = proc.stderr.strip().splitlines()
    assert where == f"stopped at step 3; a rerun into {run_dir} resumes from checkpoint {checkpoints.checkpoint_tag(2)}"
    assert error == (f"error: out of GPU memory at step 4 with data.micro_batch 4 ({TORCH_SAYS}): lower data.micro_batch "
                     "(raise train.grad_accum to keep the global batch) or set model.grad_checkpointing=true")
    rerun = run([*proc.args, "model.grad_checkpointing=true"], 150)  # the advice taken: the run continues
    assert rerun.returncode == 0 and "resumed from step 2" in rerun.stderr, rerun.stderr[-3000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["grad_checkpointing"] is True
