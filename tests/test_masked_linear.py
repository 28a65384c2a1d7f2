"""The weight gradient of a large in-place masked Linear is zeroed inside its backward, block by
block while in cache (plugins/core/masked_linear.py). A user relies on: the same weights as the
parametrized form, step for step; every other contribution to that gradient (a regularizer on the
weight, gradient accumulation, a double backward) still zeroed; a baked model is a plain Linear."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plugins.core.blocked_gemm import fused_weight_gradient
from plugins.core.mask_forms import held_zeros
from plugins.core.masked_linear import BLOCK_BYTES
from plugins.core.masks import bake, ensure_mask, get_mask, set_mask
from tests.helpers import Tiny, mlp, quiet_trainer
from tests.test_mask_forms import OPTIMIZERS, sparsifier, stored_weights

# net.2's weight is 600x1000 float32: 2.4 MB, three blocks of 262, 262 and 76 rows.
WIDTHS = (8, 1000, 600, 3)
assert 600 * 1000 * 4 >= 2 * BLOCK_BYTES
ROUTED = {"net.2.weight"}


class Regularized(Tiny):
    """Adds a penalty on net.2's weight whose gradient is nonzero also where the weight is 0
    (``first``: written before the loss, so autograd sums the two gradients the other way round)."""

    def __init__(self, first: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.first = first

    def training_step(self, batch, batch_idx):
        x, y = batch
        penalty = 1e-3 * (self.net[2].weight - 0.5).pow(2).sum()
        loss = F.cross_entropy(self(x), y)
        return penalty + loss if self.first else loss + penalty


class GradientPenalty(Tiny):
    """A penalty on the gradient of the output with respect to the input (create_graph=True)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.requires_grad_(True)
        out = self(x)
        (slope,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return F.cross_entropy(out, y) + 1e-2 * slope.pow(2).sum()


def train(mask_form: str, model_class=Tiny, epochs: int = 2, **kwargs):
    trainer_kwargs = {k: kwargs.pop(k) for k in ("accumulate_grad_batches",) if k in kwargs}
    torch.manual_seed(0)
    model = model_class(net=mlp(*WIDTHS), optimizer=OPTIMIZERS["sgd_momentum_wd"], **kwargs)
    callback = sparsifier(mask_form)
    quiet_trainer([callback], max_epochs=epochs, **trainer_kwargs).fit(model)
    return model, callback


def masked_entries_moved(model: Tiny, callback) -> int:
    moved = 0
    for target in callback.targets:
        mask = get_mask(target.module, target.tensor_name).mask
        moved += int(((target.module.weight != 0) & (mask == 0)).sum())
    return moved


def test_a_large_linears_gradient_is_zeroed_in_its_backward_to_the_parametrized_weights(one_thread):
    ours, a = train("auto")
    assert a.held.backward_zeroed == ROUTED  # the pass after backward skipped it at the last step
    assert a.held.byte_zeroed == {"net.0.weight", "net.4.weight"}
    theirs, _ = train("parametrize")
    mine, other = stored_weights(ours), stored_weights(theirs)
    for key in mine:
        torch.testing.assert_close(mine[key], other[key], rtol=0, atol=1e-6, msg=key)
    assert masked_entries_moved(ours, a) == 0


@pytest.mark.parametrize("first", [True, False], ids=["penalty_first", "loss_first"])
def test_another_gradient_on_the_weight_is_still_zeroed_by_the_pass(one_thread, first):
    model, callback = train("auto", Regularized, first=first)
    assert callback.held.backward_zeroed == set()  # the summed gradient is not the one backward zeroed
    assert masked_entries_moved(model, callback) == 0
    theirs, _ = train("parametrize", Regularized, first=first)
    mine, other = stored_weights(model), stored_weights(theirs)
    for key in mine:
        torch.testing.assert_close(mine[key], other[key], rtol=0, atol=1e-6, msg=key)


def test_gradient_accumulation_and_a_double_backward_keep_the_zeros(one_thread):
    model, callback = train("auto", accumulate_grad_batches=2)
    assert masked_entries_moved(model, callback) == 0
    theirs, _ = train("parametrize", accumulate_grad_batches=2)
    for key, value in stored_weights(model).items():
        torch.testing.assert_close(value, stored_weights(theirs)[key], rtol=0, atol=1e-6, msg=key)
    penalized, callback = train("auto", GradientPenalty, epochs=1)
    assert masked_entries_moved(penalized, callback) == 0


def test_a_copy_trains_plainly_and_a_baked_model_is_a_plain_linear(one_thread):
    model, callback = train("auto", epochs=1)
    replica = copy.deepcopy(model.net)
    x = torch.randn(4, 8)
    torch.testing.assert_close(replica(x), model.net(x), rtol=0, atol=0)
    bake(model.net)
    assert type(model.net[2]) is nn.Linear
    torch.save(model.net, io.BytesIO())  # a baked model pickles: nothing of the route is left on it


def masked_and_plain(rows: int = 600) -> tuple[nn.Linear, nn.Linear, torch.Tensor, object]:
    """A rows x 1000 Linear masked in place (90% zeros), a plain Linear with the same weights times
    the mask, the mask, and the model's HeldZeros."""
    torch.manual_seed(0)
    layer, plain = nn.Linear(1000, rows), nn.Linear(1000, rows)
    plain.load_state_dict(layer.state_dict())
    keep = torch.rand(rows, 1000) > 0.9
    with torch.no_grad():
        plain.weight.mul_(keep)
    ensure_mask(layer, "weight", inplace=True)
    set_mask(layer, "weight", keep)
    return layer, plain, keep, held_zeros(nn.Sequential(layer))


@pytest.mark.parametrize("shape", [(2, 5, 1000), (1000,)], ids=["sequence", "one_sample"])
def test_inputs_of_any_shape_get_autograds_gradients_times_the_mask(one_thread, shape):
    layer, plain, keep, held = masked_and_plain()
    x = torch.randn(shape)
    ours_in, theirs_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    layer(ours_in).pow(2).sum().backward()
    plain(theirs_in).pow(2).sum().backward()
    held.zero_gradients(step=0)
    assert held.backward_zeroed == {"0.weight"}
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, plain.weight.grad * keep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-5, atol=1e-6)


def test_torch_func_transforms_see_the_plain_forward(one_thread):
    torch.manual_seed(0)
    layer = nn.Linear(1000, 600)
    ensure_mask(layer, "weight", inplace=True)
    set_mask(layer, "weight", torch.rand(600, 1000) > 0.9)
    model = nn.Sequential(layer)
    held_zeros(model)
    x = torch.randn(4, 1000)
    per_sample = torch.func.vmap(torch.func.grad(lambda row: model(row).pow(2).sum()))(x)
    expected = torch.stack([torch.autograd.grad(model(row).pow(2).sum(), row)[0] for row in x.clone().requires_grad_(True)])
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [600, 525], ids=["blocks_524_76", "one_row_left"])
def test_the_compiled_block_loop_gives_autograds_gradient_times_the_mask_bit_for_bit(one_thread, rows):
    # torch's own BLAS routine, called block by block from one compiled function
    # (plugins/core/blocked_gemm.py), in blocks of 524 rows of 4000 bytes: 600 rows give blocks of
    # 524 and 76; of 525 rows, the one left joins the block before (alone, it rounds differently).
    assert fused_weight_gradient(torch.float32) is not None  # else the slower block loop in Python
    layer, plain, keep, held = masked_and_plain(rows)
    x = torch.randn(1000, 33).t()  # not contiguous
    layer(x).sum().backward()  # an expanded gradient: stride 0
    plain(x).sum().backward()
    held.zero_gradients(step=0)
    assert held.backward_zeroed == {"0.weight"}
    assert torch.equal(layer.parametrizations.weight.original.grad, plain.weight.grad * keep)
