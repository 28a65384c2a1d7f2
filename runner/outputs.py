"""What a finished run writes: ``model.pt``, ``model.pt2``, the plugins' plots and ``summary.json``
(last, atomically: a folder without it is a run that did not finish)."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from omegaconf import DictConfig

from plugins.core.errors import ConfigError, SelectionWarning
from plugins.core.masks import sparsity
from plugins.core.modes import evaluating
from plugins.core.selection import DEFAULT_MODULE_TYPES, select_parameters
from runner.run_folder import write_atomically, write_json

__all__ = ["Reports", "train_metrics", "weight_sparsity", "export_program", "write_outputs", "optimized_value"]

log = logging.getLogger("train")


@runtime_checkable
class Reports(Protocol):
    """What ``train.py`` asks of a plugin at the end of a run (every :class:`PluginCallback` does)."""

    def summary(self) -> dict[str, Any]: ...

    def save_plots(self, directory: str | Path) -> list[Path]: ...


def weight_sparsity(net: torch.nn.Module) -> dict[str, Any]:
    """Zeros in the weights of conv and linear layers, per layer and over all of them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectionWarning)  # the plugins have said it already
        try:
            targets = select_parameters(net, ["*weight*"], module_types=DEFAULT_MODULE_TYPES)
        except ConfigError:  # no conv, linear or attention weights at all
            targets = []
    layers = {t.name: t.tensor for t in targets}
    return {
        "sparsity/global": sparsity(layers.values()),
        "sparsity/layers": {name: sparsity([w]) for name, w in layers.items()},
    }


def export_program(net: torch.nn.Module, example: torch.Tensor, path: Path) -> str | None:
    """Write ``net`` (eval mode, any batch size) as a ``torch.export`` program: it runs with
    ``torch.export.load(path).module()`` and no code of this project, unlike the pickled
    ``model.pt``. Returns why it could not be exported (a model ``torch.export`` cannot trace),
    or ``None``; a failure is a warning, not an error, as ``model.pt`` is already written."""
    try:
        batch = torch.export.Dim("batch", min=1)
        with evaluating(net):
            program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
        write_atomically(path, lambda tmp: torch.export.save(program, tmp))
        return None
    except Exception as err:  # noqa: BLE001 - any tracing failure: keep model.pt, say why
        log.warning("model.pt2 not written: torch.export failed (%s: %s)", type(err).__name__, err)
        path.unlink(missing_ok=True)  # never leave an older run's program beside this model.pt
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def extra_exports(asked: Mapping[str, Any], net: torch.nn.Module, example: torch.Tensor, output_dir: Path) -> dict:
    """``export.sparse`` (``model_sparse.pt2``, timed on the test batch ``example``) and
    ``export.onnx`` (``model.onnx``, checked in onnxruntime): their summary keys. A model that cannot
    be exported is a warning and a reason in the summary, never a failed run: model.pt is written."""
    out: dict[str, Any] = {}
    if asked.get("sparse"):
        from plugins.export import write_sparse_export

        out["export_sparse"] = write_sparse_export(net, example, output_dir)
    if asked.get("onnx"):
        from plugins.export import export_onnx

        try:
            checked = export_onnx(net, example[:2], output_dir / "model.onnx")
            out["export_onnx"] = {**{k: v for k, v in checked.items() if k != "path"}, "written": "model.onnx"}
        except Exception as err:  # noqa: BLE001 - any exporter failure: keep the run, say why
            log.warning("model.onnx not written: %s: %s", type(err).__name__, err)
            (output_dir / "model.onnx").unlink(missing_ok=True)
            out["export_onnx"] = {"written": None, "reason": f"{type(err).__name__}: {err}"}
    return out


def train_metrics(module: L.LightningModule) -> dict[str, float]:
    """The last training epoch's metrics (``train/acc`` ...) when the module keeps them, as
    :class:`models.Classifier` does in ``last_train_metrics``; ``trainer.test`` clears the
    trainer's copy. Empty for a module that does not."""
    kept = getattr(module, "last_train_metrics", None) or {}
    return {str(k): float(v) for k, v in kept.items()}


def write_outputs(
    cfg: DictConfig,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    plugins: list[L.Callback],
    metrics: dict[str, float],
    output_dir: Path,
    started: float,
) -> dict[str, Any]:
    """``model.pt`` (on CPU, so it loads without the run's accelerator), ``model.pt2``, the plots
    and ``summary.json``; returns the summary, which holds ``metrics`` and the last training
    epoch's :func:`train_metrics` (``train/acc``: did the run fit its training set?). Its
    ``plots`` key lists the plot files written (names in ``output_dir``), which
    :func:`runner.dashboards.publish` logs as images."""
    net = module.net
    summary: dict[str, Any] = {
        **train_metrics(module),
        **metrics,
        "params/total": sum(p.numel() for p in net.parameters()),
        "params/nonzero": sum(int((p != 0).sum()) for p in net.parameters()),
        **weight_sparsity(net),
        "norm": cfg.norm.kind,
        "seed": cfg.seed,
        "data": cfg.data.get("name", "digits"),
        "model": cfg.model._target_.rsplit(".", 1)[-1],
    }
    plots: list[Path] = []
    for plugin in plugins:
        if isinstance(plugin, Reports):
            plots += plugin.save_plots(output_dir)
            summary.update(plugin.summary())
    summary["plots"] = [Path(p).name for p in plots]
    net.cpu()
    write_atomically(output_dir / "model.pt", lambda tmp: torch.save(net, tmp))
    example, _ = next(iter(datamodule.test_dataloader()))
    summary["export"] = export_program(net, example[:2], output_dir / "model.pt2") or "model.pt2"
    summary.update(extra_exports(cfg.get("export") or {}, net, example, output_dir))
    summary["duration_s"] = time.time() - started
    write_json(output_dir / "summary.json", summary)
    log.info("test/acc=%.4f  outputs in %s", summary["test/acc"], output_dir)
    print(f"test/acc={summary['test/acc']:.4f}  summary: {output_dir / 'summary.json'}", flush=True)
    return summary


def optimized_value(cfg: DictConfig, summary: dict[str, Any], sweep: bool = True) -> float:
    """The value a sweeper maximizes or minimizes: ``summary[cfg.optimized_metric]``. A run that
    did not compute it (``trainer.max_steps`` ended it before its first validation) is an error in a
    sweep, whose sweeper needs it; a single run has written its outputs and returns NaN, with a
    warning, rather than exit 2 beside a finished folder."""
    key = cfg.get("optimized_metric") or "test/acc"
    if key not in summary:
        numeric = sorted(k for k, v in summary.items() if isinstance(v, (int, float)))
        if sweep:
            raise ConfigError("optimized_metric", key, f"a metric of this run: {', '.join(numeric)}")
        computed = ", ".join(numeric)
        warnings.warn(f"optimized_metric={key} was not computed by this run (it has {computed})", stacklevel=2)
        return math.nan
    return float(summary[key])
