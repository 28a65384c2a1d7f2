"""Sweep results people can read: a Hydra callback that gathers every job's ``summary.json``.

Registered in ``conf/hydra/default.yaml`` under ``hydra.callbacks``, so every multirun (basic,
joblib or submitit launcher; grid or Optuna sweeper) ends with, in its sweep directory:

- ``summary.csv``: one row a job: the job's number and folder, its overrides as columns (``norm``,
  ``seed``, ``data.name``...), every scalar of its ``summary.json``, and where it ran (pid, host,
  start and end time, written by the same callback's ``on_job_start``/``on_job_end``);
- ``summary.md``: one row per combination of the swept keys other than the seed, with ``n`` (the
  seeds that finished) and ``mean ± std`` of each metric over them (sample std, ``n - 1``);
- ``summary.png``: the first metric's mean ± std per combination, as grouped bars.

The tables are pure functions of the job rows (:func:`collect_rows`, :func:`aggregate`,
:func:`markdown_table`), which the tests call without Hydra. A job that wrote no ``summary.json``
(it crashed or was killed) is listed under the table, never silently dropped.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import socket
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

__all__ = [
    "SweepSummary",
    "at_launch",
    "jobs_at_once",
    "aggregate",
    "collect_rows",
    "markdown_table",
    "swept_keys",
    "write_sweep_summary",
]

log = logging.getLogger(__name__)

JOB_INFO = "job_info.json"
DEFAULT_METRICS = ("test/acc", "test/f1", "val/acc", "sparsity/global", "duration_s")


def at_launch(value: Any) -> Any:
    """``${at_launch:${task_name}}``: the value in the launching command's config, in every job.

    The resolver is cached, and Hydra copies the launching config's resolver cache into each job's
    config (the way ``${now:}`` gives every job the same time). The cache is keyed by the
    argument as written, so a sweep over experiments that each set their own ``task_name``
    (``-m +experiment=a,b``) still puts every job in one sweep folder and one dashboard group.
    In a single run it is just the value.
    """
    return value


OmegaConf.register_new_resolver("at_launch", at_launch, use_cache=True, replace=True)


def jobs_at_once(launcher: Any) -> int:
    """``${jobs_at_once:${hydra.launcher}}``: how many jobs the launcher runs side by side, for a
    sweeper that hands it jobs in batches (Optuna's ``n_jobs`` is its batch size: with 1, a
    parallel launcher gets one trial at a time).

    joblib's ``n_jobs`` (``-1`` = one per CPU, ``-2`` = all but one, as joblib counts), submitit's
    ``array_parallelism``, else 1 (the basic launcher runs one job at a time).
    """
    launcher = launcher if isinstance(launcher, (DictConfig, Mapping)) else {}
    n_jobs = launcher.get("n_jobs", None)
    if isinstance(n_jobs, int) and not isinstance(n_jobs, bool) and n_jobs != 0:
        return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    parallel = launcher.get("array_parallelism", None)
    if isinstance(parallel, int) and not isinstance(parallel, bool) and parallel > 0:
        return parallel
    return 1


OmegaConf.register_new_resolver("jobs_at_once", jobs_at_once, replace=True)


def _override_items(overrides: Iterable[str]) -> dict[str, str]:
    """``["norm=batch", "+experiment=x", "~tags"]`` -> ``{"norm": "batch", "experiment": "x"}``."""
    items = {}
    for text in overrides:
        key, sep, value = str(text).partition("=")
        if sep:
            items[key.lstrip("+~")] = value
    return items


def _job_overrides(job_dir: Path, hydra_subdir: str = ".hydra") -> dict[str, str]:
    path = job_dir / hydra_subdir / "overrides.yaml"
    if not path.is_file():
        return {}
    return _override_items(OmegaConf.to_container(OmegaConf.load(path)) or [])


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool))


def collect_rows(
    sweep_dir: Path, hydra_subdir: str = ".hydra"
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per job folder under ``sweep_dir`` (any depth, any subdir pattern).

    A job folder is one that holds ``<hydra_subdir>/overrides.yaml``. Returns ``(rows, missing)``:
    rows for the jobs with a ``summary.json`` (overrides, then its scalar values, then
    ``job_info.json`` if any), and the folders (relative) of the jobs without one.
    """
    sweep_dir = Path(sweep_dir)
    rows, missing = [], []
    job_dirs = sorted(
        {p.parent.parent for p in sweep_dir.rglob(f"{hydra_subdir}/overrides.yaml")},
        key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(sweep_dir).parts],
    )
    for job_dir in job_dirs:
        rel = str(job_dir.relative_to(sweep_dir)) or "."
        summary_path = job_dir / "summary.json"
        if not summary_path.is_file():
            missing.append(rel)
            continue
        row: dict[str, Any] = {"job": rel, **_job_overrides(job_dir, hydra_subdir)}
        summary = json.loads(summary_path.read_text())
        row.update({k: v for k, v in summary.items() if _scalar(v) and k not in row})
        info = job_dir / JOB_INFO
        if info.is_file():
            row.update({f"job/{k}": v for k, v in json.loads(info.read_text()).items()})
        rows.append(row)
    return rows, missing


def swept_keys(rows: Sequence[Mapping[str, Any]], candidates: Iterable[str]) -> list[str]:
    """The ``candidates`` (override keys, in the command's order) whose values differ by row."""
    keys: list[str] = []
    for key in candidates:
        if key not in keys and len({str(row.get(key)) for row in rows}) > 1:
            keys.append(key)
    return keys


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def aggregate(
    rows: Sequence[Mapping[str, Any]],
    group_by: Sequence[str],
    metrics: Sequence[str],
) -> list[dict[str, Any]]:
    """Mean and sample std of each metric over the rows sharing the values of ``group_by``.

    Returns one dict per group, in first-seen order: the group's values, ``n``, and
    ``<metric>`` -> ``(mean, std)`` for each metric present (as a number) in the group's rows.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k)) for k in group_by), []).append(row)
    out = []
    for values, members in groups.items():
        entry: dict[str, Any] = dict(zip(group_by, values, strict=True))
        entry["n"] = len(members)
        for metric in metrics:
            numbers = [
                float(r[metric])
                for r in members
                if isinstance(r.get(metric), (int, float))
                and not isinstance(r.get(metric), bool)
                and math.isfinite(float(r[metric]))
            ]
            if numbers:
                entry[metric] = _stats(numbers)
        out.append(entry)
    return out


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"


def _fmt_key(value: Any) -> str:
    """A swept value as typed, or with 4 significant digits when it is a long float (Optuna's)."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:.4g}" if len(text) > 8 and not number.is_integer() else text


def markdown_table(
    groups: Sequence[Mapping[str, Any]], group_by: Sequence[str], metrics: Sequence[str]
) -> str:
    """A Markdown table of :func:`aggregate`'s output: ``mean ± std (n)`` per metric."""
    shown = [m for m in metrics if any(m in g for g in groups)]
    header = [*group_by, "n", *shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for g in groups:
        cells = [_fmt_key(g[k]) for k in group_by] + [str(g["n"])]
        for m in shown:
            if m not in g:
                cells.append("")
            else:
                mean, std = g[m]
                cells.append(f"{_fmt(mean)} ± {_fmt(std)}" if g["n"] > 1 else _fmt(mean))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], first: Sequence[str]) -> None:
    columns = list(dict.fromkeys([*first, *(k for row in rows for k in row)]))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _plot(
    path: Path, groups: Sequence[Mapping[str, Any]], group_by: Sequence[str], metric: str
) -> bool:
    """Grouped bars of ``metric``: the last swept key as colours, the others along the x axis."""
    groups = [g for g in groups if metric in g]
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    hue_key = group_by[-1] if len(group_by) >= 2 else None
    x_keys = [k for k in group_by if k != hue_key]
    x_labels = list(
        dict.fromkeys(", ".join(f"{k}={g[k]}" for k in x_keys) or metric for g in groups)
    )
    hues = list(dict.fromkeys(g[hue_key] for g in groups)) if hue_key else [None]
    width = 0.8 / len(hues)
    fig, ax = plt.subplots(
        figsize=(max(4.0, 1.2 * len(x_labels) * max(1, len(hues)) ** 0.5 + 2), 3.6)
    )
    for h_index, hue in enumerate(hues):
        xs, means, stds = [], [], []
        for g in groups:
            if hue_key and g[hue_key] != hue:
                continue
            label = ", ".join(f"{k}={g[k]}" for k in x_keys) or metric
            xs.append(x_labels.index(label) + (h_index - (len(hues) - 1) / 2) * width)
            means.append(g[metric][0])
            stds.append(g[metric][1])
        ax.bar(
            xs, means, width, yerr=stds, capsize=3, label=f"{hue_key}={hue}" if hue_key else None
        )
    ax.set_xticks(range(len(x_labels)))
    ax.set_xticklabels(
        x_labels,
        rotation=20 if len(x_labels) > 3 else 0,
        ha="right" if len(x_labels) > 3 else "center",
    )
    ax.set_ylabel(f"{metric} (mean ± std)")
    if hue_key:
        ax.legend(fontsize="small", ncols=min(len(hues), 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_sweep_summary(
    sweep_dir: Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    seed_keys: Sequence[str] = ("seed",),
    order: Sequence[str] = (),
    title: str | None = None,
    hydra_subdir: str = ".hydra",
    filename: str = "summary",
    best: tuple[str, str] | None = None,
) -> dict[str, Path]:
    """Gather the jobs under ``sweep_dir`` and write ``<filename>.csv``, ``.md`` and ``.png``.

    Args:
        sweep_dir: the multirun's folder (``hydra.sweep.dir``).
        metrics: the ``summary.json`` keys to aggregate; the first one is plotted.
        seed_keys: swept keys averaged over (not grouped by).
        order: keys to put first among the columns (the sweep's own parameters).
        title: the Markdown heading.
        hydra_subdir: ``hydra.output_subdir`` (where each job's ``overrides.yaml`` is).
        filename: stem of the three files.
        best: ``(metric, "maximize" | "minimize")``: name the best job under the table (a
            sweeper's objective).

    Returns:
        The paths written, by suffix (``csv``, ``md``, and ``png`` when there was a value to plot).
    """
    sweep_dir = Path(sweep_dir)
    rows, missing = collect_rows(sweep_dir, hydra_subdir)
    override_keys = [k for job in _job_dirs_overrides(sweep_dir, hydra_subdir) for k in job]
    swept = swept_keys(rows, [*order, *override_keys])
    group_by = [k for k in swept if k not in seed_keys]
    written: dict[str, Path] = {}

    csv_path = sweep_dir / f"{filename}.csv"
    _write_csv(csv_path, rows, ["job", *swept])
    written["csv"] = csv_path

    groups = aggregate(rows, group_by, metrics)
    lines = [f"# {title or sweep_dir.name}", ""]
    if rows:
        seeds = ", ".join(k for k in seed_keys if k in swept)
        how = (
            f"mean ± std (sample std) over {seeds}" if seeds else "no seed swept: one value per job"
        )
        lines += [
            f"{len(rows)} jobs; {how}; n = jobs per row.",
            "",
            markdown_table(groups, group_by, metrics),
        ]
    else:
        lines.append("No job wrote a summary.json.")
    if best and rows:
        metric, direction = best
        scored = [r for r in rows if isinstance(r.get(metric), (int, float))]
        if scored:
            pick = (max if direction == "maximize" else min)(scored, key=lambda r: float(r[metric]))
            values = ", ".join(f"{k}={_fmt_key(pick.get(k))}" for k in swept) or "no swept key"
            lines += [
                "",
                f"Best job ({direction} {metric}): {pick['job']}: {values}"
                f" -> {metric}={pick[metric]:.4f}",
            ]
    if missing:
        lines += [
            "",
            f"{len(missing)} job(s) wrote no summary.json (failed or unfinished): "
            + ", ".join(missing),
        ]
    md_path = sweep_dir / f"{filename}.md"
    md_path.write_text("\n".join(lines) + "\n")
    written["md"] = md_path

    png_path = sweep_dir / f"{filename}.png"
    try:
        if rows and _plot(
            png_path,
            groups,
            group_by,
            next((m for m in metrics if any(m in g for g in groups)), metrics[0]),
        ):
            written["png"] = png_path
    except Exception as err:  # noqa: BLE001 - a plot must never lose the tables
        log.warning("sweep summary: no plot (%s: %s)", type(err).__name__, err)
    return written


def _job_dirs_overrides(sweep_dir: Path, hydra_subdir: str) -> list[dict[str, str]]:
    return [
        _override_items(OmegaConf.to_container(OmegaConf.load(p)) or [])
        for p in sorted(sweep_dir.rglob(f"{hydra_subdir}/overrides.yaml"))
    ]


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, write ``summary.csv``, ``summary.md`` and
    ``summary.png`` in the sweep directory (see :func:`write_sweep_summary`).

    At the start it fixes the sweep's dashboard group (``paths.group``) for every job. Each job
    also gets a ``job_info.json`` (pid, host, start, end, status) from ``on_job_start`` /
    ``on_job_end``, which run where the job runs (a joblib worker, a SLURM node); the summary runs
    in the launching process once every job has returned.

    Args:
        metrics: the ``summary.json`` keys to aggregate; the first is plotted.
        seed_keys: the swept keys to average over rather than group by.
        filename: stem of the files written.
    """

    def __init__(
        self,
        metrics: Sequence[str] = DEFAULT_METRICS,
        seed_keys: Sequence[str] = ("seed",),
        filename: str = "summary",
    ) -> None:
        metrics, seed_keys = list(metrics), list(seed_keys)
        if not metrics or not all(isinstance(m, str) and m for m in metrics):
            raise ValueError(
                "SweepSummary: metrics must be a non-empty list of summary.json keys, "
                f"got {metrics!r}"
            )
        if not isinstance(filename, str) or not filename or "/" in filename:
            raise ValueError(f"SweepSummary: filename must be a plain file stem, got {filename!r}")
        self.metrics = metrics
        self.seed_keys = seed_keys
        self.filename = filename
        self._started = 0.0

    @override
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Resolve the dashboards' group (``${task_name}_${now:...}``) once, here in the launching
        # process: Hydra copies this config's resolver cache into every job (joblib and submitit
        # pickle it along), so all jobs of the sweep share one group, also with a fixed
        # ``hydra.sweep.dir`` where ``now`` would otherwise be read when each job starts.
        try:
            OmegaConf.select(config, "paths.group")
        except Exception as err:  # noqa: BLE001 - a config without paths.group is fine
            log.debug("sweep summary: paths.group not resolved (%s)", err)

    @override
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    @override
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        output_dir = Path(str(config.hydra.runtime.output_dir))
        status = getattr(getattr(job_return, "status", None), "name", "UNKNOWN")
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": self._started,
            "end": time.time(),
            "status": status,
        }
        if output_dir.is_dir():
            (output_dir / JOB_INFO).write_text(json.dumps(info, indent=2))

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            log.warning("sweep summary: no sweep folder %s", sweep_dir)
            return
        order = list(_override_items(config.hydra.overrides.task))
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        order += [k for k in params if k not in order]
        metrics = list(self.metrics)
        optimized = OmegaConf.select(config, "optimized_metric")
        direction = OmegaConf.select(config, "hydra.sweeper.direction")
        direction = getattr(direction, "name", direction)  # Optuna's schema gives an Enum
        best = None
        if optimized and isinstance(direction, str) and direction in ("maximize", "minimize"):
            # A sweeper with an objective (Optuna): its metric first, and the best job named.
            metrics = [str(optimized), *(m for m in metrics if m != optimized)]
            best = (str(optimized), direction)
        written = write_sweep_summary(
            sweep_dir,
            metrics=metrics,
            seed_keys=self.seed_keys,
            order=order,
            title=f"{OmegaConf.select(config, 'task_name') or 'sweep'}: {sweep_dir}",
            hydra_subdir=str(config.hydra.output_subdir or ".hydra"),
            filename=self.filename,
            best=best,
        )
        text = written["md"].read_text()
        log.info("sweep summary: %s\n%s", ", ".join(str(p) for p in written.values()), text)
