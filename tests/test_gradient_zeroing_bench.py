"""The gradient-zeroing benchmark's smoke run: every way it times zeroes the gradient exactly as
the float product does (else it stops), and a quick run never writes into the committed results."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_gradient_zeroing
from benchmarks.timing import RESULTS


def test_bench_quick_times_every_way_against_the_float_product(tmp_path) -> None:
    threads = torch.get_num_threads()
    result = bench_gradient_zeroing.main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    table = result["table"]
    assert set(table) == {"flushed", "hot", "with_product"}
    for cache in ("flushed", "hot"):
        rows = table[cache]
        assert "one-byte loop (ours)" in rows and rows["grad.mul_(float mask)"]["x_float_product"] == 1.0
    rows = table["with_product"]
    assert "in backward, block by block, one compiled call (ours)" in rows and bench_gradient_zeroing.DENSE in rows
    assert "in backward, block by block from Python" in rows
    assert rows["product, then grad.mul_(float mask)"]["x_float_product"] == 1.0
    assert rows[bench_gradient_zeroing.DENSE]["over_product"] == 0.0
    for rows in table.values():
        assert all(row["lo"] <= row["ms"] <= row["hi"] for row in rows.values())
    assert json.loads((tmp_path / "gradient_zeroing.json").read_text())["table"] == table


def test_a_way_that_zeroes_something_else_stops_the_benchmark(monkeypatch) -> None:
    """Also the ways that compute the weight gradient: one that skips the mask stops it."""
    real = bench_gradient_zeroing.ways

    def with_a_wrong_way(grad, keep):
        found = real(grad, keep)
        found["grad.zero_()"] = grad.zero_
        return found

    monkeypatch.setattr(bench_gradient_zeroing, "ways", with_a_wrong_way)
    grad, keep = torch.randn(64, 64), torch.rand(64, 64) > 0.9
    with pytest.raises(RuntimeError, match="grad.zero_"):
        bench_gradient_zeroing.check_same(grad, keep)
    monkeypatch.setattr(bench_gradient_zeroing, "ways", real)
    products = bench_gradient_zeroing.with_product

    def with_an_unmasked_product(grad_output, input, keep):
        found = products(grad_output, input, keep)
        found["product only"] = lambda: grad_output.t().mm(input)
        return found

    monkeypatch.setattr(bench_gradient_zeroing, "with_product", with_an_unmasked_product)
    with pytest.raises(RuntimeError, match="product only"):
        bench_gradient_zeroing.check_same(grad, keep)


def test_bench_quick_refuses_to_write_into_the_committed_results() -> None:
    with pytest.raises(SystemExit) as stop:
        bench_gradient_zeroing.main(["--quick", "--out", str(RESULTS)])
    assert stop.value.code == 2
