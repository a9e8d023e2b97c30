"""Throughput and MFU from one place (medsapiens.training.telemetry): what they count."""
import time

import pytest
import torch

from medsapiens.training import telemetry
from medsapiens.training.telemetry import StepTimer, peak_flops_of


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_validation_and_checkpoint_time_is_set_aside_from_the_step_rate(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(telemetry.time, "perf_counter", clock)
    timer = StepTimer()
    clock.now += 0.1
    timer.stepped(4)
    with timer.aside():  # a validation, a checkpoint
        clock.now += 5.0
    clock.now += 0.1
    timer.stepped(4)
    rates = timer.report(torch.device("cpu"), None, world_size=3)
    assert rates["perf/step_time_s"] == pytest.approx(0.1) and rates["perf/samples_per_s"] == pytest.approx(40)
    assert rates["perf/samples_per_s_all_ranks"] == pytest.approx(120)
    clock.now += 0.5
    timer.stepped(4)
    assert timer.report(torch.device("cpu"), None)["perf/step_time_s"] == pytest.approx(0.5)  # a report starts afresh


def test_peak_memory_is_the_peak_since_the_previous_report(monkeypatch):
    """Not since the process started: an earlier fine-tuning seed's peak, or the start-up's, is not this window's."""
    allocator = {"now": 0, "peak": 0}

    def allocate(gib):
        allocator["now"] += gib * 2**30
        allocator["peak"] = max(allocator["peak"], allocator["now"])

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: allocator["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: allocator.update(peak=allocator["now"]))
    timer, gpu = StepTimer(), torch.device("cuda", 0)
    allocate(30)  # an earlier seed's activations, then freed
    allocate(-20)
    timer.stepped(4)
    assert timer.report(gpu, 1e12)["perf/peak_memory_gib"] == 30
    allocate(5)
    allocate(-5)
    timer.stepped(4)
    assert timer.report(gpu, 1e12)["perf/peak_memory_gib"] == 15


@pytest.mark.parametrize(("name", "tflops"), [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                              ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
                                              ("NVIDIA A100-SXM4-80GB", 312), ("Tesla V100-SXM2-32GB", 125),
                                              ("NVIDIA GeForce RTX 4090", None)])
def test_each_gpu_gets_its_own_dense_bf16_peak(name, tflops):
    assert peak_flops_of(name) == (tflops and tflops * 1e12)


def test_a_progress_bar_written_into_a_file_does_not_flood_it(monkeypatch):
    import io

    from medsapiens.io.progress import progress_bar

    log = io.StringIO()  # a scheduler's job log: not a terminal
    monkeypatch.setattr("sys.stderr", log)
    with progress_bar(total=2000, desc="train", file=log) as bar:
        for step in range(2000):
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{1 / (step + 1):.4g}", refresh=False)
            time.sleep(0.0005)
    assert log.getvalue().count("\r") <= 3  # the first draw, the last; tqdm redraws 10 times a second
