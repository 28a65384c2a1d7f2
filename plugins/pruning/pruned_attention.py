"""``nn.MultiheadAttention`` with heads removed: the same parameters (fewer rows), the same call.

``nn.MultiheadAttention`` ties its inner width to ``embed_dim`` (``head_dim = embed_dim //
num_heads``), so it cannot hold fewer heads of the same size. This module can: it keeps the
parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), the call signature and the
head size of the module it replaces, and so the softmax scale ``1 / sqrt(head_dim)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrunedMultiheadAttention"]


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention over ``num_heads`` heads of ``head_dim`` each, inner width
    ``num_heads * head_dim`` independent of ``embed_dim``: what compaction puts in place of an
    ``nn.MultiheadAttention`` that lost heads. Costs what the remaining heads cost.

    ``kept_heads`` are the original indices of the heads kept, to slice a per-head (3-D) ``attn_mask``
    given for the original heads. ``_qkv_same_embed_dim`` is ``False`` so that
    ``nn.TransformerEncoderLayer`` takes its Python path (its fused kernel assumes the full width).
    """

    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        head_dim: int,
        kept_heads: list[int],
        original_heads: int,
        dropout: float,
        batch_first: bool,
        bias: bool,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.head_dim = head_dim
        self.num_heads = len(kept_heads)
        self.original_heads = original_heads
        self.register_buffer("kept_heads", torch.tensor(kept_heads, dtype=torch.long), persistent=False)
        self.dropout = dropout
        self.batch_first = batch_first
        inner = self.num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=True)

    @classmethod
    @torch.no_grad()
    def from_attention(cls, attention: nn.MultiheadAttention, keep: torch.Tensor) -> PrunedMultiheadAttention:
        """The heads of ``attention`` that ``keep`` (bool, one per head) keeps, with their weights."""
        d = attention.head_dim
        kept = keep.nonzero().flatten().tolist()
        new = cls(
            attention.embed_dim,
            d,
            kept,
            attention.num_heads,
            attention.dropout,
            attention.batch_first,
            attention.in_proj_bias is not None,
        ).to(attention.in_proj_weight.device, attention.in_proj_weight.dtype)
        rows = keep.repeat_interleave(d).repeat(3).nonzero().flatten().to(attention.in_proj_weight.device)
        new.in_proj_weight.copy_(attention.in_proj_weight.index_select(0, rows))
        if new.in_proj_bias is not None:
            new.in_proj_bias.copy_(attention.in_proj_bias.index_select(0, rows))
        new.out_proj.weight.copy_(attention.out_proj.weight.index_select(1, rows[: len(kept) * d]))
        if attention.out_proj.bias is not None:
            new.out_proj.bias.copy_(attention.out_proj.bias)
        else:
            new.out_proj.bias.zero_()
        new.train(attention.training)
        return new

    def _additive_mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        batch: int,
        length: int,
        source: int,
        is_causal: bool,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """attn_mask (L, S) or (N * original heads, L, S) and key_padding_mask (N, S), bool (True =
        masked) or additive floats, as one additive (N, heads, L, S) mask."""
        total = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool).triu(1)
        if attn_mask is not None:
            m = F._canonical_mask(
                mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=dtype
            )
            if m.dim() == 3:  # per original head: keep the kept heads' rows
                m = m.view(batch, self.original_heads, length, source).index_select(1, self.kept_heads.to(m.device))
            total = m
        if key_padding_mask is not None:
            p = F._canonical_mask(
                mask=key_padding_mask, mask_name="key_padding_mask", other_type=None, other_name="", target_type=dtype
            ).view(batch, 1, 1, source)
            total = p if total is None else total + p
        return total

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1 if not self.batch_first else 0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, _ = query.shape
        source = key.shape[1]
        h, d = self.num_heads, self.head_dim
        bias = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        w = self.in_proj_weight.chunk(3)
        q, k, v = (
            F.linear(x, w_i, b_i).view(x.shape[0], x.shape[1], h, d).transpose(1, 2)
            for x, w_i, b_i in zip((query, key, value), w, bias, strict=True)
        )
        mask = self._additive_mask(attn_mask, key_padding_mask, n, length, source, is_causal, q.dtype)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # the head size as trained: the scale is kept
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = (weights @ v).transpose(1, 2).reshape(n, length, h * d)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
        if not need_weights:
            return out, None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights
