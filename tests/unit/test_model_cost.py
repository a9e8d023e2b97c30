"""Analytic parameter counts, FLOPs and activation memory against measurements."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from medsapiens.model import build_model, count_params, forward_flops, memory_estimate
from medsapiens.model.cost import FRAMEWORK_ALLOWANCE, largest_micro_batch

IMG = (256, 192)
K = 19


def tiny_model(width, grad_checkpointing=False, arch="sapiens_tiny"):
    torch.manual_seed(0)
    return build_model(arch, IMG, {"head": K, "leg": 26}, trunk_width=width, grad_checkpointing=grad_checkpointing)


@pytest.mark.parametrize("arch, width", [("sapiens_tiny", 64), ("sapiens_tiny", 768), ("sapiens2_tiny", 64)])
def test_forward_flops_match_the_flop_counter(arch, width):
    model = tiny_model(width, arch=arch)
    # the math SDPA backend runs attention as matmuls the counter sees (the CPU flash kernel it misses)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, *IMG), torch.tensor([0]))
    measured = counter.get_total_flops()
    assert abs(forward_flops(arch, IMG, width, K).total / measured - 1) < 0.01


def test_flops_of_sapiens_03b_agree_with_the_spec():
    flops = forward_flops("sapiens_0.3b", (1024, 768), 768, K)
    assert abs(flops.backbone / 2.8e12 - 1) < 0.02 and abs(flops.decoder / 0.43e12 - 1) < 0.02


@pytest.mark.parametrize("arch, width", [("sapiens_tiny", 64), ("sapiens_small", 128), ("sapiens_0.3b", 768),
                                         ("sapiens_0.6b", 768), ("sapiens_1b", 768), ("sapiens_2b", 768),
                                         ("sapiens2_tiny", 64), ("sapiens2_0.4b", 768), ("sapiens2_5b", 768)])
def test_param_counts_match_the_built_model(arch, width):
    with torch.device("meta"):
        model = build_model(arch, IMG, {"head": K, "leg": 26}, trunk_width=width)
    counted = count_params(arch, IMG, width, K + 26)
    assert counted.backbone == sum(p.numel() for p in model.backbone.parameters())
    assert counted.decoder == sum(p.numel() for p in model.decoder.parameters())


def saved_activation_bytes(model):
    """Bytes autograd keeps from forward to backward for one image (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    targets, weights = torch.rand(1, K, IMG[0] // 4, IMG[1] // 4), torch.ones(1, K)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.loss(model(torch.randn(1, 3, *IMG), torch.tensor([0])), targets, weights).total.backward()
    return sum(storages.values())


@pytest.mark.parametrize("width", [64, 768])
def test_activation_estimate_matches_saved_tensors(width):
    estimate = memory_estimate("sapiens_tiny", IMG, width, K, precision="fp32")
    full = saved_activation_bytes(tiny_model(width))
    assert abs(estimate.activations / full - 1) < 0.005
    # checkpointed forward keeps block inputs only; backward adds one recomputed block
    kept = saved_activation_bytes(tiny_model(width, grad_checkpointing=True))
    depth, block_input = 4, 4 * 192 * (IMG[0] // 16) * (IMG[1] // 16)
    one_block = (full - kept) / depth + block_input
    assert abs(estimate.activations_checkpointed / (kept + one_block) - 1) < 0.005


def test_sapiens2_activation_estimate_matches_saved_tensors():
    estimate = memory_estimate("sapiens2_tiny", IMG, 64, K, precision="fp32")
    full = saved_activation_bytes(tiny_model(64, arch="sapiens2_tiny"))
    assert abs(estimate.activations / full - 1) < 0.005


def test_memory_estimate_states_per_precision():
    params = count_params("sapiens_0.3b", trunk_width=768, head_channels=K).total
    fp32 = memory_estimate("sapiens_0.3b", head_channels=K, precision="fp32")
    bf16 = memory_estimate("sapiens_0.3b", head_channels=K, precision="bf16")
    assert (fp32.weights, fp32.grads, fp32.optimizer) == (4 * params, 4 * params, 16 * params)
    assert (bf16.weights, bf16.grads, bf16.optimizer) == (2 * params, 2 * params, 16 * params)
    assert bf16.activations * 2 == fp32.activations
    assert bf16.total(micro_batch=2, checkpointing=True) == 20 * params + 2 * bf16.activations_checkpointed


@pytest.mark.parametrize("arch, micro_batch, checkpointing, measured_gib", [
    ("sapiens_0.3b", 32, False, 102.2),  # bf16, ZeRO-2 on one GPU
    ("sapiens_2b", 32, True, 88.1),      # bf16, ZeRO-3 + activation checkpointing on one GPU
])
def test_memory_estimate_agrees_with_the_peaks_measured_on_one_h200(arch, micro_batch, checkpointing, measured_gib):
    """bench/train_step.py on one H200 at 1024x768 (bench/RESULTS.md): torch.cuda.max_memory_allocated."""
    estimate = memory_estimate(arch, (1024, 768), 768, K, precision="bf16")
    assert abs(estimate.total(micro_batch, checkpointing) / 2**30 / measured_gib - 1) < 0.05


def test_largest_micro_batch_fits_and_the_next_does_not():
    estimate = memory_estimate("sapiens_0.3b", (1024, 768), 768, K, precision="bf16")
    usable = 80 * 2**30 * (1 - FRAMEWORK_ALLOWANCE)
    for checkpointing in (False, True):
        n = largest_micro_batch(estimate, 80, checkpointing)
        assert estimate.total(n, checkpointing) <= usable < estimate.total(n + 1, checkpointing)
    sharded = largest_micro_batch(estimate, 80, True, zero=3, ranks=8)
    assert sharded > largest_micro_batch(estimate, 80, True)  # the weights and states split 8 ways
    assert largest_micro_batch(memory_estimate("sapiens_2b", (1024, 768), 768, K), 40) == 0  # states alone: 40 GiB


@pytest.mark.parametrize("lora", [False, True])
def test_training_flops_match_the_flop_counter_over_forward_and_backward(lora):
    """3 x forward when everything trains, less the patch conv's input gradient; a frozen backbone (LoRA) has
    no weight gradients to compute, but attention still needs both its operands' gradients. The count
    leaves out the adapters' own matmuls."""
    from medsapiens.model import apply_lora, training_flops

    model = tiny_model(64)
    if lora:
        apply_lora(model)
    targets, weights = torch.rand(1, K, IMG[0] // 4, IMG[1] // 4), torch.ones(1, K)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(model(torch.randn(1, 3, *IMG), torch.tensor([0])), targets, weights).total.backward()
    expected = training_flops(forward_flops("sapiens_tiny", IMG, 64, K), frozen_backbone=lora)
    assert abs(expected / counter.get_total_flops() - 1) < (0.01 if lora else 1e-6)
