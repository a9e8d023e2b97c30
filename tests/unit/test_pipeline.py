import dataclasses
import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

from medsapiens.data.augment import AugmentConfig, _box_blur, _median_blur, _sampling_grid, normalize, photometric
from medsapiens.data.codec import decode_udp, heatmap_to_input
from medsapiens.data.pipeline import (
    CorruptDataError,
    DataConfig,
    TrainStream,
    collate,
    epoch_images,
    eval_examples,
    mixture_weights,
    train_batches,
    training_example,
)
from medsapiens.io import manifest as manifestlib
from medsapiens.io.registry import BUILTIN
from medsapiens.io.shard_tar import file_digest, write_samples

INPUT = (96, 128)


def small_config(**changes) -> DataConfig:
    cfg = DataConfig(micro_batch=4, workers=0, shuffle_buffer=8)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def first_batches(stream, n=2):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def same_batches(a, b) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_stream_is_a_function_of_seed_segment_and_rank(phantom_shards):
    manifest = manifestlib.load(phantom_shards)
    make = lambda rank: TrainStream(manifest, small_config(), ["head", "hand"], INPUT, seed=3, rank=rank)
    again = first_batches(make(0))
    assert same_batches(first_batches(make(0)), again)
    assert not same_batches(first_batches(make(1)), again)
    later = make(0)
    later.segment_start = 10
    assert not same_batches(first_batches(later), again)
    batch = again[0]
    assert batch["images"].shape == (4, 1, 128, 96)  # grey, 0-255: normalised on the device
    assert batch["target_heatmaps"].shape == (4, 37, 32, 24)  # padded to hand's K
    head = batch["dataset_index"] == 0
    assert (batch["target_weights"][head, 19:] == 0).all()


def test_segments_cut_short_still_reach_every_sample_of_a_shard(phantom_shards):
    """The stream restarts at every segment; one that reads fewer samples than a shard holds must not
    always leave out the shard's end (which then would never be trained on)."""
    manifest = manifestlib.load(phantom_shards)
    stream = TrainStream(manifest, small_config(shuffle_buffer=1), ["head"], INPUT, seed=0, rank=0)
    shards = manifest.shards_for("head", "train")
    assert min(s.samples for s in shards) > 4
    drawn = set()
    for segment in range(100):  # 2 samples a segment: 3 read
        samples = stream._dataset_stream("head", np.random.SeedSequence([0, segment]))
        drawn |= {sample["__key__"] for _, sample in itertools.islice(samples, 2)}
    assert len(drawn) == sum(s.samples for s in shards)


def shards_of_sizes(manifest_dir, tmp_path, sizes) -> manifestlib.Manifest:
    """A head train split in shards of these sizes; the members hold no image (the shard draw decodes none)."""
    info, shards, n = manifestlib.load(manifest_dir).datasets["head"], [], 0
    for i, size in enumerate(sizes):
        path = tmp_path / f"head-train-{i:06d}.tar"
        write_samples(path, ({"__key__": f"head_train_{n + j:04d}", "json": b"{}"} for j in range(size)))
        n += size
        shards.append(manifestlib.ShardInfo(path.name, "head", "train", size, *reversed(file_digest(path))))
    sizes_manifest = manifestlib.Manifest({"head": manifestlib.DatasetInfo(info.landmark_set, {"train": n})}, shards, n, 0)
    (tmp_path / "manifest.json").write_bytes(sizes_manifest.to_json())
    return manifestlib.load(tmp_path)


@pytest.mark.parametrize("per_segment", [1, 6, 40])
def test_each_image_is_drawn_equally_often_whatever_its_shard_size_and_the_segment_length(phantom_shards, tmp_path,
                                                                                         per_segment):
    """A split's last shard is its leftover: its images must not be trained on less (or more) than the others,
    whether a segment reads a few samples of one shard or many shards."""
    manifest = shards_of_sizes(phantom_shards, tmp_path, (12, 12, 2))
    stream = TrainStream(manifest, small_config(shuffle_buffer=1), ["head"], INPUT, seed=0, rank=0)
    counts = Counter()
    for segment in range(6000 // per_segment):
        samples = stream._shard_cycle("head", np.random.default_rng([0, segment]))
        counts.update(sample["__key__"] for _, sample in itertools.islice(samples, per_segment))
    rate = {name: np.mean([counts[f"head_train_{i:04d}"] for i in ids]) * 26 / sum(counts.values())
            for name, ids in (("large shards", range(24)), ("small shard", range(24, 26)))}
    assert rate["large shards"] == pytest.approx(1, abs=0.03) and rate["small shard"] == pytest.approx(1, abs=0.15), rate


@pytest.mark.timeout(120)
def test_resumed_batches_equal_uninterrupted_ones_with_workers(phantom_shards):
    manifest = manifestlib.load(phantom_shards)
    stream = TrainStream(manifest, small_config(), ["head", "chest"], INPUT, seed=0, rank=0)
    whole = list(train_batches(stream, 0, 6, segment_steps=3, grad_accum=2, workers=2))
    resumed = list(train_batches(stream, 3, 6, segment_steps=3, grad_accum=2, workers=2))
    assert [s for s, _ in whole] == list(range(6)) and [s for s, _ in resumed] == [3, 4, 5]
    for (_, a), (_, b) in zip(whole[3:], resumed, strict=True):
        assert same_batches(a, b)
    assert not same_batches(whole[0][1], whole[1][1])
    inside = list(train_batches(stream, 4, 6, segment_steps=3, grad_accum=2, workers=2))  # a stop signal's checkpoint
    assert [s for s, _ in inside] == [4, 5]
    for (_, a), (_, b) in zip(whole[4:], inside, strict=True):
        assert same_batches(a, b)


@pytest.mark.timeout(120)
def test_training_and_evaluation_stream_from_s3(phantom_shards, s3_env, monkeypatch):
    from medsapiens.io import storage

    env, client = s3_env
    for path in phantom_shards.iterdir():
        client.upload_file(str(path), "medsapiens-test", f"pipeline/{path.name}")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage._client_for_pid.cache_clear()
    manifest = manifestlib.load("s3://medsapiens-test/pipeline")
    assert manifest.url_of(manifest.shards[0]).startswith("s3://medsapiens-test/pipeline/")
    stream = TrainStream(manifest, small_config(), ["head", "hand"], INPUT, seed=0, rank=0)
    batches = list(train_batches(stream, 0, 2, segment_steps=2, grad_accum=1, workers=2))  # worker processes
    assert [b[0]["images"].shape[0] for _, b in batches] == [4, 4]
    local = TrainStream(manifestlib.load(phantom_shards), small_config(), ["head", "hand"], INPUT, seed=0, rank=0)
    assert same_batches(batches[0][1], next(iter(train_batches(local, 0, 1, 2, 1, workers=2)))[1])
    examples = list(eval_examples(manifest, "leg", "test", INPUT))
    assert len(examples) == manifest.datasets["leg"].splits["test"]


def test_mixture_weights(phantom_shards):
    manifest = manifestlib.load(phantom_shards)
    sizes = np.array([manifest.datasets[d].splits["train"] for d in ("head", "leg")], dtype=float)
    assert np.allclose(mixture_weights(manifest, small_config(), ["head", "leg"]), sizes / sizes.sum())
    assert np.allclose(mixture_weights(manifest, small_config(mixing="uniform"), ["head", "leg"]), [0.5, 0.5])
    tempered = np.sqrt(sizes) / np.sqrt(sizes).sum()
    assert np.allclose(mixture_weights(manifest, small_config(mixing="temperature", temperature=2.0), ["head", "leg"]), tempered)
    explicit = mixture_weights(manifest, small_config(mixing="uniform", weights={"leg": 3.0}), ["head", "leg"])
    assert np.allclose(explicit, [0.25, 0.75])
    doubled = mixture_weights(manifest, small_config(weights={"leg": 2.0}), ["head", "leg"])  # proportional, x2
    assert np.allclose(doubled, sizes * [1, 2] / (sizes * [1, 2]).sum())
    with pytest.raises(ValueError, match="not being trained"):
        mixture_weights(manifest, small_config(weights={"hand": 1.0}), ["head", "leg"])


def test_an_epoch_counts_the_images_of_the_datasets_drawn(phantom_shards):
    manifest = manifestlib.load(phantom_shards)
    head, leg = (manifest.datasets[d].splits["train"] for d in ("head", "leg"))
    assert epoch_images(manifest, small_config(), ["head", "leg"]) == head + leg
    assert epoch_images(manifest, small_config(weights={"leg": 0.0}), ["head", "leg"]) == head  # leg is never drawn


def test_mixing_follows_weights(phantom_shards):
    manifest = manifestlib.load(phantom_shards)
    cfg = small_config(mixing="uniform", weights={"chest": 4.0}, micro_batch=50)
    batch = next(iter(TrainStream(manifest, cfg, ["head", "chest"], (48, 64), seed=0, rank=0)))
    chest_share = (batch["dataset_index"] == 1).float().mean().item()
    assert 0.65 < chest_share < 0.95  # expected 0.8


def dot_image(size=(200, 300), at=(60.0, 210.0)):
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    return (255 * np.exp(-((xs - at[0]) ** 2 + (ys - at[1]) ** 2) / (2 * 2.0**2))).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_augmented_image_and_targets_stay_aligned(seed):
    chest = BUILTIN["chest"]
    landmarks = [[60.0, 210.0]] + [[100.0, 150.0]] * 5
    meta = {"landmarks": landmarks, "visible": [1] * 6}
    cfg = AugmentConfig(rotation_prob=1.0, shift_prob=1.0, photometric_prob=0, blur_prob=0, median_blur_prob=0,
                        dropout_prob=0)
    example = training_example(dot_image(), meta, chest, 0, INPUT, 2.0, cfg, np.random.default_rng(seed))
    image = example["image"][0]
    peak = torch.nonzero(image == image.max())[0].flip(0).double()  # (x, y) in input pixels
    decoded, _ = decode_udp(example["heatmaps"][:1])
    target = heatmap_to_input(decoded, INPUT, (24, 32))[0]
    assert (peak - target).norm() < 1.6  # within the input pixel grid's rounding of a 4x coarser heatmap


@pytest.mark.parametrize("image_size, blob_sigma, output", [((200, 300), 2.0, (192, 256)),
                                                          ((1500, 2000), 12.0, (96, 128))])  # pooled first
def test_warp_puts_each_pixel_where_the_affine_maps_it(image_size, blob_sigma, output):
    from medsapiens.data.augment import random_affine, warp
    from medsapiens.data.codec import apply_affine

    at = (image_size[0] * 0.37, image_size[1] * 0.61)
    w, h = image_size
    ys, xs = np.mgrid[0:h, 0:w]
    image = (255 * np.exp(-((xs - at[0]) ** 2 + (ys - at[1]) ** 2) / (2 * blob_sigma**2))).astype(np.float32)
    for seed in range(4):
        matrix, _ = random_affine(np.random.default_rng(seed), image_size, output,
                                  AugmentConfig(rotation_prob=1.0, shift_prob=1.0), can_flip=True)
        warped = warp(image, matrix, output)[0].double()
        gy, gx = torch.meshgrid(torch.arange(output[1]), torch.arange(output[0]), indexing="ij")
        centroid = torch.stack([(warped * gx).sum(), (warped * gy).sum()]) / warped.sum()
        expected = apply_affine(matrix, torch.tensor([at], dtype=torch.float64))[0]
        assert (centroid - expected).norm() < 0.15, (seed, centroid, expected)


def test_flip_swaps_pairs_and_is_off_without_known_pairs():
    leg, chest = BUILTIN["leg"], BUILTIN["chest"]
    cfg = AugmentConfig(scale_range=(1.0, 1.0), rotation_prob=0, shift_prob=0, flip_prob=1.0, photometric_prob=0,
                        blur_prob=0, median_blur_prob=0, dropout_prob=0)
    points = np.stack([np.linspace(20, 180, 26), np.linspace(30, 270, 26)], axis=1)
    meta = {"landmarks": points.tolist(), "visible": [1] * 26}
    flipped = training_example(dot_image(), meta, leg, 0, INPUT, 2.0, cfg, np.random.default_rng(0))
    plain_cfg = dataclasses.replace(cfg, flip_prob=0.0)
    plain = training_example(dot_image(), meta, leg, 0, INPUT, 2.0, plain_cfg, np.random.default_rng(0))
    at = lambda ex: heatmap_to_input(decode_udp(ex["heatmaps"])[0], INPUT, (24, 32))
    mirrored = at(plain).clone()
    mirrored[:, 0] = INPUT[0] - 1 - mirrored[:, 0]
    assert torch.allclose(at(flipped), mirrored[leg.flip_permutation()], atol=0.3)
    meta6 = {"landmarks": points[:6].tolist(), "visible": [1] * 6}
    never = training_example(dot_image(), meta6, chest, 0, INPUT, 2.0, cfg, np.random.default_rng(0))
    same = training_example(dot_image(), meta6, chest, 0, INPUT, 2.0, plain_cfg, np.random.default_rng(0))
    assert torch.equal(never["heatmaps"], same["heatmaps"])


def corrupt_copy(manifest_dir, tmp_path, bad: int):
    """A copy of the head train split whose first `bad` samples have broken PNG bytes."""
    from medsapiens.data.pipeline import read_shard

    manifest = manifestlib.load(manifest_dir)
    samples = [s for shard in manifest.shards_for("head", "train") for s in read_shard(manifest, shard)]
    for sample in samples[:bad]:
        sample["png"] = sample["png"][:40]
    tmp_path.mkdir()
    path = tmp_path / "head-train-000000.tar"
    write_samples(path, samples)
    sha, size = file_digest(path)
    shard = manifestlib.ShardInfo(path.name, "head", "train", len(samples), size, sha)
    info = manifest.datasets["head"]
    subset = manifestlib.Manifest({"head": manifestlib.DatasetInfo(info.landmark_set, {"train": len(samples)})},
                                 [shard], len(samples), 0)
    (tmp_path / "manifest.json").write_bytes(subset.to_json())
    return manifestlib.load(tmp_path), str(path)


def test_corrupt_samples_are_skipped_then_abort_naming_the_shard(phantom_shards, tmp_path, capsys):
    few, _ = corrupt_copy(phantom_shards, tmp_path / "few", bad=1)
    batches = first_batches(TrainStream(few, small_config(max_corrupt_fraction=0.05), ["head"], INPUT, 0, 0), 4)
    assert [batch["images"].shape[0] for batch in batches] == [4] * 4  # 16 drawn: past the shard's 8
    assert "skipped corrupt sample #1" in capsys.readouterr().err
    many, url = corrupt_copy(phantom_shards, tmp_path / "many", bad=8)
    with pytest.raises(CorruptDataError, match=f"worst shard {url}"):
        first_batches(TrainStream(many, small_config(max_corrupt_fraction=0.02), ["head"], INPUT, 0, 0), 20)


def test_eval_examples_are_split_evenly_over_ranks(phantom_shards):
    manifest = manifestlib.load(phantom_shards)
    total = manifest.datasets["head"].splits["test1"]
    assert len(manifest.shards_for("head", "test1")) >= 2
    per_rank = [list(eval_examples(manifest, "head", "test1", INPUT, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])  # equal forward passes on every rank
    ids = [e.meta["source_id"] for p in per_rank for e in p if e.valid]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == total
    assert all(ids) and {e.meta["source_id"] for e in per_rank[0] if e.valid}.isdisjoint(
        e.meta["source_id"] for e in per_rank[1] if e.valid)
    def capped(world_size):  # the ids of the valid examples of all ranks together
        return sorted(e.meta["source_id"] for r in range(world_size) for e in
                      eval_examples(manifest, "head", "test1", INPUT, rank=r, world_size=world_size, limit=5) if e.valid)

    assert len(capped(1)) == 5 and capped(2) == capped(3) == capped(1)  # the same images whatever the ranks
    record = json.loads(json.dumps(per_rank[0][0].meta))
    assert record["dataset"] == "head" and record["split"] == "test1"


def replicate_padded_patches(img: torch.Tensor, k: int) -> torch.Tensor:
    """(C, H, W) -> (C, k * k, H * W): every pixel's k x k neighbourhood, edges replicated."""
    patches = torch.nn.functional.unfold(torch.nn.functional.pad(img[None], (k // 2,) * 4, mode="replicate"), k)
    return patches.view(img.shape[0], k * k, -1)


def sorted_patch_median(img: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: the middle of each replicate-padded k x k patch, sorted."""
    return replicate_padded_patches(img, k).sort(dim=1).values[:, k * k // 2].view_as(img)


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("shape", [(1, 64, 48), (3, 7, 5), (1, 3, 2)])
def test_median_blur_is_the_exact_median_rounded(k, shape):
    g = torch.Generator().manual_seed(k)
    ties = torch.randint(0, 6, shape, generator=g).float() * 17.5  # many equal values
    spread = torch.rand(shape, generator=g) * 300 - 20  # past 0..255 on both sides
    for img in (ties, spread):
        assert torch.equal(_median_blur(img, k), sorted_patch_median(img, k).clamp(0, 255).round())


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("shape", [(1, 64, 48), (3, 7, 5), (1, 3, 2)])
def test_box_blur_is_the_patch_mean(k, shape):
    img = torch.rand(shape, generator=torch.Generator().manual_seed(k)) * 255
    expected = replicate_padded_patches(img, k).mean(dim=1).view_as(img)
    assert torch.allclose(_box_blur(img, k), expected, atol=1e-4)


def test_sampling_grid_is_affine_grids():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        theta = torch.randn(2, 3, generator=g)
        expected = torch.nn.functional.affine_grid(theta[None], [1, 1, 40, 30], align_corners=True)
        assert torch.allclose(_sampling_grid(theta, 30, 40), expected, atol=1e-6)


def test_batches_stay_grey_and_are_normalised_like_single_images():
    grey = {"image": torch.rand(1, 8, 6) * 255, "heatmaps": torch.zeros(2, 2, 2), "weights": torch.ones(2),
            "dataset_index": 0}
    rgb = {**grey, "image": torch.rand(3, 8, 6) * 255}
    assert collate([grey, grey])["images"].shape == (2, 1, 8, 6)
    mixed = collate([grey, rgb])["images"]
    assert mixed.shape == (2, 3, 8, 6) and torch.equal(mixed[0], grey["image"].expand(3, -1, -1))
    batch = normalize(collate([grey, rgb])["images"])
    assert torch.equal(batch[0], normalize(grey["image"])) and torch.equal(batch[1], normalize(rgb["image"]))


def test_photometric_leaves_its_input_alone_and_follows_its_generator():
    cfg = AugmentConfig(photometric_prob=1.0, blur_prob=1.0, median_blur_prob=1.0)
    image = torch.rand(1, 40, 30) * 255
    before = image.clone()
    first = photometric(image, np.random.default_rng(5), cfg)
    assert torch.equal(image, before)
    assert torch.equal(first, photometric(image, np.random.default_rng(5), cfg))
    assert not torch.equal(first, image) and 0 <= first.min() and first.max() <= 255
