"""compact(): the masked model and its compacted twin agree; bad models get one clear error."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from models.backbones import DigitsCNN, ResNet1d
from plugins.core.errors import ConfigError
from plugins.norm import NormFactory
from plugins.pruning.compaction import compact, compact_copy
from plugins.pruning.structured import StructuredPruning


class Wrap(nn.Module):
    """A LightningModule-like holder: the backbone under ``net``, as in models.classifier."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _trained_like(net: nn.Module, shape: list[int]) -> Wrap:
    """Non-trivial norm parameters and running statistics, as after some training."""
    torch.manual_seed(0)
    model = Wrap(net)
    with torch.no_grad():
        for m in model.modules():
            if (
                isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
                and m.weight is not None
            ):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(3):
            model(torch.randn([16, *shape[1:]]) + 0.3)
    return model


def _masked(
    model: nn.Module, shape: list[int], method: str = "l1", amount: float = 0.5, **kw
) -> nn.Module:
    model = copy.deepcopy(model)
    cb = StructuredPruning(
        method=method, amount=amount, exclude=["*head*"], example_input_shape=shape, seed=3, **kw
    )
    cb.setup(None, model, "fit")
    cb.apply(amount)
    return model.eval()


CASES = [
    ("digits", lambda: DigitsCNN(), [2, 1, 8, 8]),
    ("resnet1d", lambda: ResNet1d(widths=(32, 64, 64)), [2, 1, 48]),
]


@pytest.mark.parametrize("method", ["l1", "random"])
@pytest.mark.parametrize("name,build,shape", CASES, ids=[c[0] for c in CASES])
def test_masked_equals_compacted(name, build, shape, method):
    """Acceptance 1: same outputs (eval) within 1e-5, half the channels gone (~0.25x params)."""
    masked = _masked(_trained_like(build(), shape), shape, method)
    x = torch.randn([8, *shape[1:]])
    with torch.no_grad():
        expected = masked(x)
    small, report = compact_copy(masked, x[:2], measure=False)
    with torch.no_grad():
        got = small(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    assert report["params_after"] <= 0.30 * report["params_before"]
    assert report["macs_after"] < 0.30 * report["macs_before"]
    assert report["inexact"] == []
    assert "speedup" not in report


def test_report_and_speed_fields_and_plain_pickle():
    """The report has the summary keys; the compact model pickles with no plugins class in it."""
    shape = [2, 1, 8, 8]
    masked = _masked(_trained_like(DigitsCNN(), shape), shape)
    small, report = compact(masked, torch.randn(shape), repeats=2, batch_size=8)
    for k in ("params_before", "params_after", "macs_before", "macs_after", "speedup"):
        assert report[k] > 0
    assert report["channels"]["net.features.0.0"] == "16/32"
    assert report["channels"]["net.head.2"] == "10/10"  # the output layer keeps its outputs
    assert not any(type(m).__module__.startswith("plugins") for m in small.modules())
    buf = io.BytesIO()
    torch.save(small.net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), small.net(x))


def test_input_channel_pruning_is_compacted_exactly():
    """dim=1: a slice no consumer reads is removed with its producer channel (consumer rule)."""
    shape = [2, 1, 8, 8]
    masked = _masked(
        _trained_like(DigitsCNN(), shape), shape, dim=1, include=["*features.1.0.weight"]
    )
    x = torch.randn([8, *shape[1:]])
    with torch.no_grad():
        expected = masked(x)
    small, report = compact_copy(masked, x[:2], measure=False)
    assert report["channels"]["net.features.0.0"] == "16/32"
    with torch.no_grad():
        assert (small(x) - expected).abs().max().item() <= 1e-5


def test_unmasked_norm_is_reported_inexact():
    """Zeroed conv channels alone leave BatchNorm's shift: compaction warns and names the layer."""
    model = _trained_like(DigitsCNN(), [2, 1, 8, 8])
    with torch.no_grad():
        model.net.features[0][0].weight[:4] = 0
    with pytest.warns(UserWarning, match="features.0.1"):
        _, report = compact(model, torch.randn(2, 1, 8, 8), measure=False)
    assert report["inexact"] == ["net.features.0.1"]
    assert report["channels"]["net.features.0.0"] == "28/32"


def test_group_norm_is_inexact_instance_norm_exact():
    shape = [2, 1, 8, 8]
    x = torch.randn([8, *shape[1:]])
    gn = _masked(_trained_like(DigitsCNN(norm=NormFactory("group", num_groups=4)), shape), shape)
    with pytest.warns(UserWarning, match="compaction changes the outputs"):
        compact(gn, x[:2], measure=False)
    inst = _masked(_trained_like(DigitsCNN(norm=NormFactory("instance")), shape), shape)
    with torch.no_grad():
        expected = inst(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        small, report = compact_copy(inst, x[:2], measure=False)
    with torch.no_grad():
        assert (small(x) - expected).abs().max().item() <= 1e-5


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.fc.weight.t() + self.fc.bias.view(1, -1).expand(x.shape[0], -1).clone()


def test_untraceable_model_names_the_layer():
    model = Untraceable()
    with torch.no_grad():
        model.fc.weight[:2] = 0
    with pytest.raises(ConfigError, match=r"compact=.*fc"):
        compact(model, torch.randn(2, 8), measure=False)


def test_failing_forward_is_a_config_error():
    with pytest.raises(ConfigError, match="compact="):
        compact(DigitsCNN(), torch.randn(2, 3, 8, 8), measure=False)  # wrong channel count


def test_compact_copy_leaves_the_masked_model_working():
    """A plain deepcopy of a parametrized model shares its class; baking the copy would break it."""
    shape = [2, 1, 8, 8]
    masked = _masked(_trained_like(DigitsCNN(), shape), shape)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = masked(x)
        compact_copy(masked, x[:2], measure=False)
        assert torch.equal(masked(x), before)
