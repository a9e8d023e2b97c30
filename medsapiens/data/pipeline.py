"""Streaming input pipeline: shards listed in a manifest -> augmented images + UDP targets.

Training reads resampled shards (every rank and DataLoader worker draws its own shards; there are no
epochs, the trainer runs a fixed number of steps), each image of a split equally often whatever the
sizes of its shards and wherever a segment cuts the stream (`TrainStream._shard_cycle`), mixes
datasets by weight, and is
deterministic in (seed, segment start step, rank, worker). The stream restarts at the start of
every segment of `segment_steps` steps; checkpoints are taken on segment boundaries, so a resumed
run reproduces exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import math
import random
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medsapiens.config import at_least, positive
from medsapiens.data.augment import AugmentConfig, normalize, photometric, random_affine, warp
from medsapiens.data.codec import apply_affine, encode_udp, whole_image_affine
from medsapiens.errors import InputError, UserError
from medsapiens.io import processes, storage
from medsapiens.io.manifest import Manifest, ManifestError
from medsapiens.io.registry import LandmarkSet
from medsapiens.io.shard_tar import ShardError, decode_sample, read_shard

MIXING_RULES = ("proportional", "uniform", "temperature")
TEST_SPLIT_PREFIX = "test"  # test, test1, test2, ...: held out, never used for selection


@dataclass
class DataConfig:
    APPLIES_WHEN: ClassVar = {"temperature": ("mixing", "temperature")}

    shards: str = ""
    datasets: list[str] = field(default_factory=list)
    mixing: str = "proportional"
    temperature: float = 2.0
    weights: dict[str, float] = field(default_factory=dict)  # multiply a dataset's share under `mixing` (default 1)
    train_split: str = "train"
    val_split: str = "val"  # validation and best-checkpoint selection; never a test split
    micro_batch: int = 2
    workers: int = 2
    shuffle_buffer: int = 64
    sigma: float = 3.0
    max_corrupt_fraction: float = 0.01
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def check(self) -> None:
        at_least("data.micro_batch", self.micro_batch, 1)
        at_least("data.workers", self.workers, 0)
        at_least("data.shuffle_buffer", self.shuffle_buffer, 1)
        positive("data.sigma", self.sigma)
        if self.mixing not in MIXING_RULES:
            raise InputError(f"data.mixing must be one of {MIXING_RULES}, got {self.mixing!r}")
        positive("data.temperature", self.temperature)
        if not all(math.isfinite(w) and w >= 0 for w in self.weights.values()) or \
                (self.weights and not any(self.weights.values())):
            raise InputError(f"data.weights must be non-negative numbers, not all 0, got {self.weights}")
        repeated = sorted({d for d in self.datasets if self.datasets.count(d) > 1})
        if repeated:
            raise InputError(f"data.datasets lists {repeated} more than once")
        self.augment.check()
        if not 0 <= self.max_corrupt_fraction <= 1:
            raise InputError(f"data.max_corrupt_fraction must be in 0..1, got {self.max_corrupt_fraction}")
        check_val_split(self.val_split)
        if is_test_split(self.train_split):
            raise InputError(f"data.train_split={self.train_split!r} is a test split: the numbers reported on it would "
                             "be on the images the model trained on; train on 'train'")
        if self.val_split == self.train_split:
            raise InputError(f"data.val_split is the training split ({self.val_split!r}): a checkpoint chosen on "
                             "the images it trained on is chosen on nothing; validate on 'val'")


class CorruptDataError(UserError, RuntimeError):
    pass


def heatmap_size(input_size) -> tuple[int, int]:
    return input_size[0] // 4, input_size[1] // 4


def mixture_weights(manifest: Manifest, cfg: DataConfig, datasets: list[str]) -> np.ndarray:
    """Sampling probability of each dataset: by size, uniform or size^(1/T) (`data.mixing`), times its
    `data.weights` entry (default 1): `{chest: 2}` draws chest twice as often as the rule alone would."""
    unknown = sorted(set(cfg.weights) - set(datasets))
    if unknown:
        raise InputError(f"data.weights names dataset(s) not being trained: {unknown}")
    sizes = np.array([manifest.datasets[d].splits.get(cfg.train_split, 0) for d in datasets], dtype=np.float64)
    empty = [d for d, n in zip(datasets, sizes, strict=True) if n == 0]
    if empty:
        raise ManifestError(f"no {cfg.train_split!r} samples for dataset(s) {empty} in {manifest.location}")
    base = {"proportional": sizes, "uniform": np.ones_like(sizes), "temperature": sizes ** (1.0 / cfg.temperature)}
    weights = base[cfg.mixing] * np.array([cfg.weights.get(d, 1.0) for d in datasets])
    if not weights.sum() > 0:
        raise InputError(f"data.weights give every dataset trained ({', '.join(datasets)}) a weight of 0")
    return weights / weights.sum()


def epoch_images(manifest: Manifest, cfg: DataConfig, datasets: list[str]) -> int:
    """The training images an epoch counts: those of every dataset drawn (a `data.weights` of 0 draws none)."""
    shares = mixture_weights(manifest, cfg, datasets)
    return sum(manifest.datasets[d].splits.get(cfg.train_split, 0)
               for d, share in zip(datasets, shares, strict=True) if share > 0)


def is_test_split(split: str) -> bool:
    return split.startswith(TEST_SPLIT_PREFIX)


def check_val_split(split: str) -> None:
    """Selecting a checkpoint on a test split biases every number reported on it: refused."""
    if is_test_split(split):
        raise InputError(
            f"data.val_split={split!r} is a test split: validation chooses the best checkpoint, so the "
            "test numbers would be biased. Validate on 'val' (shards build carves one from train when "
            "the source has none: --opt ID.val_fraction=F) and evaluate on the test split(s) afterwards")


def validation_split(manifest: Manifest, dataset: str, requested: str) -> str | None:
    """The split this dataset is validated on, or None when the manifest has no such samples."""
    check_val_split(requested)
    return requested if manifest.datasets[dataset].splits.get(requested) else None


def training_example(image, meta, landmark_set: LandmarkSet, dataset_index: int, input_size, sigma,
                     cfg: AugmentConfig, rng: np.random.Generator) -> dict:
    size = (image.shape[1], image.shape[0])
    matrix, flipped = random_affine(rng, size, input_size, cfg, landmark_set.can_flip)
    landmarks = apply_affine(matrix, torch.tensor(meta["landmarks"], dtype=torch.float64))
    visible = torch.tensor(meta["visible"], dtype=torch.float32)
    if flipped:
        perm = landmark_set.flip_permutation()
        landmarks, visible = landmarks[perm], visible[perm]
    heatmaps, weights = encode_udp(landmarks, visible, input_size, heatmap_size(input_size), sigma)
    img = photometric(warp(image, matrix, input_size), rng, cfg)
    return {"image": img, "heatmaps": heatmaps, "weights": weights, "dataset_index": dataset_index}


def collate(examples: list[dict]) -> dict:
    """Stack a mixed batch; targets are zero-padded to the largest K (weight 0 there). Images stay
    on 0-255, one channel unless the batch holds an RGB one (augment.normalize runs on the device),
    a third of the bytes to copy and to send from the DataLoader workers."""
    channels = max(e["image"].shape[0] for e in examples)
    k_max = max(e["weights"].shape[0] for e in examples)
    heat = torch.zeros(len(examples), k_max, *examples[0]["heatmaps"].shape[1:])
    weights = torch.zeros(len(examples), k_max)
    for i, e in enumerate(examples):
        k = e["weights"].shape[0]
        heat[i, :k], weights[i, :k] = e["heatmaps"], e["weights"]
    return {
        "images": torch.stack([e["image"].expand(channels, -1, -1) for e in examples]),
        "dataset_index": torch.tensor([e["dataset_index"] for e in examples], dtype=torch.long),
        "target_heatmaps": heat,
        "target_weights": weights,
    }


class CorruptCounter:
    """Counts bad samples per shard, warns at a limited rate, aborts past a fraction."""

    def __init__(self, max_fraction: float, where: str):
        self.max_fraction = max_fraction
        self.where = where
        self.seen = 0
        self.bad = Counter()

    def ok(self) -> None:
        self.seen += 1

    def record(self, url: str, error: Exception) -> None:
        self.seen += 1
        self.bad[url] += 1
        total = sum(self.bad.values())
        if total <= 3 or total % 100 == 0:
            print(f"warning: {self.where}: skipped corrupt sample #{total} in {url}: {error}", file=sys.stderr)
        if total > self.max_fraction * max(self.seen, 100):
            worst, count = self.bad.most_common(1)[0]
            raise CorruptDataError(
                f"{self.where}: {total} of {self.seen} samples were corrupt (limit "
                f"{self.max_fraction:.1%}); worst shard {worst} with {count}; last error: {error}"
            )


class TrainStream(IterableDataset):
    """Infinite stream of collated micro-batches for one rank; see the module docstring."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, dataset_ids: list[str], input_size,
                 seed: int, rank: int):
        self.manifest = manifest
        self.cfg = cfg
        self.dataset_ids = dataset_ids
        self.input_size = tuple(input_size)
        self.seed = seed
        self.rank = rank
        self.segment_start = 0
        self.probabilities = mixture_weights(manifest, cfg, dataset_ids)
        self.landmark_sets = [manifest.landmark_set(d) for d in dataset_ids]

    def _shard_cycle(self, dataset: str, rng: np.random.Generator):
        """(url, sample) of the split's shards (url, exception for a damaged one), each drawn uniformly and
        read whole, except the first and any after a read cut short: drawn by size and entered at a random
        sample, as if the stream had been running forever. Every position of the stream is then each image
        equally likely, so a segment that stops after a few samples, or after many, draws each image
        equally often. (Drawn by size and read whole, an image's rate grew with its shard's size; drawn
        uniformly from the start, short segments favoured small shards.)"""
        shards = self.manifest.shards_for(dataset, self.cfg.train_split)
        sizes = np.array([s.samples for s in shards], dtype=np.float64)

        def entered() -> tuple[int, int]:
            index = int(rng.choice(len(shards), p=sizes / sizes.sum()))
            return index, int(rng.integers(shards[index].samples))

        index, start = entered()
        s3_failures = 0
        while True:
            shard = shards[index]
            url = self.manifest.url_of(shard)
            try:
                with contextlib.closing(read_shard(self.manifest, shard)) as samples:
                    for sample in itertools.islice(samples, start, None):
                        yield url, sample
            except ShardError:  # not the shard the manifest lists: stop, do not train on it
                raise
            except OSError as exc:  # gone or unreadable: drawing others would train on another mix than listed
                raise ShardError(f"{url}: a shard the manifest lists cannot be read ({exc}); training stops rather "
                                 "than go on without it") from exc
            except storage.S3Error as exc:  # the network, not the data: say so and draw another shard
                s3_failures += 1
                if s3_failures >= storage.limits().attempts:
                    raise
                print(f"warning: {exc}; drawing another shard", file=sys.stderr)
            except Exception as exc:  # a damaged shard: count it and draw another
                yield url, exc
            else:
                s3_failures = 0
                index, start = int(rng.integers(len(shards))), 0
                continue
            index, start = entered()  # after a read cut short, as at the start

    def _dataset_stream(self, dataset: str, seed_seq: np.random.SeedSequence):
        from webdataset.filters import shuffle

        rng = np.random.default_rng(seed_seq)
        buffered = shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer,
                           rng=random.Random(int(rng.integers(2**62))))
        return iter(buffered(self._shard_cycle(dataset, rng)))

    def __iter__(self):
        worker = get_worker_info()
        worker_id = worker.id if worker else 0
        root = np.random.SeedSequence([self.seed, self.segment_start, self.rank, worker_id])
        mix_seq, aug_seq, *dataset_seqs = root.spawn(2 + len(self.dataset_ids))
        mix_rng, aug_rng = np.random.default_rng(mix_seq), np.random.default_rng(aug_seq)
        streams = [self._dataset_stream(d, s) for d, s in zip(self.dataset_ids, dataset_seqs, strict=True)]
        counter = CorruptCounter(self.cfg.max_corrupt_fraction, f"rank {self.rank} worker {worker_id}")
        batch = []
        while True:
            d = int(mix_rng.choice(len(streams), p=self.probabilities))
            url, sample = next(streams[d])
            try:
                if isinstance(sample, Exception):
                    raise sample
                image, meta = decode_sample(sample, self.landmark_sets[d], self.manifest.max_side)
            except Exception as exc:
                counter.record(url, exc)
                continue
            counter.ok()
            batch.append(training_example(image, meta, self.landmark_sets[d], d, self.input_size,
                                          self.cfg.sigma, self.cfg.augment, aug_rng))
            if len(batch) == self.cfg.micro_batch:
                yield collate(batch)
                batch = []


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def leave_stop_signals_to_the_rank(_worker_id: int) -> None:
    """In a data worker: ignore the stop signals (SIGTERM, SIGUSR1) that the launcher and DeepSpeed send
    to every process of a job, so that the rank, which saves a checkpoint on them, keeps its workers
    until it leaves the training loop; `train_batches` then stops them (`stop_workers`). The worker
    was born with them blocked (`workers_born_deaf`); one that came meanwhile is dropped here."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def workers_born_deaf():
    """Around starting data workers: they inherit the stop signals blocked. Between a worker's birth
    and `leave_stop_signals_to_the_rank`, torch's own SIGTERM handler in the worker would die of one,
    and the rank with it ("DataLoader worker exited unexpectedly") instead of checkpointing."""
    return processes.children_born_blocking(STOP_SIGNALS)


def stop_workers(loader) -> None:
    """Shut a loader iterator's worker processes down now. Workers that ignore SIGTERM cannot be left to
    Python's exit, which sends them SIGTERM and waits for them; and an error raised through the
    loader keeps it alive in the error's traceback, so its own cleanup never runs before that exit."""
    shutdown = getattr(loader, "_shutdown_workers", None)  # none without worker processes
    if shutdown is not None:
        shutdown()


def train_batches(stream: TrainStream, start_step: int, max_steps: int, segment_steps: int,
                  grad_accum: int, workers: int):
    """Yield (step, [micro-batches]) from start_step to max_steps. The stream restarts at every multiple
    of segment_steps; a start inside a segment (a resume from a checkpoint a stop signal wrote) replays
    the segment from its start and drops the steps before start_step, so the batches are the ones an
    uninterrupted run sees. Close it when stopping early: that stops the data workers."""
    step = start_step
    while step < max_steps:
        stream.segment_start = step - step % segment_steps
        with workers_born_deaf():
            loader = iter(DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                                     prefetch_factor=4 if workers else None,
                                     worker_init_fn=leave_stop_signals_to_the_rank))
        try:
            for _ in range((step - stream.segment_start) * grad_accum):
                next(loader)
            segment_end = min(max_steps, (step // segment_steps + 1) * segment_steps)
            while step < segment_end:
                yield step, [next(loader) for _ in range(grad_accum)]
                step += 1
        finally:  # a worker's error, the consumer's (closing this generator), or the segment's end
            stop_workers(loader)


@dataclass
class EvalExample:
    image: torch.Tensor
    matrix: torch.Tensor
    meta: dict
    valid: bool = True


def eval_example(image, meta, input_size, margin: float) -> EvalExample:
    matrix = whole_image_affine((image.shape[1], image.shape[0]), input_size, margin)
    return EvalExample(normalize(warp(image, matrix, input_size)), matrix, meta)


def shard_start(manifest: Manifest, shard, n: int):
    """A shard's first n samples. A shard taken whole is then read to its end, where its sha256 and sample
    count are checked against the manifest (a shard swapped or holding other samples is refused, not
    scored), and no sample past the listed count is given: every rank makes as many forward passes."""
    samples = read_shard(manifest, shard)
    yield from itertools.islice(samples, n)
    if n == shard.samples:
        collections.deque(samples, maxlen=0)


def eval_examples(manifest: Manifest, dataset: str, split: str, input_size, margin: float = 1.25,
                  rank: int = 0, world_size: int = 1, limit: int = 0):
    """This rank's share of a split: whole shards, dealt round-robin (each shard is read by one rank
    only), in a fixed order; with `limit`, the split's first `limit` images in shard order, the same
    images whatever the number of ranks.

    Ranks must run the same number of forward passes under ZeRO-3, so every rank yields as many
    examples as the busiest one, padding with copies marked `valid=False`. A bad sample here is an
    error, not a skip: evaluation must see every image.
    """
    taken = [(shard, shard.samples) for shard in manifest.shards_for(dataset, split)]  # (shard, images read)
    if limit:
        before = list(itertools.accumulate((n for _, n in taken), initial=0))
        taken = [(shard, min(n, limit - start)) for (shard, n), start in zip(taken, before, strict=False)
                 if start < limit]
    per_rank = max(sum(n for _, n in taken[r::world_size]) for r in range(world_size))
    landmark_set = manifest.landmark_set(dataset)
    samples = itertools.chain.from_iterable(shard_start(manifest, shard, n) for shard, n in taken[rank::world_size])
    last, count = None, 0
    for sample in samples:
        image, meta = decode_sample(sample, landmark_set, manifest.max_side)
        last = eval_example(image, meta, input_size, margin)
        count += 1
        yield last
    if last is None:
        last = EvalExample(torch.zeros(3, input_size[1], input_size[0]), torch.eye(3, dtype=torch.float64), {})
    for _ in range(per_rank - count):
        yield EvalExample(last.image, last.matrix, last.meta, valid=False)
