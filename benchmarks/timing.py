"""The benchmarks' shared clock options: torch threads, seed, and which clock times a step.

By default the clock is the CPU time of the training thread (``time.thread_time``) with torch on
one thread: other processes on a shared machine do not inflate it. ``wall`` is elapsed time
(``time.perf_counter``), the only meaningful clock on a GPU, where the work is not on this thread.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

__all__ = ["add_clock_args", "clock"]


def add_clock_args(parser: argparse.ArgumentParser) -> None:
    """``--threads``, ``--seed`` and ``--clock`` with the defaults every benchmark uses."""
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = steadiest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: CPU time of the training thread (steady on a shared machine, needs --threads 1);"
        " wall: elapsed time (always on a GPU)",
    )


def clock(kind: str, accelerator: str = "cpu") -> Callable[[], float]:
    """The function that reads the clock ``kind`` (``cpu`` or ``wall``); wall on an accelerator."""
    return time.perf_counter if kind == "wall" or accelerator != "cpu" else time.thread_time
