"""swap_norm on any model: a torchvision-style ResNet written here, transformer LayerNorms, our
backbones; explicit options, copied parameters, and the bad inputs of issue 6."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import ResNet1d
from plugins import ConfigError, NormFactory, swap_norm
from plugins.norm import NORM_KINDS, ChannelLayerNorm, ChannelsLast, InstanceNormNd


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn, plus a (conv 1x1, bn) downsample shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """Stem conv-bn-relu, two stages of BasicBlocks, global pooling, fc: 8 BatchNorm2d layers."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


NUM_BN = 8  # stem 1 + layer1 2 x 2 + layer2 (2 + downsample 1)
NEW_TYPE = {
    "batch": nn.BatchNorm2d,
    "instance": nn.InstanceNorm2d,
    "group": nn.GroupNorm,
    "layer": nn.GroupNorm,  # GroupNorm(1, C): over channels and positions
    "channel_layer": ChannelLayerNorm,
    "none": nn.Identity,
}
NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    ChannelLayerNorm,
)


def _train_one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    return float(loss.detach())


@pytest.mark.parametrize("kind", NORM_KINDS.names())
def test_swap_every_norm_of_a_torchvision_style_resnet_and_train_a_step(kind: str) -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    report = swap_norm(model, kind, num_groups=4)

    assert report.kind == kind
    assert report.replaced == {"BatchNorm2d": NUM_BN}
    assert report.total == NUM_BN and len(report.layers) == NUM_BN
    assert {new for _, _, new in report.layers} == {NEW_TYPE[kind].__name__}
    assert isinstance(model.layer2[0].downsample[1], NEW_TYPE[kind])
    norms = [
        m for m in model.modules() if isinstance(m, NORM_TYPES) and not isinstance(m, nn.LayerNorm)
    ]
    if kind == "none":
        assert norms == []
    else:
        assert len(norms) == NUM_BN and all(type(m) is NEW_TYPE[kind] for m in norms)
    assert f"{NUM_BN} BatchNorm2d" in str(report)

    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    _train_one_step(model, x, y)
    assert model(x).shape == (4, 4)


def test_explicit_affine_and_running_stats() -> None:
    model = TinyResNet()
    swap_norm(model, "instance", affine=True, track_running_stats=True)
    assert model.bn1.affine and model.bn1.track_running_stats and model.bn1.running_mean is not None

    model = TinyResNet()
    swap_norm(model, "batch", affine=False, track_running_stats=False)
    assert model.bn1.weight is None and model.bn1.running_mean is None

    model = TinyResNet()
    swap_norm(model, "instance")  # PyTorch's default for instance: no running statistics
    assert model.bn1.running_mean is None


def test_affine_parameters_are_copied_where_shapes_agree() -> None:
    model = TinyResNet()
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 2.0)
        model.bn1.bias.uniform_(-1.0, 1.0)
        model.bn1.running_mean.uniform_(-1.0, 1.0)
    weight, bias, mean = (
        model.bn1.weight.clone(),
        model.bn1.bias.clone(),
        model.bn1.running_mean.clone(),
    )

    to_group = copy.deepcopy(model)
    report = swap_norm(to_group, "group", num_groups=4)
    assert torch.equal(to_group.bn1.weight, weight) and torch.equal(to_group.bn1.bias, bias)
    assert len(report.copied) == NUM_BN

    to_batch = copy.deepcopy(model)
    swap_norm(to_batch, "batch")
    assert torch.equal(to_batch.bn1.running_mean, mean)

    to_layer = copy.deepcopy(model)
    swap_norm(to_layer, "layer")
    assert to_layer.bn1.num_groups == 1 and torch.equal(to_layer.bn1.weight, weight)

    to_channel_layer = copy.deepcopy(model)
    swap_norm(to_channel_layer, "channel_layer")
    assert torch.equal(to_channel_layer.bn1.norm.weight, weight)

    no_affine = copy.deepcopy(model)
    report = swap_norm(no_affine, "group", num_groups=4, affine=False)
    assert report.copied == [] and no_affine.bn1.weight is None


def test_num_groups_not_dividing_names_the_layer_and_changes_nothing() -> None:
    model = TinyResNet()
    with pytest.raises(ConfigError, match=r"num_groups=3.*16 channels of layer bn1"):
        swap_norm(model, "group", num_groups=3)
    assert all(isinstance(m, nn.BatchNorm2d) for m in (model.bn1, model.layer2[0].bn2))

    stage2 = TinyResNet().layer2  # 32 channels, and 32 in the shortcut
    with pytest.raises(ConfigError, match=r"32 channels of layer 0\.bn1"):
        swap_norm(stage2, "group", num_groups=5)


def test_unknown_kind_lists_the_kinds() -> None:
    with pytest.raises(ConfigError, match="one of the registered norm kinds: batch, channel_layer, group, instance, layer, none"):
        swap_norm(TinyResNet(), "banana")


def test_model_without_norm_layers_warns_and_reports_nothing() -> None:
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match="has no normalization layer"):
        report = swap_norm(model, "instance")
    assert report.total == 0 and report.replaced == {}


def test_channels_last_layernorm_of_a_transformer() -> None:
    """A plain nn.LayerNorm(C) normalizes the last axis: it is taken as channels-last (N, L, C)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    x = torch.randn(3, 5, 16)

    kept = copy.deepcopy(layer)
    report = swap_norm(kept, "layer", eps=1e-6)
    assert report.replaced == {"LayerNorm": 2}
    assert type(kept.norm1) is nn.LayerNorm and kept.norm1.eps == 1e-6
    kept_too = copy.deepcopy(layer)
    swap_norm(kept_too, "channel_layer")
    assert type(kept_too.norm1) is nn.LayerNorm

    inst = copy.deepcopy(layer)
    report = swap_norm(inst, "instance", affine=False)
    assert isinstance(inst.norm1, ChannelsLast) and isinstance(inst.norm1.norm, InstanceNormNd)
    # Each sample's channel normalized over its L tokens.
    expected = F.instance_norm(x.transpose(1, 2), eps=1e-5).transpose(1, 2)
    torch.testing.assert_close(inst.norm1(x), expected)
    inst(x).sum().backward()

    for kind in ("batch", "group", "none"):
        other = copy.deepcopy(layer)
        swap_norm(other, kind, num_groups=4)
        assert other(x).shape == x.shape


def test_layernorm_over_several_axes_is_skipped_with_a_warning() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LayerNorm([4, 6, 6]), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"left 1 as it was"):
        report = swap_norm(model, "group", num_groups=2)
    assert report.replaced == {"BatchNorm2d": 1}
    assert report.skipped and report.skipped[0][0] == "1"
    assert isinstance(model[1], nn.LayerNorm)


def test_example_input_gives_the_rank_of_a_groupnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8))
    without = copy.deepcopy(model)
    swap_norm(without, "instance")
    assert isinstance(without[1], InstanceNormNd)  # rank unknown: rank-agnostic class
    swap_norm(model, "instance", example_input=torch.randn(1, 3, 8, 8))
    assert type(model[1]) is nn.InstanceNorm2d
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 8, 6, 6)


def test_instance_norm_on_flat_features_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    with pytest.raises(ConfigError, match="norm.kind"):
        swap_norm(model, "instance", example_input=torch.randn(2, 4))


@pytest.mark.parametrize("kind", ["instance", "group", "layer", "channel_layer", "none"])
def test_swap_matches_building_with_the_factory(kind: str) -> None:
    """The norm config group builds our models with a factory; swapping afterwards agrees."""
    swapped = ResNet1d(1, 3, widths=(8, 16), norm=NormFactory("batch"))
    swap_norm(swapped, kind, num_groups=4)
    built = ResNet1d(1, 3, widths=(8, 16), norm=NormFactory(kind, num_groups=4))
    assert [type(m) for m in swapped.modules()] == [type(m) for m in built.modules()]
    swapped(torch.randn(2, 1, 20)).sum().backward()


def test_swap_norm_takes_a_factory() -> None:
    model = TinyResNet()
    report = swap_norm(model, NormFactory("group", num_groups=8, affine=False))
    assert report.kind == "group" and model.bn1.num_groups == 8 and model.bn1.weight is None


def test_layer_normalizes_each_sample_over_channels_and_positions() -> None:
    """``layer`` is the LayerNorm of conv features (GroupNorm(1, C)): a per-sample gain cancels, the
    relative amplitude of local windows stays. ``channel_layer`` (the old ``layer``) normalizes each
    position's channel vector on its own, so every window comes out at the same amplitude."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 40)
    x[:, :, 20:] *= 10.0  # a loud second half, as after a conv over a series whose amplitude grows
    layer = NormFactory("layer", affine=False)(8, 1)
    channel_layer = NormFactory("channel_layer", affine=False)(8, 1)

    out = layer(x)
    flat = x.flatten(1)
    expected = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, expected.view_as(x))
    torch.testing.assert_close(layer(x * torch.tensor([0.1, 1.0, 100.0]).view(3, 1, 1)), out, atol=1e-3, rtol=1e-3)
    assert out[:, :, 20:].std() > 5 * out[:, :, :20].std()  # the loud half stays loud

    old = channel_layer(x)
    per_position = x.transpose(1, 2)
    expected_old = F.layer_norm(per_position, (8,), eps=1e-5).transpose(1, 2)
    torch.testing.assert_close(old, expected_old)
    torch.testing.assert_close(old[:, :, 20:].std(), old[:, :, :20].std(), atol=0.05, rtol=0.05)  # amplitude gone
