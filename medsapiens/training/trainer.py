"""The training loop shared by pretraining and fine-tuning: steps, logging, validation, checkpoints.

A run directory holds `config.yaml` (the resolved config), `run.json` (datasets, heads, landmark
sets, manifest digest, the split checkpoints are selected on), `tensorboard/`, `metrics.jsonl`,
`checkpoints/` (see medsapiens.training.checkpoints) and `best.json` when the best validation checkpoint
is tracked. Validation reads only each dataset's val split (never a test split).
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from medsapiens import config as configlib
from medsapiens import distributed
from medsapiens.data.pipeline import DataConfig, TrainStream, train_batches, validation_split
from medsapiens.errors import DivergedError, Stopped, is_out_of_memory
from medsapiens.evaluation.inference import PredictSettings, predict_split
from medsapiens.evaluation.metrics import Protocol, summarize
from medsapiens.evaluation.visualize import draw_landmarks
from medsapiens.io.manifest import Manifest
from medsapiens.io.progress import progress_bar
from medsapiens.training import checkpoints
from medsapiens.training.engine import Engine, TrainConfig
from medsapiens.training.memory import MemoryPlan, device_memory_gib, out_of_memory
from medsapiens.training.telemetry import StepTimer, Telemetry, metric_rows

RUN_INFO = "run.json"
RESOLVED_CONFIG = "config.yaml"
RESOLVED_DEEPSPEED = "deepspeed.json"


def add_loss_sum(sums: dict, name: str, loss_sum, count: int) -> None:
    """Accumulate a dataset's (summed loss, sample count) in `sums`."""
    total, n = sums.get(name, (0.0, 0))
    sums[name] = (total + loss_sum, n + count)


def write_run_files(run_dir: Path, cfg, stage: str, manifest: Manifest, dataset_ids: list[str], **extra) -> None:
    """The resolved config and run.json (what the run trains on) beside the run's checkpoints."""
    configlib.save(cfg, run_dir / RESOLVED_CONFIG)
    info = {
        "stage": stage,
        "dataset_ids": dataset_ids,
        "landmark_sets": {d: manifest.landmark_set(d).to_dict() for d in dataset_ids},
        "manifest": {"location": manifest.location, "sha256": manifest.digest},
        "world_size": distributed.world_size(),
        **extra,
    }
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2))


@dataclass
class RunContext:
    """What the loop needs besides the engine: data, sizes and identity of the run."""

    run_dir: Path
    manifest: Manifest
    dataset_ids: list[str]
    input_size: tuple[int, int]
    data: DataConfig
    train: TrainConfig
    config_digest: str
    train_flops_per_sample: float | None = None  # forward and backward, for MFU
    track_best: bool = False
    memory: MemoryPlan | None = None  # what fits the GPU, for the out-of-memory error (None: no fair estimate)


class StopSignals:
    """Records SIGTERM / SIGUSR1 (a scheduler's preemption or time-limit warning) instead of dying on
    them, for the loop to stop at a step every rank agrees on, after a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous = {signum: signal.signal(signum, self._note) for signum in self.SIGNALS}

    def _note(self, signum, frame) -> None:
        self.received = self.received or signum

    def agreed(self) -> bool:
        """True on every rank once any rank has received a stop signal (one all-reduce per call)."""
        return distributed.any_rank(self.received is not None)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Trainer:
    def __init__(self, engine: Engine, objective, ctx: RunContext):
        """objective(forward, batch, dtype) -> (loss, {dataset: (loss sum, samples)}): the model's;
        objective.mean_loss(those summed) is the loss logged."""
        self.engine, self.objective, self.ctx = engine, objective, ctx
        self.is_main = distributed.rank() == 0
        self.telemetry: Telemetry | None = None
        if self.is_main:
            (ctx.run_dir / RESOLVED_DEEPSPEED).write_text(json.dumps(engine.config, indent=2))
            compiled = ", torch.compile (the first steps compile)" if ctx.train.compile else ""
            batch, accum, world = ctx.data.micro_batch, ctx.train.grad_accum, distributed.world_size()
            threads = f", {torch.get_num_threads()} CPU thread(s) per rank" if engine.device.type == "cpu" else ""
            print(f"DeepSpeed ZeRO-{engine.zero_stage}, {engine.precision}{compiled}: micro-batch {batch} x "
                  f"accumulation {accum} x {world} rank(s) = global batch {batch * accum * world}{threads}",
                  file=sys.stderr)
        self.best: dict | None = None
        self.last_validation: dict = {}
        self.finished = False  # the schedule's last step is done (not stopped short by train.stop_after)
        self.validation_settings = PredictSettings(ctx.input_size, engine.device, engine.dtype, ctx.data.micro_batch,
                                                   margin=ctx.data.augment.margin)

    @property
    def ckpt_dir(self) -> Path:
        return checkpoints.checkpoint_dir(self.ctx.run_dir)

    def resume(self, mode: str) -> int:
        """Load a checkpoint ('auto': the last complete one, if any; 'universal'; 'none'); return the step.
        Incomplete checkpoints (saves that died) are removed first. Rank 0 chooses the checkpoint and every
        rank loads that one: a shared file system may list a folder to a rank from a stale cache."""
        def choose() -> str | None:
            if torn := checkpoints.remove_incomplete(self.ckpt_dir):
                print(f"removed the incomplete checkpoint(s) {', '.join(torn)}: saves that did not finish",
                      file=sys.stderr)
            return checkpoints.resume_tag(self.ckpt_dir, mode)

        tag = distributed.computed_on_rank0(choose)
        if tag is None:
            return 0
        distributed.check_every_rank(checkpoints.unloadable(self.ckpt_dir, tag, distributed.rank()), lambda ranks: (
            f"checkpoint {self.ckpt_dir / tag}, which rank 0 resumes, cannot be loaded by {ranks}: the run directory "
            "must be one folder every host sees alike"))
        state = self.engine.load(self.ckpt_dir, tag)
        if state is None:
            raise checkpoints.CheckpointError(f"no checkpoint to resume from in {self.ckpt_dir}")
        if state.get("manifest_digest") != self.ctx.manifest.digest:
            raise checkpoints.CheckpointError(
                f"the checkpoint in {self.ckpt_dir} was trained on another shard manifest "
                f"(sha256 {state.get('manifest_digest', '?')[:12]}, now {self.ctx.manifest.digest[:12]})"
            )
        recorded = state.get("best")
        self.best = checkpoints.best_still_kept(self.ckpt_dir, recorded)
        if self.is_main:
            print(f"resumed from step {state['step']} ({self.ckpt_dir})", file=sys.stderr)
            if recorded and self.best is None:
                print(f"the best validation checkpoint it records, {recorded['tag']}, is gone: the best is "
                      "chosen again from the validations to come", file=sys.stderr)
        return int(state["step"])

    def fit(self, start_step: int) -> dict:
        ctx, train = self.ctx, self.ctx.train
        if 0 < train.stop_after <= start_step < train.max_steps:  # the loop would never meet the stop
            self._say_where_a_rerun_resumes(f"at step {start_step} already, not before train.stop_after "
                                            f"({train.stop_after}): nothing trained (raise or drop train.stop_after to go on)")
            return self.last_validation
        self.telemetry = Telemetry(ctx.run_dir, self.is_main, start_step)
        stream = TrainStream(ctx.manifest, ctx.data, ctx.dataset_ids, ctx.input_size, train.seed, distributed.rank())
        batches = train_batches(stream, start_step, train.max_steps, train.checkpoint_every, train.grad_accum,
                                ctx.data.workers)
        timer, sums = StepTimer(), {}
        progress = progress_bar(total=train.max_steps, initial=start_step, disable=not self.is_main, desc="train",
                        unit="step", dynamic_ncols=True)
        waiting_since = time.perf_counter()
        done = start_step
        stop = StopSignals()
        try:
            for step, micro_batches in batches:
                timer.waited(time.perf_counter() - waiting_since)
                seed_step(train.seed, step, distributed.rank())
                lrs = self.engine.group_lrs()  # this update's: the step moves the schedule on to the next
                try:
                    stats, grad_norm = self.engine.train_step(micro_batches, self.objective)
                except RuntimeError as exc:
                    if not is_out_of_memory(exc):
                        raise
                    raise out_of_memory(step + 1, ctx.data.micro_batch, exc, ctx.memory,
                                        device_memory_gib(self.engine.device)) from None
                self._check_finite(step + 1, stats, grad_norm)
                timer.stepped(ctx.data.micro_batch * train.grad_accum)
                for batch_stats in stats:
                    for name, (loss_sum, count) in batch_stats.items():
                        add_loss_sum(sums, name, loss_sum, count)
                done = step + 1
                stopping = done == train.stop_after
                final = done == train.max_steps
                signalled = not (final or stopping) and stop.agreed()
                # a checkpoint or a stop logs its part of a window: a run resumed there starts a new one
                if done % train.log_every == 0 or done % train.checkpoint_every == 0 or final or stopping or signalled:
                    progress.set_postfix(loss=f"{self._log_train(done, sums, grad_norm, lrs, timer):.4g}", refresh=False)
                    sums = {}
                with timer.aside():
                    if done % train.val_every == 0 or final:
                        self.validate(done)
                    if done % train.checkpoint_every == 0 or final or stopping or signalled:
                        self.checkpoint(done)
                progress.update(1)
                if stopping:
                    break
                if signalled:
                    raise self._stopped(done, f"stopped at step {done}", "resume")
                waiting_since = time.perf_counter()
            # a signal during the schedule's last step or its checkpoint: what follows training must wait too
            if done == train.max_steps and stop.agreed():
                raise self._stopped(done, f"stopped after step {done}, the schedule's last,", "go on")
        except Stopped:
            raise
        except BaseException:
            progress.close()
            self._say_where_a_rerun_resumes(f"stopped at step {done}")
            raise
        finally:
            batches.close()  # stops the data workers, which ignore SIGTERM: Python's exit would wait on them forever
            stop.restore()
            progress.close()
            self.telemetry.close()
        self.finished = done >= train.max_steps
        if not self.finished:
            self._say_where_a_rerun_resumes(f"stopped at step {done} (train.stop_after)")
        elif self.is_main:
            ran = (f"finished at step {done}" if done > start_step else
                   f"finished at step {done} already: nothing to train (a longer schedule is another run: start it "
                   "in another run directory, or with --resume none)")
            print(f"{ran}; {validation_text(self.last_validation)}", file=sys.stderr)
        return self.last_validation

    def _check_finite(self, step: int, stats: list[dict], grad_norm) -> None:
        """Stop at the first step whose gradient norm (the same on every rank), or without one this
        rank's loss, is not finite, before anything after it is saved: no checkpoint holds weights
        such a step touched. A host sync per step, on one number."""
        value = float(grad_norm) if grad_norm is not None else sum(float(s) for b in stats for s, _ in b.values())
        if math.isfinite(value):
            return
        datasets = sorted({name for batch in stats for name, (_, count) in batch.items() if count})
        what = "gradient norm" if grad_norm is not None else "loss"
        raise DivergedError(f"training diverged at step {step}: the {what} is {value} (this rank's batch: "
                            f"{', '.join(datasets)}); no checkpoint after it is written: lower optim.lr (now "
                            f"{self.engine.optim_cfg.lr:g}) or check the data, then start afresh (--resume none, or "
                            "another run directory): a rerun as it is would diverge again")

    def _stopped(self, step: int, when: str, rerun_does: str) -> Stopped:
        """A stop signal after `step`'s checkpoint (every step a signal ends has one)."""
        return Stopped(f"{when} by a stop signal; checkpoint {checkpoints.checkpoint_tag(step)} in "
                       f"{self.ckpt_dir} is complete; rerun the same command to {rerun_does}")

    def _say_where_a_rerun_resumes(self, what: str) -> None:
        if self.is_main:
            tag = checkpoints.latest_tag(self.ckpt_dir) if checkpoints.has_checkpoint(self.ckpt_dir) else None
            where = f"a rerun into {self.ctx.run_dir} resumes from checkpoint {tag}" if tag else "no checkpoint yet"
            print(f"{what}; {where}", file=sys.stderr)

    def _log_train(self, step: int, sums: dict, grad_norm, lrs: dict[str, float], timer: StepTimer) -> float:
        totals = distributed.sum_across_ranks(sums, self.ctx.dataset_ids)
        loss = self.objective.mean_loss(totals)
        scalars = {"loss/total": loss, "train/grad_norm": float(grad_norm) if grad_norm is not None else None}
        scalars.update({f"loss/{name}": s / n for name, (s, n) in totals.items()})
        scalars.update({f"lr/{tag}": lr for tag, lr in lrs.items()})
        scalars.update(timer.report(self.engine.device, self.ctx.train_flops_per_sample, distributed.world_size()))
        self.telemetry.scalars(step, scalars)
        return loss

    def validate(self, step: int) -> dict:
        ctx, results = self.ctx, {}
        self.engine.ds.eval()  # no dropout (LoRA's) while measuring; train_step switches back
        for index, dataset in enumerate(ctx.dataset_ids):
            split = validation_split(ctx.manifest, dataset, ctx.data.val_split)
            if split is None:
                continue
            preds = predict_split(self.engine.ds, ctx.manifest, dataset, index, split, self.validation_settings,
                                  limit=ctx.train.val_limit, panels=ctx.train.val_panels)
            # rank 0 scores; an error there (e.g. an image without spacing) stops every rank
            distributed.decide_on_rank0(partial(self._score, results, step, dataset, split, preds))
        if self.is_main and results:
            self.last_validation = results
            self._update_best(step, results)
        return results

    def _score(self, results: dict, step: int, dataset: str, split: str, preds) -> None:
        landmark_set = self.ctx.manifest.landmark_set(dataset)
        errors, mask = preds.errors(Protocol(landmark_set))
        summary = summarize(errors, landmark_set.sdr_radii, mask=mask, names=landmark_set.names, image_ids=preds.ids)
        unit = landmark_set.unit
        scalars = {f"val/{dataset}/mre_{unit}": summary["mre"]}
        scalars.update({f"val/{dataset}/sdr_{r}{unit}": v for r, v in summary["sdr"].items()})
        self.telemetry.scalars(step, scalars)
        self.telemetry.images(step, f"val/{dataset}", {sample: draw_landmarks(img, truth, pred)
                                                         for sample, img, pred, truth in preds.panels})
        results[dataset] = {"split": split, "unit": unit, "mre": summary["mre"], "sdr": summary["sdr"]}

    def _update_best(self, step: int, results: dict) -> None:
        if not self.ctx.track_best:
            return
        score = float(np.mean([r["mre"] for r in results.values()]))
        if self.best is None or score < self.best["mre"]:
            self.best = checkpoints.best_entry(step, score, results)

    def checkpoint(self, step: int) -> None:
        best = [self.best] if self.ctx.track_best else [None]
        distributed.broadcast_from_rank0(best)
        self.best = best[0]
        keep = {self.best["tag"]} if self.best else set()
        self.engine.save(self.ckpt_dir, step, {
            "step": step,
            "data": {"seed": self.ctx.train.seed, "segment_steps": self.ctx.train.checkpoint_every},
            "config_digest": self.ctx.config_digest,
            "manifest_digest": self.ctx.manifest.digest,
            "world_size": distributed.world_size(),
            "best": self.best,
        }, keep=keep)
        if self.is_main and self.ctx.track_best:
            checkpoints.write_best(self.ctx.run_dir, self.best)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Torch's random numbers in a step (LoRA's dropout) as a function of (seed, step, rank), as the data
    stream's are: a resumed run draws what an uninterrupted one would, and each rank draws its own."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]))


def validation_text(results: dict) -> str:
    """The last validation in words: each dataset's MRE on its val split."""
    if not results:
        return "no validation in this run"
    return "last validation: " + ", ".join(f"{d} MRE {r['mre']:.3f} {r['unit']} ({r['split']})"
                                           for d, r in results.items())


def validation_at(run_dir: Path, step: int) -> dict[str, float]:
    """The validation scalars of the last validation at or before `step` (from metrics.jsonl)."""
    rows = [r for r in metric_rows(run_dir) if r["step"] <= step and any(k.startswith("val/") for k in r)]
    if not rows:
        return {}
    last = max(r["step"] for r in rows)
    found = {"step": last}
    for row in rows:
        if row["step"] == last:
            found.update({k: v for k, v in row.items() if k.startswith("val/")})
    return found
