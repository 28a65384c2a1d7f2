"""Normalization layers by name: one factory that every backbone takes, so the ``norm`` config group
changes every normalization layer of a model without touching its code.

Kinds: ``batch``, ``instance``, ``group``, ``layer`` (channel-wise, over C for each position... see
:class:`ChannelLayerNorm`), ``none`` (identity).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from plugins.errors import ConfigError, is_number

__all__ = [
    "NORM_KINDS",
    "BatchNormNd",
    "ChannelLayerNorm",
    "ChannelsLast",
    "InstanceNormNd",
    "NormFactory",
    "NormSwapReport",
    "make_norm",
    "swap_norm",
]

NORM_KINDS = ("batch", "instance", "group", "layer", "none")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(N, C, *)`` features, at each position separately.

    ``nn.LayerNorm`` normalizes the last axes; conv features keep channels on axis 1, so this moves
    them last, normalizes, and moves them back. Costs two transposes per call.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.norm = nn.LayerNorm(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.norm(x)
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


@dataclass(frozen=True)
class NormFactory:
    """Builds the chosen normalization for a given channel count and spatial rank (1 or 2).

    Args:
        kind: one of ``NORM_KINDS``.
        num_groups: groups for ``group`` (must divide every layer's channels).
        affine: learnable scale and shift.
        track_running_stats: running statistics for ``batch`` and ``instance``; ``None`` = each
            kind's PyTorch default (True for batch, False for instance).
        eps: added to the variance.
    """

    kind: str = "batch"
    num_groups: int = 8
    affine: bool = True
    track_running_stats: bool | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise ConfigError("norm.kind", self.kind, f"one of {', '.join(NORM_KINDS)}")
        groups = self.num_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ConfigError("norm.num_groups", self.num_groups, "an integer >= 1")
        if not isinstance(self.affine, bool):
            raise ConfigError("norm.affine", self.affine, "true or false")
        if self.track_running_stats is not None and not isinstance(self.track_running_stats, bool):
            raise ConfigError("norm.track_running_stats", self.track_running_stats, "true, false or null")
        if not is_number(self.eps) or self.eps <= 0:
            raise ConfigError("norm.eps", self.eps, "a finite number > 0")

    def __call__(self, channels: int, dims: int = 2, name: str = "") -> nn.Module:
        return make_norm(self, channels, dims, name)


def make_norm(factory: NormFactory, channels: int, dims: int = 2, name: str = "") -> nn.Module:
    """One normalization layer of ``factory.kind`` for ``channels`` channels.

    ``dims`` is the spatial rank: 0 for ``(N, C)``, 1 for ``(N, C, L)``, 2 for ``(N, C, H, W)``.
    ``name`` is the layer's name, used in error messages.
    """
    kind = factory.kind
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        track = True if factory.track_running_stats is None else factory.track_running_stats
        return cls(channels, eps=factory.eps, affine=factory.affine, track_running_stats=track)
    if kind == "instance":
        if dims == 0:
            where = name or "this layer"
            raise ConfigError("norm.kind", kind, f"a kind defined for (N, C) features at {where}")
        cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
        track = False if factory.track_running_stats is None else factory.track_running_stats
        return cls(channels, eps=factory.eps, affine=factory.affine, track_running_stats=track)
    if kind == "group":
        if channels % factory.num_groups:
            raise ConfigError(
                "norm.num_groups",
                factory.num_groups,
                f"a divisor of the {channels} channels of layer {name or '?'}",
            )
        return nn.GroupNorm(factory.num_groups, channels, eps=factory.eps, affine=factory.affine)
    return ChannelLayerNorm(channels, eps=factory.eps, affine=factory.affine)



# --------------------------------------------------------------------------------------------------
# swap_norm: the same choice for any model, after it was built.
# --------------------------------------------------------------------------------------------------

NormBuilder = Callable[[int, int, str], nn.Module]


class BatchNormNd(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for ``(N, C, *)`` features of any rank, used where the rank is not known when the
    layer is made (replacing a GroupNorm or a channel LayerNorm). Same state as ``BatchNorm1d``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected (N, C, *) features, got {input.dim()}-D input")


class InstanceNormNd(nn.modules.instancenorm._InstanceNorm):
    """InstanceNorm for ``(N, C, *)`` features with at least one position, any rank."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 3:
            raise ValueError(
                f"instance norm needs (N, C, *) features with positions, got {tuple(input.shape)}: "
                "each sample's channel would be normalized over a single value"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if input.size(1) != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on axis 1, got {tuple(input.shape)}"
            )
        return self._apply_instance_norm(input)


class ChannelsLast(nn.Module):
    """Applies a channels-first norm (``(N, C, *)``) to channels-last features ``(N, *, C)``.

    Used when a plain ``nn.LayerNorm(C)`` (which normalizes the last axis, as in transformers on
    ``(N, L, C)`` tokens) is swapped for batch, instance or group normalization.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.norm(x)
        return self.norm(x.movedim(-1, 1)).movedim(1, -1)


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
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return ranks


def _new_layer(factory: NormFactory, old: nn.Module, name: str, rank: int | None) -> nn.Module:
    """The replacement of ``old``: channels-first unless ``old`` is a plain ``nn.LayerNorm``."""
    channels = _channels(old)
    if isinstance(old, nn.LayerNorm):  # channels last: (N, *, C)
        if factory.kind == "layer":
            return nn.LayerNorm(channels, eps=factory.eps, elementwise_affine=factory.affine)
        if factory.kind == "none":
            return nn.Identity()
        return ChannelsLast(_new_layer(factory, ChannelLayerNorm(channels), name, None))
    if rank is not None:
        return make_norm(factory, channels, rank, name)
    if factory.kind == "batch":
        track = True if factory.track_running_stats is None else factory.track_running_stats
        return BatchNormNd(channels, factory.eps, affine=factory.affine, track_running_stats=track)
    if factory.kind == "instance":
        track = False if factory.track_running_stats is None else factory.track_running_stats
        return InstanceNormNd(
            channels, factory.eps, affine=factory.affine, track_running_stats=track
        )
    return make_norm(factory, channels, 1, name)  # group, layer, none: rank-agnostic


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
    channels-last features ``(N, *, C)`` (a transformer's ``(N, L, C)`` tokens): ``layer`` keeps
    it a ``nn.LayerNorm``, other kinds are wrapped in :class:`ChannelsLast`. A LayerNorm over
    several axes (``LayerNorm([C, H, W])``) has no single channel axis and is skipped (reported).

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
