"""The benchmark's smoke run: three variants train, each row holds its own measured ratios and
sparsity, and the files on disk hold the same table."""

from __future__ import annotations

import json
import math

from benchmarks.bench_hardshrink import VARIANTS, main


def test_bench_quick_runs_all_three_variants(tmp_path):
    result = main(["--quick", "--out", str(tmp_path)])
    table, runs = result["table"], result["runs"]
    assert set(table) == set(VARIANTS)
    # --quick: one round of every variant, 2 epochs x 4 steps each, every step timed.
    by = {r["variant"]: r for r in runs}
    assert len(runs) == 3 and set(by) == set(VARIANTS)
    assert all(r["steps"] == 8 and r["step_median_s"] > 0 and r["step_mean_s"] > 0 for r in runs), runs
    for variant, row in table.items():
        run, dense = by[variant], by["dense"]
        # Each ratio is this variant's own time over the dense run's (one round: no median to take).
        assert math.isclose(row["ratio_step_median"], run["step_median_s"] / dense["step_median_s"]), variant
        assert math.isclose(row["ratio_step_mean"], run["step_mean_s"] / dense["step_mean_s"]), variant
        assert math.isclose(row["step_median_ms"], 1e3 * run["step_median_s"]), variant
        assert math.isclose(row["step_mean_ms"], 1e3 * run["step_mean_s"]), variant
        assert row["sparsity"] == run["sparsity"] and 0.0 <= row["test_acc"] <= 1.0, variant
    # Dense keeps every weight; both pruners reach the 0.9 target of the conv and linear weights.
    assert table["dense"]["sparsity"] == 0.0
    for variant in ("hardshrink", "modelpruning"):
        assert abs(table[variant]["sparsity"] - 0.9) < 0.001, variant
    markdown = (tmp_path / "hardshrink.md").read_text()
    for variant, row in table.items():
        assert f"| {variant} | {row['step_median_ms']:.3f} | {row['ratio_step_median']:.3f} |" in markdown, variant
    assert json.loads((tmp_path / "hardshrink.json").read_text())["table"] == table
