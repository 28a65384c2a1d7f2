"""Sweep results people can read: a Hydra callback that gathers every job's ``summary.json``.

Registered in ``conf/hydra/default.yaml`` under ``hydra.callbacks``, so every multirun (basic,
joblib or submitit launcher; grid or Optuna sweeper) ends with, in its sweep directory:

- ``summary.csv``: one row a job: the job's number and folder, its overrides as columns (``norm``,
  ``seed``, ``data.name``...), every scalar of its ``summary.json``, and where it ran (pid, host,
  start and end time, written by the same callback's ``on_job_start``/``on_job_end``);
- ``summary.md``: one row per combination of the swept keys other than the seed, with ``n`` (the
  seeds that finished) and ``mean ± std`` of each metric over them (sample std, ``n - 1``), then
  the first metric as a wide table (rows: the first swept key; columns: the others);
- ``summary.png``: the first metric, one panel per swept key other than the first (whose values
  are the colours); an Optuna sweep gets Optuna's own slice, history and importance plots.

Two options make a fair comparison (both off by default; ``hydra.callbacks.sweep_summary.*``):
``select: {key: module.lr, by: val/acc}`` keeps, per arm, the value of ``key`` with the best mean
``by``; ``fit: {metric: train/acc, min: 0.95}`` shows ``did not fit`` instead of the test numbers
of an arm whose mean training metric is below the bar.

The tables are pure functions of the job rows (:func:`collect_rows`, and
:mod:`runner.sweep_tables`), which the tests call without Hydra. A job that wrote no ``summary.json``
(it crashed or was killed) is listed under the table, never silently dropped.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

from runner.sweep_tables import (
    FitBar,
    Selection,
    Summary,
    aggregate,
    best_line,
    markdown_table,
    report_lines,
    summarize,
    wide_table,
)

__all__ = [
    "FitBar",
    "Selection",
    "SweepSummary",
    "at_launch",
    "jobs_at_once",
    "aggregate",
    "collect_rows",
    "markdown_table",
    "swept_keys",
    "wide_table",
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


def _last_logged(job_dir: Path, key: str) -> float | None:
    """The last value of ``key`` in the job's CSV logger file (``<job>/**/metrics.csv``), if any:
    ``summary.json`` holds the validation and test metrics, not the training ones."""
    for path in sorted(job_dir.rglob("metrics.csv")):
        with path.open(newline="") as f:
            values = [row[key] for row in csv.DictReader(f) if row.get(key) not in (None, "")]
        if values:
            return float(values[-1])
    return None


def _job_row(job_dir: Path, rel: str, hydra_subdir: str, logged: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"job": rel, **_job_overrides(job_dir, hydra_subdir)}
    summary = json.loads((job_dir / "summary.json").read_text())
    row.update({k: v for k, v in summary.items() if _scalar(v) and k not in row})
    for key in logged:
        if key not in row and (value := _last_logged(job_dir, key)) is not None:
            row[key] = value
    info = job_dir / JOB_INFO
    if info.is_file():
        row.update({f"job/{k}": v for k, v in json.loads(info.read_text()).items()})
    return row


def collect_rows(
    sweep_dir: Path, hydra_subdir: str = ".hydra", logged: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per job folder under ``sweep_dir`` (any depth, any subdir pattern).

    A job folder is one that holds ``<hydra_subdir>/overrides.yaml``. Returns ``(rows, missing)``:
    rows for the jobs with a ``summary.json`` (overrides, then its scalar values, then each of
    ``logged`` that the summary lacks, read from the job's CSV logger, then ``job_info.json`` if
    any), and the folders (relative) of the jobs without one.
    """
    sweep_dir = Path(sweep_dir)
    rows, missing = [], []
    job_dirs = sorted(
        {p.parent.parent for p in sweep_dir.rglob(f"{hydra_subdir}/overrides.yaml")},
        key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(sweep_dir).parts],
    )
    for job_dir in job_dirs:
        rel = str(job_dir.relative_to(sweep_dir)) or "."
        if (job_dir / "summary.json").is_file():
            rows.append(_job_row(job_dir, rel, hydra_subdir, logged))
        else:
            missing.append(rel)
    return rows, missing


def swept_keys(rows: Sequence[Mapping[str, Any]], candidates: Iterable[str]) -> list[str]:
    """The ``candidates`` (override keys, in the command's order) whose values differ by row."""
    keys: list[str] = []
    for key in candidates:
        if key not in keys and len({str(row.get(key)) for row in rows}) > 1:
            keys.append(key)
    return keys


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], first: Sequence[str]) -> None:
    columns = list(dict.fromkeys([*first, *(k for row in rows for k in row)]))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plots(sweep_dir: Path, filename: str, s: Summary, metric: str, seed_keys: Sequence[str],
           optuna: tuple[Mapping[str, str], str] | None) -> dict[str, Path]:
    """``<filename>.png`` (Optuna's slice plot in an Optuna sweep) and Optuna's other figures."""
    from runner.sweep_plots import optuna_figures, summary_figure  # matplotlib only when plotting

    written: dict[str, Path] = {}
    try:
        if optuna:
            figures = optuna_figures(s.rows, optuna[0], metric, optuna[1])
            for name, fig in figures.items():
                key, stem = ("png", filename) if name == "slice" else (f"{name}_png", f"{filename}_{name}")
                written[key] = _save(fig, sweep_dir / f"{stem}.png")
        elif (fig := summary_figure(s.rows, s.arms, metric, seed_keys)) is not None:
            written["png"] = _save(fig, sweep_dir / f"{filename}.png")
    except Exception as err:  # noqa: BLE001 - a plot must never lose the tables
        log.warning("sweep summary: no plot (%s: %s)", type(err).__name__, err)
    return written


def write_sweep_summary(
    sweep_dir: Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    seed_keys: Sequence[str] = ("seed",),
    order: Sequence[str] = (),
    title: str | None = None,
    hydra_subdir: str = ".hydra",
    filename: str = "summary",
    best: tuple[str, str] | None = None,
    select: Selection | None = None,
    fit: FitBar | None = None,
    search_space: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Gather the jobs under ``sweep_dir`` and write ``<filename>.csv``, ``.md`` and ``.png``.

    Args:
        sweep_dir: the multirun's folder (``hydra.sweep.dir``).
        metrics: the ``summary.json`` keys to aggregate; the first one is plotted and pivoted.
        seed_keys: swept keys averaged over (not grouped by).
        order: keys to put first among the columns (the sweep's own parameters).
        title: the Markdown heading.
        hydra_subdir: ``hydra.output_subdir`` (where each job's ``overrides.yaml`` is).
        filename: stem of the files.
        best: ``(metric, "maximize" | "minimize")``: name the best job under the table (a
            sweeper's objective).
        select: choose one value of a swept key per arm (e.g. the learning rate by ``val/acc``);
            the tables and the plot report only the chosen jobs.
        fit: arms whose mean training metric is below the bar show ``did not fit`` for their test
            numbers.
        search_space: with ``best``, the Optuna sweeper's ``params``: the pictures are then
            Optuna's (slice as ``<filename>.png``, ``<filename>_history.png``,
            ``<filename>_importances.png``) and there is no wide table.

    Returns:
        The paths written, by kind (``csv``, ``md``, ``png``, and Optuna's ``history_png`` and
        ``importances_png``), plotted files only when there was a value to plot.
    """
    sweep_dir = Path(sweep_dir)
    extra = [m for m in (select.by if select else None, fit.metric if fit else None) if m]
    metrics = list(dict.fromkeys([*metrics, *extra]))
    rows, missing = collect_rows(sweep_dir, hydra_subdir, logged=[fit.metric] if fit else [])
    override_keys = [k for job in _job_dirs_overrides(sweep_dir, hydra_subdir) for k in job]
    swept = swept_keys(rows, [*order, *override_keys])
    csv_path = sweep_dir / f"{filename}.csv"
    _write_csv(csv_path, rows, ["job", *swept])
    written: dict[str, Path] = {"csv": csv_path}

    s = summarize(rows, swept, seed_keys, metrics, select, fit)
    optuna = (search_space, best[1]) if best and search_space else None
    lines = [f"# {title or sweep_dir.name}", ""]
    lines += report_lines(s, metrics, seed_keys, wide=optuna is None) if rows else ["No job wrote a summary.json."]
    lines += best_line(rows, swept, best) if best else []
    if missing:
        lines += ["", f"{len(missing)} job(s) wrote no summary.json (failed or unfinished): " + ", ".join(missing)]
    md_path = sweep_dir / f"{filename}.md"
    md_path.write_text("\n".join(lines) + "\n")
    written["md"] = md_path
    plotted = next((m for m in metrics if any(m in g for g in s.groups)), None)
    if rows and plotted:
        written.update(_plots(sweep_dir, filename, s, plotted, seed_keys, optuna))
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
        select: ``{key, by, mode}``: per arm, keep only the value of the swept ``key`` with the best
            mean ``by`` (``mode`` ``max``, the default, or ``min``), seeds averaged.
        fit: ``{metric, min}``: an arm whose mean ``metric`` is below ``min`` did not fit; its
            test numbers are not reported.
    """

    def __init__(
        self,
        metrics: Sequence[str] = DEFAULT_METRICS,
        seed_keys: Sequence[str] = ("seed",),
        filename: str = "summary",
        select: Mapping[str, Any] | None = None,
        fit: Mapping[str, Any] | None = None,
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
        self.select = Selection.from_config(select)
        self.fit = FitBar.from_config(fit)
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
        space = OmegaConf.to_container(params) if best and isinstance(params, DictConfig) else None
        written = write_sweep_summary(
            sweep_dir,
            metrics=metrics,
            seed_keys=self.seed_keys,
            order=order,
            title=f"{OmegaConf.select(config, 'task_name') or 'sweep'}: {sweep_dir}",
            hydra_subdir=str(config.hydra.output_subdir or ".hydra"),
            filename=self.filename,
            best=best,
            select=self.select,
            fit=self.fit,
            search_space={str(k): str(v) for k, v in space.items()} if space else None,
        )
        text = written["md"].read_text()
        log.info("sweep summary: %s\n%s", ", ".join(str(p) for p in written.values()), text)
