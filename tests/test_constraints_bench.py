"""The constraints benchmark's smoke run: every variant in the table, positive ratios, the n/a
ones for a reason, and the polar projection within the violation bound (no timing asserted)."""

from __future__ import annotations

import json
import math

from benchmarks.bench_constraints import BOUND, MODELS, POLAR, VARIANTS, main

# On the ResNet's conv weights: no square matrix, and the libraries' orthogonal/sphere read a 3-D
# tensor as a batch of matrices (or of kernels).
RESNET_NA = {
    "ours:symmetric",
    "ours:skew",
    "PyTorch:orthogonal(matrix_exp)",
    "PyTorch:orthogonal(cayley)",
    "PyTorch:orthogonal(householder)",
    "geotorch:orthogonal(expm)",
    "geotorch:orthogonal(cayley)",
    "geotorch:symmetric",
    "geotorch:skew",
    "geotorch:unit_norm(sphere, embedded)",
}


def test_bench_quick_measures_every_variant(tmp_path):
    result = main(["--quick", "--out", str(tmp_path)])
    rows = {(r["model"], r["variant"]): r for r in result["table"]}
    assert set(rows) == {(m, v.key) for m in MODELS for v in VARIANTS}
    for (model, variant), row in rows.items():
        if model == "resnet1d" and variant in RESNET_NA:
            assert "ratio" not in row and row["note"], variant
            continue
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, (model, variant)
        assert row["step_ms"] > 0, (model, variant)
        if variant == "none":
            assert row["ratio"] == 1.0 and row["violation"] is None
        else:
            assert row["violation"] is not None and math.isfinite(row["violation"]), (
                model,
                variant,
            )
    for model in MODELS:
        assert rows[(model, POLAR)]["violation"] <= BOUND, model
    head = next(h for h in result["headlines"] if h["theirs"] == "PyTorch:orthogonal(matrix_exp)")
    assert head["speedup"] > 0 and head["violation_theirs"] <= BOUND

    text = (tmp_path / "constraints.md").read_text()
    assert "orthogonal polar vs parametrizations.orthogonal(matrix_exp):" in text
    assert "| mlp | orthogonal | polar | ours projection |" in text
    assert "| resnet1d | symmetric | - | ours parametrization | n/a |" in text
    saved = json.loads((tmp_path / "constraints.json").read_text())
    assert len(saved["table"]) == len(MODELS) * len(VARIANTS) and saved["meta"]["clock"] == "cpu"
