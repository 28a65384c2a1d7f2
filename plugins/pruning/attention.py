"""Attention as a structure of heads: which tensors hold a head, and how to remove heads exactly.

An adapter in :data:`ATTENTION` recognizes one kind of attention module and returns a
:class:`HeadStructure`: the projection tensors (rows of q/k/v, columns of the output projection,
head-major: head ``h`` owns rows ``h * head_dim ... (h + 1) * head_dim - 1``), the head count and
a way to remove heads. Removing a head removes its q/k/v rows and output columns and lowers the
head count; the head size, so the softmax scale ``1 / sqrt(head_dim)``, stays as trained. This is
the semantics of Hugging Face's ``prune_heads`` (transformers 4.x; 5.x dropped the method).

Registered adapters, tried in order:

- ``torch_mha``: ``nn.MultiheadAttention`` with one packed ``in_proj_weight`` (``nn.TransformerEncoder``
  and ``nn.TransformerDecoder`` layers). Compaction replaces it with
  :class:`~plugins.pruning.pruned_attention.PrunedMultiheadAttention`, which keeps its parameter
  names, its call signature and its head size.
- ``qkvo``: a module with ``Linear`` children for q, k and v (``q``/``k``/``v``, ``q_proj``...,
  ``query``/``key``/``value``, ``wq``..., ``to_q``...) and an integer head count (``num_heads``,
  ``heads``, ``n_heads``, ``n_head``, ``num_attention_heads``); the output projection is a child
  (``o``, ``o_proj``, ``out_proj``, ``wo``, ``to_out``) or, as in Hugging Face's BERT and ViT, the
  ``output.dense`` of its parent. Its forward must take the head count from that attribute (or
  infer it from the width) and the head size from the projection width or a fixed attribute;
  compaction checks that it did.
- ``packed_conv1d``: GPT-2 style ``c_attn``/``c_proj`` (Hugging Face ``Conv1D``, q/k/v packed).

A user's own attention registers an adapter: ``@ATTENTION.register("mine")`` on a function
``(module, name, parents) -> HeadStructure | None``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from plugins.core.registry import Registry

__all__ = ["ATTENTION", "HeadStructure", "Projection", "find_attention"]


@dataclass
class Projection:
    """One tensor of a head structure: ``axis`` 0 = its rows are heads' (q/k/v weights and
    biases), 1 = its columns are (the output projection); ``tiles`` head-major blocks one after
    another (3 in a packed q/k/v tensor)."""

    module: nn.Module
    tensor_name: str
    axis: int
    tiles: int = 1

    def expand(self, keep: torch.Tensor, head_dim: int, ndim: int) -> torch.Tensor:
        """A head keep vector ``(heads,)`` as this tensor's mask shape (broadcastable)."""
        rows = keep.repeat_interleave(head_dim).repeat(self.tiles)
        shape = [1] * ndim
        shape[self.axis] = rows.numel()
        return rows.view(shape)

    def contract(self, mask: torch.Tensor, heads: int) -> torch.Tensor:
        """Which heads this tensor's mask keeps (a head is kept while any of its entries is)."""
        m = (mask.detach() != 0).movedim(self.axis, 0).reshape(self.tiles, heads, -1)
        return m.any(dim=2).any(dim=0).cpu()

    def head_major(self, tensor: torch.Tensor, heads: int) -> torch.Tensor:
        """``tensor`` as ``(heads, everything a head owns)``, for criteria scoring heads."""
        t = tensor.detach().movedim(self.axis, 0)
        return t.reshape(self.tiles, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(heads, -1)

    def kept_indices(self, keep: torch.Tensor, head_dim: int) -> torch.Tensor:
        """The full-width indices along ``axis`` that survive removing the heads ``keep`` drops."""
        rows = keep.repeat_interleave(head_dim).repeat(self.tiles)
        return rows.nonzero().flatten()


@dataclass
class HeadStructure:
    """The heads of one attention module: ``weights`` (their projections' weights) and ``biases``
    (q/k/v biases), ``heads`` of ``head_dim`` each. ``remove(keep, root)`` removes the heads
    ``keep`` drops from the model ``root`` in place."""

    name: str
    module: nn.Module
    heads: int
    head_dim: int
    weights: list[Projection]
    biases: list[Projection] = field(default_factory=list)
    remove: Callable[[torch.Tensor, nn.Module], None] = lambda keep, root: None


Adapter = Callable[[nn.Module, str, dict[nn.Module, nn.Module]], "HeadStructure | None"]
ATTENTION: Registry[Adapter] = Registry("attention adapter")


def find_attention(model: nn.Module) -> list[HeadStructure]:
    """Every attention module of ``model`` a registered adapter recognizes, in module order."""
    parents = {child: module for module in model.modules() for child in module.children()}
    found = []
    for name, module in model.named_modules():
        for adapter_name in ATTENTION.names():
            structure = ATTENTION.get(adapter_name, "attention")(module, name, parents)
            if structure is not None:
                found.append(structure)
                break
    return found


@torch.no_grad()
def _slice_linear(linear: nn.Linear, axis: int, index: torch.Tensor) -> None:
    """Keep ``index`` along ``axis`` of a Linear's weight (0 also slices its bias)."""
    index = index.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(axis, index).clone())
    if axis == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, index).clone())
        linear.out_features = index.numel()
    else:
        linear.in_features = index.numel()


_Q, _K, _V = (
    ("q", "q_proj", "query", "wq", "to_q"),
    ("k", "k_proj", "key", "wk", "to_k"),
    ("v", "v_proj", "value", "wv", "to_v"),
)
_O = ("o", "o_proj", "out_proj", "wo", "to_out")
_HEAD_COUNTS = ("num_heads", "heads", "n_heads", "n_head", "num_attention_heads")


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Linear | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear):
            return child
    return None


@ATTENTION.register("qkvo")
def qkvo(module: nn.Module, name: str, parents: dict[nn.Module, nn.Module]) -> HeadStructure | None:
    """Separate q/k/v/o Linear projections with a head-count attribute (hand-written blocks,
    Hugging Face BERT and ViT self-attention)."""
    q, k, v = _child(module, _Q), _child(module, _K), _child(module, _V)
    count_name = next((n for n in _HEAD_COUNTS if isinstance(getattr(module, n, None), int)), None)
    if q is None or k is None or v is None or count_name is None:
        return None
    o = _child(module, _O)
    parent = parents.get(module)
    if o is None and parent is not None:
        o = getattr(getattr(parent, "output", None), "dense", None)  # BERT/ViT: parent.output.dense
    heads = getattr(module, count_name)
    width = q.out_features
    if not isinstance(o, nn.Linear) or heads <= 0 or width % heads:
        return None
    if not (k.out_features == v.out_features == width == o.in_features):
        return None  # grouped or multi-query attention: k/v have fewer heads than q
    head_dim = width // heads
    if (
        getattr(module, "attention_head_size", head_dim) != head_dim
        or getattr(module, "head_dim", head_dim) != head_dim
    ):
        return None

    def remove(keep: torch.Tensor, root: nn.Module) -> None:
        rows = keep.repeat_interleave(head_dim).nonzero().flatten()
        for linear in (q, k, v):
            _slice_linear(linear, 0, rows)
        _slice_linear(o, 1, rows)
        setattr(module, count_name, int(keep.sum()))
        if isinstance(getattr(module, "all_head_size", None), int):
            module.all_head_size = int(keep.sum()) * head_dim

    weights = [Projection(lin, "weight", 0) for lin in (q, k, v)] + [Projection(o, "weight", 1)]
    biases = [Projection(lin, "bias", 0) for lin in (q, k, v) if lin.bias is not None]
    return HeadStructure(name, module, heads, head_dim, weights, biases, remove)


@ATTENTION.register("torch_mha")
def torch_mha(module: nn.Module, name: str, parents: dict[nn.Module, nn.Module]) -> HeadStructure | None:
    """``nn.MultiheadAttention`` with a packed ``in_proj_weight`` and no ``bias_k``/``add_zero_attn``."""
    if not isinstance(module, nn.MultiheadAttention) or not module._qkv_same_embed_dim:
        return None
    if module.bias_k is not None or module.add_zero_attn:
        return None
    heads, head_dim = module.num_heads, module.head_dim

    def remove(keep: torch.Tensor, root: nn.Module) -> None:
        from plugins.pruning.pruned_attention import PrunedMultiheadAttention

        parent = parents[module]
        for child_name, child in parent.named_children():
            if child is module:
                setattr(parent, child_name, PrunedMultiheadAttention.from_attention(module, keep))

    weights = [Projection(module, "in_proj_weight", 0, tiles=3), Projection(module.out_proj, "weight", 1)]
    biases = [Projection(module, "in_proj_bias", 0, tiles=3)] if module.in_proj_bias is not None else []
    return HeadStructure(name, module, heads, head_dim, weights, biases, remove)


@torch.no_grad()
def _slice_param(module: nn.Module, name: str, axis: int, index: torch.Tensor) -> None:
    tensor = getattr(module, name)
    setattr(module, name, nn.Parameter(tensor.index_select(axis, index.to(tensor.device)).clone()))


@ATTENTION.register("packed_conv1d")
def packed_conv1d(module: nn.Module, name: str, parents: dict[nn.Module, nn.Module]) -> HeadStructure | None:
    """GPT-2 style self-attention: one packed ``c_attn`` (Hugging Face ``Conv1D``, weight ``(in,
    out)``: q, k, v side by side in its columns) and ``c_proj`` (its rows are the heads')."""
    c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not all(hasattr(c, "nf") and getattr(c, "weight", None) is not None for c in (c_attn, c_proj)):
        return None
    if not isinstance(heads, int) or not isinstance(head_dim, int) or hasattr(module, "q_attn"):
        return None  # cross-attention keeps q apart
    if c_attn.weight.shape[1] != 3 * heads * head_dim or c_proj.weight.shape[0] != heads * head_dim:
        return None

    def remove(keep: torch.Tensor, root: nn.Module) -> None:
        kept = int(keep.sum())
        columns = keep.repeat_interleave(head_dim).repeat(3).nonzero().flatten()
        _slice_param(c_attn, "weight", 1, columns)
        if c_attn.bias is not None:
            _slice_param(c_attn, "bias", 0, columns)
        c_attn.nf = 3 * kept * head_dim
        _slice_param(c_proj, "weight", 0, keep.repeat_interleave(head_dim).nonzero().flatten())
        module.num_heads = kept
        module.split_size = kept * head_dim

    weights = [Projection(c_attn, "weight", 1, tiles=3), Projection(c_proj, "weight", 0)]
    biases = [Projection(c_attn, "bias", 0, tiles=3)] if c_attn.bias is not None else []
    return HeadStructure(name, module, heads, head_dim, weights, biases, remove)
