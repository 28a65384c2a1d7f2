"""sparse_export(): the exported model computes what the baked model computes, layer forms are
recorded, unbaked models are refused, and the saved file runs back without this project's code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models.backbones import DigitsCNN, ResNet1d
from plugins.core.errors import ConfigError
from plugins.core.kth import kth_smallest_abs
from plugins.core.masks import ensure_mask
from plugins.export import SparseExportMismatch, sparse_export, write_sparse_export
from plugins.export.layers import SparseConv1x1, SparseLinear
from tests.helpers import mlp
from tests.zoo_models import ZOO

ROOT = Path(__file__).resolve().parents[1]
FORMS = {"dense", "csr", "bsr16", "bsr32"}


@torch.no_grad()
def magnitude_prune(
    model: nn.Module, fraction: float, types: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv1D")
) -> nn.Module:
    """Zero the smallest ``fraction`` of each weight of these module types (a baked GMP end state)."""
    for module in model.modules():
        if type(module).__name__ in types:
            w = module.weight
            cut = kth_smallest_abs([w], max(1, round(fraction * w.numel())))
            w.mul_(w.abs() > cut)
    return model


def _trained_like(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial BatchNorm statistics, as after some training; returned in eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.3)
    return model.eval()


def _close(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The difference scaled as sparse_export's own check: within 1e-5 of max(1, |expected|)."""
    return (got - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def test_mlp_at_90_percent_zeros_matches_the_baked_model_and_names_every_linear():
    torch.manual_seed(0)
    model = magnitude_prune(mlp(64, 512, 512, 10), 0.9).eval()
    x = torch.randn(32, 64)
    exported, record = sparse_export(model, x, budget_s=0.05)
    with torch.no_grad():
        assert _close(exported(x), model(x)) <= 1e-5
        assert _close(exported(x[:3]), model(x[:3])) <= 1e-5  # another batch size than the one timed
    assert [row["layer"] for row in record] == ["0", "2", "4"]
    for row in record:
        assert row["form"] in FORMS and row["zeros"] == pytest.approx(0.9, abs=1e-3)
        assert row["dense_ms"] > 0 and row["reason"] == "timed"
    json.loads(json.dumps(record))  # the record is JSON as it is
    assert isinstance(model[0], nn.Linear) and (model[0].weight == 0).float().mean() == pytest.approx(0.9, abs=1e-3)


def test_layers_forced_sparse_compute_the_same_function():
    torch.manual_seed(0)
    model = magnitude_prune(mlp(64, 128, 96, 10), 0.9).eval()
    x = torch.randn(4, 7, 64)  # a sequence batch: Linear acts on the last dimension
    exported, record = sparse_export(model, x, forms={"0": "csr", "2": "bsr32", "4": "dense"})
    assert [row["form"] for row in record] == ["csr", "bsr32", "dense"]
    assert all(row["reason"] == "forced" for row in record)
    assert isinstance(exported[0], SparseLinear) and exported[0].form == "csr"
    assert isinstance(exported[2], SparseLinear) and exported[2].form == "bsr32"
    assert isinstance(exported[4], nn.Linear)
    with torch.no_grad():
        assert _close(exported(x), model(x)) <= 1e-5


def test_digits_cnn_after_magnitude_pruning():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    model = magnitude_prune(_trained_like(DigitsCNN(), x), 0.9)
    exported, record = sparse_export(model, x, forms={"head.2": "csr"}, budget_s=0.05)
    by_layer = {row["layer"]: row for row in record}
    assert set(by_layer) == {"features.0.0", "features.1.0", "features.3.0", "head.2"}
    assert by_layer["features.0.0"]["form"] == "dense" and "1x1" in by_layer["features.0.0"]["reason"]
    assert isinstance(exported.head[2], SparseLinear)
    with torch.no_grad():
        assert _close(exported(x), model(x)) <= 1e-5


def test_pointwise_convolutions_run_sparse():
    """ResNet1d's shortcuts are 1x1 Conv1d layers: they take a CSR weight and give the same outputs."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 48)
    model = magnitude_prune(_trained_like(ResNet1d(widths=(32, 64, 64)), x), 0.8)
    forms = {"blocks.0.shortcut.0": "csr", "blocks.1.shortcut.0": "bsr16"}
    exported, record = sparse_export(model, x, forms=forms, budget_s=0.05)
    assert isinstance(exported.blocks[0].shortcut[0], SparseConv1x1)
    assert isinstance(exported.blocks[1].shortcut[0], SparseConv1x1)
    assert {r["layer"]: r["form"] for r in record if r["layer"] in forms} == forms
    with torch.no_grad():
        assert _close(exported(x), model(x)) <= 1e-5


def _gpt2(use_cache: bool = True) -> tuple[nn.Module, torch.Tensor, dict[str, str]]:
    zoo = next(z for z in ZOO if z.name == "gpt2")
    torch.manual_seed(0)
    model = magnitude_prune(zoo.build(), 0.9).eval()
    model.config.use_cache = use_cache
    conv1d = {name: "csr" for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    return model, zoo.inputs(4), conv1d


def test_gpt2_from_the_zoo_keeps_its_logits_and_its_tied_head_dense():
    model, tokens, conv1d = _gpt2()
    exported, record = sparse_export(model, tokens, forms=conv1d)
    assert len(conv1d) == 8
    assert {r["layer"]: r["form"] for r in record if r["layer"] in conv1d} == conv1d
    head = next(r for r in record if r["layer"] == "lm_head")
    assert head["form"] == "dense" and "tied" in head["reason"]
    assert exported.lm_head.weight is exported.transformer.wte.weight  # still tied after the copy
    with torch.no_grad():
        assert _close(exported(tokens).logits, model(tokens).logits) <= 1e-5


@pytest.mark.parametrize("how", ["mask", "torch_prune"])
def test_an_unbaked_model_is_refused(how):
    model = mlp(8, 16, 3)
    if how == "mask":
        ensure_mask(model[0], "weight")
    else:
        torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ConfigError, match=r"sparse_export\(model\)=.*bake"):
        sparse_export(model, torch.randn(2, 8))


@pytest.mark.parametrize(
    "forms,match",
    [
        ({"7": "csr"}, r"forms\['7'\]='csr' is not allowed: a Linear-like layer"),
        ({"0": "coo"}, r"forms\['0'\]='coo'.*'dense', 'csr', 'bsr<k>' \(k >= 2\) or '2:4'"),
    ],
)
def test_forms_naming_an_unknown_layer_or_form_are_refused(forms, match):
    with pytest.raises(ConfigError, match=match):
        sparse_export(mlp(8, 16, 3), torch.randn(2, 8), forms=forms)


def test_a_sparse_layer_that_computes_something_else_is_named(monkeypatch):
    model = magnitude_prune(mlp(16, 32, 32, 3), 0.9).eval()
    broken = SparseLinear.forward
    monkeypatch.setattr(SparseLinear, "forward", lambda self, x: broken(self, x) + 1e-3)
    with pytest.raises(SparseExportMismatch, match=r"layer '2' as csr differs from dense by 0.001"):
        sparse_export(model, torch.randn(4, 16), forms={"0": "dense", "2": "csr", "4": "dense"})


LOAD = """
import runpy, sys, torch
runpy.run_path(sys.argv[1])  # registers torch.ops.sparsekit.sparse_matmul: the file needs torch only
program = torch.export.load(sys.argv[2]).module()
inputs = torch.load(sys.argv[3])
torch.save([program(x) for x in inputs], sys.argv[4])
print(sorted(m for m in sys.modules if m.split(".")[0] in ("plugins", "lightning", "models")))
"""


def test_the_saved_program_loads_in_a_fresh_process_with_torch_alone(tmp_path):
    torch.manual_seed(0)
    model = magnitude_prune(mlp(64, 128, 128, 10), 0.9).eval()
    x = torch.randn(8, 64)
    exported, record = sparse_export(model, x, tmp_path / "model_sparse.pt2", forms={"0": "csr", "2": "bsr16"})
    assert json.loads((tmp_path / "model_sparse.json").read_text()) == record
    inputs = [x, torch.randn(3, 64)]  # the program keeps a dynamic batch size
    torch.save(inputs, tmp_path / "inputs.pt")
    ops = ROOT / "plugins" / "export" / "ops.py"
    args = [str(ops), str(tmp_path / "model_sparse.pt2"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    done = subprocess.run([sys.executable, "-c", LOAD, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # nothing of this project was imported
    with torch.no_grad():
        for got, inp in zip(torch.load(tmp_path / "out.pt"), inputs, strict=True):
            assert torch.equal(got, exported(inp))
            assert _close(got, model(inp)) <= 1e-5


def test_a_model_torch_export_cannot_trace_is_pickled_instead(tmp_path):
    """GPT-2 with its key/value cache returns a DynamicCache, which torch.export refuses."""
    model, tokens, conv1d = _gpt2(use_cache=True)
    exported, _ = sparse_export(model, tokens, tmp_path / "model_sparse.pt2", forms=conv1d)
    assert not (tmp_path / "model_sparse.pt2").exists()
    loaded = torch.load(tmp_path / "model_sparse.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, exported(tokens).logits)


def test_write_sparse_export_reports_instead_of_raising(tmp_path):
    unbaked = mlp(8, 16, 3)
    ensure_mask(unbaked[0], "weight")
    summary = write_sparse_export(unbaked, torch.randn(2, 8), tmp_path / "a")
    assert summary["written"] is None and "bake" in summary["reason"]
    assert not (tmp_path / "a").exists()

    torch.manual_seed(0)
    model = magnitude_prune(mlp(256, 1024, 1024, 10), 0.95).eval()
    summary = write_sparse_export(model, torch.randn(64, 256), tmp_path / "b")
    assert summary["layers"] == 3 and sum(summary["forms"].values()) == 3
    assert (tmp_path / "b" / "model_sparse.json").exists()
    if summary["written"] is not None:  # which layers run faster sparse is this machine's timing
        assert (tmp_path / "b" / summary["written"]).exists()
    else:
        assert summary["reason"] == "no layer runs faster sparse"
