"""The benchmark's smoke run: three variants train, the table has every column, sparsity matches."""

from __future__ import annotations

from benchmarks.bench_hardshrink import VARIANTS, main


def test_bench_quick_runs_all_three_variants(tmp_path):
    result = main(["--quick", "--out", str(tmp_path)])
    table = result["table"]
    assert set(table) == set(VARIANTS) and table["dense"]["ratio_step_median"] == 1.0
    assert table["dense"]["sparsity"] == 0.0
    for variant in ("hardshrink", "modelpruning"):
        assert abs(table[variant]["sparsity"] - 0.9) < 0.001, variant
        assert table[variant]["ratio_step_mean"] > 0
    assert "| hardshrink |" in (tmp_path / "hardshrink.md").read_text()
    assert (tmp_path / "hardshrink.json").is_file()
