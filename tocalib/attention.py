"""Token-to-cluster attention (ToCa): queries are the N tokens, keys and values M cluster tokens.

For tokens x (B, N, C) the layer computes

    logits = clustering(x)                      (B, M, N)
    C      = softmax over the N tokens          (B, M, N)   every row is a distribution over tokens
    Z      = cluster_norm(C · x)                (B, M, C)   each cluster is a weighted token average
    y      = proj(MHA(q(x), k(Z), v(Z)))        (B, N, C)   cost O(N·M·C) instead of O(N²·C)

exactly as PaCa-ViT's ``PaCaLayer``. ``num_clusters=0`` turns it into plain multi-head
self-attention (PaCa's last stage). The input is expected to be normalised already (pre-norm
blocks), as in PaCa.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib.clustering import build_clustering
from tocalib.pooling import cluster_counts, hard_assign, hard_assignment_matrix, pool, scatter_mean_pool, soft_assign

__all__ = ["ToCaAttention", "ToCaIntermediates"]


@dataclass
class ToCaIntermediates:
    """What one forward pass computed besides its output (fields are None where not computed).

    Attributes:
        assignment: (B, M, N) the normalised assignment that built the clusters.
        logits: (B, M, N) the raw clustering logits (None when the assignment was given).
        clusters: (B, M, C) the cluster tokens after ``cluster_norm``.
        attn_weights: (B, heads, N, M) token-to-cluster attention weights, only with
            ``need_weights=True`` (for M = 0 they are (B, heads, N, N)).
    """

    assignment: Tensor | None = None
    logits: Tensor | None = None
    clusters: Tensor | None = None
    attn_weights: Tensor | None = None


class ToCaAttention(nn.Module):
    """Token-to-cluster multi-head attention.

    Args:
        dim: token width C; must be divisible by ``num_heads``.
        num_heads: attention heads.
        num_clusters: M clusters; 0 gives plain multi-head self-attention over the tokens.
        clustering: a registered clustering name (see :func:`tocalib.list_clusterings`), a clustering
            module, or None for a layer that always receives ``assignment=`` (a block that reuses an
            earlier block's assignment, or one fed by a teacher).
        qkv_bias: bias in the q, k and v projections (``proj`` always has one).
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        cluster_norm: LayerNorm on the cluster tokens Z (PaCa's default).
        norm_eps: that LayerNorm's eps.
        clustering_kwargs: extra arguments for a named clustering, e.g. ``{"kernel_size": 5}``.

    Example:
        >>> attn = ToCaAttention(dim=64, num_heads=4, num_clusters=8)
        >>> attn(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

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
    ) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads != 0:
            raise ValueError(
                f"dim ({dim}) must be a positive multiple of num_heads ({num_heads}); "
                f"choose num_heads among the divisors of dim"
            )
        if num_clusters < 0:
            raise ValueError(f"num_clusters must be >= 0 (0 = full self-attention), got {num_clusters}")
        self.dim = dim
        self.num_heads = num_heads
        self.num_clusters = num_clusters
        self.head_dim = dim // num_heads
        self.attn_drop_p = attn_drop
        if num_clusters and clustering is not None:
            self.clustering = build_clustering(clustering, dim, num_clusters, **(clustering_kwargs or {}))
        else:
            self.clustering = None
        self.cluster_norm = nn.LayerNorm(dim, eps=norm_eps) if num_clusters and cluster_norm else nn.Identity()
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_clusters={self.num_clusters}"

    def forward(
        self,
        x: Tensor,
        size: Sequence[int] | None = None,
        key_padding_mask: Tensor | None = None,
        assignment: Tensor | None = None,
        return_assignment: bool = False,
        return_intermediates: bool = False,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Any]:
        """Attend from every token to the clusters.

        Args:
            x: (B, N, C) tokens.
            size: token layout, ``(H, W)`` for 2-D clustering (H·W = N); ignored by the others.
            key_padding_mask: (B, N) bool, True marks padding. Padded tokens get zero weight in every
                cluster, so real tokens' outputs do not depend on them.
            assignment: (B, M, N) an already normalised assignment to reuse instead of clustering.
            return_assignment: also return the (B, M, N) assignment that was used.
            return_intermediates: also return a :class:`ToCaIntermediates` record.
            need_weights: compute the (B, heads, N, M) attention weights on the explicit path (the
                default path is ``F.scaled_dot_product_attention``); needs ``return_intermediates``.

        Returns:
            y (B, N, C); ``(y, assignment)`` with ``return_assignment``; ``(y, intermediates)`` with
            ``return_intermediates``.
        """
        if return_assignment and return_intermediates:
            raise ValueError(
                "pass return_assignment or return_intermediates, not both (the record holds the assignment)"
            )
        if need_weights and not return_intermediates:
            raise ValueError(
                "need_weights=True returns the weights in the intermediates: also pass return_intermediates=True"
            )
        keep = self._check_inputs(x, key_padding_mask, assignment)
        if keep is not None:
            x = x.masked_fill(~keep.unsqueeze(-1), 0.0)
        record = ToCaIntermediates()
        attn_mask = None
        if self.num_clusters == 0:
            kv = x
            if keep is not None:  # sequences with no real token attend to all, which keeps them finite
                attn_mask = (keep | ~keep.any(dim=1, keepdim=True))[:, None, None, :]
        else:
            want = return_assignment or return_intermediates
            kv = self.cluster_norm(self._cluster(x, size, key_padding_mask, keep, assignment, want, record))
            record.clusters = kv
        out = self._attend(
            self._heads(self.q(x)), self._heads(self.k(kv)), self._heads(self.v(kv)), attn_mask, need_weights, record
        )
        y = self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))
        if return_assignment:
            return y, record.assignment
        if return_intermediates:
            return y, record
        return y

    def _cluster(
        self,
        x: Tensor,
        size: Sequence[int] | None,
        key_padding_mask: Tensor | None,
        keep: Tensor | None,
        assignment: Tensor | None,
        want_assignment: bool,
        record: ToCaIntermediates,
    ) -> Tensor:
        """Cluster tokens Z (B, M, C) before ``cluster_norm``; fills ``record.assignment``/``logits``.

        A hard clustering builds its dense (B, M, N) assignment only when ``want_assignment``.
        """
        if assignment is not None:
            record.assignment = assignment
            return pool(assignment.to(x.dtype), x)
        if self.clustering is None:
            raise ValueError(
                "this ToCaAttention has no clustering function (clustering=None): pass assignment= "
                "(B, M, N), e.g. from an earlier block or a teacher, or build it with clustering='mlp'"
            )
        logits = self.clustering(x, size=size, key_padding_mask=key_padding_mask)
        expected = (x.shape[0], self.num_clusters, x.shape[1])
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"clustering returned logits of shape {tuple(logits.shape)}, expected (B, M, N) = {expected}"
            )
        record.logits = logits
        if not getattr(self.clustering, "hard", False):
            record.assignment = soft_assign(logits, keep)
            return pool(record.assignment, x)
        index, weight = hard_assign(logits, keep)
        counts = cluster_counts(index, weight, self.num_clusters)
        if want_assignment:
            record.assignment = hard_assignment_matrix(index, weight, counts)
        return scatter_mean_pool(x, index, weight, counts, self.clustering.scatter_backend)

    def _heads(self, t: Tensor) -> Tensor:
        """(B, L, C) → (B, heads, L, head_dim)."""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, need_weights: bool, record: ToCaIntermediates
    ) -> Tensor:
        """Scaled dot-product attention: SDPA by default, explicit matmuls when weights are needed."""
        if not need_weights:
            dropout_p = self.attn_drop_p if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        record.attn_weights = scores.softmax(dim=-1)
        return torch.matmul(self.attn_drop(record.attn_weights), v)

    def _check_inputs(self, x: Tensor, key_padding_mask: Tensor | None, assignment: Tensor | None) -> Tensor | None:
        """Validate shapes and dtypes; return ``keep`` (B, N) bool (True = real token) or None."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have shape (B, N, C) with C = dim = {self.dim}, got {tuple(x.shape)}; "
                f"for an image feature map (B, C, H, W) pass x.flatten(2).transpose(1, 2) and size=(H, W)"
            )
        b, n, _ = x.shape
        if assignment is not None:
            if self.num_clusters == 0:
                raise ValueError("assignment= was given but this layer has num_clusters=0 (plain self-attention)")
            if tuple(assignment.shape) != (b, self.num_clusters, n) or not assignment.is_floating_point():
                raise ValueError(
                    f"assignment must be a floating tensor of shape (B, M, N) = {(b, self.num_clusters, n)}, "
                    f"got {assignment.dtype} {tuple(assignment.shape)}"
                )
        if key_padding_mask is None:
            return None
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, n):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape (B, N) = {(b, n)} with True = padding, got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}; convert with `mask.bool()`"
            )
        return ~key_padding_mask

    def macs(self, num_tokens: int, computes_assignment: bool | None = None) -> int:
        """Analytic multiply-accumulates of one forward pass on one sequence of ``num_tokens`` tokens.

        fvcore convention (what the PaCa paper calls FLOPs): linear/conv/matmul MACs, LayerNorm at
        5 per element, a scatter-add at 1 per source element; biases, softmax and activations are
        free. ``computes_assignment`` (default: the layer has a clustering function) says whether
        this call runs the clustering or reuses a given assignment.
        """
        n, c, m = num_tokens, self.dim, self.num_clusters
        total = 2 * n * c * c  # q and proj
        if m == 0:
            return total + 2 * n * c * c + 2 * n * n * c  # k, v on tokens; QKᵀ and AV
        total += 2 * m * c * c + 2 * n * m * c  # k, v on clusters; QKᵀ and AV
        if isinstance(self.cluster_norm, nn.LayerNorm):
            total += 5 * m * c
        if computes_assignment is None:
            computes_assignment = self.clustering is not None
        if not computes_assignment:
            return total + n * m * c  # pooling C · X
        if self.clustering is None:
            raise ValueError("computes_assignment=True but this layer has no clustering function")
        hard = getattr(self.clustering, "hard", False)
        pooling = n * c + n if hard else n * m * c  # hard: member sums and member counts by scatter
        return total + pooling + self.clustering.macs(n)
