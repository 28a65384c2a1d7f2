"""The mask-overhead benchmark's smoke run: the five variants step in rounds, every ratio is a step
over the dense step of its own round, the three phases of each step add up to it, and a quick run
never writes into the committed results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_mask_overhead import MODELS, PHASES, VARIANTS, _Turns, main
from benchmarks.timing import RESULTS

ROOT = Path(__file__).resolve().parents[1]


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
        assert rows["dense"]["over_dense_ms"] == {p: 0.0 for p in PHASES}
        for variant, row in rows.items():
            # The three phases tile the step: each step is their sum.
            phases = row["phases_ms"]
            for i, step in enumerate(row["steps_ms"]):
                assert sum(phases[p][i] for p in PHASES) == pytest.approx(step, rel=1e-9, abs=1e-9), (model, variant)
            gaps = [[t - d for t, d in zip(phases[p], rows["dense"]["phases_ms"][p], strict=True)] for p in PHASES]
            assert [row["over_dense_ms"][p] for p in PHASES] == pytest.approx([statistics.median(g) for g in gaps])
    if cores is not None:
        assert os.sched_getaffinity(0) == cores  # pinned to one core while measuring, not after
    assert json.loads((tmp_path / "mask_overhead.json").read_text())["table"] == table
    written = (tmp_path / "mask_overhead.md").read_text()
    assert "| resnet18 | inplace |" in written and "| over dense (ms): forward | backward | optimizer |" in written
    assert result["meta"]["malloc"] == "malloc as the process started"  # quick runs leave this process alone


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_a_full_run_keeps_freed_memory_for_reuse_instead_of_mapping_it_afresh() -> None:
    # In a process of its own: the settings last for the process. Ten 16 MiB tensors freed: by
    # default glibc gives all 160 MiB back to the kernel (each later one costs 4096 page faults).
    probe = (
        "import sys, torch; from benchmarks.steady_malloc import keep_freed_memory\n"
        "said = keep_freed_memory() if sys.argv[1] == 'steady' else 'default'\n"
        "def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "kept = [torch.ones(2048, 2048) for _ in range(10)]\n"
        "full = rss()\n"
        "del kept\n"
        "print(said, round(full - rss()))\n"
    )
    runs = {}
    for mode in ("steady", "default"):
        done = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True, cwd=ROOT)
        said, returned_mib = done.stdout.rsplit(" ", 1)
        runs[mode] = (said, int(returned_mib))
    assert runs["steady"] == ("glibc malloc keeps freed memory (one arena, no trimming, mmap above 32 MiB)", 0)
    assert runs["default"][1] >= 150


def test_bench_quick_refuses_to_write_into_the_committed_results() -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--quick", "--out", str(RESULTS)])
    assert stop.value.code == 2
