"""Training checkpoints, in one place: tags, save and prune, resume, the best one, consolidated
fp32 weights and universal (world-size independent) copies.

A run keeps its DeepSpeed checkpoints in `RUN_DIR/checkpoints/`: one folder per tag
`step_NNNNNNNN`, DeepSpeed's `latest` naming the last complete one, and `best.json` when the
best validation checkpoint is tracked (that tag is never pruned).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

CHECKPOINTS = "checkpoints"
BEST = "best.json"
CLIENT_STATE_KEY = "medsapiens"
TAG_PREFIX = "step_"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_tag(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def tag_step(tag: str) -> int:
    return int(tag.removeprefix(TAG_PREFIX).removesuffix("_universal"))


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints, oldest first (DeepSpeed writes `latest` only after a save completes)."""
    if not (ckpt_dir / "latest").is_file():
        return []
    tags = sorted(p.name for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir() and not p.name.endswith("_universal"))
    latest = (ckpt_dir / "latest").read_text().strip()
    return [t for t in tags if t <= latest]


def latest_tag(ckpt_dir: Path) -> str:
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir} (no 'latest' file)")
    return latest.read_text().strip()


def has_checkpoint(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / "latest").is_file()


def save(ds_engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, keep: set[str] = frozenset()) -> None:
    """Every rank calls this; rank 0 then prunes to the last `keep_last` complete checkpoints
    (tags in `keep`, such as the best one, are never pruned)."""
    ds_engine.save_checkpoint(str(ckpt_dir), tag=checkpoint_tag(step), client_state={CLIENT_STATE_KEY: client_state})
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        for old in set(complete_tags(ckpt_dir)[:-keep_last]) - set(keep):
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    torch.distributed.barrier()


def load(ds_engine, ckpt_dir: Path) -> dict | None:
    """Load the last complete checkpoint (or the universal one when so configured); our client state."""
    path, client = ds_engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        return None
    return (client or {}).get(CLIENT_STATE_KEY, {})


def best_entry(step: int, score: float, validation: dict) -> dict:
    return {"step": step, "tag": checkpoint_tag(step), "mre": score, "validation": validation}


def write_best(run_dir: Path, best: dict) -> None:
    (Path(run_dir) / BEST).write_text(json.dumps(best, indent=2))


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model, gathered from the ZeRO partitions of every rank."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (Path(ckpt_dir) / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag!r} in {ckpt_dir}")
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def make_universal(ckpt_dir: Path, tag: str | None = None) -> str:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format, loadable at another world size.

    Writes `<tag>_universal/` and points `latest_universal` at it; resume with `--resume universal`.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    out_tag = f"{tag}_universal"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder", str(ckpt_dir / tag), "--output_folder", str(ckpt_dir / out_tag),
                    "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   check=True)
    (ckpt_dir / "latest_universal").write_text(out_tag)
    return out_tag
