"""Routing of a mixed batch through the shared trunk and per-dataset heads, and the loss."""
import pytest
import torch
import torch.nn.functional as F

from medsapiens.model import build_model
from medsapiens.training.trainer import add_loss_sum

IMG = (128, 96)
HEADS = {"head": 19, "hand": 37, "chest": 6}


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_model("sapiens_tiny", IMG, HEADS, trunk_width=32)


def batch(dataset_index, seed=0):
    gen = torch.Generator().manual_seed(seed)
    """Targets padded to the largest K among the datasets present, as the input pipeline does."""
    n, kmax = len(dataset_index), max(list(HEADS.values())[i] for i in dataset_index)
    images = torch.randn(n, 3, *IMG, generator=gen)
    targets = torch.rand(n, kmax, IMG[0] // 4, IMG[1] // 4, generator=gen)
    weights = torch.zeros(n, kmax)
    for i, position in enumerate(dataset_index):
        weights[i, : list(HEADS.values())[position]] = 1.0
    return images, torch.tensor(dataset_index), targets, weights


def test_each_sample_gets_the_output_of_its_own_head(model):
    images, index, _, _ = batch([2, 0, 0, 2, 0, 1])
    with torch.no_grad():
        outputs = model(images, index)
        assert list(outputs) == model.dataset_ids == list(HEADS)
        for position, (dataset_id, (indices, heatmaps)) in enumerate(outputs.items()):
            assert indices.tolist() == (index == position).nonzero().flatten().tolist()
            assert heatmaps.shape == (len(indices), HEADS[dataset_id], IMG[0] // 4, IMG[1] // 4)
            for row, sample in enumerate(indices.tolist()):
                alone = model.decoder.heads[dataset_id](model.decoder.trunk(model.backbone(images[sample:sample + 1])))
                torch.testing.assert_close(heatmaps[row:row + 1], alone, rtol=1e-4, atol=1e-6)


def test_a_head_without_samples_still_gets_zero_gradients(model):
    images, index, targets, weights = batch([0, 2, 0])
    outputs = model(images, index)
    assert outputs["hand"].heatmaps.shape[0] == 0
    loss = model.loss(outputs, targets, weights)
    loss.total.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
    hand = model.decoder.heads["hand"]
    assert hand.weight.grad.abs().sum() == 0 and hand.bias.grad.abs().sum() == 0
    assert model.decoder.heads["chest"].weight.grad.abs().sum() > 0
    assert loss.counts == {"head": 2, "hand": 0, "chest": 1} and loss.per_dataset["hand"] == 0


def test_loss_is_the_mean_of_masked_per_sample_mse(model):
    images, index, targets, weights = batch([0, 1, 2, 2])
    weights[0, 3] = 0.0  # an invisible landmark
    with torch.no_grad():
        outputs = model(images, index)
        loss = model.loss(outputs, targets, weights)
        per_sample = {}
        for dataset_id, (indices, heatmaps) in outputs.items():
            k = HEADS[dataset_id]
            for row, i in enumerate(indices.tolist()):
                w = weights[i, :k, None, None]
                per_sample[i] = F.mse_loss(heatmaps[row] * w, targets[i, :k] * w)  # mmpose KeypointMSELoss
        torch.testing.assert_close(loss.total, torch.stack(list(per_sample.values())).mean())
        torch.testing.assert_close(loss.per_dataset["chest"], (per_sample[2] + per_sample[3]) / 2)

        padded = targets.clone()
        padded[weights == 0] = 1e3  # every channel beyond a sample's K, and the weight-0 landmark
        torch.testing.assert_close(model.loss(outputs, padded, weights).total, loss.total, rtol=0, atol=0)
        padded[2, 5] = 1e3  # chest's own last channel does count
        assert model.loss(outputs, padded, weights).per_dataset["chest"] > 1e3


def test_union_loss_equals_mmpose_mse_over_the_union_of_landmarks(model):
    """MedSapiens' loss: one output over every head's landmarks (19 + 37 + 6 channels here), the other
    datasets' channels weighted 0, KeypointMSELoss = mean over B x union x h x w."""
    images, index, targets, weights = batch([0, 1, 2, 2, 1])
    weights[1, 7] = 0.0
    offsets = {"head": 0, "hand": 19, "chest": 56}
    with torch.no_grad():
        outputs = model(images, index)
        union = sum(HEADS.values())
        pred = torch.zeros(len(index), union, IMG[0] // 4, IMG[1] // 4)
        target, weight = torch.zeros_like(pred), torch.zeros(len(index), union)
        for dataset_id, (indices, heatmaps) in outputs.items():
            k, start = HEADS[dataset_id], offsets[dataset_id]
            for row, i in enumerate(indices.tolist()):
                pred[i, start:start + k] = heatmaps[row]
                target[i, start:start + k] = targets[i, :k]
                weight[i, start:start + k] = weights[i, :k]
        w = weight[:, :, None, None]
        expected = F.mse_loss(pred * w, target * w)  # mmpose KeypointMSELoss(use_target_weight=True)
        union_loss = model.loss(outputs, targets, weights, average="union")
        torch.testing.assert_close(union_loss.total, expected)
        per_sample = model.loss(outputs, targets, weights)
        assert not torch.isclose(union_loss.total, per_sample.total)  # the two averages really differ
        assert union_loss.per_dataset == per_sample.per_dataset  # logged per-dataset losses do not


@pytest.mark.parametrize("average", ["per_sample", "union"])
def test_the_logged_loss_is_the_loss_the_steps_optimised(model, average):
    """What the trainer logs (`mean_loss` of the summed per-dataset stats) is the mean of the
    micro-batches' objectives, union weighting included."""
    objective, losses, totals = model.objective(average), [], {}
    with torch.no_grad():
        for seed, index in ((0, [0, 1, 2, 2]), (1, [1, 1, 0, 2])):
            images, dataset_index, targets, weights = batch(index, seed)
            loss, stats = objective(model, {"images": images, "dataset_index": dataset_index,
                                            "target_heatmaps": targets, "target_weights": weights}, torch.float32)
            losses.append(float(loss))
            for name, (loss_sum, n) in stats.items():
                add_loss_sum(totals, name, float(loss_sum), n)
    assert objective.mean_loss(totals) == pytest.approx(sum(losses) / 2, rel=1e-6)


def test_heads_can_be_added_and_dropped(model):
    model.add_head("leg", 26)
    assert model.dataset_ids == ["head", "hand", "chest", "leg"]
    leg = model.decoder.heads["leg"]
    assert leg.out_channels == 26 and leg.bias.abs().sum() == 0 and 0.0005 < leg.weight.std() < 0.002
    model.drop_head("hand")
    assert model.dataset_ids == ["head", "chest", "leg"]
    assert model.decoder.num_landmarks == {"head": 19, "chest": 6, "leg": 26}
    assert [k for k in model.state_dict() if k.startswith("decoder.heads.")] == [
        "decoder.heads.head.weight", "decoder.heads.head.bias", "decoder.heads.chest.weight",
        "decoder.heads.chest.bias", "decoder.heads.leg.weight", "decoder.heads.leg.bias"]
    images, _, _, _ = batch([0, 0])
    with torch.no_grad():
        assert model.heatmaps(images, "leg").shape == (2, 26, IMG[0] // 4, IMG[1] // 4)
    with pytest.raises(ValueError, match="already has a head"):
        model.add_head("leg", 26)


def test_an_index_without_a_head_is_refused(model):
    images, _, _, _ = batch([0, 0])
    with pytest.raises(ValueError, match=r"routes 1 of 2 samples.*0\.\.2"):
        model(images, torch.tensor([0, 3]))


def test_state_dict_keys_are_stable(model):
    keys = list(model.state_dict())
    assert keys[:3] == ["backbone.pos_embed", "backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"]
    assert [k for k in keys if k.startswith("decoder.trunk")] == [
        "decoder.trunk.0.conv.weight", "decoder.trunk.1.conv.weight", "decoder.trunk.2.conv.weight",
        "decoder.trunk.2.conv.bias", "decoder.trunk.3.conv.weight", "decoder.trunk.3.conv.bias"]
