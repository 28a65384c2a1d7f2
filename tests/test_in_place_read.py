"""Reading an in-place masked weight costs no parametrization call (plugins/core/in_place_read.py).
A user relies on: the model computes exactly what parametrize's own read gives, in every state a
mask can be in (in place, capturing the dense gradient, parametrized, under a constraint, hooked,
inside ``parametrize.cached()``), and a baked model is a plain module."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.constraints.registry import build_constraint
from plugins.core.masks import Mask, bake, ensure_mask, get_mask, set_mask
from tests.zoo_models import _resnet18


def masked_resnet(inplace: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = _resnet18()
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            ensure_mask(module, "weight", inplace=inplace)
            weight = module.weight.detach()
            set_mask(module, "weight", weight.abs() > weight.abs().median())
    return net


@pytest.fixture
def mask_calls(monkeypatch) -> list[int]:
    calls = []
    forward = Mask.forward

    def counted(self, x):
        calls.append(1)
        return forward(self, x)

    monkeypatch.setattr(Mask, "forward", counted)
    return calls


def test_an_in_place_masked_resnet_computes_without_calling_a_mask(mask_calls):
    net = masked_resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    out = net(x).logits
    assert mask_calls == []
    # The same output as parametrize's own read, which calls every mask.
    for module in net.modules():
        if parametrize.is_parametrized(module, "weight"):
            module.__class__.weight = property(module.__class__.weight.fget.read_through)
    assert torch.equal(net(x).logits, out)
    assert len(mask_calls) == 21  # 20 convolutions and the classifier


def test_every_other_state_of_a_mask_reads_through_parametrize(mask_calls):
    linear = nn.Linear(6, 4)
    mask = ensure_mask(linear, "weight", inplace=True)
    set_mask(linear, "weight", torch.arange(24).reshape(4, 6) % 3 != 0)
    stored = linear.parametrizations.weight.original
    assert linear.weight is stored and mask_calls == []

    mask.capture = True  # a regrowing method reads the dense gradient through the mask's product
    out = linear(torch.randn(3, 6)).sum()
    out.backward()
    assert mask.dense_grad is not None and len(mask_calls) == 1
    mask.capture = False

    seen = []
    handle = mask.register_forward_hook(lambda *args: seen.append(1))
    read = linear.weight
    handle.remove()
    assert seen == [1] and read is stored

    with parametrize.cached():
        assert linear.weight is stored

    mask.inplace = False  # the parametrized form: the product, a new tensor
    assert linear.weight is not stored and torch.equal(linear.weight, stored * mask.mask)


def test_a_constraint_under_the_mask_is_applied_on_every_read():
    linear = nn.Linear(5, 5)
    ensure_mask(linear, "weight", inplace=True)
    constraint = build_constraint("non_negative")
    parametrize.register_parametrization(linear, "weight", constraint)
    stored = linear.parametrizations.weight.original
    assert (stored < 0).any() and (linear.weight >= 0).all()
    assert torch.equal(linear.weight, constraint(stored))


def test_a_baked_model_is_plain_again():
    net = masked_resnet()
    x = torch.randn(2, 3, 32, 32)
    before = net.eval()(x).logits
    bake(net)
    conv = net.resnet.embedder.embedder.convolution
    assert type(conv) is nn.Conv2d and isinstance(conv.weight, nn.Parameter)
    assert torch.equal(net(x).logits, before)
    assert get_mask(conv, "weight") is None
