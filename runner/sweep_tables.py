"""The sweep summary's tables, as pure functions of the job rows (no Hydra, no files).

- :func:`aggregate`: mean and sample std of each metric per combination of the grouping keys;
- :func:`markdown_table`: the long table (one row per combination);
- :func:`wide_table`: the same numbers pivoted, rows by the first key, columns by the others;
- :func:`select_best`: a swept key chosen per arm on another metric (e.g. the learning rate on
  ``val/acc``), keeping only the chosen jobs;
- :func:`mark_unfit`: arms whose training metric stays below a bar lose their test numbers.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FitBar",
    "Selection",
    "Summary",
    "aggregate",
    "arm_name",
    "best_line",
    "cell",
    "fmt_key",
    "mark_unfit",
    "partition",
    "report_lines",
    "summarize",
    "markdown_table",
    "select_best",
    "wide_table",
]

log = logging.getLogger("runner.sweeps")

UNFIT = "did_not_fit"  # the key :func:`mark_unfit` sets on a group: the text its test cells show


def _options(name: str, value: Any, fields: Sequence[str], required: int) -> dict[str, Any]:
    """``value`` as keyword arguments, or a ValueError naming the option and what it takes."""
    if not isinstance(value, Mapping) or any(k not in value for k in fields[:required]):
        raise ValueError(f"SweepSummary: {name} must be a mapping with {', '.join(fields[:required])}, got {value!r}")
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"SweepSummary: {name} has unknown keys {unknown}; it takes {list(fields)}")
    return dict(value)


@dataclass(frozen=True)
class Selection:
    """Choose ``key`` per arm: the value with the best mean ``by`` (``mode``: max or min)."""

    key: str
    by: str
    mode: str = "max"

    def __post_init__(self) -> None:
        names = all(isinstance(v, str) and v for v in (self.key, self.by))
        if not names or self.mode not in ("max", "min"):
            raise ValueError(f"SweepSummary: select needs key and by as names and mode max or min, got {self}")

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | None) -> Selection | None:
        """``{key: module.lr, by: val/acc, mode: max}`` (``None``: no selection)."""
        return None if value is None else cls(**_options("select", value, ["key", "by", "mode"], 2))


@dataclass(frozen=True)
class FitBar:
    """An arm fits when its mean ``metric`` (over seeds) is at least ``min``."""

    metric: str
    min: float

    def __post_init__(self) -> None:
        number = isinstance(self.min, (int, float)) and not isinstance(self.min, bool)
        if not (isinstance(self.metric, str) and self.metric) or not number:
            raise ValueError(f"SweepSummary: fit needs metric as a name and min as a number, got {self}")

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | None) -> FitBar | None:
        """``{metric: train/acc, min: 0.95}`` (``None``: no bar)."""
        return None if value is None else cls(**_options("fit", value, ["metric", "min"], 2))


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _numbers(rows: Sequence[Mapping[str, Any]], metric: str) -> list[float]:
    return [
        float(r[metric])
        for r in rows
        if isinstance(r.get(metric), (int, float))
        and not isinstance(r.get(metric), bool)
        and math.isfinite(float(r[metric]))
    ]


def partition(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[tuple[str, ...], list[Mapping[str, Any]]]:
    """The rows by their values of ``keys`` (as text), in first-seen order."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k)) for k in keys), []).append(row)
    return groups


def aggregate(
    rows: Sequence[Mapping[str, Any]],
    group_by: Sequence[str],
    metrics: Sequence[str],
) -> list[dict[str, Any]]:
    """Mean and sample std of each metric over the rows sharing the values of ``group_by``.

    Returns one dict per group, in first-seen order: the group's values, ``n``, and
    ``<metric>`` -> ``(mean, std)`` for each metric present (as a number) in the group's rows.
    """
    out = []
    for values, members in partition(rows, group_by).items():
        entry: dict[str, Any] = dict(zip(group_by, values, strict=True))
        entry["n"] = len(members)
        for metric in metrics:
            numbers = _numbers(members, metric)
            if numbers:
                entry[metric] = _stats(numbers)
        out.append(entry)
    return out


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"


def fmt_key(value: Any) -> str:
    """A swept value as typed, or with 4 significant digits when it is a long float (Optuna's)."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:.4g}" if len(text) > 8 and not number.is_integer() else text


def arm_name(group: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``norm=batch, data.name=GunPoint``: the group's values of ``keys``."""
    return ", ".join(f"{k}={fmt_key(group[k])}" for k in keys) or "all jobs"


def cell(group: Mapping[str, Any], metric: str) -> str:
    """``mean ± std`` (``mean`` alone when n = 1), empty when the metric is missing, and the
    :func:`mark_unfit` text instead of any ``test/`` number of an arm that did not fit."""
    if metric.startswith("test/") and UNFIT in group:
        return str(group[UNFIT])
    if metric not in group:
        return ""
    mean, std = group[metric]
    return f"{_fmt(mean)} ± {_fmt(std)}" if group["n"] > 1 else _fmt(mean)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: Sequence[str]) -> list[str]:
    return [_row(cells), "|" + "|".join(" --- " for _ in cells) + "|"]


def markdown_table(groups: Sequence[Mapping[str, Any]], group_by: Sequence[str], metrics: Sequence[str]) -> str:
    """The long table of :func:`aggregate`'s output: one row per group, ``mean ± std`` per metric."""
    shown = [m for m in metrics if any(m in g for g in groups)]
    lines = _header([*group_by, "n", *shown])
    for g in groups:
        lines.append(_row([fmt_key(g[k]) for k in group_by] + [str(g["n"])] + [cell(g, m) for m in shown]))
    return "\n".join(lines)


def wide_table(groups: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str) -> str:
    """``metric`` pivoted: one row per value of ``keys[0]``, one column per combination of the
    other keys (``a=1, b=x``), each cell ``mean ± std (n)`` as in the long table (empty when the
    sweep has no such job)."""
    first, others = keys[0], list(keys[1:])
    columns = list(dict.fromkeys(arm_name(g, others) for g in groups))
    cells: dict[tuple[str, str], str] = {}
    for g in groups:
        text = cell(g, metric)
        if text and g["n"] > 1 and UNFIT not in g:
            text += f" ({g['n']})"
        cells[(str(g[first]), arm_name(g, others))] = text
    lines = _header([f"{first} \\ {metric}", *columns])
    for value in dict.fromkeys(str(g[first]) for g in groups):
        lines.append(_row([fmt_key(value), *(cells.get((value, c), "") for c in columns)]))
    return "\n".join(lines)


def select_best(
    rows: Sequence[Mapping[str, Any]], arms: Sequence[str], selection: Selection
) -> tuple[list[Mapping[str, Any]], list[dict[str, Any]]]:
    """Per combination of ``arms`` (the swept keys other than the seed and ``selection.key``),
    the value of ``selection.key`` whose rows have the best mean ``selection.by``; the first
    in sweep order wins a tie, and a value without any ``by`` number never wins.

    Returns the rows of the chosen values only, and one dict per arm: its values of ``arms``,
    ``selection.key`` -> the chosen value, ``selection.by`` -> its mean.
    """
    pick = max if selection.mode == "max" else min
    kept: list[Mapping[str, Any]] = []
    choices: list[dict[str, Any]] = []
    for values, members in partition(rows, arms).items():
        candidates = {
            value: statistics.fmean(scores)
            for value, same in partition(members, [selection.key]).items()
            if (scores := _numbers(same, selection.by))
        }
        if not candidates:
            continue
        chosen = pick(candidates, key=candidates.__getitem__)  # first-seen wins a tie
        kept += [r for r in members if str(r.get(selection.key)) == chosen[0]]
        choices.append(
            {**dict(zip(arms, values, strict=True)), selection.key: chosen[0], selection.by: candidates[chosen]}
        )
    return kept, choices


def mark_unfit(groups: Sequence[dict[str, Any]], fit: FitBar) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Mark the groups whose mean ``fit.metric`` is below ``fit.min`` (their test cells then read
    ``did not fit (train/acc 0.45)``). Returns ``(unfit, unknown)``: the marked groups and those
    without any ``fit.metric`` number (left unmarked: nothing says they did not fit)."""
    unfit, unknown = [], []
    for g in groups:
        if fit.metric not in g:
            unknown.append(g)
        elif g[fit.metric][0] < fit.min:
            g[UNFIT] = f"did not fit ({fit.metric} {_fmt(g[fit.metric][0])})"
            unfit.append(g)
    return unfit, unknown


@dataclass
class Summary:
    """What the tables and the plot are drawn from, once the options are applied."""

    rows: list[dict[str, Any]]  # the jobs reported (the chosen ones under ``select``)
    swept: list[str]  # every swept key, seeds included
    group_by: list[str]  # the long table's keys (the selected key included)
    arms: list[str]  # the wide table's and the plot's keys (the selected key left out)
    groups: list[dict[str, Any]]
    notes: list[str]


def _select(rows: list[dict[str, Any]], group_by: list[str], select: Selection | None, notes: list[str]):
    """Apply ``select`` (when its key is swept): the chosen rows, the arms' keys, notes naming the choices."""
    if select is None:
        return rows, group_by
    if select.key not in group_by:
        notes.append(f"select: {select.key} is not swept; nothing chosen.")
        log.warning("sweep summary: select: %s is not swept; nothing chosen", select.key)
        return rows, group_by
    arms = [k for k in group_by if k != select.key]
    kept, choices = select_best(rows, arms, select)
    notes.append(f"{select.key} chosen per arm by the best mean {select.by} ({select.mode}), seeds averaged:")
    notes += [
        f"- {arm_name(c, arms)}: {select.key}={fmt_key(c[select.key])} ({select.by} {c[select.by]:.3f})"
        for c in choices
    ]
    chosen = {id(r) for r in kept}
    return [r for r in rows if id(r) in chosen], arms


def _check_fit(summary: Summary, fit: FitBar | None) -> None:
    """Mark the arms below the fit bar (and their rows, for the plot), with a warning each."""
    if fit is None:
        return
    unfit, unknown = mark_unfit(summary.groups, fit)
    for g in unfit:
        arm = arm_name(g, summary.group_by)
        summary.notes.append(
            f"Did not fit: {arm}: mean {fit.metric} {g[fit.metric][0]:.3f} < {fit.min}; no test number reported."
        )
        log.warning(
            "sweep summary: %s did not fit its training set (%s %.3f < %s)", arm, fit.metric, g[fit.metric][0], fit.min
        )
        for row in summary.rows:
            if all(str(row.get(k)) == g[k] for k in summary.group_by):
                row[UNFIT] = g[UNFIT]
    if unknown:
        arms = "; ".join(arm_name(g, summary.group_by) for g in unknown)
        summary.notes.append(f"Fit not checked (no {fit.metric} in summary.json or metrics.csv): {arms}.")
        log.warning("sweep summary: no %s for %s: fit not checked", fit.metric, arms)


def summarize(
    rows: list[dict[str, Any]],
    swept: list[str],
    seed_keys: Sequence[str],
    metrics: Sequence[str],
    select: Selection | None,
    fit: FitBar | None,
) -> Summary:
    """Group the rows by the swept keys other than the seeds, after ``select`` and with ``fit``."""
    notes: list[str] = []
    group_by = [k for k in swept if k not in seed_keys]
    rows, arms = _select(rows, group_by, select, notes)
    summary = Summary(rows, swept, group_by, arms, aggregate(rows, group_by, metrics), notes)
    _check_fit(summary, fit)
    return summary


def best_line(rows: Sequence[Mapping[str, Any]], swept: Sequence[str], best: tuple[str, str]) -> list[str]:
    """``Best job (maximize val/acc): 3: module.lr=0.001 -> val/acc=0.9000`` (``best``: metric, direction)."""
    metric, direction = best
    scored = [r for r in rows if isinstance(r.get(metric), (int, float))]
    if not scored:
        return []
    pick = (max if direction == "maximize" else min)(scored, key=lambda r: float(r[metric]))
    values = ", ".join(f"{k}={fmt_key(pick.get(k))}" for k in swept) or "no swept key"
    return ["", f"Best job ({direction} {metric}): {pick['job']}: {values} -> {metric}={pick[metric]:.4f}"]


def report_lines(s: Summary, metrics: Sequence[str], seed_keys: Sequence[str], wide: bool) -> list[str]:
    """summary.md's body: what n and ± mean, the long table, the wide one (``wide``), the notes."""
    seeds = ", ".join(k for k in seed_keys if k in s.swept)
    how = f"mean ± std (sample std) over {seeds}" if seeds else "no seed swept: one value per job"
    lines = [f"{len(s.rows)} jobs; {how}; n = jobs per row.", "", markdown_table(s.groups, s.group_by, metrics)]
    shown = next((m for m in metrics if any(m in g for g in s.groups)), None)
    if wide and shown and len(s.arms) >= 2:
        lines += [
            "",
            f"{shown}, wide: rows by {s.arms[0]}, columns by {', '.join(s.arms[1:])}.",
            "",
            wide_table(s.groups, s.arms, shown),
        ]
    return lines + ([""] + s.notes if s.notes else [])
