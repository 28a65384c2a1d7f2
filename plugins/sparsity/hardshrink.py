"""Scheduled hardshrink sparsification: ``w -> hardshrink(w, lambda)`` on a schedule, kept by masks.

``torch.nn.functional.hardshrink(w, lambd)`` keeps ``w`` where ``|w| > lambd`` and zeroes it
elsewhere: applied to weights during training it is magnitude pruning by threshold. The schedule
gives lambda directly (``mode="threshold"``) or a target fraction of zeros from which lambda is
derived (``mode="sparsity"``), per tensor (``scope="layer"``) or one lambda over every selected
tensor (``scope="global"``). With ``pattern="N:M"`` the zeros form an N:M pattern instead
(:mod:`plugins.sparsity.nm_pattern`). The masks go through :mod:`plugins.core.masks` (shared with
structured pruning), so zeros stay exactly zero with any optimizer, checkpoints hold sparse
weights, and a resumed run continues the schedule with its masks.

    from plugins.sparsity.hardshrink import HardshrinkSparsifier
    sparsifier = HardshrinkSparsifier(
        schedule={"kind": "cubic", "start": 0.0, "end": 0.9, "begin_epoch": 1, "end_epoch": 10},
        mode="sparsity", scope="global",
    )
    trainer = L.Trainer(callbacks=[sparsifier])
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from plugins.core.allocation import ALLOCATIONS, FixedThreshold
from plugins.core.criteria import L1
from plugins.core.errors import ConfigError
from plugins.core.mask_mechanism import EntryMasks
from plugins.core.masking_callback import MaskingCallback
from plugins.core.masks import sparsity
from plugins.core.schedules import Schedule, build_schedule
from plugins.core.selection import Target, selection_arguments
from plugins.sparsity.nm_pattern import NMCost, NMMasks, nm_fraction, parse_pattern

__all__ = ["HardshrinkSparsifier", "MODES"]

MODES = ("threshold", "sparsity")


class HardshrinkSparsifier(MaskingCallback):
    """Callback: scheduled hardshrink of selected weights, in any LightningModule.

    At each update the schedule's value becomes a lambda and every selected weight with
    ``|w| <= lambda`` is set to 0 and masked: the weights right after an update equal
    ``F.hardshrink(w, lambda)`` exactly. Between updates the mask keeps them at 0 (their stored
    value and their optimizer state are zeroed, and the gradient through the mask is 0). In
    sparsity mode exactly ``k = round(f * n)`` weights are zero after an update (per tensor, or
    over all of them with ``scope="global"``): ties at lambda are pruned in index order. With
    ``regrow=True`` no mask is kept: the zeros may come back between updates, and each update
    (and the end of fit) thresholds afresh.

    Logs at each epoch end through ``pl_module.log_dict``: ``{key}/value`` (the schedule's value:
    lambda or target fraction), ``{key}/sparsity`` (reached over the selected weights),
    ``{key}/lambda`` (the global lambda; per layer ``{key}/lambda/<name>`` with ``scope="layer"``)
    and ``{key}/layer/<name>``.

    With ``pattern="N:M"`` (e.g. ``"2:4"``, mode sparsity only) the schedule's value is the
    fraction of M-groups (M consecutive weights along the input dimension) under the pattern, in [0, 1]: the
    allocation cuts the ``round(f * groups)`` groups cheapest to pattern (the sum of their M - N
    smallest ``|w|``), per tensor or over all, and each keeps its N largest ``|w|``; 1.0 makes
    every selected tensor N:M, with (M - N) / M of its weights zero. A patterned group stays
    patterned. Logs ``{key}/patterned`` (fraction of groups with at most N nonzeros) in place of
    lambda. Cost: two sorts of M entries per group at each update (the cost, then the N kept).

    Args:
        schedule: a :class:`~plugins.core.schedules.Schedule` or a mapping (kind, start, end,
            begin_epoch, end_epoch, every_n_steps, steps). Lambda (>= 0) in threshold mode, the
            fraction of zeros (in [0, 1)) in sparsity mode.
        mode: ``"threshold"`` or ``"sparsity"``.
        scope: a registered allocation (:mod:`plugins.core.allocation`: ``layer``, ``global``);
            how the target splits into lambdas in sparsity mode.
        targets: ``{include, exclude, module_types}`` for
            :func:`~plugins.core.selection.select_parameters`; default: the weights of
            Conv1d/2d/3d and Linear layers (no biases, no norm parameters).
        regrow: let pruned weights return between updates (no mask kept).
        bake_at_end: remove the mask parametrizations at the end of fit, keeping the zeros.
        key: names this callback in error messages, logged metrics and ``summary.json``.
        pattern: ``"N:M"`` with ``0 < N < M``, or ``None`` (unstructured). Every selected
            tensor's dim 1 must be a multiple of M (refused in ``setup`` otherwise). Threshold
            mode is refused with a pattern: a lambda says nothing about which N of M stay.
        mask_form: ``auto`` (the zeros live in the weights, kept by zeroing their gradients before
            each optimizer step: exact and free in forward) or ``parametrize`` (a mask multiplies
            the weight in forward); see :mod:`plugins.core.mask_forms`.

    Composition (:class:`~plugins.core.masking_callback.MaskingCallback`): the schedule, the
    magnitude criterion, the ``scope`` allocation (or the fixed lambda in threshold mode) and
    entry masks; with a pattern, the N:M cost criterion and N:M masks
    (:class:`~plugins.sparsity.nm_pattern.NMCost`, :class:`~plugins.sparsity.nm_pattern.NMMasks`).

    Raises:
        ConfigError: for a bad mode, scope, schedule value or targets key (here), a selection that
            matches nothing or a selected weight holding NaN/Inf (in ``setup``).
    """

    def __init__(
        self,
        schedule: Schedule | Mapping[str, Any],
        mode: str = "threshold",
        scope: str = "layer",
        targets: Mapping[str, Any] | None = None,
        regrow: bool = False,
        bake_at_end: bool = True,
        key: str = "sparsity",
        pattern: str | None = None,
        mask_form: str = "auto",
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"{key}.mode", mode, f"one of {', '.join(MODES)}")
        nm = parse_pattern(pattern, f"{key}.pattern")
        if nm is not None and mode == "threshold":
            raise ConfigError(
                f"{key}.mode",
                mode,
                f"sparsity with {key}.pattern={nm} (the schedule then gives the fraction of {nm.m}-groups "
                "under the pattern): a lambda says nothing about which N of M stay",
            )
        by_scope = ALLOCATIONS.get(scope, f"{key}.scope")  # checked in threshold mode too
        if not isinstance(regrow, bool):
            raise ConfigError(f"{key}.regrow", regrow, "true or false")
        if not isinstance(bake_at_end, bool):
            raise ConfigError(f"{key}.bake_at_end", bake_at_end, "true or false")
        selection = selection_arguments(targets, key)
        schedule = build_schedule(schedule, key=f"{key}.schedule")
        for end in ("start", "end"):
            value = getattr(schedule, end)
            if mode == "threshold" and value < 0:
                raise ConfigError(f"{key}.schedule.{end}", value, "a lambda >= 0 (mode=threshold)")
            if nm is not None and not 0 <= value <= 1:
                raise ConfigError(
                    f"{key}.schedule.{end}", value, f"a fraction of {nm.m}-groups under the {nm} pattern, in [0, 1]"
                )
            if mode == "sparsity" and nm is None and not 0 <= value < 1:
                raise ConfigError(
                    f"{key}.schedule.{end}", value, "a fraction of zeros in [0, 1) (mode=sparsity)"
                )
        super().__init__(
            schedule=schedule,
            criterion=L1() if nm is None else NMCost(nm),  # on entries |w|; on M-groups the pattern's cost
            allocation=FixedThreshold() if mode == "threshold" else by_scope(),
            masks=EntryMasks(persistent=not regrow) if nm is None else NMMasks(nm, persistent=not regrow),
            **selection,
            bake_at_end=bake_at_end,
            key=key,
            mask_form=mask_form,
        )
        self.mode = mode
        self.scope = scope
        self.regrow = regrow
        self.pattern = nm

    @property
    def lambdas(self) -> dict[str, float]:
        """The lambda of the last update per tensor name: ``|w| <= lambda`` went (ties at it in
        index order, to exactly k in sparsity mode). None with a pattern: it cuts M-groups."""
        if self.pattern is not None:
            return {}
        return {name: max(cut.threshold, 0.0) for name, cut in self.cuts.items()}

    # --- the sparsifier ---------------------------------------------------------------------------

    @override
    @torch.no_grad()
    def check_targets(self, targets: list[Target]) -> None:
        """Threshold mode: refuse a scheduled lambda at or above the largest ``|w|`` of the selected
        weights (in ``setup``, before the first batch): it would zero every one of them at once."""
        if self.mode != "threshold":
            return
        sizes = [(float(t.tensor.detach().abs().max()), t.name) for t in targets if t.tensor.numel()]
        if not sizes:
            return
        largest, name = max(sizes)
        s = self.schedule
        end = "end" if s.kind == "constant" or s.end >= s.start else "start"
        peak = getattr(s, end)
        if peak >= largest:
            raise ConfigError(
                f"{self.key}.schedule.{end}",
                peak,
                f"a lambda below the largest |w| of the selected weights ({largest:.4g}, in {name}): "
                "hardshrink would set every selected weight to 0",
            )

    @override
    def record(self) -> dict[str, float]:
        if self.pattern is not None:
            return {"patterned": nm_fraction(self.targets, self.pattern)}
        if self.mode == "threshold" or self.scope == "global":
            return {"lambda": next(iter(self.lambdas.values()), 0.0)}
        return {f"lambda/{name}": lam for name, lam in self.lambdas.items()}

    # --- run outputs ------------------------------------------------------------------------------

    @override
    def summary(self) -> dict[str, Any]:
        """``{key}/target``, ``{key}/selected`` (reached over the selected weights),
        ``{key}/selected_layers`` (name -> fraction of zeros), ``{key}/lambda``, mode and scope;
        with a pattern also ``{key}/pattern`` ("2:4") and ``{key}/patterned`` (fraction of
        M-groups with at most N nonzeros)."""
        out = super().summary()
        out[f"{self.key}/selected_layers"] = {t.name: sparsity([t.tensor]) for t in self.targets}
        out[f"{self.key}/lambda"] = dict(self.lambdas)
        out[f"{self.key}/mode"] = self.mode
        out[f"{self.key}/scope"] = self.scope
        out[f"{self.key}/updates"] = len(self.history)
        if self.pattern is not None:
            out[f"{self.key}/pattern"] = str(self.pattern)
            out[f"{self.key}/patterned"] = nm_fraction(self.targets, self.pattern)
        return out

    @override
    def headline(self) -> dict[str, float]:
        """``{key}/sparsity`` reached at the last update and its lambda (``{key}/lambda``; with one
        lambda per tensor the largest, ``{key}/lambda_max``) or, with a pattern, ``{key}/patterned``."""
        out = super().headline()
        last = self.history[-1] if self.history else {}
        lambdas = [v for k, v in last.items() if k.startswith("lambda/")]
        if "patterned" in last:
            out[f"{self.key}/patterned"] = float(last["patterned"])
        elif "lambda" in last:
            out[f"{self.key}/lambda"] = float(last["lambda"])
        elif lambdas:
            out[f"{self.key}/lambda_max"] = float(max(lambdas))
        return out

    def save_plots(self, directory: str | Path) -> list[Path]:
        """Write ``{key}_schedule.png`` (the schedule's target against the sparsity reached, per
        update step) and ``{key}_layers.png`` (sparsity per selected tensor); returns the paths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / f"{self.key}_schedule.png", directory / f"{self.key}_layers.png"]
        steps = [h["step"] for h in self.history]
        # With a pattern the schedule's value is a fraction of M-groups: plot it against the same.
        reached = [h["patterned" if self.pattern else "sparsity"] for h in self.history]
        values = [h["value"] for h in self.history]
        what = f"{self.pattern.m}-groups under {self.pattern}" if self.pattern else "sparsity"

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.step(steps, reached, where="post", marker="o", label=f"reached {what}")
        if self.mode == "sparsity":
            ax.plot(steps, values, "--", marker="x", label=f"target {what}")
        else:
            twin = ax.twinx()
            twin.plot(steps, values, "--", color="tab:orange", marker="x", label="lambda")
            twin.set_ylabel("lambda")
            twin.legend(loc="lower right")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"fraction of {what if self.pattern else 'zeros'} (selected weights)")
        ax.set_ylim(0, 1)
        ax.set_title(f"hardshrink, mode={self.mode}, scope={self.scope}")
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(paths[0], dpi=100)
        plt.close(fig)

        names = [t.name for t in self.targets]
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.5))
        ax.barh(names, [sparsity([t.tensor]) for t in self.targets])
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of zeros")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(paths[1], dpi=100)
        plt.close(fig)
        return paths
