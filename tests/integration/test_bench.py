"""bench/train_step.py's CPU path: the real engine and objective on a tiny config (no timings asserted)."""
import json
import math
import sys

import pytest
from conftest import REPO, run


@pytest.mark.timeout(600)  # the first DeepSpeed test of a fresh venv also builds its CPU comm op
def test_train_step_bench_measures_each_setting_against_the_recipe(tmp_path):
    out, kept = tmp_path / "train_step.json", tmp_path / "rows.jsonl"
    proc = run([sys.executable, "bench/train_step.py", "--tiny", "--steps", "1", "--warmup", "0", "--max-batch", "2",
                "--only", "recipe", "zero3+ckpt", "s2-recipe", "--json", str(out), "--jsonl", str(kept)], timeout=580,
               env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert [json.loads(line)["name"] for line in kept.read_text().splitlines()] == ["recipe", "zero3+ckpt", "s2-recipe"]
    summary = run([sys.executable, "bench/train_step.py", "--summary", str(kept)], timeout=120,
                  env={"PYTHONPATH": str(REPO)})
    assert [line.split()[0] for line in summary.stdout.splitlines()] == ["setting", "recipe", "zero3+ckpt", "s2-recipe"]
    assert list(rows) == ["recipe", "zero3+ckpt", "s2-recipe"] and rows["s2-recipe"]["arch"] == "sapiens2_tiny"
    assert (rows["zero3+ckpt"]["zero"], rows["zero3+ckpt"]["checkpointing"]) == (3, True)
    for row in rows.values():
        assert row["micro_batch"] == 2  # the largest power of two up to --max-batch: everything fits on CPU
        for key in ("images_per_s", "mfu", "peak_memory_gb"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
        assert row["vs_recipe"] == pytest.approx(row["images_per_s"] / rows["recipe"]["images_per_s"])
        assert any(line.startswith(row["name"]) and f"{row['images_per_s']:.2f}" in line
                   for line in proc.stdout.splitlines())
    assert result["peak_tflops"] > 0 and result["peak_source"] == "measured matmul"
