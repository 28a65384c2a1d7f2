"""The two mask forms: in place (the default wherever it is exact: the weights hold the zeros and
forward reads them as they are) and parametrized (a mask multiplies the weight in forward). A user
relies on: the in-place form computes what the parametrized one computes, step for step, with
every common optimizer; momentum never revives a zero; the form of each tensor is recorded; an
optimizer that breaks the in-place form is an error naming the tensor, never a silent drift."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.constraints.callback import WeightConstraints
from plugins.core.byte_mask import ByteMask, zero_under
from plugins.core.errors import ConfigError
from plugins.core.masks import get_mask
from plugins.pruning.structured import StructuredPruning
from plugins.sparsity.hardshrink import HardshrinkSparsifier
from tests.helpers import Tiny, mlp, quiet_trainer

RAMP = {"kind": "linear", "start": 0.3, "end": 0.8, "begin_epoch": 0, "end_epoch": 2, "every_n_steps": 2}

OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam_wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1),
}


def sparsifier(mask_form: str = "auto", **kwargs) -> HardshrinkSparsifier:
    return HardshrinkSparsifier(RAMP, mode="sparsity", scope="global", bake_at_end=False, mask_form=mask_form, **kwargs)


def run(mask_form: str, optimizer, epochs: int = 3, callbacks=()) -> tuple[Tiny, HardshrinkSparsifier]:
    torch.manual_seed(0)
    model = Tiny(mlp(8, 32, 32, 3), optimizer=optimizer)
    callback = sparsifier(mask_form)
    quiet_trainer([callback, *callbacks], max_epochs=epochs).fit(model)
    return model, callback


def stored_weights(model: Tiny) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n.endswith("original")}


def test_the_default_form_is_in_place_and_forward_reads_the_stored_weight():
    model, callback = run("auto", OPTIMIZERS["sgd_momentum_wd"], epochs=1)
    for target in callback.targets:
        assert get_mask(target.module, target.tensor_name).inplace
        # No product in forward: the module computes with the very tensor it stores.
        assert target.module.weight is target.module.parametrizations.weight.original
    assert callback.summary()["sparsity/mask_forms"] == {"inplace": 3}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_in_place_and_parametrized_forms_train_to_the_same_weights(name):
    inplace, a = run("auto", OPTIMIZERS[name])
    masked, b = run("parametrize", OPTIMIZERS[name])
    assert a.forms and set(a.forms.values()) == {"inplace"}
    assert b.forms and set(b.forms.values()) == {"parametrize"}
    assert a.history == b.history and a.history[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)
    ours, theirs = stored_weights(inplace), stored_weights(masked)
    for key in ours:
        # Same zeros, same values: the two forms differ only in where the product happens.
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


def test_momentum_never_revives_a_zero_between_updates():
    seen: list[int] = []
    callback = sparsifier("auto")

    class AfterStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            for target in callback.targets:
                mask = get_mask(target.module, target.tensor_name).mask
                seen.append(int(((target.tensor != 0) & (mask == 0)).sum()))

    torch.manual_seed(0)
    model = Tiny(mlp(8, 32, 32, 3))
    quiet_trainer([callback, AfterStep()], max_epochs=3).fit(model)
    assert len(seen) == 3 * 8 * 3 and max(seen) == 0
    assert callback.history[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)


class Drifting(torch.optim.SGD):
    """An optimizer that moves every weight a little, whatever its gradient (like a noise step)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


def test_an_optimizer_that_moves_zeros_is_an_error_naming_the_tensor_and_the_way_out():
    with pytest.raises(RuntimeError) as err:
        run("auto", lambda p: Drifting(p, lr=0.1))
    message = str(err.value)
    assert "masked entries of net.0.weight are no longer 0" in message
    assert "Drifting" in message and "sparsity.mask_form=parametrize" in message
    # The way out trains: the mask multiplies in forward, so the module computes with the zeros.
    model, callback = run("parametrize", lambda p: Drifting(p, lr=0.1))
    assert callback.history[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)


class ManualTiny(Tiny):
    """Tiny under manual optimization, stepping the optimizer Lightning wraps or the raw torch one."""

    def __init__(self, raw: bool) -> None:
        super().__init__(mlp(8, 32, 32, 3))
        self.automatic_optimization = False
        self.raw = raw

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers(use_pl_optimizer=not self.raw)
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()


def test_manual_optimization_through_self_optimizers_trains_the_weights_automatic_optimization_does():
    automatic, _ = run("auto", OPTIMIZERS["sgd_momentum_wd"])
    torch.manual_seed(0)
    manual, callback = ManualTiny(raw=False), sparsifier("auto")
    quiet_trainer([callback], max_epochs=3).fit(manual)
    assert set(callback.forms.values()) == {"inplace"}
    ours, theirs = stored_weights(manual), stored_weights(automatic)
    assert ours.keys() == theirs.keys() and len(ours) == 3
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


def test_a_raw_optimizer_under_manual_optimization_is_an_error_saying_how_to_step():
    torch.manual_seed(0)
    with pytest.raises(RuntimeError) as err:
        quiet_trainer([sparsifier("auto")], max_epochs=3).fit(ManualTiny(raw=True))
    message = str(err.value)
    assert "masked entries of net.0.weight are no longer 0" in message
    assert "without Lightning's on_before_optimizer_step" in message and "self.optimizers()" in message


def test_a_tensor_under_a_constraint_keeps_the_parametrized_mask():
    torch.manual_seed(0)
    model = Tiny(mlp(8, 32, 32, 3))
    constraints = WeightConstraints([{"name": "non_negative", "include": ["net.2.weight"]}])
    callback = sparsifier("auto")
    quiet_trainer([constraints, callback], max_epochs=1).fit(model)
    assert callback.forms == {"net.0.weight": "inplace", "net.2.weight": "parametrize", "net.4.weight": "inplace"}
    assert callback.summary()["sparsity/mask_forms"] == {"inplace": 2, "parametrize": 1}


def test_structured_pruning_masks_are_in_place_too_and_compact_exactly():
    torch.manual_seed(0)
    model = Tiny(mlp(8, 32, 32, 3))
    schedule = {"kind": "constant", "end": 0.5, "begin_epoch": 0}
    pruning = StructuredPruning("l1", schedule, include=["net.0.weight", "net.2.weight"], compact=True)
    quiet_trainer([pruning], max_epochs=2).fit(model)
    assert set(pruning.forms.values()) == {"inplace"}
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert [m.out_features for m in model.net if isinstance(m, nn.Linear)] == [16, 16, 3]


@pytest.mark.parametrize("bad", ["inplace", "", None, 1])
def test_a_bad_mask_form_is_refused_naming_the_key(bad):
    with pytest.raises(ConfigError) as err:
        sparsifier(bad)
    assert err.value.key == "sparsity.mask_form" and err.value.value == bad


def test_on_one_cpu_thread_gradients_are_zeroed_through_a_one_byte_mask_to_the_same_weights(one_thread):
    inplace, a = run("auto", OPTIMIZERS["sgd_momentum_wd"])
    # Every in-place tensor went through the one-byte loop at the last step, not torch's product.
    assert a.held.byte_zeroed == {"net.0.weight", "net.2.weight", "net.4.weight"}
    masked, _ = run("parametrize", OPTIMIZERS["sgd_momentum_wd"])
    ours, theirs = stored_weights(inplace), stored_weights(masked)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


def gradient_with_edge_values(dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(0)
    grad = torch.randn(64, 48, dtype=dtype)
    grad[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -1.0], dtype=dtype)
    return grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_one_byte_loop_gives_torchs_product_bit_for_bit(one_thread, dtype):
    mask = (torch.rand(64, 48) > 0.7).to(dtype)
    mask[0, :4] = 0  # NaN times 0 stays NaN, inf times 0 is NaN, -1 times 0 is -0.0: as torch does
    grad = gradient_with_edge_values(dtype)
    expected = grad * mask
    assert zero_under(grad, mask, ByteMask())
    torch.testing.assert_close(grad, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(grad), torch.signbit(expected))


def test_the_one_byte_copy_follows_every_change_of_the_mask(one_thread):
    mask, cache = (torch.rand(64, 48) > 0.5).float(), ByteMask()
    grad = gradient_with_edge_values(torch.float32)[1:]
    mask = mask[1:].contiguous()
    assert zero_under(grad.clone(), mask, cache)
    mask.copy_((torch.rand_like(mask) > 0.5).float())  # an update, or a loaded checkpoint
    zeroed = grad.clone()
    zero_under(zeroed, mask, cache)
    assert torch.equal(zeroed, grad * mask)


def test_a_mask_rewritten_at_every_step_falls_back_to_torchs_product(one_thread):
    # DDP broadcasts buffers before each forward: a byte copy per step would cost more than it saves.
    mask, cache = (torch.rand(64, 48) > 0.5).float(), ByteMask()
    used = []
    for _ in range(4):
        mask.mul_(1.0)
        grad = torch.randn(64, 48)
        expected = grad * mask
        used.append(zero_under(grad, mask, cache))
        assert torch.equal(grad, expected)
    assert used == [True, False, False, False]
    grad = torch.randn(64, 48)
    assert zero_under(grad, mask, cache)  # steady again: the copy is made once more and used


def test_where_the_one_byte_loop_does_not_fit_torchs_product_zeroes_the_gradient(one_thread):
    cases = {
        "broadcast mask": (torch.randn(8, 6), (torch.rand(8, 1) > 0.5).float()),
        "half precision": (torch.randn(8, 6).half(), (torch.rand(8, 6) > 0.5).half()),
        "not contiguous": (torch.randn(6, 8).t(), (torch.rand(8, 6) > 0.5).float()),
        "soft mask": (torch.randn(8, 6), torch.full((8, 6), 0.5)),
        "sparse gradient": (torch.randn(8, 6).to_sparse(), (torch.rand(8, 6) > 0.5).float()),
    }
    for name, (grad, mask) in cases.items():
        expected = (grad * mask).to_dense()
        assert not zero_under(grad, mask, ByteMask()), name
        assert torch.equal(grad.to_dense(), expected), name
    torch.set_num_threads(2)
    grad, mask = torch.randn(8, 6), (torch.rand(8, 6) > 0.5).float()
    assert not zero_under(grad, mask, ByteMask())  # torch's product splits the work across threads


def test_without_a_working_numba_one_warning_and_torchs_product_does_the_work(one_thread, monkeypatch):
    import numba

    from plugins.core import byte_mask

    monkeypatch.setattr(byte_mask, "_KERNEL", None)
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)  # a pure-Python loop: seconds a step
    grad, mask = torch.randn(64, 48), (torch.rand(64, 48) > 0.5).float()
    expected = grad * mask
    with pytest.warns(UserWarning, match="one-byte gradient mask is off .*NUMBA_DISABLE_JIT"):
        assert not zero_under(grad, mask, ByteMask())
    assert torch.equal(grad, expected)
