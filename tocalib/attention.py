"""Token-to-cluster attention (ToCa): queries are the N tokens, keys and values M cluster tokens.

For tokens x (B, N, C) the layer computes

    logits = clustering(x)                      (B, M, N)
    C      = softmax over the N tokens          (B, M, N)   every row is a distribution over tokens
    Z      = cluster_norm(C · x)                (B, M, C)   each cluster is a weighted token average
    y      = proj(MHA(q(x), k(Z), v(Z)))        (B, N, C)   cost O(N·M·C) instead of O(N²·C)

exactly as PaCa-ViT's ``PaCaLayer``. ``num_clusters=0`` turns it into plain multi-head
self-attention (PaCa's last stage). The input is expected to be normalised already (pre-norm
blocks), as in PaCa. Variants: cross-attention (clusters pooled from a separate ``context``),
causal (position t sees clusters of tokens ≤ t, :mod:`tocalib.causal`) and packed batches
(``cu_seqlens``, :mod:`tocalib.packing`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib._checks import _NOT_SCRIPTABLE, check_forward, check_step
from tocalib.causal import (
    ClusterState,
    KVCache,
    Projections,
    causal_cluster_macs,
    causal_toca,
    causal_toca_step,
    full_attention_mask,
    full_attention_step,
)
from tocalib.clustering import build_clustering
from tocalib.packing import pack, unpack
from tocalib.pooling import Assignment
from tocalib.validation import check_int

__all__ = ["ToCaAttention", "ToCaIntermediates"]


@dataclass
class ToCaIntermediates:
    """What one forward pass computed besides its output (fields are None where not computed).

    Attributes:
        assignment: the :class:`~tocalib.Assignment` that built the clusters, over L tokens (L = N, or the
            context length in cross-attention): soft, hard, or in causal mode the logits. Pass it to
            another layer's ``assignment=`` to share it; ``.dense()`` gives the (B, M, L) matrix (in
            causal mode, the one the last position sees).
        logits: (B, M, L) the raw clustering logits (None when the assignment was given).
        clusters: (B, M, C) the cluster tokens after ``cluster_norm`` (None in causal mode, where
            every position has its own).
        attn_weights: (B, heads, N, M) token-to-cluster attention weights, only with
            ``need_weights=True`` (for M = 0 they are (B, heads, N, L)).
    """

    assignment: Assignment | None = None
    logits: Tensor | None = None
    clusters: Tensor | None = None
    attn_weights: Tensor | None = None


class ToCaAttention(nn.Module):
    """Token-to-cluster multi-head attention.

    Args:
        dim: token width C; must be divisible by ``num_heads``.
        num_heads: attention heads.
        num_clusters: M clusters; 0 gives plain multi-head attention over the tokens.
        clustering: a registered clustering name (see :func:`tocalib.list_clusterings`), a clustering
            module, or None for a layer that always receives ``assignment=`` (a block that reuses an
            earlier block's assignment, or one fed by a teacher).
        qkv_bias: bias in the q, k and v projections (``proj`` always has one).
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        cluster_norm: LayerNorm on the cluster tokens Z (PaCa's default).
        norm_eps: that LayerNorm's eps.
        clustering_kwargs: extra arguments for a named clustering, e.g. ``{"kernel_size": 5}``.
        causal: position t attends only to clusters pooled from tokens ≤ t, exactly the non-causal layer
            run on the prefix ``x[:, :t+1]`` (needs a clustering whose logit for token s uses tokens ≤ s:
            ``linear``, ``mlp`` or ``conv1d`` with ``clustering_kwargs={"causal": True}``). Computed as a
            chunked scan with a carried state of M cluster entries (:mod:`tocalib.causal`), in
            O(C² + M·C + T·C + h·M·T) per position for chunk size T; :meth:`step` decodes with that
            state. With ``num_clusters=0`` it is causal full attention (SDPA's ``is_causal``), and
            :meth:`step` keeps a KV cache.
        chunk_size: T, positions per chunk of the causal scan. The default 64 balances the intra-chunk
            work (∝ T) against the carried state read per chunk (∝ M·C / T); 32–128 are all reasonable.
        recompute: causal layers: keep only the scan's state between blocks for the backward pass and
            recompute the rest there (training memory O(N·(C + M)) instead of
            O(N·(C + h·M + h·T + M·C/T)), one more forward pass of the scan).
        device, dtype: where and in which dtype to create the parameters (PyTorch's factory kwargs).

    Example:
        >>> attn = ToCaAttention(dim=64, num_heads=4, num_clusters=8)
        >>> attn(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    check_assignment: bool = True
    """Whether a given ``assignment=`` is checked to be a distribution over the tokens, and a given
    :class:`~tocalib.Assignment`'s padding to equal the call's ``key_padding_mask`` (a reduction and a host sync
    per call; set it to False on a layer, or on the class, to skip them). The blocks of a
    :class:`~tocalib.ToCaStack` that reuse an assignment skip them: the stack gives them the padding and the
    assignment it built itself."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_clusters: int = 64,
        clustering: str | nn.Module | None = "mlp",
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        cluster_norm: bool = True,
        norm_eps: float = 1e-6,
        clustering_kwargs: dict[str, Any] | None = None,
        causal: bool = False,
        chunk_size: int = 64,
        recompute: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        dim, num_heads = check_int("dim", dim, 1), check_int("num_heads", num_heads, 1)
        num_clusters, chunk_size = check_int("num_clusters", num_clusters, 0), check_int("chunk_size", chunk_size, 1)
        if dim % num_heads != 0:
            raise ValueError(
                f"dim ({dim}) must be a positive multiple of num_heads ({num_heads}); "
                f"choose num_heads among the divisors of dim"
            )
        self.dim, self.num_heads, self.num_clusters = dim, num_heads, num_clusters
        self.head_dim = dim // num_heads
        self.attn_drop_p = attn_drop
        self.causal, self.chunk_size, self.recompute = causal, chunk_size, recompute
        if num_clusters and clustering is not None:
            kwargs = clustering_kwargs or {}
            self.clustering = build_clustering(clustering, dim, num_clusters, **factory, **kwargs)
        else:
            self.clustering = None
        if causal and getattr(self.clustering, "hard", False):
            raise ValueError(
                "causal=True needs a soft clustering: a hard one pools each cluster's members by scatter over the "
                "whole sequence, while a causal layer renormalises soft logits per prefix; use clustering='mlp'"
            )
        if causal and self.clustering is not None and not getattr(self.clustering, "causal_safe", False):
            raise ValueError(
                f"causal=True needs a clustering whose logit for token s uses only tokens <= s, got {clustering!r}; "
                "use 'linear', 'mlp', or 'conv1d' with clustering_kwargs={'causal': True}"
            )
        normed = num_clusters and cluster_norm
        self.cluster_norm = nn.LayerNorm(dim, eps=norm_eps, **factory) if normed else nn.Identity()
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.k = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_clusters={self.num_clusters}, causal={self.causal}"

    def forward(
        self,
        x: Tensor,
        *,
        size: Sequence[int] | None = None,
        key_padding_mask: Tensor | None = None,
        assignment: Tensor | Assignment | None = None,
        context: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        need_weights: bool = False,
        return_intermediates: bool = False,
    ) -> Tensor | tuple[Tensor, ToCaIntermediates]:
        """Attend from every token to the clusters.

        Args:
            x: (B, N, C) query tokens, or (T, C) packed sequences with ``cu_seqlens``.
            size: layout of the clustered tokens, ``(H, W)`` for 2-D clustering; ignored otherwise.
            key_padding_mask: (B, L) bool over the clustered tokens (x, or ``context``), True marks
                padding: padded tokens get zero weight in every cluster, so nothing depends on them.
            assignment: an assignment to reuse instead of clustering: an :class:`~tocalib.Assignment` (from an
                earlier layer's intermediates or a provider; the causal form, logits, for a causal layer), or a
                normalised (B, M, L) tensor: weights >= 0 whose rows sum to 1 over the real tokens (checked, see
                ``check_assignment``).
            context: (B, L, C) cross-attention: clusters are pooled from these tokens instead of x.
            cu_seqlens: (S + 1,) int cumulative lengths of S sequences packed into x (T, C); the output
                is packed the same way and equals the padded computation.
            need_weights: compute the (B, heads, N, M) attention weights on the explicit path (the
                default path is ``F.scaled_dot_product_attention``); needs ``return_intermediates``.
            return_intermediates: also return a :class:`ToCaIntermediates` record (the assignment used,
                the cluster tokens, the attention weights).

        Returns:
            y (B, N, C), or ``(y, intermediates)`` with ``return_intermediates``. With ``cu_seqlens``, y is
            (T, C) and the record's assignment covers the padded (S, max_len) batch.
        """
        if need_weights and not return_intermediates:
            raise ValueError(
                "need_weights=True returns the weights in the intermediates: also pass return_intermediates=True"
            )
        if cu_seqlens is not None:
            if key_padding_mask is not None or context is not None or size is not None:
                raise ValueError(
                    "cu_seqlens describes the whole batch: do not combine it with key_padding_mask, context or size"
                )
            padded, pad = unpack(x, cu_seqlens)
            out = self(padded, key_padding_mask=pad, assignment=assignment, need_weights=need_weights,
                       return_intermediates=return_intermediates)  # fmt: skip
            return (pack(out[0], pad), out[1]) if return_intermediates else pack(out, pad)
        keep = check_forward(self, x, context, key_padding_mask, assignment)
        source = x if context is None else context
        if keep is not None:
            source = source.masked_fill(~keep.unsqueeze(-1), 0.0)
            x = source if context is None else x
        record = ToCaIntermediates()
        if self.causal and self.num_clusters:
            if assignment is None:
                record.logits = self._logits(x, size, key_padding_mask)
                assignment = Assignment.from_logits(record.logits, keep, causal=True)
            record.assignment = assignment
            out, record.attn_weights, _ = causal_toca(
                x, assignment.logits, self._projections(), keep=keep, chunk_size=self.chunk_size,
                dropout_p=self.attn_drop_p if self.training else 0.0, need_weights=need_weights, final_state=False,
                recompute=self.recompute,
            )  # fmt: skip
        else:
            if self.num_clusters:
                self._assignment(source, size, key_padding_mask, keep, assignment, record)
                kv = record.clusters = self.cluster_norm(record.assignment.pool(source))
            else:
                kv = source
            attn_mask = None
            if not self.num_clusters:
                attn_mask = full_attention_mask(keep, x.shape[1], source.shape[1], self.causal, x.device)
            is_causal = self.causal and not self.num_clusters and attn_mask is None  # self-attention: N = L
            out, record.attn_weights = self._attend(
                self._heads(self.q(x)),
                self._heads(self.k(kv)),
                self._heads(self.v(kv)),
                attn_mask,
                need_weights,
                is_causal,
            )
            out = out.transpose(-3, -2).flatten(-2)
        y = self.proj_drop(self.proj(out))
        return (y, record) if return_intermediates else y

    def step(
        self, x: Tensor, state: ClusterState | KVCache | None = None, *, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, ClusterState | KVCache]:
        """Incremental causal decoding: append T ≥ 1 new positions to a sequence and get their outputs.

        ``step`` over any split of a sequence gives the parallel forward's outputs (up to float rounding).
        For M > 0 the state is a :class:`~tocalib.causal.ClusterState` of fixed size, O(M·C) per layer
        (a cache of M cluster entries instead of N tokens), and a token costs O(C² + M·C) (the
        projections, the clustering, scores and values against the M clusters) whatever its position.
        For ``num_clusters=0`` it is a :class:`~tocalib.causal.KVCache`, which grows by one entry per
        position.

        Args:
            x: (B, T, C) the new positions.
            state: what the previous call returned, or None at the start of a sequence.
            key_padding_mask: (B, T) bool, True at padded new positions (they never enter a cluster).

        Padded new positions are zeroed, as in the forward pass; a clustering that looks back (a causal
        conv1d) sees those zeros in its window, and a clustering that reads ``key_padding_mask`` is told
        which of its window's tokens were padding.

        Returns:
            ``(y, state)``: y (B, T, C), and the state after the new positions.

        Example:
            >>> layer = ToCaAttention(32, num_heads=4, num_clusters=8, causal=True).eval()
            >>> x = torch.randn(1, 10, 32)
            >>> y1, state = layer.step(x[:, :6])
            >>> y2, state = layer.step(x[:, 6:], state)
            >>> torch.allclose(torch.cat([y1, y2], 1), layer(x), atol=1e-5)
            True
        """
        keep = check_step(self, x, key_padding_mask, state)
        if keep is not None:
            x = x.masked_fill(~keep.unsqueeze(-1), 0.0)
        dropout_p = self.attn_drop_p if self.training else 0.0
        if not self.num_clusters:
            out, state = full_attention_step(x, self._projections(), state, keep=keep, dropout_p=dropout_p)
        else:
            out, state = causal_toca_step(
                x, self.clustering, self._projections(), state, keep=keep, chunk_size=self.chunk_size,
                dropout_p=dropout_p,
            )  # fmt: skip
        return self.proj_drop(self.proj(out)), state

    def _projections(self) -> Projections:
        norm = self.cluster_norm if isinstance(self.cluster_norm, nn.LayerNorm) else None
        return Projections(
            self.q.weight, self.q.bias, self.k.weight, self.k.bias, self.v.weight, self.v.bias, norm, self.num_heads
        )

    def _assignment(
        self,
        x: Tensor,
        size: Sequence[int] | None,
        key_padding_mask: Tensor | None,
        keep: Tensor | None,
        given: Tensor | Assignment | None,
        record: ToCaIntermediates,
    ) -> None:
        """The assignment that pools this call's clusters (the given one, or this layer's clustering's), into
        ``record`` with the logits it came from."""
        if isinstance(given, Assignment):
            record.assignment = given
        elif given is not None:
            record.assignment = Assignment.from_matrix(given, keep)
        else:
            hard = getattr(self.clustering, "hard", False)
            backend = getattr(self.clustering, "scatter_backend", "torch")
            record.logits = self._logits(x, size, key_padding_mask)
            record.assignment = Assignment.from_logits(record.logits, keep, hard=hard, backend=backend)

    def _logits(self, x: Tensor, size: Sequence[int] | None, key_padding_mask: Tensor | None) -> Tensor:
        if self.clustering is None:
            given = "Assignment.from_logits(logits, causal=True)" if self.causal else "a (B, M, N) tensor or Assignment"
            raise ValueError(
                f"this ToCaAttention has no clustering function (clustering=None): pass assignment= ({given}), e.g. "
                "from an earlier block or a provider, or build it with clustering='mlp'"
            )
        logits = self.clustering(x, size=size, key_padding_mask=key_padding_mask)
        expected = (x.shape[0], self.num_clusters, x.shape[1])
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"clustering returned logits of shape {tuple(logits.shape)}, expected (B, M, N) = {expected}"
            )
        return logits

    def _heads(self, t: Tensor) -> Tensor:
        """(..., L, C) → (..., heads, L, head_dim)."""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, need_weights: bool, is_causal: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Scaled dot-product attention: SDPA by default, explicit matmuls when weights are needed.

        ``is_causal`` (queries and keys of one length, no ``attn_mask``) is SDPA's fused causal attention.
        """
        if not need_weights:
            dropout_p = self.attn_drop_p if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal), None
        if is_causal:
            attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        return torch.matmul(self.attn_drop(weights), v), weights

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this first: ToCa uses Python that TorchScript cannot compile."""
        raise TypeError(_NOT_SCRIPTABLE.format(type(self).__name__))

    def macs(
        self,
        num_tokens: int,
        *,
        computes_assignment: bool | None = None,
        hard: bool | None = None,
        context_tokens: int | None = None,
    ) -> int:
        """Analytic multiply-accumulates of one forward pass on one sequence of ``num_tokens`` tokens.

        fvcore convention (what the PaCa paper calls FLOPs): linear/conv/matmul MACs, LayerNorm at
        5 per element, a scatter-add at 1 per source element; biases, softmax and activations are
        free. ``computes_assignment`` (default: the layer has a clustering function) says whether
        this call runs the clustering or reuses a given assignment; ``hard`` whether the assignment is
        pooled by scatter (default: this layer's clustering is hard and runs); ``context_tokens`` is the
        context length L in cross-attention.
        """
        n, c, m = check_int("num_tokens", num_tokens, 0), self.dim, self.num_clusters
        length = n if context_tokens is None else check_int("context_tokens", context_tokens, 0)
        total = 2 * n * c * c  # q and proj
        if m == 0:
            pairs = n * (n + 1) // 2 if self.causal else n * length  # a causal kernel skips the masked pairs
            return total + 2 * length * c * c + 2 * pairs * c  # k, v on the tokens; QKᵀ and AV
        if computes_assignment is None:
            computes_assignment = self.clustering is not None
        if computes_assignment and self.clustering is None:
            raise ValueError("computes_assignment=True but this layer has no clustering function")
        clustering = self.clustering.macs(length) if computes_assignment else 0
        if self.causal:
            normed = isinstance(self.cluster_norm, nn.LayerNorm)
            scan = causal_cluster_macs(n, c, self.num_heads, m, self.chunk_size, normed)
            return total + 2 * n * c * c + clustering + scan  # q and proj, k and v on the tokens, the scan
        total += 2 * m * c * c + 2 * n * m * c  # k, v on clusters; QKᵀ and AV
        if isinstance(self.cluster_norm, nn.LayerNorm):
            total += 5 * m * c
        if hard is None:
            hard = computes_assignment and getattr(self.clustering, "hard", False)
        if not hard:
            return total + length * m * c + clustering  # the pooling C·X
        counts = length if computes_assignment else 0  # the members are counted where the assignment is built
        return total + length * c + counts + clustering  # hard: the member sums by scatter
