"""Per-layer choice of a weight's form (dense, CSR, BSR) by timing the candidates on the layer's own
input, and the output comparison every choice must pass.

Timing follows the benchmarks' house rules: torch on one thread, the CPU time of this thread
(``time.thread_time``, which other processes on a shared machine do not inflate), the candidates
called in rotating order round after round, the median per candidate. On a CUDA input the clock is
CUDA's events around each call (the work is not on this thread).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["capture_inputs", "max_difference", "one_thread", "tolerance", "time_candidates"]


@contextmanager
def one_thread():
    """torch on one thread inside the block (the thread-time clock is only right there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(model: nn.Module, example: torch.Tensor | tuple) -> object:
    """``model(example)``, or ``model(*example)`` for a tuple of arguments, without gradients."""
    with torch.no_grad():
        return model(*example) if isinstance(example, tuple) else model(example)


def capture_inputs(model: nn.Module, names: list[str], example: torch.Tensor | tuple) -> dict[str, torch.Tensor]:
    """The input tensor each named module receives at its first call while ``model`` runs
    ``example`` (a copy: a later in-place op must not change it). Modules never called as modules
    (a parent that reads their weight itself, as ``nn.MultiheadAttention`` does) are absent."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook_for(name: str) -> Callable:
        def hook(module, args):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()

        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        run(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def tolerance(reference: torch.Tensor, atol: float) -> float:
    """``atol`` scaled by the output's size: ``atol * max(1, max |reference|)``. A sparse product sums
    in another order than the dense one; in float32 that moves large outputs by more than 1e-5.
    ``atol`` is at least 4 units in the last place of a floating output's dtype (float16's is 1e-3)."""
    scale = reference.detach().abs().max().item() if reference.numel() else 0.0
    if reference.is_floating_point():
        atol = max(atol, 4 * torch.finfo(reference.dtype).eps)
    return atol * max(1.0, scale)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ``|a - b|`` (``inf`` when the shapes differ)."""
    if a.shape != b.shape:
        return float("inf")
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def _timed(candidate: Callable, x: torch.Tensor) -> tuple[float, object]:
    """Seconds one call of ``candidate(x)`` takes, and its output."""
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = candidate(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    start_s = time.thread_time()
    out = candidate(x)
    return time.thread_time() - start_s, out


def time_candidates(
    candidates: dict[str, nn.Module], x: torch.Tensor, budget_s: float, min_reps: int = 3, max_reps: int = 15
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median seconds per call of each candidate on ``x`` and each one's output (from its warm-up
    call). Rounds: every candidate once, in rotating order; as many rounds as fit in ``budget_s``
    after the warm-up, within ``[min_reps, max_reps]``."""
    names = list(candidates)
    outputs, first = {}, {}
    with one_thread(), torch.no_grad():
        for name in names:
            first[name], outputs[name] = _timed(candidates[name], x)
        reps = int(budget_s / max(sum(first.values()), 1e-9))
        reps = max(min_reps, min(max_reps, reps))
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(reps):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(_timed(candidates[name], x)[0])
    return {name: statistics.median(t) for name, t in times.items()}, outputs
