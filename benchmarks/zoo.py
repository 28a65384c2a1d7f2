"""The "Your model" table (docs/reference/your-model.md): each plugin on each model of the zoo (tests/zoo_models.py).

    .venv/bin/python benchmarks/zoo.py            # writes benchmarks/results/zoo.md
    .venv/bin/python benchmarks/zoo.py --quick    # prints only

Per model: its parameters; 80% unstructured sparsity (global hardshrink over its weight
matrices): the zeros reached and whether ``model.pt2`` exports; 50% of the channels with
compaction: the parameters after it, or the one-line refusal before training; 50% of the
attention heads (``heads=true``) with compaction: the heads and parameters after it, the largest
difference between the masked and the compact model's outputs on the example batch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins.core.errors import ConfigError  # noqa: E402
from plugins.pruning.structured import StructuredPruning  # noqa: E402
from plugins.sparsity.hardshrink import HardshrinkSparsifier  # noqa: E402
from runner.outputs import export_program  # noqa: E402
from tests.zoo_models import ZOO, ZooModel, fit_zoo  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "zoo.md"


def unstructured(model: ZooModel, root: Path) -> tuple[str, str]:
    schedule = {"kind": "constant", "start": 0.8, "end": 0.8}
    targets = {"module_types": model.sparse_types}
    plugin = HardshrinkSparsifier(schedule, mode="sparsity", scope="global", targets=targets)
    task, _, x = fit_zoo(model, plugin, root, epochs=2)
    zeros = sum(int((t.tensor == 0).sum()) for t in plugin.targets)
    total = sum(t.tensor.numel() for t in plugin.targets)
    reason = export_program(task.net, x, root / "model.pt2")
    return f"{zeros}/{total} zeros ({len(plugin.targets)} tensors)", "yes" if reason is None else f"no: {reason[:80]}"


def structured(model: ZooModel, root: Path) -> str:
    plugin = StructuredPruning(amount=0.5, compact=True, exclude=model.head)
    try:
        fit_zoo(model, plugin, root)
    except ConfigError as err:
        return f"refused before training: `{str(err)[:160]}`"
    report = plugin.compaction
    done = f"{report['params_before']} -> {report['params_after']} params"
    if report["inexact"]:  # norms that mix channels: warned, not an error
        return f"{done}, not exact: {len(report['inexact'])} norm layers mix channels (warned)"
    return f"{done}, exact (checked on the example batch)"


def heads(model: ZooModel, root: Path) -> str:
    from plugins.core.modes import evaluating
    from plugins.pruning.dependency import independent_copy

    class Masked(L.Callback):
        def on_train_end(self, trainer, pl_module):
            self.model = independent_copy(pl_module)

    masked = Masked()
    plugin = StructuredPruning(amount=0.5, heads=True, compact=True, exclude=model.head)
    try:
        task, _, x = fit_zoo(model, plugin, root, extra=[masked])
    except ConfigError as err:
        return f"refused: `{str(err)[:100]}`"
    with evaluating(task), evaluating(masked.model), torch.no_grad():
        diff = float((task(x) - masked.model(x)).abs().max())
    report = plugin.compaction
    kept = sorted(set(report["heads"].values()))
    params = f"{report['params_before']} -> {report['params_after']} params"
    return f"{'/'.join(kept)} heads per module, {params}, max diff {diff:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="print only, never overwrite the results")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = [
        "| model | parameters | 80% unstructured | model.pt2 | 50% of channels + compaction"
        " | 50% of heads + compaction |",
        "|---|---|---|---|---|---|",
    ]
    for model in ZOO:
        with tempfile.TemporaryDirectory() as tmp:
            params = sum(p.numel() for p in model.build().parameters())
            zeros, export = unstructured(model, Path(tmp))
            cells = [model.name, params, zeros, export, structured(model, Path(tmp)), heads(model, Path(tmp))]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
    table = "\n".join(rows) + "\n"
    print(table)
    if not args.quick:
        RESULTS.write_text(f"Command: `.venv/bin/python benchmarks/zoo.py`\n\n{table}")


if __name__ == "__main__":
    main()
