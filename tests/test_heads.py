"""Attention heads as the unit of structured pruning (``pruning.heads=true``): whole heads go,
compaction removes them for real, the compact model computes what the masked one did (within
1e-5), and the softmax scale stays that of the trained head size."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from plugins.core.errors import ConfigError
from plugins.core.modes import evaluating
from plugins.pruning.dependency import independent_copy
from plugins.pruning.structured import StructuredPruning
from tests.helpers import quiet_trainer
from tests.zoo_models import QKVO, ZOO, Task, ZooModel, fit_zoo

ATTENTION_MODELS = [m for m in ZOO if m.name in ("bert", "vit", "gpt2", "transformer_encoder", "qkvo_attention")]


class Masked(L.Callback):
    """A copy of the module at the end of training: masked, before the plugin compacts it."""

    def on_train_end(self, trainer, pl_module):
        self.model = independent_copy(pl_module)


def _scales(task: Task) -> dict[str, float]:
    """The softmax scale of every attention module, as its forward will compute it."""
    out = {}
    for name, m in task.named_modules():
        if hasattr(m, "scaling") and hasattr(m, "num_attention_heads"):  # BERT, ViT: a fixed attribute
            out[name] = float(m.scaling)
        elif hasattr(m, "c_attn"):  # GPT-2: scaling fixed at build
            out[name] = float(m.scaling)
        elif isinstance(m, nn.MultiheadAttention) or hasattr(m, "kept_heads"):
            out[name] = 1 / math.sqrt(m.head_dim)
        elif isinstance(m, QKVO):  # SDPA's default: the head size of its runtime shape
            out[name] = 1 / math.sqrt(m.q.out_features // m.heads)
    return out


def _heads(task: Task) -> dict[str, int]:
    counts = {}
    for name, m in task.named_modules():
        for attr in ("num_attention_heads", "num_heads", "heads"):
            if isinstance(getattr(m, attr, None), int):
                counts[name] = getattr(m, attr)
                break
    return counts


@pytest.mark.parametrize("model", ATTENTION_MODELS, ids=[m.name for m in ATTENTION_MODELS])
def test_half_of_the_heads_compacted_exactly_with_the_softmax_scale_kept(model: ZooModel, tmp_path):
    torch.manual_seed(0)
    before = model.build()
    scales, heads = _scales(Task(before)), _heads(Task(before))
    masked = Masked()
    plugin = StructuredPruning(amount=0.5, heads=True, compact=True, exclude=model.head)
    task, _, x = fit_zoo(model, plugin, tmp_path, extra=[masked])

    assert _scales(task) == scales and scales  # the trained head size sets the scale, as before
    attention = {name: n for name, n in heads.items() if n > 1 and name in _heads(task)}
    assert attention and all(_heads(task)[name] == n // 2 for name, n in attention.items())
    assert plugin.report["params_after"] < plugin.report["params_before"]
    with evaluating(task), evaluating(masked.model), torch.no_grad():
        want, got = masked.model(x), task(x)
    assert float((want - got).abs().max()) <= 1e-5


def test_full_width_checkpoints_load_into_the_head_compacted_model(tmp_path):
    """trainer.test(ckpt_path="best") and resumes read checkpoints written before compaction."""
    model = next(m for m in ZOO if m.name == "transformer_encoder")
    masked = Masked()
    plugin = StructuredPruning(amount=0.5, heads=True, compact=True, exclude=model.head)
    task, _, x = fit_zoo(model, plugin, tmp_path, extra=[masked])
    full = {k: v for k, v in masked.model.state_dict().items() if "parametrizations" not in k}
    full.update(
        {k.replace(".parametrizations", "").replace(".original", ""): v for k, v in masked.model.state_dict().items() if k.endswith(".original")}
    )
    reference = independent_copy(task)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(1.0)  # the load below must overwrite every value
    task.load_state_dict(full)
    with evaluating(task), evaluating(reference), torch.no_grad():
        assert torch.allclose(task(x), reference(x), atol=1e-6)


def test_pruned_heads_stay_masked_through_the_optimizer(tmp_path):
    model = next(m for m in ZOO if m.name == "qkvo_attention")
    plugin = StructuredPruning(amount=0.5, heads=True, exclude=model.head, bake_at_end=False)
    task, _, _ = fit_zoo(model, plugin, tmp_path, epochs=2)
    net = task.net
    d = net.q.out_features // net.heads
    rows = net.q.weight.detach().view(net.heads, d, -1).ne(0).flatten(1).any(1)
    assert int(rows.sum()) == 2  # two of four heads zero after 4 AdamW steps
    for layer in (net.k, net.v):
        assert torch.equal(layer.weight.detach().view(net.heads, d, -1).ne(0).flatten(1).any(1), rows)
    assert torch.equal(net.o.weight.detach().view(-1, net.heads, d).ne(0).any(0).any(1), rows)
    assert plugin.channels() == {"net": "2/4"}


def test_heads_on_a_model_without_attention_is_refused_naming_the_key():
    model = next(m for m in ZOO if m.name == "resnet18")
    plugin = StructuredPruning(amount=0.5, heads=True, exclude=model.head)
    with pytest.raises(ConfigError, match=r"^pruning.heads=True is not allowed: false for this model: no selected weight"):
        plugin.setup(None, Task(model.build()), "fit")


def test_a_criterion_that_cannot_score_heads_is_refused():
    with pytest.raises(ConfigError, match=r"^pruning.method='taylor' is not allowed: one of random, l1, l2, fpgm with heads=true"):
        StructuredPruning(method="taylor", amount=0.5, heads=True)


class FixedWidth(QKVO):
    """Attention whose forward hard-codes the inner width: removing a head breaks it."""

    def forward(self, x):
        h = self.embed(x)
        b, t, _ = h.shape
        q, k, v = (z.view(b, t, 4, 4).transpose(1, 2) for z in (self.q(h), self.k(h), self.v(h)))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.head(self.o(a.transpose(1, 2).reshape(b, t, 16)).mean(1))


def test_head_compaction_a_forward_cannot_follow_is_refused_before_training():
    torch.manual_seed(0)
    plugin = StructuredPruning(amount=0.5, heads=True, compact=True, exclude=["*head*"], example_input_shape=[2, 5, 8])
    data = DataLoader(TensorDataset(torch.randn(16, 5, 8), torch.randint(0, 3, (16,))), batch_size=8)
    trainer = quiet_trainer([plugin], max_epochs=1)
    with pytest.raises(ConfigError, match=r"^pruning.compact=True is not allowed: false for this model: a dry run"):
        trainer.fit(Task(FixedWidth()), data)
    assert trainer.global_step == 0


def test_gpt2_head_compaction_keeps_the_embedding_tie_also_after_reloading(tmp_path):
    model = next(m for m in ZOO if m.name == "gpt2")
    plugin = StructuredPruning(amount=0.5, heads=True, compact=True, exclude=model.head)
    task, _, x = fit_zoo(model, plugin, tmp_path)
    lm = task.net
    assert lm.transformer.h[0].attn.num_heads == 1
    assert lm.lm_head.weight is lm.transformer.wte.weight
    torch.save(lm, tmp_path / "model.pt")
    reloaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight


class TiedPair(nn.Module):
    """Two layers sharing one weight (an autoencoder's tied encoder and decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.head(torch.relu(self.dec(torch.relu(self.enc(x)))))


def test_channel_compaction_that_would_untie_weights_is_refused_before_training():
    """Compaction used to untie shared tensors without a word; now the dry run names them."""
    plugin = StructuredPruning(amount=0.25, compact=True, include=["net.enc.weight"], exclude=["*head*"], example_input_shape=[2, 8])
    data = DataLoader(TensorDataset(torch.randn(16, 8), torch.randint(0, 3, (16,))), batch_size=8)
    trainer = quiet_trainer([plugin], max_epochs=1)
    with pytest.raises(ConfigError, match=r"^pruning.compact=True is not allowed: .*untied net.enc.weight and net.dec.weight"):
        trainer.fit(Task(TiedPair()), data)
    assert trainer.global_step == 0
