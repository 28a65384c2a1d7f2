"""The sweep summary's pictures: readable for any sweep.

- :func:`summary_figure`: one panel per swept key other than the grouping key (the first swept
  key, drawn as colours); bars of the metric's mean, error bars only where n > 1 with the std
  named on the axis, the y axis zoomed to the data, tick labels that never overlap.
- :func:`optuna_figures`: an Optuna sweep drawn with ``optuna.visualization.matplotlib``
  (optimization history, parameter importances, slice), from the jobs' rows.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from runner.sweep_tables import UNFIT, fmt_key, partition  # noqa: E402

__all__ = ["Bar", "bars", "error_label", "optuna_figures", "summary_figure", "overlapping_labels", "wrap_label"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bar:
    """One bar: its colour (``hue``) and slot (``x``) values, the metric's mean and sample std over
    its ``n`` jobs, and ``note`` (``did not fit ...``) where no number may be shown."""

    hue: str
    x: str
    mean: float
    std: float
    n: int
    note: str = ""


def _numbers(members: Sequence[Mapping[str, Any]], metric: str) -> list[float]:
    return [float(r[metric]) for r in members if isinstance(r.get(metric), (int, float))]


def bars(rows: Sequence[Mapping[str, Any]], hue: str | None, x: str | None, metric: str) -> list[Bar]:
    """The rows pooled by their ``hue`` and ``x`` values (every other key averaged over). A bar
    pooling a job marked ``did_not_fit`` (see :func:`runner.sweep_tables.mark_unfit`) shows no
    number when ``metric`` is a test metric."""
    out = []
    keys = [k for k in (hue, x) if k]
    for values, members in partition(rows, keys).items():
        named = dict(zip(keys, values, strict=True))
        numbers = _numbers(members, metric)
        if not numbers:
            continue
        mean = sum(numbers) / len(numbers)
        std = (sum((v - mean) ** 2 for v in numbers) / (len(numbers) - 1)) ** 0.5 if len(numbers) > 1 else 0.0
        notes = [str(r[UNFIT]) for r in members if r.get(UNFIT)] if metric.startswith("test/") else []
        out.append(Bar(named.get(hue, ""), named.get(x, metric), mean, std, len(numbers), notes[0] if notes else ""))
    return out


def error_label(metric: str, ns: Sequence[int], over: Sequence[str]) -> str:
    """The y label: the metric and what its error bars are (or that there are none)."""
    top, low = max(ns, default=1), min(ns, default=1)
    if top <= 1:
        return f"{metric} (one job per bar, no error bars)"
    n = f"n = {top}" if low == top else f"n = {low}–{top}; no bar where n = 1"
    return f"{metric}: mean ± sample std\nover {', '.join(over) or 'jobs'} ({n})"


def _limits(drawn: Sequence[Bar]) -> tuple[float, float]:
    """A y range hugging the bars' tops and error bars, with 15% headroom either side."""
    low = min(b.mean - (b.std if b.n > 1 else 0.0) for b in drawn)
    high = max(b.mean + (b.std if b.n > 1 else 0.0) for b in drawn)
    pad = 0.15 * (high - low) or max(abs(high) * 0.02, 1e-3)
    bottom = low - pad
    if low >= 0 > bottom:
        bottom = 0.0
    return bottom, high + pad


def _draw_panel(ax: Axes, panel: Sequence[Bar], hues: Sequence[str], hue_key: str | None) -> None:
    xs = list(dict.fromkeys(b.x for b in panel))
    width = 0.8 / len(hues)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, hue in enumerate(hues):
        own = [b for b in panel if b.hue == hue]
        shift = (i - (len(hues) - 1) / 2) * width
        pos = [xs.index(b.x) + shift for b in own]
        colour = colours[i % len(colours)]
        drawn = [(p, b) for p, b in zip(pos, own, strict=True) if not b.note]
        ax.bar(
            [p for p, _ in drawn],
            [b.mean for _, b in drawn],
            width,
            color=colour,
            label=f"{hue_key}={fmt_key(hue)}" if hue_key else None,
        )
        spread = [(p, b) for p, b in drawn if b.n > 1]
        if spread:
            ax.errorbar(
                [p for p, _ in spread],
                [b.mean for _, b in spread],
                yerr=[b.std for _, b in spread],
                fmt="none",
                ecolor="black",
                capsize=3,
                lw=1,
            )
        for p, b in ((p, b) for p, b in zip(pos, own, strict=True) if b.note):
            ax.text(
                p,
                0.03,
                b.note.replace(" (", "\n("),
                transform=ax.get_xaxis_transform(),
                rotation=90,
                ha="center",
                va="bottom",
                fontsize="x-small",
                color=colour,
            )
    ax.set_xticks(range(len(xs)), [wrap_label(fmt_key(x)) for x in xs])
    drawn_bars = [b for b in panel if not b.note]
    if drawn_bars:
        ax.set_ylim(*_limits(drawn_bars))
    ax.grid(axis="y", alpha=0.3)


def overlapping_labels(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of tick labels of one axes whose drawn boxes overlap (the renderer's extents)."""
    renderer = fig.canvas.get_renderer()
    pairs = []
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels(which="both") if t.get_text() and t.get_visible()]
        boxes = [t.get_window_extent(renderer) for t in labels]
        pairs += [
            (labels[i].get_text(), labels[j].get_text())
            for i in range(len(boxes))
            for j in range(i + 1, len(boxes))
            if boxes[i].overlaps(boxes[j])
        ]
    return pairs


def wrap_label(text: str, width: int = 16) -> str:
    """``ucr_resnet_prune50`` -> lines of at most ``width`` characters where it can break (after
    ``_ . - , / =`` or a space); a part longer than ``width`` stays whole."""
    lines = [""]
    for part in re.split(r"(?<=[_.\-, /=])", text):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(line.strip() for line in lines)


def _rotate(fig: Figure, rotation: int) -> None:
    for ax in fig.axes:
        ax.tick_params(axis="x", labelrotation=rotation)
        for label in ax.get_xticklabels():
            label.set_ha("right" if rotation < 90 else "center")
            label.set_rotation_mode("anchor" if rotation < 90 else "default")


def _fit_height(fig: Figure, base_height: float) -> None:
    """Make room under each panel for its (rotated) tick labels."""
    renderer = fig.canvas.get_renderer()
    extra = sum(
        max((t.get_window_extent(renderer).height for t in ax.get_xticklabels()), default=0.0) / fig.dpi
        for ax in fig.axes
    )
    fig.set_size_inches(fig.get_size_inches()[0], base_height + extra)


def _separate_labels(fig: Figure) -> None:
    """Rotate the tick labels (making room for them), then widen the figure, until no two overlap."""
    base_height = fig.get_size_inches()[1]
    for rotation in (30, 90):
        fig.canvas.draw()
        if not overlapping_labels(fig):
            return
        _rotate(fig, rotation)
        fig.canvas.draw()
        _fit_height(fig, base_height)
    for _ in range(4):
        fig.canvas.draw()
        if not overlapping_labels(fig):
            return
        width, height = fig.get_size_inches()
        fig.set_size_inches(width * 1.4, height)


def summary_figure(
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    metric: str,
    seed_keys: Sequence[str] = (),
    title: str = "",
) -> Figure | None:
    """Grouped bars of ``metric``: ``keys[0]`` as colours, one panel per other key along x (one
    panel with ``keys[0]`` along x when it is the only key). ``None`` when no row has the metric."""
    hue_key = keys[0] if len(keys) >= 2 else None
    panel_keys: list[str | None] = list(keys[1:]) if hue_key else [keys[0] if keys else None]
    panels = [bars(rows, hue_key, key, metric) for key in panel_keys]
    if not any(panels):
        return None
    hues = list(dict.fromkeys(b.hue for panel in panels for b in panel))
    slots = max(len({b.x for b in panel}) for panel in panels) * len(hues)
    fig, axes = plt.subplots(
        len(panels),
        1,
        squeeze=False,
        layout="constrained",
        figsize=(min(max(4.5, 0.45 * slots + 2.5), 14), 0.4 + 2.9 * len(panels)),
    )
    for ax, key, panel in zip(axes[:, 0], panel_keys, panels, strict=True):
        _draw_panel(ax, panel, hues, hue_key)
        over = [k for k in [*seed_keys, *keys] if k not in (hue_key, key) and any(k in r for r in rows)]
        ax.set_ylabel(error_label(metric, [b.n for b in panel], over), fontsize="small")
        ax.set_xlabel(key or "")
    if hue_key:
        axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    if title:
        fig.suptitle(title, fontsize="medium")
    _separate_labels(fig)
    return fig


def _param_value(distribution: Any, text: Any) -> Any:
    """A job's override value (text) as the Optuna distribution's own type."""
    from optuna.distributions import CategoricalDistribution, IntLogUniformDistribution, IntUniformDistribution

    if isinstance(distribution, CategoricalDistribution):
        return next(c for c in distribution.choices if str(c) == str(text))
    if isinstance(distribution, (IntUniformDistribution, IntLogUniformDistribution)):
        return int(float(text))
    return float(text)


def _study(rows: Sequence[Mapping[str, Any]], space: Mapping[str, str], metric: str, direction: str) -> Any:
    """An in-memory study with one finished trial per job that has ``metric`` (in job order)."""
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    distributions, _ = create_params_from_overrides([f"{k}={v}" for k, v in space.items()])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction)
    for row in rows:
        if not isinstance(row.get(metric), (int, float)) or any(k not in row for k in distributions):
            continue
        params = {k: _param_value(d, row[k]) for k, d in distributions.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=row[metric]))
    return study


@contextmanager
def _old_matplotlib_names() -> Iterator[None]:
    """``matplotlib.cm.get_cmap`` while Optuna 2.10 draws (its importance plot calls it; matplotlib
    3.9 removed it for ``plt.get_cmap``); removed again afterwards."""
    from matplotlib import cm

    missing = not hasattr(cm, "get_cmap")
    if missing:
        cm.get_cmap = plt.get_cmap
    try:
        yield
    finally:
        if missing:
            del cm.get_cmap


def optuna_figures(
    rows: Sequence[Mapping[str, Any]], space: Mapping[str, str], metric: str, direction: str
) -> dict[str, Figure]:
    """Optuna's own matplotlib figures of the sweep: ``history``, ``importances``, ``slice``.

    ``space`` is the sweeper's ``params`` (``{"module.lr": "tag(log, interval(0.0003, 0.01))"}``).
    A figure Optuna cannot draw (importances need two finished trials) is left out, with a warning.
    The study is rebuilt from the rows (one trial per job with ``metric``), so it needs no storage.
    """
    from optuna.exceptions import ExperimentalWarning
    from optuna.importance import MeanDecreaseImpurityImportanceEvaluator
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # create_trial, add_trial
        study = _study(rows, space, metric, direction)
    # Optuna 2.10's default importance (fANOVA) fails on current scikit-learn; mean decrease in
    # impurity is its other random-forest measure, seeded for the same picture every time.
    drawers = {
        "history": partial(optuna_plots.plot_optimization_history, target_name=metric),
        "importances": partial(
            optuna_plots.plot_param_importances, evaluator=MeanDecreaseImpurityImportanceEvaluator(seed=0)
        ),
        "slice": partial(optuna_plots.plot_slice, target_name=metric),
    }
    figures: dict[str, Figure] = {}
    # Optuna sets the ggplot style globally: rc_context gives the previous style back.
    with warnings.catch_warnings(), matplotlib.rc_context(), _old_matplotlib_names():
        warnings.simplefilter("ignore", ExperimentalWarning)
        for name, draw in drawers.items():
            try:
                axes = draw(study)
            except Exception as err:  # noqa: BLE001 - one figure must not lose the others
                log.warning("sweep summary: no Optuna %s plot (%s: %s)", name, type(err).__name__, err)
                continue
            figures[name] = _tidy((axes.flat[0] if hasattr(axes, "flat") else axes).figure)
    return figures


def _tidy(fig: Figure) -> Figure:
    """An Optuna figure with room for its labels: 4 inches a slice panel, a log axis labelled at
    1, 2 and 5 of each decade only (Optuna labels every minor tick: ``2x10^-3 3x10^-3`` run into
    each other), then no two tick labels overlapping."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter

    fig.set_layout_engine("constrained")
    panels = sum(1 for ax in fig.axes if ax.get_label() != "<colorbar>")
    fig.set_size_inches(max(fig.get_size_inches()[0], 4.0 * panels), fig.get_size_inches()[1])
    for ax in fig.axes:
        if ax.get_xscale() == "log":  # ticks at 1, 2 and 5 of each decade, minor ones unlabelled
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
            ax.xaxis.set_minor_formatter(NullFormatter())
    _separate_labels(fig)
    return fig
