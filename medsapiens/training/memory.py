"""What a run's micro-batch needs of a GPU, and the one line a training step out of GPU memory ends on:
the step, the micro-batch, torch's report, the largest micro-batch the estimate of `medsapiens model
info` fits on this GPU, and what to change."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medsapiens import distributed
from medsapiens.errors import UserError, torch_memory_report
from medsapiens.model.cost import MemoryEstimate, largest_micro_batch, memory_estimate
from medsapiens.model.landmark_model import ModelConfig


@dataclass(frozen=True)
class MemoryPlan:
    """The run's estimate (all parameters training) with its ZeRO stage and data-parallel ranks."""

    estimate: MemoryEstimate
    checkpointing: bool
    zero: int
    ranks: int

    def largest_micro_batch(self, device_gib: float, checkpointing: bool) -> int:
        return largest_micro_batch(self.estimate, device_gib, checkpointing, self.zero, self.ranks)


def memory_plan(model: ModelConfig, heads: int, precision: str, zero: int, deepspeed_config: dict,
                lora: bool) -> MemoryPlan | None:
    """The run's plan; None where the estimate would mislead: with LoRA (it counts every parameter as
    training) and ZeRO-Offload (it counts the optimizer states on the GPU)."""
    zero_config = deepspeed_config.get("zero_optimization", {})
    offloaded = any((zero_config.get(key) or {}).get("device", "none") != "none"
                    for key in ("offload_optimizer", "offload_param"))
    if lora or offloaded:
        return None
    estimate = memory_estimate(model.arch, model.img_size, model.trunk_width, heads, precision)
    return MemoryPlan(estimate, model.grad_checkpointing, zero, distributed.world_size())


def device_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None


def out_of_memory(step: int, micro_batch: int, exc: BaseException, plan: MemoryPlan | None,
                  device_gib: float | None) -> UserError:
    """The error to end a run on when training step `step` ran out of GPU memory."""
    text = f"out of GPU memory at step {step} with data.micro_batch {micro_batch} ({torch_memory_report(exc)})"
    checkpointing = plan is not None and plan.checkpointing
    if plan is not None and device_gib is not None:
        fits = plan.largest_micro_batch(device_gib, checkpointing)
        estimate = f"by the estimate of `medsapiens model info` on this {device_gib:.1f} GiB GPU"
        if fits == 0:
            return UserError(f"{text}; {estimate}, the weights, gradients and optimizer states alone do not fit "
                             f"(ZeRO-{plan.zero} over {plan.ranks} GPU(s)): shard them over more GPUs with "
                             "train.deepspeed=zero3, or keep the optimizer states in host memory with train.offload=true")
        text += f"; {estimate}, at most {fits} fit"
        if not checkpointing:
            text += f", {plan.largest_micro_batch(device_gib, True)} with model.grad_checkpointing=true"
        if fits >= micro_batch:
            text += (" (so more memory was in use than estimated: another process on this GPU, or fragmentation, "
                     "which PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True reduces)")
    advice = "lower data.micro_batch (raise train.grad_accum to keep the global batch)"
    return UserError(f"{text}: {advice}{'' if checkpointing else ' or set model.grad_checkpointing=true'}")
