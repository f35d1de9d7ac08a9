"""Drop-in use: ToCa where code expects PyTorch's ``nn.MultiheadAttention``.

:class:`ToCaMultiheadAttention` takes the same constructor arguments, the same call
``(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)``
and returns the same ``(attn_output, attn_weights)`` pair, so it can replace ``self_attn`` inside
``nn.TransformerEncoderLayer`` or any module written against that API::

    layer = nn.TransformerEncoderLayer(256, 8, batch_first=True)
    layer.self_attn = ToCaMultiheadAttention(256, 8, batch_first=True, num_clusters=32)

Differences that follow from ToCa itself: keys and values must be the same tensor (clusters pool one
stream); the attention weights are over the M clusters, (B, N, M), not over the keys; and the only
``attn_mask`` is the causal one, for a layer built with ``causal=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tocalib.attention import ToCaAttention
from tocalib.causal import ClusterState, KVCache

__all__ = ["ToCaMultiheadAttention"]


class ToCaMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s interface around a :class:`~tocalib.ToCaAttention`.

    Args:
        embed_dim, num_heads, dropout, bias, batch_first: as in ``nn.MultiheadAttention``.
        num_clusters, clustering, causal: as in :class:`~tocalib.ToCaAttention`.
        **toca_kwargs: any other :class:`~tocalib.ToCaAttention` argument.
    """

    # PyTorch's encoder layers read these two before choosing their fused full-attention fast path,
    # which cannot run ToCa; these values make them take the regular path through this module.
    _qkv_same_embed_dim = False
    in_proj_bias = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        *,
        num_clusters: int = 64,
        clustering: str | nn.Module | None = "mlp",
        causal: bool = False,
        **toca_kwargs: Any,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.toca = ToCaAttention(
            embed_dim,
            num_heads,
            num_clusters,
            clustering,
            qkv_bias=bias,
            attn_drop=dropout,
            causal=causal,
            **toca_kwargs,
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """(B, N, C) or (N, B, C) query → ``(attn_output, attn_weights)``; weights (B, N, M) averaged over heads,
        (B, heads, N, M) otherwise, or None without ``need_weights``. ``key_padding_mask`` (B, L): bool with
        True = padding, or float with -inf = padding (as ``nn.TransformerEncoderLayer`` passes it)."""
        if key is not value:
            raise ValueError("ToCa pools keys and values from the same tokens: pass the same tensor as key and value")
        self._check_causal(attn_mask, is_causal, query.shape[0 if not self.batch_first else 1])
        self_attention = key is query
        if not self.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        context = None if self_attention else key
        pad = None if key_padding_mask is None else _as_padding(key_padding_mask)
        if need_weights:
            out, record = self.toca(
                query, context=context, key_padding_mask=pad, return_intermediates=True, need_weights=True
            )
            weights = record.attn_weights.mean(1) if average_attn_weights else record.attn_weights
        else:
            out, weights = self.toca(query, context=context, key_padding_mask=pad), None
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def step(
        self, query: Tensor, state: ClusterState | KVCache | None = None, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, ClusterState | KVCache]:
        """Incremental decoding for a ``causal=True`` layer: the outputs of T new positions (``query`` (B, T, E),
        or (T, B, E) without ``batch_first``) and the state to pass to the next call. See
        :meth:`tocalib.ToCaAttention.step`: for M > 0 the state has a fixed size, for M = 0 it is a KV cache."""
        if not self.batch_first:
            query = query.transpose(0, 1)
        pad = None if key_padding_mask is None else _as_padding(key_padding_mask)
        out, state = self.toca.step(query, state, key_padding_mask=pad)
        return (out if self.batch_first else out.transpose(0, 1)), state

    def _check_causal(self, attn_mask: Tensor | None, is_causal: bool, n: int) -> None:
        """Accept no mask, or the causal mask for a layer built with ``causal=True``."""
        if attn_mask is None and not is_causal:
            return
        if not self.toca.causal:
            raise ValueError(
                "ToCa mixes tokens into clusters, so an arbitrary attn_mask cannot apply; for causal attention "
                "build ToCaMultiheadAttention(..., causal=True)"
            )
        if attn_mask is not None:
            future = torch.ones(n, n, dtype=torch.bool, device=attn_mask.device).triu(1)
            blocked = attn_mask if attn_mask.dtype == torch.bool else attn_mask.isneginf()
            if tuple(attn_mask.shape) != (n, n) or not torch.equal(blocked, future):
                raise ValueError(
                    f"the only attn_mask ToCa takes is the ({n}, {n}) causal mask (True or -inf above the diagonal); "
                    f"got a {attn_mask.dtype} mask of shape {tuple(attn_mask.shape)} that differs from it"
                )


def _as_padding(mask: Tensor) -> Tensor:
    """A bool (True = padding) or additive float (-inf = padding) key-padding mask as bool."""
    return mask if mask.dtype == torch.bool else mask.isneginf()
