"""bench/train_step.py: its CPU path on the real engine and objective with a tiny config (no timings
asserted), and how it sorts a profile's time."""
import json
import math
import sys

import pytest
from conftest import REPO, run


def test_train_step_bench_measures_each_setting_against_the_recipe(tmp_path):
    out, kept = tmp_path / "train_step.json", tmp_path / "rows.jsonl"
    proc = run([sys.executable, "bench/train_step.py", "--tiny", "--steps", "1", "--warmup", "0", "--max-batch", "2",
                "--only", "recipe", "zero3+ckpt", "s2-recipe", "--profile", "--json", str(out), "--jsonl", str(kept)], timeout=580,
               env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert [json.loads(line)["name"] for line in kept.read_text().splitlines()] == ["recipe", "zero3+ckpt", "s2-recipe"]
    summary = run([sys.executable, "bench/train_step.py", "--summary", str(kept)], timeout=120,
                  env={"PYTHONPATH": str(REPO)})
    assert [line.split()[0] for line in summary.stdout.splitlines()] == [
        "setting", "recipe", "zero3+ckpt", "s2-recipe", "recipe:", "zero3+ckpt:", "s2-recipe:"]
    assert list(rows) == ["recipe", "zero3+ckpt", "s2-recipe"] and rows["s2-recipe"]["arch"] == "sapiens2_tiny"
    assert (rows["zero3+ckpt"]["zero"], rows["zero3+ckpt"]["checkpointing"]) == (3, True)
    for row in rows.values():
        assert row["micro_batch"] == 2  # the largest power of two up to --max-batch: everything fits on CPU
        for key in ("images_per_s", "mfu", "peak_memory_gb"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
        shares = row["profile"]["shares"]  # every kind of work a step does shows up, and nothing twice
        assert sum(shares.values()) == pytest.approx(1) and row["profile"]["device_busy"] is None  # CPU
        assert all(shares[kind] > 0 for kind in ("attention", "convolution", "matmul", "norm", "optimizer")), shares
        assert f"{row['name']}: attention {shares['attention']:.1%}, convolution" in summary.stdout
        assert row["vs_recipe"] == pytest.approx(row["images_per_s"] / rows["recipe"]["images_per_s"])
        assert any(line.startswith(row["name"]) and f"{row['images_per_s']:.2f}" in line
                   for line in proc.stdout.splitlines())
    assert result["peak_tflops"] > 0 and result["peak_source"] == "measured matmul"


def test_kernel_time_is_sorted_by_kind_and_busy_time_counts_overlaps_once():
    sys.path.insert(0, str(REPO / "bench"))
    from train_step import busy_seconds, time_kind

    kinds = {name: time_kind(name) for name in (
        "pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64",
        "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64",
        "nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNT", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "aten::mm", "c10d::allreduce_",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "Memcpy HtoD (Pageable -> Device)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>")}
    assert list(kinds.values()) == ["attention", "attention", "convolution", "matmul", "matmul", "communication",
                                    "matmul", "communication", "norm", "optimizer", "copies", "elementwise and other"]
    assert busy_seconds([(0, 2e6), (1e6, 3e6), (5e6, 6e6), (5.5e6, 5.6e6)]) == pytest.approx(4)


def test_a_cuda_profile_counts_kernels_not_the_gpu_spans_of_annotations():
    sys.path.insert(0, str(REPO / "bench"))
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent
    from train_step import time_shares

    def event(name, start_ms, end_ms, device=DeviceType.CUDA):
        return FunctionEvent(0, name, 0, start_ms * 1000, end_ms * 1000, device_type=device)

    events = [event("ProfilerStep#1", 0, 100, DeviceType.CPU), event("aten::mm", 1, 2, DeviceType.CPU),
              event("ProfilerStep#1", 0, 100),  # the annotation's span on the GPU's timeline
              event("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNT", 10, 40),
              event("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", 40, 50),
              event("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 45, 55)]  # on a stream of its own
    profile = time_shares(events, wall_s=0.1)
    assert profile["device_busy"] == pytest.approx(0.45)
    assert {k: v for k, v in profile["shares"].items() if v} == pytest.approx(
        {"matmul": 0.6, "attention": 0.2, "communication": 0.2})


def test_a_row_starts_at_the_micro_batch_the_memory_estimate_fits_on_the_card_and_halves_from_there():
    sys.path.insert(0, str(REPO / "bench"))
    from train_step import K, cuda_settings, micro_batch_tries

    from medsapiens.model.cost import GPU_MEMORY_GIB, largest_micro_batch, memory_estimate

    assert micro_batch_tries(cuda_settings()[0], (1024, 768), 8, None) == [8, 4, 2, 1]  # a CPU: from --max-batch
    assert micro_batch_tries(cuda_settings()[0], (1024, 768), 6, None) == [4, 2, 1]
    starts = {}
    for setting in cuda_settings():
        estimate = memory_estimate(setting.arch, (1024, 768), setting.trunk_width, K, setting.precision)
        for card, gib in GPU_MEMORY_GIB.items():
            tries = micro_batch_tries(setting, (1024, 768), 64, gib)
            assert tries == [tries[0] >> i for i in range(len(tries))] and tries[-1] == 1, tries
            fits = largest_micro_batch(estimate, gib, setting.checkpointing, setting.zero)
            assert tries[0] == 64 if fits >= 64 else (tries[0] <= max(1, fits) < 2 * tries[0]), (setting.name, card)
            starts[setting.name, card] = tries[0]
    assert starts["bf16", "80 GB"] < starts["bf16", "141 GB"] < starts["bf16+ckpt", "141 GB"]
    assert starts["2b-zero3+ckpt", "40 GB"] == 1  # the estimate fits nothing there: the step itself decides


@pytest.mark.timeout(300)
def test_a_micro_batch_out_of_memory_is_halved_and_a_given_one_gives_an_empty_row_not_a_traceback(tmp_path):
    """On the tiny CPU config, with every step above one image made to run out of GPU memory as a CUDA step does."""
    script = tmp_path / "oom.py"
    script.write_text(
        "import json, sys, torch\n"
        f"sys.path.insert(0, {str(REPO / 'bench')!r})\n"
        "import train_step\n"
        "from medsapiens.distributed import init_distributed, shutdown\n"
        "real = train_step.run_steps\n"
        "def run_steps(engine, batch, steps):\n"
        "    if len(batch['images']) > 1:\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
        "    return real(engine, batch, steps)\n"
        "train_step.run_steps = run_steps\n"
        "init_distributed(120)\n"
        "recipe = train_step.cpu_settings()[0]\n"
        "rows = [train_step.measure(recipe, (128, 96), 1, 0, 4, 1.0),\n"
        "        train_step.measure(recipe, (128, 96), 1, 0, 4, 1.0, micro_batch=2)]\n"
        "print(json.dumps([[r['micro_batch'], r['images_per_s']] for r in rows]))\n"
        "shutdown()\n")
    proc = run([sys.executable, str(script)], timeout=280, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    (fitted, fitted_rate), given = json.loads(lines[-1])
    assert fitted == 1 and fitted_rate > 0 and given == [0, 0.0]
    assert [line for line in lines if "ran out of memory" in line] == [
        "recipe: micro-batch 4 ran out of memory", "recipe: micro-batch 2 ran out of memory",
        "recipe: micro-batch 2 ran out of memory"]
