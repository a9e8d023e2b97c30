"""The compute paths as they run on a GPU, checked on CPU: a stand-in device (tests/standin_gpu.py)
holds the model and the batches, computes on the CPU and refuses, as CUDA does, an operation that
mixes devices. Training's objective and backward (both backbones, bf16, LoRA), evaluation with flip
test, calibration and prediction run there and give the CPU's numbers bit for bit (the CPU's run with the
math attention the stand-in runs)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from standin_gpu import GPU, DeviceMismatch, stand_in_gpu
from torch.nn.attention import SDPBackend, sdpa_kernel

from medsapiens.data.augment import mean_and_std_on
from medsapiens.data.pipeline import DataConfig, TrainStream
from medsapiens.evaluate.evaluate import EvalOptions, calibrate_bundle, evaluate_bundle
from medsapiens.evaluate.predict import PredictOptions, predict
from medsapiens.io import manifest as manifestlib
from medsapiens.model.landmark_model import build_model
from medsapiens.model.lora import apply_lora

IMG_SIZE = (128, 96)  # (H, W)
DATASETS = ["head", "hand"]


@pytest.fixture(autouse=True)
def forget_the_stand_ins_tensors():
    """The normalisation constants are cached per device: the stand-in's must not meet a real meta tensor."""
    mean_and_std_on.cache_clear()
    yield
    mean_and_std_on.cache_clear()


def test_the_stand_in_refuses_what_cuda_refuses_and_computes_the_rest():
    cpu = torch.arange(12.0).reshape(3, 4)
    with stand_in_gpu():
        gpu = cpu.to(GPU)
        assert gpu.device == GPU and torch.equal(gpu.cpu(), cpu)
        refused = {
            "a CPU operand": lambda: gpu + cpu,
            "CPU indices for index_select": lambda: gpu.index_select(0, torch.tensor([2, 0])),
            "a CPU scalar outside elementwise operations": lambda: torch.stack([gpu.sum(), torch.tensor(1.0)]),
            "a CPU tensor written with a GPU one": lambda: torch.tensor(0.0).add_(gpu.sum()),
            "GPU indices into a CPU tensor": lambda: cpu[torch.tensor([0, 2], device=GPU)],
            "CPU values put into a GPU tensor": lambda: gpu.clone().index_put_((torch.tensor([0]),), torch.ones(1, 4)),
            "a CPU generator": lambda: torch.randn(3, device=GPU, generator=torch.Generator()),
        }
        for what, operation in refused.items():
            with pytest.raises(DeviceMismatch):
                operation()
                pytest.fail(f"{what} was accepted")
        with pytest.raises(RuntimeError, match="numpy"):  # CUDA: "can't convert cuda:0 device type tensor to numpy"
            gpu.numpy()
        with pytest.raises(NotImplementedError, match="shape in place"):
            gpu.clone().unsqueeze_(0)
        assert torch.equal((gpu * torch.tensor(2.0)).cpu(), cpu * 2)  # a CPU scalar, which CUDA takes
        assert torch.equal(gpu[[2, 0]].cpu(), cpu[[2, 0]])  # a list index, which torch builds on the GPU
        assert torch.equal(gpu[torch.tensor([2, 0])].cpu(), cpu[[2, 0]])  # CPU indices into a GPU tensor
        assert torch.equal(torch.tensor([5.0, 6.0], device=GPU).cpu(), torch.tensor([5.0, 6.0]))
        total = torch.zeros(3, 4, device=GPU)
        total += gpu
        assert total.device == GPU and torch.equal(total.cpu(), cpu)


def first_batch(manifest) -> dict:
    stream = TrainStream(manifest, DataConfig(micro_batch=4, workers=0, shuffle_buffer=8), DATASETS,
                         (IMG_SIZE[1], IMG_SIZE[0]), seed=1, rank=0)
    batch = next(iter(stream))
    assert set(batch["dataset_index"].tolist()) == {0, 1}  # both heads have samples
    return batch


def loss_and_gradients(model, batch: dict, dtype: torch.dtype):
    """With PyTorch's math attention, the stand-in's (which has no fused kernel), on the CPU too: the
    same operations, so the same bits."""
    torch.manual_seed(0)  # LoRA's dropout draws the same masks on both devices: the CPU's generator
    with sdpa_kernel(SDPBackend.MATH):
        loss, stats = model.objective()(model, batch, dtype)
        loss.backward()
    gradients = {name: p.grad.cpu().float() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, stats, gradients


@pytest.mark.parametrize(("arch", "dtype", "lora"), [("sapiens_tiny", torch.float32, True),
                                                     ("sapiens_tiny", torch.bfloat16, False),
                                                     ("sapiens2_tiny", torch.bfloat16, False)],
                         ids=["sapiens-fp32-lora", "sapiens-bf16", "sapiens2-bf16"])
def test_the_training_step_computes_on_the_gpu_what_it_computes_on_the_cpu(phantom_shards, arch, dtype, lora):
    manifest = manifestlib.load(phantom_shards)
    batch = first_batch(manifest)
    torch.manual_seed(0)  # the same weights whatever ran before
    model = build_model(arch, IMG_SIZE, {d: manifest.landmark_set(d).num_landmarks for d in DATASETS}, 16)
    model = (apply_lora(model) if lora else model).to(dtype).train()
    cpu_loss, _, cpu_gradients = loss_and_gradients(model, batch, dtype)
    with stand_in_gpu():
        model.to(GPU)
        on_gpu = {key: value.to(GPU) for key, value in batch.items()}
        loss, stats, gradients = loss_and_gradients(model, on_gpu, dtype)
        assert loss.device == GPU and {total.device for total, _ in stats.values()} == {GPU}
        assert torch.equal(loss.detach().cpu(), cpu_loss.detach())
        assert gradients.keys() == cpu_gradients.keys() and len(gradients) > 10
        assert [name for name, gradient in gradients.items() if not torch.equal(gradient, cpu_gradients[name])] == []
        with pytest.raises(DeviceMismatch):  # a batch key left on the CPU is caught
            model.objective()(model, {**on_gpu, "dataset_index": batch["dataset_index"]}, dtype)


def test_evaluation_calibration_and_prediction_on_the_gpu_give_the_cpus_numbers(head_hand_bundle, phantom_shards,
                                                                               tmp_path):
    bundles = {device: tmp_path / device for device in ("cpu", "gpu")}
    for bundle in bundles.values():
        shutil.copytree(head_hand_bundle, bundle)
    images = sorted((phantom_shards.parent / "raw" / "head" / "RawImage" / "Test1Data").glob("*.bmp"))[:3]

    def run_stages(bundle, device) -> tuple[dict, dict, list[dict]]:
        options = EvalOptions(flip_test=True, batch_size=4, device=device)
        report = evaluate_bundle(bundle, str(phantom_shards), "head", "test1", bundle / "eval", options)
        calibration = calibrate_bundle(bundle, str(phantom_shards), "head", "val", 0.5, options)
        predictions, failures = predict([str(p) for p in images], bundle / "predict",
                                        PredictOptions("head", overlays=True, device=device), bundle_dir=bundle)
        assert failures == []
        return report, calibration, predictions

    with sdpa_kernel(SDPBackend.MATH):  # the stand-in's attention: the same operations, so the same numbers
        cpu_report, cpu_calibration, cpu_predictions = run_stages(bundles["cpu"], "cpu")
    with stand_in_gpu():
        report, calibration, predictions = run_stages(bundles["gpu"], GPU)
    assert report["images"] == cpu_report["images"] > 0
    assert report == cpu_report
    assert calibration == cpu_calibration
    assert json.loads((bundles["gpu"] / "config.json").read_text())["calibration"]["head"] == calibration
    assert predictions == cpu_predictions and len(predictions) == len(images)
