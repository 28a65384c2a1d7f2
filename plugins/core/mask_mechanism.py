"""The mask mechanism of a masking callback: how groups are formed from the selected tensors, how
a decision reaches the weights (apply, also regrowing), how it holds between updates (keep) and how
it ends (bake).

:class:`EntryMasks` masks single entries (hardshrink); the slice mechanism of structured pruning
(:class:`plugins.pruning.slice_masks.SliceMasks`) adds coupling and compaction. Both write through
:mod:`plugins.core.masks`, so zeros stay zero with any optimizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.decision import Group
from plugins.core.errors import ConfigError
from plugins.core.masks import ensure_mask, get_mask, prune_in_place, set_mask, share_mask
from plugins.core.selection import Target

__all__ = ["MaskMechanism", "EntryMasks"]


class MaskMechanism(ABC):
    """Forms groups in ``setup``, applies keep vectors, bakes at the end of fit.

    ``persistent=True`` keeps a :class:`~plugins.core.masks.Mask` per tensor (zeros stay zero; in
    place where exact, one product per optimizer step, else one per forward and backward: see
    :mod:`plugins.core.mask_forms`); ``False`` zeroes the stored weights at each update and lets
    them regrow in between (no cost between updates).
    """

    persistent: bool = True
    #: ``auto``: each mask in place where exact (:mod:`plugins.core.mask_forms`); ``parametrize``: never.
    form: str = "auto"

    @abstractmethod
    def groups(self, trainer: L.Trainer | None, pl_module: nn.Module, targets: list[Target], key: str) -> list[Group]:
        """The groups decided together; raise ConfigError for targets this mechanism cannot act on."""

    @abstractmethod
    def mask_shape(self, group: Group, tensor: torch.Tensor) -> tuple[int, ...]:
        """The shape of a member's or extra's mask (its keep vector broadcast to the tensor)."""

    @abstractmethod
    def current(self, group: Group) -> torch.Tensor:
        """The group's keep vector now (bool, one per element)."""

    def _tensors(self, group: Group) -> list[tuple[nn.Module, str]]:
        return [(m.module, m.tensor_name) for m in group.members] + [(m, n) for _, m, n in group.extras]

    @staticmethod
    def _aliases(group: Group) -> list[tuple[nn.Module, str, nn.Module, str]]:
        """(owner, name, alias owner, alias name) of the members' tied tensors."""
        return [(m.module, m.tensor_name, module, name) for m in group.members for _, module, name in m.aliases]

    def install(self, groups: list[Group], key: str) -> None:
        """Register the masks (in ``setup``, so that a checkpoint's masks load on resume)."""
        for group in groups:
            for module, tensor_name in self._tensors(group):
                if self.persistent:
                    shape = self.mask_shape(group, getattr(module, tensor_name))
                    ensure_mask(module, tensor_name, shape, inplace=self.form == "auto")
                elif parametrize.is_parametrized(module, tensor_name):
                    # Without a mask the zeros are written into the stored tensor, and a
                    # constraint's output need not keep them (softplus maps 0 to log 2).
                    raise ConfigError(
                        f"{key}.regrow",
                        True,
                        f"false on {group.name}: a constraint is on it and, without a mask, its output "
                        "does not keep the zeros (or exclude the tensor from one of the two selections)",
                    )
            for module, tensor_name, alias, alias_name in self._aliases(group):
                # The same Mask object on every owner: the tie holds and no owner's gradient
                # reaches the masked entries.
                if self.persistent and get_mask(alias, alias_name) is None:
                    share_mask(alias, alias_name, get_mask(module, tensor_name))

    def apply(
        self, groups: list[Group], keeps: dict[str, torch.Tensor], optimizers: list[Any] = (), regrow: bool = False
    ) -> None:
        """Zero what ``keeps`` drops (weights, optimizer state, and the mask when persistent). With
        ``regrow`` (persistent masks only) the masks become ``keeps``: what they turn back on starts
        at zero with zeroed optimizer state (:func:`~plugins.core.masks.set_mask`)."""
        if regrow and not self.persistent:
            raise ValueError("regrowth needs persistent masks: without one nothing says what is off")
        for group in groups:
            keep = keeps[group.name]
            for module, tensor_name in self._tensors(group):
                tensor = getattr(module, tensor_name)
                shaped = keep.reshape(self.mask_shape(group, tensor)).to(tensor.device)
                if self.persistent:
                    set_mask(module, tensor_name, shaped, optimizers, regrow=regrow)
                else:
                    prune_in_place(module, tensor_name, shaped, optimizers)

    def capture_gradients(self, groups: list[Group], on: bool) -> None:
        """Start (``on``, from zero) or stop and free the capture of each member's dense gradient
        (:attr:`~plugins.core.masks.Mask.dense_grad`), for criteria that choose what grows back."""
        for group in groups:
            for member in group.members:
                mask = get_mask(member.module, member.tensor_name)
                if mask is not None:
                    mask.capture, mask.dense_grad = on, None

    def finish(
        self, trainer: L.Trainer | None, pl_module: nn.Module, groups: list[Group], bake: bool
    ) -> dict[str, Any] | None:
        """At the end of fit: remove the mask parametrizations when ``bake`` (keeping the zeros);
        returns a report for ``summary.json`` or ``None``."""
        if bake:
            for group in groups:
                tied = [(alias, name) for _, _, alias, name in self._aliases(group)]
                for module, tensor_name in self._tensors(group) + tied:
                    if parametrize.is_parametrized(module, tensor_name):
                        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
        return None


class EntryMasks(MaskMechanism):
    """Masks single entries: one group per selected tensor, a mask of the tensor's shape."""

    def __init__(self, persistent: bool = True) -> None:
        self.persistent = persistent

    def groups(self, trainer, pl_module, targets, key):
        return [Group(t.name, [t], t.raw.numel()) for t in targets]

    def mask_shape(self, group, tensor):
        return tuple(group.members[0].raw.shape)

    def current(self, group):
        member = group.members[0]
        mask = get_mask(member.module, member.tensor_name)
        if mask is None:
            return torch.ones(member.raw.shape, dtype=torch.bool, device=member.raw.device)
        # A slice mask (structured pruning on the same tensor) broadcasts to the entries.
        return (mask.mask != 0).expand(member.raw.shape)
