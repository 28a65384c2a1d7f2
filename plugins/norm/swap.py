"""``swap_norm``: the same norm choice for any model after it was built, as the ``norm`` config group
makes for this project's backbones (:mod:`plugins.norm.kinds`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from plugins.core.modes import evaluating
from plugins.norm.kinds import NORM_KINDS, NormFactory
from plugins.norm.layers import ChannelLayerNorm, ChannelsLast

__all__ = ["NormSwapReport", "swap_norm"]


_SOURCE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, BatchNormNd
    nn.modules.instancenorm._InstanceNorm,  # InstanceNorm1d/2d/3d, InstanceNormNd
    nn.GroupNorm,
    nn.LayerNorm,
    ChannelLayerNorm,
)
_RANK_BY_TYPE: dict[type[nn.Module], int] = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nn.InstanceNorm1d: 1,
    nn.InstanceNorm2d: 2,
    nn.InstanceNorm3d: 3,
}


@dataclass
class NormSwapReport:
    """What :func:`swap_norm` changed.

    Attributes:
        kind: the kind every normalization layer became.
        replaced: number of layers replaced, by their former type name (``{"BatchNorm2d": 5}``).
        layers: ``(qualified name, former type, new type)`` for each replaced layer.
        copied: names of the layers whose affine parameters (and running statistics, where both
            layers keep them) were copied into the new layer because the shapes agreed.
        skipped: ``(qualified name, reason)`` for normalization layers left as they were.
    """

    kind: str
    replaced: dict[str, int] = field(default_factory=dict)
    layers: list[tuple[str, str, str]] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of layers replaced."""
        return sum(self.replaced.values())

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {t}" for t, n in sorted(self.replaced.items())) or "nothing"
        copied = len(self.copied)
        text = f"swap_norm -> {self.kind}: replaced {counts} ({copied} with copied parameters)"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} ({why})" for n, why in self.skipped)
        return text


def _channels(module: nn.Module) -> int | None:
    """The channel count a normalization layer acts on, or None if it has no single channel axis."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return module.num_features
    if isinstance(module, (nn.GroupNorm, ChannelLayerNorm)):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        return shape[0] if len(shape) == 1 else None
    return None


def _input_ranks(model: nn.Module, names: list[str], example_input: object) -> dict[str, int]:
    """Spatial rank of each named layer's input, seen in one forward pass of ``example_input``."""
    ranks: dict[str, int] = {}
    modules = dict(model.named_modules())
    hooks = []
    for name in names:
        def hook(_mod, args, _name=name):
            if args and isinstance(args[0], torch.Tensor):
                ranks[_name] = args[0].dim() - 2
        hooks.append(modules[name].register_forward_pre_hook(hook))
    try:
        with evaluating(model), torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return ranks


def _new_layer(factory: NormFactory, old: nn.Module, name: str, rank: int | None) -> nn.Module:
    """The replacement of ``old``: channels-first unless ``old`` is a plain ``nn.LayerNorm``."""
    kind = NORM_KINDS.get(factory.kind, "norm.kind")()
    if isinstance(old, nn.LayerNorm):  # channels last: (N, *, C)
        return kind.channels_last(factory, _channels(old), name)
    return kind.build(factory, _channels(old), rank, name)


def _affine_of(module: nn.Module) -> nn.Module:
    """The module that holds ``weight``/``bias`` (a wrapper's inner layer)."""
    while isinstance(module, (ChannelLayerNorm, ChannelsLast)):
        module = module.norm
    return module


@torch.no_grad()
def _copy_state(old: nn.Module, new: nn.Module) -> bool:
    """Copy weight, bias and running statistics where both layers have them with equal shapes."""
    src, dst = _affine_of(old), _affine_of(new)
    copied = False
    for key in ("weight", "bias", "running_mean", "running_var"):
        a, b = getattr(src, key, None), getattr(dst, key, None)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
            b.copy_(a)
            copied = copied or key in ("weight", "bias")
    return copied


def swap_norm(
    model: nn.Module,
    kind: str | NormFactory = "batch",
    *,
    num_groups: int = 8,
    affine: bool = True,
    track_running_stats: bool | None = None,
    eps: float = 1e-5,
    example_input: object = None,
) -> NormSwapReport:
    """Replace every normalization layer of ``model``, in place, by ``kind``.

    Replaced: every BatchNorm (1d/2d/3d, SyncBatchNorm), InstanceNorm (1d/2d/3d), GroupNorm,
    ``nn.LayerNorm`` over one axis and :class:`ChannelLayerNorm`. The new layers are made by
    :class:`NormFactory` with explicit ``affine`` and ``track_running_stats`` (``None`` = the
    kind's PyTorch default), moved to the old layer's device and dtype, and take the old layer's
    weight, bias and running statistics where the shapes agree. The new layer is in the old one's
    training mode.

    Layout: BatchNorm, InstanceNorm, GroupNorm and ChannelLayerNorm act on channels-first features
    ``(N, C, *)``; a plain ``nn.LayerNorm(C)`` normalizes the *last* axis, so it is taken to act on
    channels-last features ``(N, *, C)`` (a transformer's ``(N, L, C)`` tokens): ``layer`` and
    ``channel_layer`` keep it a ``nn.LayerNorm``, other kinds are wrapped in :class:`ChannelsLast`.
    On channels-first features ``layer`` is ``nn.GroupNorm(1, C)`` (over channels and positions)
    and ``channel_layer`` a :class:`ChannelLayerNorm` (over channels at each position). A LayerNorm
    over several axes (``LayerNorm([C, H, W])``) has no single channel axis and is skipped (reported).

    The spatial rank picks the class (``BatchNorm1d`` vs ``2d``): it is read from the old layer's
    type, or from one forward pass of ``example_input`` when given; where neither tells (a
    GroupNorm), a rank-agnostic :class:`BatchNormNd` / :class:`InstanceNormNd` is used.

    Args:
        model: any ``nn.Module``; changed in place.
        kind: one of ``NORM_KINDS``, or a :class:`NormFactory` (then the other options are unused).
        num_groups: groups for ``group``; must divide every replaced layer's channels.
        affine: learnable scale and shift.
        track_running_stats: running statistics for ``batch``/``instance``.
        eps: added to the variance.
        example_input: optional input for one forward pass that records each layer's input rank.

    Returns:
        A :class:`NormSwapReport`. A model without any normalization layer gives a warning and an
        empty report.

    Raises:
        ConfigError: unknown kind (the message lists the kinds), or ``num_groups`` not dividing a
            layer's channels (the message names the layer). Nothing is changed in that case.
    """
    factory = (
        kind
        if isinstance(kind, NormFactory)
        else NormFactory(kind, num_groups, affine, track_running_stats, eps)
    )
    report = NormSwapReport(kind=factory.kind)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, _SOURCE_TYPES) and not _inside_replacement(name, model)
    ]
    if not found:
        warnings.warn(
            f"swap_norm: {type(model).__name__} has no normalization layer (BatchNorm, "
            "InstanceNorm, GroupNorm, LayerNorm); nothing was replaced",
            UserWarning,
            stacklevel=2,
        )
        return report
    ranks = {}
    if example_input is not None:
        ranks = _input_ranks(model, [n for n, _ in found], example_input)

    plan: list[tuple[str, nn.Module, nn.Module]] = []
    for name, old in found:  # build everything first: a bad layer leaves the model untouched
        if _channels(old) is None:
            shape = tuple(old.normalized_shape)
            report.skipped.append((name, f"LayerNorm over {shape} has no single channel axis"))
            continue
        rank = ranks.get(name, _RANK_BY_TYPE.get(type(old)))
        new = _new_layer(factory, old, name, rank)
        reference = next(iter([*old.parameters(), *old.buffers()]), None)
        if reference is not None:
            dtype = reference.dtype if reference.is_floating_point() else None
            new = new.to(device=reference.device, dtype=dtype)
        new.train(old.training)
        plan.append((name, old, new))

    for name, old, new in plan:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if _copy_state(old, new):
            report.copied.append(name)
        setattr(parent, attr, new)
        old_type = type(old).__name__
        report.replaced[old_type] = report.replaced.get(old_type, 0) + 1
        report.layers.append((name, old_type, type(new).__name__))
    for name, why in report.skipped:
        warnings.warn(f"swap_norm: left {name} as it was: {why}", UserWarning, stacklevel=2)
    return report


def _inside_replacement(name: str, model: nn.Module) -> bool:
    """True for the inner LayerNorm of a ChannelLayerNorm (or the inner norm of a ChannelsLast):
    the wrapper is the layer that gets replaced."""
    parent_name, _, _ = name.rpartition(".")
    if not parent_name:
        return False
    return isinstance(model.get_submodule(parent_name), (ChannelLayerNorm, ChannelsLast))
