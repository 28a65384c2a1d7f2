"""The benchmarks' shared options: torch threads, seed, which clock times a step, and where the
results go.

By default the clock is the CPU time of the training thread (``time.thread_time``) with torch on
one thread: other processes on a shared machine do not inflate it. ``wall`` is elapsed time
(``time.perf_counter``), the only meaningful clock on a GPU, where the work is not on this thread.

``benchmarks/results/`` holds the committed numbers of full runs: a ``--quick`` run writes to
``--out`` or a new temporary folder, never there (:func:`results_folder`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "RESULTS",
    "add_clock_args",
    "add_output_args",
    "clock",
    "parse_with_output",
    "results_folder",
    "write_results",
]

#: The committed results of full runs.
RESULTS = Path(__file__).resolve().parent / "results"


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


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--quick`` and ``--out`` with the meaning every benchmark shares (see :func:`results_folder`)."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the .md and .json (default: benchmarks/results; with --quick a new temporary folder)",
    )


def results_folder(out: Path | None, quick: bool, results: Path = RESULTS) -> Path:
    """Where a benchmark writes: ``out`` when given, else ``results`` for a full run and a new
    temporary folder for a quick one. A quick run never writes into ``results`` (its numbers are
    smoke-test numbers, not the committed ones): asking for it is a ``ValueError``."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix="sparsekit-bench-")) if quick else results
    if quick and Path(out).resolve() == Path(results).resolve():
        raise ValueError(
            f"--quick writes smoke-test numbers: not into {results} (the committed full-run results); "
            "leave out --out or give another folder"
        )
    return Path(out)


def parse_with_output(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Path]:
    """Add ``--out``, parse ``argv`` and resolve where the results go (:func:`results_folder`; the
    parser must define ``--quick``); a quick run asked to write into the results is a usage error."""
    add_output_args(parser)
    args = parser.parse_args(argv)
    try:
        return args, results_folder(args.out, args.quick)
    except ValueError as err:
        parser.error(str(err))


def write_results(out: Path, name: str, markdown: str, result: dict) -> None:
    """``{out}/{name}.md`` and ``{out}/{name}.json``, then the table and where it went, printed."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(markdown)
    print(f"written: {out / f'{name}.md'}")
