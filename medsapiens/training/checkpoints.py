"""Training checkpoints, in one place: tags, save and prune, resume, the best one, consolidated
fp32 weights and universal (world-size independent) copies.

A run keeps its DeepSpeed checkpoints in `RUN_DIR/checkpoints/`: one folder per tag
`step_NNNNNNNN`, each complete one with `complete.json` (every file of every rank and its size,
written by rank 0 once all ranks have confirmed their files), `latest` naming the newest complete
one, and `best.json` when the best validation checkpoint is tracked (that tag is never pruned).

DeepSpeed reads its files with `torch.load(weights_only=False)`, which runs whatever code a
pickle names; every read of a checkpoint goes through `weights_only_loading`, so a run directory
from elsewhere can hold tensors and DeepSpeed's own state types, never code.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from medsapiens import distributed
from medsapiens.errors import CheckpointError, run_command
from medsapiens.io import storage
from medsapiens.io.processes import exit_process
from medsapiens.model.weights import refuse_non_finite

CHECKPOINTS = "checkpoints"
BEST = "best.json"
COMPLETE = "complete.json"
CLIENT_STATE_KEY = "medsapiens"
TAG_PREFIX = "step_"
LATEST_UNIVERSAL = "latest_universal"  # names the universal checkpoint `--resume universal` loads
# Each rank's ZeRO optimizer partition: `[bf16_]zero_pp_rank_<dp rank>_mp_rank_<mp rank>_optim_states.pt`.
OPTIMIZER_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_?optim_states\.pt")
MODEL_STATES = "_model_states.pt"  # `mp_rank_00_model_states.pt`; under ZeRO-3 one per rank
RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # a file of one rank's ZeRO partition (optimizer; model states under ZeRO-3)
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load obeys it over an explicit weights_only=False


def deepspeed_state_types() -> list:
    """The non-tensor types DeepSpeed's ZeRO checkpoint files hold (beyond what weights_only allows)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


@contextlib.contextmanager
def weights_only_loading(where):
    """Every torch.load inside (DeepSpeed's included) unpickles only tensors, containers and
    `deepspeed_state_types()`; anything else is refused with one line naming `where`."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_state_types()):
            yield
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"names {found.group(1)}" if found else "is not plain weights"
        raise CheckpointError(f"{where}: refused to load: a checkpoint file {what}, which could run code "
                              "(a run directory is not a safe thing to share; share a bundle)") from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_tag(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def tag_step(tag: str) -> int:
    return int(tag.removeprefix(TAG_PREFIX).removesuffix("_universal"))


def size_on_disk(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def is_complete(tag_dir: Path) -> bool:
    """Whether the tag's `complete.json` exists and every file it lists is there with its size. A file
    that cannot be read (an I/O error, no permission) is an error, not a "no": incomplete tags get deleted."""
    try:
        listed = json.loads((Path(tag_dir) / COMPLETE).read_text())
        return bool(listed) and all((Path(tag_dir) / name).stat().st_size == size for name, size in listed.items())
    except (FileNotFoundError, NotADirectoryError, ValueError, AttributeError):
        return False
    except OSError as exc:
        raise CheckpointError(f"checkpoint {tag_dir}: cannot tell whether it is complete ({exc}); "
                              "nothing was deleted") from None


def tags(ckpt_dir: Path) -> list[str]:
    """Every ZeRO checkpoint folder, complete or not, oldest first."""
    return sorted(p.name for p in Path(ckpt_dir).glob(f"{TAG_PREFIX}*") if p.is_dir() and not p.name.endswith("_universal"))


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints, oldest first."""
    return [t for t in tags(ckpt_dir) if is_complete(Path(ckpt_dir) / t)]


def latest_tag(ckpt_dir: Path) -> str:
    """The newest complete checkpoint (an incomplete newer one, as a rank frozen mid-save leaves, is passed over)."""
    complete = complete_tags(ckpt_dir)
    if not complete:
        raise CheckpointError(f"no complete checkpoint in {ckpt_dir}")
    return complete[-1]


def has_checkpoint(ckpt_dir: Path) -> bool:
    return bool(complete_tags(ckpt_dir))


def saved_world_size(tag_dir: Path) -> int | None:
    """How many ranks saved a complete checkpoint: one ZeRO optimizer partition each, as its `complete.json`
    lists them. None when it holds none (ZeRO stage 0: no state split by rank)."""
    listed = json.loads((Path(tag_dir) / COMPLETE).read_text())
    ranks = {int(found.group(1)) for name in listed if (found := OPTIMIZER_SHARD.fullmatch(name))}
    return len(ranks) or None


def prepare(ds_engine) -> None:
    """Make the engine's checkpoint writer note each file it saves and its size (DeepSpeed does
    not tell which files a rank wrote)."""
    engine = ds_engine.checkpoint_engine
    save_file = engine.save
    engine.medsapiens_written = {}

    def save(state_dict, path):
        save_file(state_dict, path)
        engine.medsapiens_written[Path(path).name] = os.path.getsize(path)

    engine.save = save


def save(ds_engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, keep: set[str] = frozenset()) -> None:
    """Every rank calls this. Once every rank has confirmed its files, rank 0 checks their sizes
    on disk, writes `complete.json` and `latest`, then prunes (see `prune`; tags in `keep`, such as
    the best one, are never pruned). A rank that never confirms leaves the previous checkpoint the latest."""
    tag = checkpoint_tag(step)
    tag_dir = Path(ckpt_dir) / tag
    rank = distributed.rank()
    if rank == 0:
        (tag_dir / COMPLETE).unlink(missing_ok=True)  # a save over an older, damaged copy of this tag
    ds_engine.checkpoint_engine.medsapiens_written.clear()
    with storage.local_write(tag_dir):  # a full disk: one line; the torn tag goes at the next start
        ds_engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={CLIENT_STATE_KEY: client_state},
                                  save_latest=False)
    confirmed = distributed.gather_to_rank0(ds_engine.checkpoint_engine.medsapiens_written)
    if rank == 0:
        files = {name: size for files in confirmed for name, size in files.items()}
        # each file by name: a shared file system may list a folder from a stale cache
        wrong = sorted(name for name, size in files.items() if size_on_disk(tag_dir / name) != size)
        if wrong:
            raise CheckpointError(f"checkpoint {tag_dir}: file(s) {wrong} differ from what the ranks wrote")
        write_atomically(tag_dir / COMPLETE, json.dumps(files, indent=1))
        write_atomically(Path(ckpt_dir) / "latest", tag)
        prune(ckpt_dir, step, keep_last, keep)
    distributed.barrier()


def remove_incomplete(ckpt_dir: Path) -> list[str]:
    """Delete the tags no rank will finish (a save that died with its job or on a full disk), giving their
    space back; the run directory's lock keeps any live writer out. Returns them."""
    torn = [t for t in tags(ckpt_dir) if not is_complete(Path(ckpt_dir) / t)]
    for tag in torn:
        shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)
    return torn


def prune(ckpt_dir: Path, step: int, keep_last: int, keep: set[str] = frozenset()) -> None:
    """After step's checkpoint completed: keep the last `keep_last` complete tags (and those in `keep`);
    drop incomplete tags older than `step`, which no rank will ever finish (a torn save of a killed job)."""
    complete = complete_tags(ckpt_dir)
    torn = {t for t in tags(ckpt_dir) if t not in complete and tag_step(t) < step}
    for old in (set(complete[:-keep_last]) - set(keep)) | torn:
        shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resume_tag(ckpt_dir: Path, mode: str) -> str | None:
    """The checkpoint `--resume mode` loads: `auto` the newest complete one (None when there is none),
    `universal` the conversion of the newest, `none` None."""
    if mode == "universal":
        return current_universal(ckpt_dir)
    complete = complete_tags(ckpt_dir) if mode == "auto" else []
    return complete[-1] if complete else None


def unloadable(ckpt_dir: Path, tag: str, rank: int) -> str | None:
    """Why `rank` cannot load checkpoint `tag` as it sees it, or None: a universal checkpoint's folder, or a
    ZeRO one's `complete.json` and the files of it the rank reads (those of no rank, and its own)."""
    tag_dir = Path(ckpt_dir) / tag
    if tag.endswith("_universal"):
        return None if tag_dir.is_dir() else "no such folder"
    try:
        listed = json.loads((tag_dir / COMPLETE).read_text())
        wrong = [name for name, size in listed.items()
                 if reads_file(name, rank) and size_on_disk(tag_dir / name) != size]
        shown = set(os.listdir(tag_dir))  # DeepSpeed finds the model states by listing the folder
        unlisted = [name for name in listed if name.endswith(MODEL_STATES) and reads_file(name, rank)
                    and name not in shown]
    except (OSError, ValueError, AttributeError) as exc:
        return f"{COMPLETE} unreadable: {exc}"
    if wrong:
        return f"{', '.join(wrong)} missing or of another size"
    return f"{', '.join(unlisted)} not in its listing of the folder (a stale cache?)" if unlisted else None


def reads_file(name: str, rank: int) -> bool:
    """Whether `rank` loads a checkpoint file: each rank loads its own ZeRO partitions, and the shared files."""
    owner = RANK_FILE.search(name)
    return owner is None or int(owner.group(1)) == rank


def load(ds_engine, ckpt_dir: Path, tag: str) -> dict | None:
    """Load checkpoint `tag` (a universal one when the engine is so configured); our client state."""
    ckpt_dir = Path(ckpt_dir)
    with weights_only_loading(ckpt_dir / tag):
        path, client = ds_engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        return None
    steps_beside_their_parameters(getattr(ds_engine.optimizer, "optimizer", ds_engine.optimizer))
    return (client or {}).get(CLIENT_STATE_KEY, {})


def universal_tag(ckpt_dir: Path) -> str | None:
    """The universal checkpoint `medsapiens pretrain universal` made last, if any."""
    pointer = Path(ckpt_dir) / LATEST_UNIVERSAL
    return pointer.read_text().strip() if pointer.is_file() else None


def current_universal(ckpt_dir: Path) -> str:
    """The universal checkpoint `--resume universal` loads: the conversion of the run's newest complete
    checkpoint, never an older one (the steps since would be trained again)."""
    universal = universal_tag(ckpt_dir)
    newest = complete_tags(ckpt_dir)[-1] if has_checkpoint(ckpt_dir) else None
    if universal is None or (newest is not None and tag_step(universal) < tag_step(newest)):
        found = f"its universal checkpoint is {universal}, older than" if universal else "it has no universal checkpoint of"
        raise CheckpointError(f"{ckpt_dir.parent}: {found} its newest checkpoint {newest}: convert that one with "
                              f"`medsapiens pretrain universal {ckpt_dir.parent}`, then rerun with --resume universal")
    return universal


def steps_beside_their_parameters(optimizer) -> None:
    """A fused (or capturable) torch optimizer's `step` as float32 on its parameter's device, where
    `Optimizer.load_state_dict` puts it, one tensor per parameter. DeepSpeed's universal load sets `step`
    as its converter saved it, on the CPU, where the fused CUDA AdamW kernel cannot read it; under ZeRO-3
    it hands every partition one shared tensor, which each sub-group's update would advance again. The
    states are walked, not the groups: ZeRO-3 lists a group's parameters only while it steps them (the
    engine's groups are all fused or none is)."""
    groups = getattr(optimizer, "param_groups", [])
    if not groups or not all(group.get("fused") or group.get("capturable") for group in groups):
        return
    for param, state in optimizer.state.items():
        step = state.get("step")
        if step is not None:
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=param.device)


def best_entry(step: int, score: float, validation: dict) -> dict:
    return {"step": step, "tag": checkpoint_tag(step), "mre": score, "validation": validation}


def best_still_kept(ckpt_dir: Path, best: dict | None) -> dict | None:
    """The best entry a resumed checkpoint recorded, or None when its tag is no longer complete on disk. A
    resume that fell back past a removed newest checkpoint reads an older record, whose best the removed
    save may have pruned for its own, newer best."""
    return best if best and is_complete(Path(ckpt_dir) / best["tag"]) else None


def write_best(run_dir: Path, best: dict | None) -> None:
    """`best.json`, or none while no kept checkpoint is the best."""
    path = Path(run_dir) / BEST
    if best is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps(best, indent=2))


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered from the ZeRO partitions of every rank: fp32 master copies of
    what trained, frozen weights in the dtype they trained in (bf16 in a bf16 LoRA run, docs/model.md)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not is_complete(Path(ckpt_dir) / tag):
        raise CheckpointError(f"no complete checkpoint {tag!r} in {ckpt_dir}")
    with weights_only_loading(Path(ckpt_dir) / tag):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    refuse_non_finite(state, Path(ckpt_dir) / tag)
    return state


def make_universal(ckpt_dir: Path, tag: str | None = None) -> str:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format, loadable at another world size.

    Writes `<tag>_universal/` and points `latest_universal` at it; resume with `--resume universal`.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    out_tag = f"{tag}_universal"
    proc = subprocess.run([sys.executable, "-m", "medsapiens.training.checkpoints",
                           "--input_folder", str(ckpt_dir / tag), "--output_folder", str(ckpt_dir / out_tag),
                           "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"])
    if proc.returncode:
        raise CheckpointError(f"converting {ckpt_dir / tag} to a universal checkpoint failed (its error is above)")
    (ckpt_dir / LATEST_UNIVERSAL).write_text(out_tag)
    return out_tag


if __name__ == "__main__":  # make_universal runs DeepSpeed's converter here, under weights-only loading
    from deepspeed.checkpoint import ds_to_universal

    def convert(arguments) -> None:
        with weights_only_loading(arguments.input_folder):
            ds_to_universal.main(arguments)

    exit_process(run_command(convert, ds_to_universal.parse_arguments()))
