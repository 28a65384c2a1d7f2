"""What compaction saves: multiply-adds and parameters counted by Torch-Pruning, and latency
measured side by side."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from plugins.core.modes import evaluating
from plugins.pruning.dependency import call_with

__all__ = ["count", "latency", "batch_of"]


def count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """(MACs, parameters) for one forward pass on ``example_inputs`` (Torch-Pruning's counter)."""
    with evaluating(model), torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), sum(p.numel() for p in model.parameters())


@torch.no_grad()
def latency(model: nn.Module, inputs: Any, repeats: int = 10, warmup: int = 2) -> list[float]:
    """Seconds per forward pass, ``repeats`` measurements after ``warmup`` (eval, no grad)."""
    times = []
    with evaluating(model):
        for i in range(warmup + repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            call_with(model, inputs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def batch_of(example_inputs: Any, batch_size: int) -> Any:
    """Random inputs shaped like ``example_inputs`` with ``batch_size`` rows."""
    if torch.is_tensor(example_inputs):
        shape = (batch_size, *example_inputs.shape[1:])
        if example_inputs.is_floating_point():
            return torch.randn(shape, dtype=example_inputs.dtype, device=example_inputs.device)
        return example_inputs[:1].expand(shape).clone()
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(batch_of(x, batch_size) for x in example_inputs)
    return example_inputs
