"""The global lambda: the exact k-th smallest |w| over many tensors, equal to torch's kthvalue of
their concatenation, in memory bounded by one stated figure whatever the model size."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_global_lambda import peak_extra_bytes, weights
from plugins.core.kth import MAX_EXTRA_BYTES, SMALL, select_abs


@pytest.mark.parametrize("total", [SMALL - 1, 3 * SMALL + 7, 2_000_003])
def test_equals_torch_kthvalue_bit_for_bit_at_every_fraction(total):
    tensors = weights(total, seed=total)
    flat = torch.cat(tensors).abs()
    for fraction in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        k = max(1, round(fraction * total))
        assert select_abs(tensors, k).value == flat.kthvalue(k).values.item(), fraction


def test_ties_report_how_many_lie_below_and_at_the_value():
    # 8 magnitude levels (quantized weights): the k-th value is shared by many entries.
    levels = torch.arange(1, 9, dtype=torch.float32) / 8
    tensors = [levels[torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(n))] for n in (300_000, 70_001)]
    flat = torch.cat(tensors)
    k = round(0.5 * flat.numel())
    rank = select_abs(tensors, k)
    assert rank.value == flat.kthvalue(k).values.item()
    assert rank.below == int((flat < rank.value).sum()) and rank.at == int((flat == rank.value).sum())
    assert rank.below < k <= rank.below + rank.at


@pytest.mark.slow
def test_extra_memory_stays_under_the_stated_bound_at_1m_11m_and_50m_weights():
    extras = peak_extra_bytes(1_000_000, 11_000_000, 50_000_000)
    # The bound does not grow with the model: 50M float32 weights are 200 MB, the bound 16 MiB.
    assert all(extra <= MAX_EXTRA_BYTES for extra in extras), [e / 2**20 for e in extras]
    assert MAX_EXTRA_BYTES == 16 * 2**20
