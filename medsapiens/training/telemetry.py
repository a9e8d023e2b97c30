"""Training metrics from one place: TensorBoard event files plus a `metrics.jsonl` mirror.

Only rank 0 writes. Throughput, the fraction of time spent waiting for data, MFU and peak memory
are computed here from timings the trainer reports.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, for MFU, matched in this order against
# the device's name: the PCIe and NVL cards before the SXM ones ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
# The V100 has no bf16: its fp16 tensor-core peak stands in (its runs train in fp32).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H200": 989e12, "H100": 989e12,
                   "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def peak_flops_of(name: str) -> float | None:
    """The dense bf16 peak (the V100's fp16) of the GPU named `name` (as torch names it), None when not in the
    table."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_flops(device: torch.device) -> float | None:
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


METRICS = "metrics.jsonl"


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows, less a last line a crash cut short mid-write (the row was lost with it)."""
    path = Path(run_dir) / METRICS
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
    return rows


class Telemetry:
    """Starting at `start_step` (a resume, or 0 after an attempt that left no checkpoint), whatever was
    logged after that step by the attempt that stopped is dropped, so no step is logged twice."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
            path = Path(run_dir) / METRICS
            if path.is_file():
                kept = [row for row in metric_rows(run_dir) if row["step"] <= start_step]
                path.write_text("".join(f"{json.dumps(row)}\n" for row in kept))
            self.jsonl = open(path, "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
        for tag, value in clean.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()

    def images(self, step: int, tag: str, images: dict[str, np.ndarray]) -> None:
        """HWC uint8 panels by name (a sample's id): TensorBoard tags `<tag>/<name>`."""
        if self.enabled and images:
            for name, image in images.items():
                self.writer.add_image(f"{tag}/{name}", image, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


class StepTimer:
    """Wall time per step split into waiting for data and computing, since the last report; the time
    of validations and checkpoints is set aside (`aside`), not counted as either."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.set_aside = 0.0
        self.steps = 0
        self.samples = 0

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def stepped(self, samples: int) -> None:
        self.steps += 1
        self.samples += samples

    @contextlib.contextmanager
    def aside(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.set_aside += time.perf_counter() - started

    def report(self, device: torch.device, train_flops_per_sample: float | None,
               world_size: int = 1) -> dict[str, float]:
        """Per rank (every rank steps the same number of samples), and of all ranks together."""
        elapsed = max(time.perf_counter() - self.start - self.set_aside, 1e-9)
        out = {
            "perf/samples_per_s": self.samples / elapsed,
            "perf/samples_per_s_all_ranks": self.samples * world_size / elapsed,
            "perf/step_time_s": elapsed / max(self.steps, 1),
            "perf/data_wait_fraction": self.data_wait / elapsed,
        }
        peak = peak_flops(device)
        if peak and train_flops_per_sample:
            out["perf/mfu"] = train_flops_per_sample * self.samples / elapsed / peak
        if device.type == "cuda":  # since the previous report: an earlier seed's or the start-up's peak is not this one
            out["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        self.reset()
        return out
