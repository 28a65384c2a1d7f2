"""export_onnx(): the ONNX file gives torch's outputs in onnxruntime at two batch sizes, for baked,
compacted and residual models; a mismatch raises with the difference; the fallback exporter is named."""

from __future__ import annotations

import copy
import json

import onnxruntime
import pytest
import torch
from torch import nn

from models.backbones import DigitsCNN, ResNet1d
from plugins.core.kth import kth_smallest_abs
from plugins.core.masks import bake, set_mask
from plugins.export import OnnxMismatch, export_onnx
from plugins.pruning.compaction import compact_copy
from plugins.pruning.structured import StructuredPruning
from tests.test_compaction import Wrap
from tests.test_sparse_export import _trained_like


def _digits_baked() -> tuple[nn.Module, torch.Tensor]:
    """90% of each weight masked by magnitude, then baked (the masks removed, the zeros kept)."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    model = _trained_like(DigitsCNN(), x)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight.detach()
            set_mask(module, "weight", w.abs() > kth_smallest_abs([w], round(0.9 * w.numel())))
    assert bake(model) == 4
    return model, x


def _digits_compacted() -> tuple[nn.Module, torch.Tensor]:
    """Half the channels pruned by L1 norm, baked, then removed: as tests/test_compaction.py does."""
    torch.manual_seed(0)
    shape = [2, 1, 8, 8]
    x = torch.randn(4, *shape[1:])
    model = Wrap(_trained_like(DigitsCNN(), x))
    pruning = StructuredPruning(method="l1", amount=0.5, exclude=["*head*"], example_input_shape=shape, seed=3)
    pruning.setup(None, model, "fit")
    pruning.apply(0.5)
    small, report = compact_copy(model.eval(), x[:2], measure=False)
    assert report["params_after"] < 0.3 * report["params_before"]
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in small.modules())
    return small, x


def _resnet1d() -> tuple[nn.Module, torch.Tensor]:
    """conf/model/resnet1d.yaml: widths [64, 128, 128], kernels [8, 5, 3]."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 64)
    return _trained_like(ResNet1d(widths=(64, 128, 128), kernels=(8, 5, 3)), x), x


CASES = {"digits_baked": _digits_baked, "digits_compacted": _digits_compacted, "resnet1d": _resnet1d}


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_round_trip_at_two_batch_sizes(case, tmp_path):
    model, x = CASES[case]()
    before = copy.deepcopy(model.state_dict())
    info = export_onnx(model, x, tmp_path / "model.onnx")
    assert info["exporter"] == "dynamo" and info["dynamo_error"] is None
    assert info["batch_sizes"] == [4, 5]
    assert info["max_abs_diff"] <= 1e-5
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x7 = torch.randn(7, *x.shape[1:])  # any batch size: the batch dimension is dynamic
    (out,) = session.run(None, {session.get_inputs()[0].name: x7.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(out) - model(x7)).abs().max().item() <= 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is unchanged


def test_a_mismatch_in_onnxruntime_raises_with_the_difference(tmp_path, monkeypatch):
    model, x = _digits_baked()
    run = onnxruntime.InferenceSession.run
    monkeypatch.setattr(
        onnxruntime.InferenceSession, "run", lambda self, *a, **k: [o + 1e-3 for o in run(self, *a, **k)]
    )
    with pytest.raises(OnnxMismatch, match=r"output 0 at batch 4: onnxruntime differs from torch by max 0\.001"):
        export_onnx(model, x, tmp_path / "model.onnx")


def test_when_the_dynamo_exporter_fails_the_torchscript_one_is_used_and_named(tmp_path, monkeypatch):
    model, x = _digits_baked()
    export = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo exporter unavailable")
        return export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    info = export_onnx(model, x[:1], tmp_path / "model.onnx")
    assert info["exporter"] == "torchscript"
    assert info["dynamo_error"] == "RuntimeError: dynamo exporter unavailable"
    assert info["batch_sizes"] == [1, 2] and info["max_abs_diff"] <= 1e-5


def test_a_run_with_export_keys_writes_the_sparse_and_onnx_models_it_names_in_summary_json(tmp_path):
    from tests.conftest import FAST, run_train_inprocess

    overrides = [
        *FAST,
        "+experiment=digits_gmp90",
        "sparsity.schedule.begin_epoch=0",
        "sparsity.schedule.end_epoch=0",
        "export.sparse=true",
        "export.onnx=true",
    ]
    summary = run_train_inprocess(overrides, tmp_path)
    onnx_info = summary["export_onnx"]
    assert onnx_info["written"] == "model.onnx" and (tmp_path / "model.onnx").exists()
    assert onnx_info["max_abs_diff"] <= 1e-5 and len(onnx_info["batch_sizes"]) == 2
    sparse = summary["export_sparse"]
    assert (tmp_path / "model_sparse.json").exists()  # the per-layer record, whatever was chosen
    record = json.loads((tmp_path / "model_sparse.json").read_text())
    assert sparse["layers"] == len(record) and sum(sparse["forms"].values()) == len(record)
    assert sparse["written"] is None or (tmp_path / sparse["written"]).exists()
