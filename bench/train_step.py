"""Training-step throughput, MFU and memory of the Sapiens backbones, against the published recipe.

    python bench/train_step.py [--steps 8] [--max-batch 64] [--json out.json]
    python bench/train_step.py --tiny     # CPU: sapiens_tiny at 128x96 (auto without CUDA)

One device, synthetic in-memory batches (one grey channel on 0-255, as the pipeline sends them),
the real objective and DeepSpeed engine. Settings on CUDA: sapiens_0.3b at 1024x768 with ZeRO-2,
the published recipe's fp32 eager step against bf16 with and without torch.compile and activation
checkpointing; sapiens_1b and sapiens_2b with bf16, checkpointing and ZeRO-3. Attention is timm's
fused path, PyTorch's scaled_dot_product_attention.

For each setting: the largest micro-batch that fits (or --micro-batch as given): the largest power of
two up to --max-batch that the memory estimate of `medsapiens model info` fits on this GPU, halved
until a step runs; images/s at that micro-batch, MFU = training FLOPs (medsapiens.model.cost: 3 x the analytic
forward) x images/s / peak, and the peak memory. The peak is the device's dense bf16 rate from
medsapiens.training.telemetry's table (the one TensorBoard's perf/mfu uses), else --peak-tflops, else
a bf16 (fp32 on CPU) matmul timed here; the ratio row divides each setting's
images/s by the recipe's, measured in the same run.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from dataclasses import asdict, dataclass

import torch

from medsapiens.distributed import init_distributed, shutdown
from medsapiens.errors import is_out_of_memory
from medsapiens.model import ModelConfig, param_groups
from medsapiens.model.archs import DEFAULT_TRUNK_WIDTH
from medsapiens.model.cost import forward_flops, largest_micro_batch, memory_estimate, training_flops
from medsapiens.model.loss import LandmarkObjective
from medsapiens.training.engine import Engine, OptimConfig, TrainConfig
from medsapiens.training.memory import device_memory_gib
from medsapiens.training.telemetry import peak_flops_of

K = 19  # the ISBI head's landmarks
TINY_TRUNK = 32  # the tests' decoder width: the default 768 would make the CPU run take minutes
ZERO = {2: "zero2", 3: "zero3"}


@dataclass(frozen=True)
class Setting:
    name: str
    arch: str
    precision: str
    zero: int
    compile: bool = False
    checkpointing: bool = False
    trunk_width: int = DEFAULT_TRUNK_WIDTH


def cuda_settings() -> list[Setting]:
    return [
        Setting("recipe", "sapiens_0.3b", "fp32", 2),
        Setting("bf16", "sapiens_0.3b", "bf16", 2),
        Setting("bf16+ckpt", "sapiens_0.3b", "bf16", 2, checkpointing=True),
        Setting("bf16+compile", "sapiens_0.3b", "bf16", 2, compile=True),
        Setting("bf16+compile+ckpt", "sapiens_0.3b", "bf16", 2, compile=True, checkpointing=True),
        Setting("1b-zero3+ckpt", "sapiens_1b", "bf16", 3, checkpointing=True),
        Setting("2b-zero3+ckpt", "sapiens_2b", "bf16", 3, checkpointing=True),
        Setting("s2-0.4b-bf16", "sapiens2_0.4b", "bf16", 2),
    ]


def cpu_settings() -> list[Setting]:
    return [
        Setting("recipe", "sapiens_tiny", "fp32", 2, trunk_width=TINY_TRUNK),
        Setting("ckpt", "sapiens_tiny", "fp32", 2, checkpointing=True, trunk_width=TINY_TRUNK),
        Setting("zero3+ckpt", "sapiens_tiny", "fp32", 3, checkpointing=True, trunk_width=TINY_TRUNK),
        Setting("s2-recipe", "sapiens2_tiny", "fp32", 2, trunk_width=TINY_TRUNK),
    ]


def synthetic_batch(micro_batch: int, img_size, device) -> dict:
    h, w = img_size
    g = torch.Generator().manual_seed(micro_batch)
    batch = {
        "images": torch.rand(micro_batch, 1, h, w, generator=g) * 255,
        "dataset_index": torch.zeros(micro_batch, dtype=torch.long),
        "target_heatmaps": torch.rand(micro_batch, K, h // 4, w // 4, generator=g),
        "target_weights": torch.ones(micro_batch, K),
    }
    return {k: v.to(device) for k, v in batch.items()}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_engine(setting: Setting, img_size, micro_batch: int) -> Engine:
    model = ModelConfig(arch=setting.arch, img_size=img_size, trunk_width=setting.trunk_width,
                        grad_checkpointing=setting.checkpointing).build({"head": K})
    train = TrainConfig(precision=setting.precision, deepspeed=ZERO[setting.zero], max_steps=10**6,
                        compile=setting.compile)
    return Engine(model, param_groups(model, 0.05), train, OptimConfig(warmup_steps=1), micro_batch=micro_batch)


def run_steps(engine: Engine, batch: dict, steps: int) -> float:
    """Seconds for `steps` optimizer steps on one micro-batch each."""
    objective = LandmarkObjective()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.train_step([batch], objective)
    synchronize()
    return time.perf_counter() - start


def micro_batch_tries(setting: Setting, img_size, max_batch: int, device_gib: float | None) -> list[int]:
    """The micro-batches to try, largest first: the largest power of two up to max_batch that the memory
    estimate of `medsapiens model info` fits in `device_gib` (max_batch's on a CPU: None), halving to 1.
    On a card of another size than the first run's, each setting starts where it should fit."""
    fit = max_batch
    if device_gib is not None:
        estimate = memory_estimate(setting.arch, img_size, setting.trunk_width, K, setting.precision)
        fit = min(fit, largest_micro_batch(estimate, device_gib, setting.checkpointing, setting.zero))
    top = 1 << (max(1, fit).bit_length() - 1)  # at least 1: where the estimate fits nothing, the step decides
    return [top >> i for i in range(top.bit_length())]


def engine_that_runs(setting: Setting, img_size, tries: list[int]) -> tuple[Engine | None, int]:
    """An engine whose step ran at the first micro-batch of `tries` that does not run out of memory, and
    that micro-batch; (None, 0) when none does. Each try is a fresh engine: a step that ran out of memory
    half-way may leave ZeRO's buffers half-filled."""
    for size in tries:
        engine = None
        try:
            engine = build_engine(setting, img_size, size)
            run_steps(engine, synthetic_batch(size, img_size, engine.device), 1)
            return engine, size
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
        # out of the except block: its traceback, which holds the step's tensors, is gone
        print(f"{setting.name}: micro-batch {size} ran out of memory", flush=True)
        if engine is not None:
            engine.close()
        del engine
        release_cached_memory()
    return None, 0


def release_cached_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_gb() -> float:
    """Device memory high-water since the last reset; on CPU the process's resident high-water."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measured_peak_tflops() -> float:
    """A large matmul's rate here: bf16 on CUDA, fp32 on CPU."""
    cuda = torch.cuda.is_available()
    n, reps = (8192, 10) if cuda else (2048, 3)  # smaller CPU matmuls run far below the peak
    a = torch.randn(n, n, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
    a @ a
    synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ a
    synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def device_peak_tflops(requested: float | None) -> tuple[float, str]:
    if requested:
        return requested, "--peak-tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = peak_flops_of(name)
        if peak:
            return peak / 1e12, f"{name} dense bf16 spec"
    return measured_peak_tflops(), "measured matmul"


# Where device time goes, by kernel (CUDA) or operator (CPU) name; the first match wins: attention and
# convolution kernels carry "gemm" in their names too.
TIME_KINDS = (
    ("attention", ("attention", "flash", "fmha", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad")),
    ("communication", ("nccl", "comm", "allreduce", "all_reduce", "reduce_scatter", "all_gather")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("matmul", ("gemm", "nvjet", "cutlass", "aten::mm", "addmm", "bmm", "matmul")),
    ("norm", ("norm",)),
    ("copies", ("memcpy", "memset", "copy")),
)


def time_kind(name: str) -> str:
    name = name.lower()
    return next((kind for kind, marks in TIME_KINDS if any(m in name for m in marks)), "elementwise and other")


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the (start, end) intervals, given in microseconds."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return busy / 1e6


def time_shares(events, wall_s: float) -> dict:
    """The device's time by kind of work (shares of the summed kernel time; on CPU, of the operators'
    self time) and, on CUDA, the fraction of the wall time any kernel ran: what is left is the host's."""
    from torch.autograd import DeviceType

    host_names = {e.name for e in events if e.device_type == DeviceType.CPU}
    # a profiler annotation also leaves a span on the GPU's timeline, named as on the host: not work
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.name not in host_names]
    if kernels:
        spent = [(e.name, e.time_range.elapsed_us()) for e in kernels]
        busy = busy_seconds([(e.time_range.start, e.time_range.end) for e in kernels]) / wall_s
    else:
        spent = [(e.name, e.self_cpu_time_total) for e in events if e.device_type == DeviceType.CPU]
        busy = None
    by_kind = {kind: 0.0 for kind, _ in TIME_KINDS} | {"elementwise and other": 0.0}
    for name, us in spent:
        by_kind[time_kind(name)] += us
    total = sum(by_kind.values()) or 1.0
    return {"device_busy": busy, "shares": {kind: us / total for kind, us in by_kind.items()}}


def shares_line(profile: dict) -> str:
    busy = "" if profile["device_busy"] is None else f"kernels running {profile['device_busy']:.0%} of the wall time; "
    return busy + ", ".join(f"{kind} {share:.1%}" for kind, share in profile["shares"].items())


def profile_step(engine: Engine, batch: dict, steps: int = 3, top: int = 25) -> tuple[str, dict]:
    """Where a step's time goes: torch.profiler's operators with the most self time on the device (CPU
    without CUDA), and the time by kind of work (time_shares)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        wall_s = run_steps(engine, batch, steps)
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=top)
    return table, time_shares(prof.events(), wall_s)


def measure(setting: Setting, img_size, steps: int, warmup: int, max_batch: int, peak_tflops: float,
            profile: bool = False, micro_batch: int = 0) -> dict:
    """One setting's row; at `micro_batch` when given, else at the largest of micro_batch_tries that runs."""
    device_gib = device_memory_gib(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tries = [micro_batch] if micro_batch else micro_batch_tries(setting, img_size, max_batch, device_gib)
    engine, fits = engine_that_runs(setting, img_size, tries)
    row = {**asdict(setting), "micro_batch": fits, "images_per_s": 0.0, "mfu": 0.0, "peak_memory_gb": 0.0}
    if engine is None:
        return row
    batch = synthetic_batch(fits, img_size, engine.device)
    run_steps(engine, batch, warmup)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rate = fits * steps / run_steps(engine, batch, steps)
    flops = training_flops(forward_flops(setting.arch, img_size, setting.trunk_width, head_channels=K))
    row.update(images_per_s=rate, mfu=flops * rate / (peak_tflops * 1e12), peak_memory_gb=peak_memory_gb())
    if profile:
        table, row["profile"] = profile_step(engine, batch)
        print(f"profile of {setting.name}, micro-batch {fits}, 3 steps:\n{table}\n"
              f"{setting.name}: {shares_line(row['profile'])}", flush=True)
    engine.close()
    del engine
    release_cached_memory()
    return row


HEADER = (f"{'setting':<20} {'arch':<13} {'prec':<5} {'zero':>4} {'batch':>5} {'img/s':>9} {'MFU':>6} "
          f"{'peak GB':>8} {'x recipe':>8}")


def set_ratios(rows: list[dict]) -> None:
    """Each row's images/s over the recipe's, where the recipe row is among them."""
    recipe = next((r["images_per_s"] for r in rows if r["name"] == "recipe"), None)
    for r in rows:
        r["vs_recipe"] = r["images_per_s"] / recipe if recipe else None


def row_line(r: dict) -> str:
    ratio = f"{r['vs_recipe']:>8.2f}" if r.get("vs_recipe") is not None else f"{'-':>8}"
    return (f"{r['name']:<20} {r['arch']:<13} {r['precision']:<5} {r['zero']:>4} {r['micro_batch']:>5} "
            f"{r['images_per_s']:>9.2f} {r['mfu']:>6.1%} {r['peak_memory_gb']:>8.2f} {ratio}")


def report(rows: list[dict]) -> list[str]:
    """The table, then where the time went in each profiled setting."""
    set_ratios(rows)
    return ([HEADER] + [row_line(r) for r in rows]
            + [f"{r['name']}: {shares_line(r['profile'])}" for r in rows if r.get("profile")])


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU config (the default without CUDA)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--max-batch", type=int, default=64, help="largest micro-batch tried (on a GPU, the memory estimate may start lower)")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="measure at this micro-batch instead of searching for the largest that fits "
                             "(a row of 0 images/s when it runs out of memory)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these settings, in the table's order")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--profile", action="store_true",
                        help="after each setting's timing, print torch.profiler's top operators of 3 more steps "
                             "and their time by kind of work")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--jsonl", default=None, help="append each row to this file as soon as it is measured")
    parser.add_argument("--summary", default=None, metavar="JSONL",
                        help="measure nothing: print the table of the rows in this file (from --jsonl)")
    args = parser.parse_args(argv)
    if args.summary:
        print("\n".join(report(read_rows(args.summary))))
        return {"rows": read_rows(args.summary)}
    tiny = args.tiny or not torch.cuda.is_available()
    img_size = (128, 96) if tiny else (1024, 768)
    settings = cpu_settings() if tiny else cuda_settings()
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in settings})
        if unknown:
            parser.error(f"unknown setting(s) {unknown}; choose from {[s.name for s in settings]}")
        settings = [s for s in settings if s.name in args.only]
    init_distributed(600)
    peak, source = device_peak_tflops(args.peak_tflops)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, input {img_size[1]}x{img_size[0]}, peak {peak:.3g} TFLOP/s ({source}), {args.steps} timed steps")
    print(HEADER, flush=True)
    rows = []
    for setting in settings:
        row = {**measure(setting, img_size, args.steps, args.warmup, args.max_batch, peak, args.profile,
                         args.micro_batch),
               "device": device,
               "peak_tflops": peak}
        rows.append(row)
        set_ratios(rows)
        print(row_line(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    result = {"device": device, "img_size": list(img_size), "peak_tflops": peak, "peak_source": source,
              "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
    shutdown()
