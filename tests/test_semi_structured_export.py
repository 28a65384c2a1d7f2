"""sparse_export() with 2:4 semi-structured weights: a CPU says why no layer takes them, a forced
2:4 layer that cannot run is refused naming it, a 2:4 kernel that misses the tolerance leaves its
layer dense with the difference recorded, and on a CUDA GPU a 2:4 GPT-2 keeps its logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.bench_semi_structured import keep_largest as two_four
from plugins.core.errors import ConfigError
from plugins.export import SparseExportMismatch, layers, semi_structured, sparse_export
from plugins.export.semi_structured import SemiStructuredLinear, pattern_misfit, pattern_violations
from tests.helpers import mlp


def two_four_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp(64, 128, 32).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(two_four(layer.weight))
    return model


def test_pattern_violations_counts_groups_of_four_inputs_over_two_nonzeros():
    w = torch.tensor([[1.0, 0, 2, 0, 1, 1, 1, 0], [0, 0, 0, 3, 1, 1, 1, 1]])
    assert pattern_violations(w) == 2  # row 0's second group (3 nonzeros), row 1's second (4)
    assert pattern_violations(two_four(torch.randn(16, 32))) == 0


@pytest.mark.parametrize(("dtype", "n", "m"), [(torch.float16, 2, 4), (torch.bfloat16, 2, 4), (torch.float32, 1, 2)])
def test_the_pattern_check_agrees_with_torchs_own_cutlass_encoding(dtype, n, m):
    """torch's CUTLASS encoder (plain torch ops, so it runs on CPU) keeps a matrix exactly when it is
    n:m for its dtype; pattern_violations, which decides whether a layer is offered 2:4, says the
    same. float32 is encoded in pairs: a 2:4 float32 matrix loses values."""
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass as encode,
    )
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_to_dense_cutlass as decode,
    )

    torch.manual_seed(0)
    fits = two_four(torch.randn(64, 128), n, m).to(dtype)
    off = fits.clone()
    off[3, 0:m] = 1.0  # one group with m nonzeros
    for matrix, violations in ((fits, 0), (off, 1)):
        assert pattern_violations(matrix, n, m) == violations
        # Which entries survive the encoding (float32 values come back within 1e-4, not bit for bit).
        kept = torch.equal(decode(*encode(matrix)) != 0, matrix != 0)
        assert kept == (violations == 0)
    if dtype == torch.float32:
        two_of_four = two_four(torch.randn(64, 128)).float()
        assert pattern_violations(two_of_four, 1, 2) > 0
        assert not torch.equal(decode(*encode(two_of_four)) != 0, two_of_four != 0)


def test_a_float32_layer_needs_1_2_and_the_reason_says_so():
    two_of_four = two_four(torch.randn(32, 64))
    assert pattern_misfit(two_of_four.half()) is None and pattern_misfit(two_of_four.bfloat16()) is None
    assert pattern_misfit(two_four(torch.randn(32, 64), 1, 2)) is None
    reason = pattern_misfit(two_of_four)
    assert reason.startswith("not 1:2: ") and "train with sparsity.pattern=1:2, or export in float16" in reason


def test_on_cpu_the_record_says_why_no_layer_runs_2_4():
    model = two_four_mlp().half()
    _, record = sparse_export(model, torch.randn(8, 64).half(), budget_s=0.01)
    for row in record:
        assert row["form"] == "dense" and row["zeros"] == 0.5
        assert row["reason"] == (
            "no sparse form fits (csr, bsr16, bsr32: torch.float16 on cpu: CSR/BSR kernels take float32/float64 "
            "on CPU; 2:4: 2:4 kernels run on CUDA only (this weight is on cpu))"
        )


def test_forcing_2_4_on_a_layer_that_cannot_run_it_is_refused_naming_the_layer():
    with pytest.raises(ConfigError, match=r"forms\['0'\]='2:4' is not allowed: .*'dense' here: 2:4 kernels run on CUDA"):
        sparse_export(two_four_mlp(), torch.randn(8, 64), forms={"0": "2:4"})


class DenseKernel:
    """Stands in for torch's semi-structured subclass on a machine without a GPU: it keeps the
    matrix dense, off by ``error`` (the way a kernel of another precision is)."""

    BACKEND = "stand-in"
    error = 0.0

    @classmethod
    def from_dense(cls, matrix: torch.Tensor) -> torch.Tensor:
        return matrix + cls.error


@pytest.fixture
def stand_in_kernel(monkeypatch):
    def backend(matrix):
        return "not 2:4" if pattern_violations(matrix) else DenseKernel

    monkeypatch.setattr(layers, "semi_structured_backend", backend)
    monkeypatch.setattr(semi_structured, "semi_structured_backend", backend)
    monkeypatch.setattr(DenseKernel, "error", 0.0)
    return DenseKernel


def test_a_2_4_layer_is_timed_and_put_in_place_where_its_kernel_runs(stand_in_kernel):
    model, x = two_four_mlp(), torch.randn(8, 64)
    exported, record = sparse_export(model, x, forms={"0": "2:4"}, candidates=("2:4",), min_speedup=0.0, budget_s=0.01)
    assert isinstance(exported[0], SemiStructuredLinear) and "backend=stand-in" in repr(exported[0])
    assert [r["form"] for r in record] == ["2:4", "2:4"]  # layer 2 chosen by timing (min_speedup 0)
    assert all("2:4" in r["candidates_ms"] for r in record)
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), atol=1e-6)


def test_a_2_4_kernel_that_misses_the_tolerance_leaves_its_layer_dense_and_says_by_how_much(stand_in_kernel):
    stand_in_kernel.error = 1e-3  # as CUTLASS's float32 2:4 kernel computes in TF32
    model, x = two_four_mlp(), torch.randn(8, 64)
    exported, record = sparse_export(model, x, candidates=("2:4",), min_speedup=0.0, budget_s=0.01)
    assert [r["form"] for r in record] == ["dense", "dense"]
    assert all(r["refused"]["2:4"].startswith("differs from dense by") for r in record)
    assert not any(isinstance(m, SemiStructuredLinear) for m in exported.modules())
    with pytest.raises(SparseExportMismatch, match=r"layer '0' as 2:4 differs from dense"):
        sparse_export(model, x, forms={"0": "2:4"}, budget_s=0.01)  # forced: an error, not a choice


def test_a_2_4_kernel_that_raises_leaves_its_layer_dense_with_the_error_recorded(stand_in_kernel, monkeypatch):
    def no_kernel(matrix):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")

    monkeypatch.setattr(stand_in_kernel, "from_dense", no_kernel)
    exported, record = sparse_export(two_four_mlp(), torch.randn(8, 64), candidates=("2:4",), budget_s=0.01)
    assert [r["form"] for r in record] == ["dense", "dense"]
    assert record[0]["refused"] == {"2:4": "RuntimeError: CUDA error: no kernel image is available for execution on the device"}


@pytest.mark.parametrize("candidates", ["csr", ("csr", "dense"), ("csr", "coo"), ("csr", 16)])
def test_candidates_other_than_sparse_forms_are_refused(candidates):
    with pytest.raises(ConfigError, match=r"^candidates=.* is not allowed: a tuple of sparse forms"):
        sparse_export(two_four_mlp(), torch.randn(8, 64), candidates=candidates)


CUDA_8 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@pytest.mark.skipif(not CUDA_8, reason="needs a CUDA GPU of compute capability 8.0 or more")
def test_a_2_4_gpt2_on_the_gpu_keeps_its_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=256, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.config.use_cache = False
    conv1d = {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    with torch.no_grad():
        for m in conv1d.values():  # (in, out): 2:4 along the inputs is along dim 0
            m.weight.copy_(two_four(m.weight.t()).t())
    model = model.half().cuda()
    tokens = torch.randint(0, 512, (8, 64), device="cuda")
    exported, record = sparse_export(model, tokens, forms={n: "2:4" for n in conv1d})
    assert {r["layer"]: r["form"] for r in record if r["layer"] in conv1d} == {n: "2:4" for n in conv1d}
    assert all(isinstance(exported.get_submodule(n), SemiStructuredLinear) for n in conv1d)
    with torch.no_grad():
        got, expected = exported(tokens).logits.float(), model(tokens).logits.float()
    assert (got - expected).abs().max().item() <= 4e-3 * max(1.0, expected.abs().max().item())
