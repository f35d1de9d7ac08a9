"""Turning clustering logits into assignments, and assignments into cluster tokens.

Shapes: B batch, N tokens, M clusters, C channels.

* Soft assignment (PaCa): ``C = softmax_N(logits)`` per cluster, so each cluster token
  ``Z[m] = sum_n C[m, n] x[n]`` is a weighted average of tokens.
* Hard assignment: each token joins its best cluster (argmax over M); ``Z[m]`` is the plain mean of
  its members, computed with a scatter in O(N·C) instead of the O(N·M·C) dense product. Gradients
  reach the logits by the straight-through rule: each token is weighted by ``1 + p - p.detach()`` (= 1
  in the forward pass) where ``p`` is its softmax-over-clusters probability of the chosen cluster.

Padding (``keep`` False) never contributes: padded tokens get zero weight in every cluster, and a
sequence with no real token yields all-zero assignments (no NaN).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

__all__ = [
    "SCATTER_BACKENDS",
    "cluster_counts",
    "hard_assign",
    "hard_assignment_matrix",
    "pool",
    "scatter_mean_pool",
    "soft_assign",
]

SCATTER_BACKENDS = ("torch", "torch_scatter")


def soft_assign(logits: Tensor, keep: Tensor | None = None) -> Tensor:
    """Softmax over tokens, with padded tokens at exactly zero weight.

    Args:
        logits: (B, M, N) raw clustering scores.
        keep: optional (B, N) bool, True for real tokens.

    Returns:
        (B, M, N) in ``logits.dtype``; each row sums to 1 over the real tokens, or is all zero when a
        sequence has no real token or a cluster's logits are -inf at every token (an empty cluster, not
        NaN, forward and backward). The softmax runs in at least float32 so bf16/fp16 inputs stay accurate.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    scores = logits.to(dtype)
    if keep is not None:
        keep3 = keep.unsqueeze(1)  # (B, 1, N)
        scores = scores.masked_fill(~keep3, torch.finfo(dtype).min)
    live = ~(scores == float("-inf")).all(dim=-1, keepdim=True)  # (B, M, 1): some token may join (NaN stays NaN)
    probs = scores.masked_fill(~live, 0.0).softmax(dim=-1) * live
    return (probs if keep is None else probs * keep3).to(logits.dtype)


def pool(assignment: Tensor, x: Tensor) -> Tensor:
    """Cluster tokens ``Z = C · X``: (B, M, N) × (B, N, C) → (B, M, C)."""
    return torch.matmul(assignment, x)


def hard_assign(logits: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each token's best cluster and its straight-through weight.

    Args:
        logits: (B, M, N) raw clustering scores.
        keep: optional (B, N) bool, True for real tokens.

    Returns:
        ``index`` (B, N) long in [0, M) and ``weight`` (B, N) in ``logits.dtype``: 1 for real tokens
        in the forward pass, with the gradient of the chosen cluster's softmax probability (the
        straight-through rule ``1 + p - p.detach()``), and 0 for padding.
    """
    probs = logits.softmax(dim=1, dtype=torch.float32)  # (B, M, N), over clusters
    chosen, index = probs.max(dim=1)  # (B, N)
    weight = 1 + (chosen - chosen.detach())
    if keep is not None:
        weight = weight * keep
    return index, weight.to(logits.dtype)


def cluster_counts(index: Tensor, weight: Tensor, num_clusters: int) -> Tensor:
    """(B, M) number of members of each cluster (padding has weight 0 and is not counted)."""
    real = (weight.detach() != 0).to(weight.dtype)
    counts = weight.new_zeros(index.shape[0], num_clusters)
    return counts.scatter_add_(1, index, real)


def scatter_mean_pool(x: Tensor, index: Tensor, weight: Tensor, counts: Tensor, backend: str = "torch") -> Tensor:
    """Mean of each cluster's members, by scatter: (B, N, C) → (B, M, C). Empty clusters give 0. The sums
    run in at least float32, so half-precision inputs cannot overflow them.

    Args:
        x: (B, N, C) tokens.
        index: (B, N) long cluster of each token.
        weight: (B, N) per-token weight (see :func:`hard_assign`); 0 excludes a token.
        counts: (B, M) members per cluster, from :func:`cluster_counts`.
        backend: ``"torch"`` (native ``index_add_``) or ``"torch_scatter"`` (needs the optional
            ``torch-scatter`` package: ``pip install tocalib[scatter]``).
    """
    if backend not in SCATTER_BACKENDS:
        raise ValueError(f"scatter backend {backend!r} is unknown; expected one of {SCATTER_BACKENDS}")
    b, n, c = x.shape
    num_clusters = counts.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)  # half-precision sums of many members overflow
    weighted = x.to(acc) * weight.to(acc).unsqueeze(-1)
    flat_index = (index + num_clusters * torch.arange(b, device=x.device).unsqueeze(1)).reshape(-1)
    if backend == "torch":
        sums = weighted.new_zeros(b * num_clusters, c).index_add_(0, flat_index, weighted.reshape(b * n, c))
    else:
        sums = _torch_scatter().scatter(
            weighted.reshape(b * n, c), flat_index, dim=0, dim_size=b * num_clusters, reduce="sum"
        )
    return (sums.reshape(b, num_clusters, c) / counts.clamp_min(1).unsqueeze(-1)).to(x.dtype)


def hard_assignment_matrix(index: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """The dense (B, M, N) form of a hard assignment: ``weight / count`` at each member, else 0.

    ``pool(hard_assignment_matrix(i, w, n), x)`` equals ``scatter_mean_pool(x, i, w, n)``; each row
    sums to 1 over its members, and rows of empty clusters are zero.
    """
    onehot = torch.nn.functional.one_hot(index, counts.shape[1]).transpose(1, 2).to(weight.dtype)
    return onehot * weight.unsqueeze(1) / counts.clamp_min(1).unsqueeze(-1)


def _torch_scatter():
    if importlib.util.find_spec("torch_scatter") is None:
        raise ModuleNotFoundError(
            "scatter backend 'torch_scatter' needs the optional torch-scatter package; install it with "
            "`pip install --no-build-isolation torch-scatter` or use backend='torch'"
        )
    import torch_scatter

    return torch_scatter
