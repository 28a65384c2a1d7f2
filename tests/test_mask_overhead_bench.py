"""The mask-overhead benchmark's smoke run: the four variants step in rounds, every ratio is a step
over the dense step of its own round, and a quick run never writes into the committed results."""

from __future__ import annotations

import json
import os
import statistics

import pytest
import torch

from benchmarks.bench_mask_overhead import MODELS, VARIANTS, _Turns, main
from benchmarks.timing import RESULTS


def test_turns_let_one_variant_step_at_a_time_in_rotating_rounds() -> None:
    turns = _Turns(("a", "b", "c"))
    for _ in range(6):
        holder = turns._holder()
        turns.stepped.append(holder)
        turns.pass_on(holder)
    # Each round has every variant once; the next round starts one later.
    assert turns.stepped == ["a", "b", "c", "b", "c", "a"]
    turns.pass_on("a", leave=True)  # not the holder: only stops waiting on it
    assert turns._holder() == "c" and turns.active == {"b", "c"}


def test_bench_quick_pairs_every_step_with_the_dense_step_of_its_round(tmp_path) -> None:
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    result = main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    table = result["table"]
    assert set(table) == set(MODELS) and all(set(rows) == set(VARIANTS) for rows in table.values())
    for model, rows in table.items():
        dense = rows["dense"]["steps_ms"]
        # --quick: 6 steps a epoch, the second epoch's last 4 timed.
        assert all(row["paired_steps"] == len(row["steps_ms"]) == 4 for row in rows.values()), model
        for variant, row in rows.items():
            paired = [t / d for t, d in zip(row["steps_ms"], dense, strict=True)]
            assert row["x_dense"] == pytest.approx(statistics.median(paired)), (model, variant)
        assert rows["dense"]["x_dense"] == 1.0
    if cores is not None:
        assert os.sched_getaffinity(0) == cores  # pinned to one core while measuring, not after
    assert json.loads((tmp_path / "mask_overhead.json").read_text())["table"] == table
    assert "| resnet18 | inplace |" in (tmp_path / "mask_overhead.md").read_text()


def test_bench_quick_refuses_to_write_into_the_committed_results() -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--quick", "--out", str(RESULTS)])
    assert stop.value.code == 2
