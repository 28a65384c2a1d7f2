"""One figure for every plugin that plots a value per unit against the optimizer step (channels
kept per layer, a constraint's violation): lines, a legend while it stays readable, PNG out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["LEGEND_MAX", "plot_history"]

#: The most lines a plot labels in a legend; more and the legend hides the plot.
LEGEND_MAX = 16


def plot_history(
    path: str | Path,
    history: Sequence[Mapping[str, float]],
    lines: Mapping[str, str],
    *,
    title: str,
    ylabel: str,
    steps: bool = False,
    symlog: bool = False,
) -> Path:
    """Write ``path``: for each ``lines`` item (history key -> legend label) the value at each
    ``history`` entry (a mapping with ``"step"``) against that step; ``steps`` draws a staircase
    (values that hold until the next entry), ``symlog`` a y axis linear up to the smallest positive
    value and logarithmic above (values spanning decades, often exactly 0). Costs one small figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in lines.items():
        y = [h.get(key, float("nan")) for h in history]
        if steps:
            ax.step(x, y, where="post", marker="o", markersize=3, label=label)
        else:
            ax.plot(x, y, marker="o", markersize=3, label=label)
    positive = [h[k] for h in history for k in lines if k in h and h[k] > 0]
    if symlog and positive:
        ax.set_yscale("symlog", linthresh=min(positive))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if 0 < len(lines) <= LEGEND_MAX:
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
