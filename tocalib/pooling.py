"""Turning clustering logits into assignments, and assignments into cluster tokens.

Shapes: B batch, N tokens, M clusters, C channels.

* Soft assignment (PaCa): ``C = softmax_N(logits)`` per cluster, so each cluster token
  ``Z[m] = sum_n C[m, n] x[n]`` is a weighted average of tokens.
* Hard assignment: each token joins its best cluster (argmax over M); ``Z[m]`` is the plain mean of
  its members, computed with a scatter in O(N·C) instead of the O(N·M·C) dense product. Gradients
  reach the logits by the straight-through rule: each token is weighted by ``1 + p - p.detach()`` (= 1
  in the forward pass) where ``p`` is its softmax-over-clusters probability of the chosen cluster.
* Causal assignment: only the logits. Position t of a causal layer sees ``softmax`` over the tokens
  ≤ t, so the layer renormalises them per prefix itself (:mod:`tocalib.causal`).

:class:`Assignment` holds one of the three forms; it is what flows from a clustering, a provider
(:mod:`tocalib.providers`) or an earlier block to the layers that reuse it, so that no (B, M, N)
matrix is built where its consumer does not need one.

Padding (``keep`` False) never contributes: padded tokens get zero weight in every cluster, and a
sequence with no real token yields all-zero assignments (no NaN).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SCATTER_BACKENDS",
    "Assignment",
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
    if scores.shape[-1]:  # (B, M, 1): some token may join (NaN stays NaN)
        live = scores.amax(dim=-1, keepdim=True) != float("-inf")
    else:  # no token at all: every cluster is empty
        live = torch.zeros(*scores.shape[:-1], 1, dtype=torch.bool, device=scores.device)
    fixed_graph = torch.jit.is_tracing() or torch.compiler.is_compiling()  # no data-dependent branch there
    if scores.device.type == "cpu" and not fixed_graph and bool(live.all()):
        probs = scores.softmax(dim=-1)  # what the general line gives when every cluster is live, two passes fewer
    else:
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
    index = logits.argmax(dim=1)  # (B, N)
    scores = logits.float()  # the chosen cluster's softmax-over-clusters probability, without a (B, M, N) softmax
    chosen = (scores.gather(1, index.unsqueeze(1)).squeeze(1) - scores.logsumexp(dim=1)).exp()
    weight = 1 + (chosen - chosen.detach())
    if keep is not None:
        weight = weight * keep
    return index, weight.to(logits.dtype)


def cluster_counts(index: Tensor, weight: Tensor, num_clusters: int) -> Tensor:
    """(B, M) number of members of each cluster (padding has weight 0 and is not counted), in at least float32."""
    dtype = torch.promote_types(weight.dtype, torch.float32)  # a half-precision count stops at 256 or 2048
    real = (weight.detach() != 0).to(dtype)
    counts = weight.new_zeros(index.shape[0], num_clusters, dtype=dtype)
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
    return (onehot * weight.unsqueeze(1) / counts.clamp_min(1).unsqueeze(-1)).to(weight.dtype)


def _torch_scatter():
    if importlib.util.find_spec("torch_scatter") is None:
        raise ModuleNotFoundError(
            "scatter backend 'torch_scatter' needs the optional torch-scatter package; install it with "
            "`pip install --no-build-isolation torch-scatter` or use backend='torch'"
        )
    import torch_scatter

    return torch_scatter


@dataclass(frozen=True, eq=False)
class Assignment:
    """An assignment of N tokens to M clusters (batch B), in the form that its consumers need.

    Build it with :meth:`from_logits` (or :meth:`from_matrix` for a normalised (B, M, N) tensor). Its
    form is one of:

    * ``"soft"``: ``matrix`` (B, M, N), each row a distribution over the real tokens;
    * ``"hard"``: ``index`` (B, N) and ``weight`` (B, N) (see :func:`hard_assign`) with ``counts``
      (B, M): pooled by scatter, no (B, M, N) matrix;
    * ``"causal"``: ``logits`` (B, M, N), which a causal layer renormalises per prefix.

    ``keep`` (B, N) bool marks the real tokens (None: all are real); a layer that takes the assignment
    must get the same padding (its ``key_padding_mask``, or none).

    Example:
        >>> a = Assignment.from_logits(torch.randn(2, 4, 10))
        >>> a.form, a.pool(torch.randn(2, 10, 8)).shape, a.dense().shape
        ('soft', torch.Size([2, 4, 8]), torch.Size([2, 4, 10]))
    """

    logits: Tensor | None = None
    matrix: Tensor | None = None
    index: Tensor | None = None
    weight: Tensor | None = None
    counts: Tensor | None = None
    keep: Tensor | None = None
    backend: str = "torch"

    @classmethod
    def from_logits(
        cls,
        logits: Tensor,
        keep: Tensor | None = None,
        *,
        hard: bool = False,
        causal: bool = False,
        backend: str = "torch",
    ) -> Assignment:
        """The assignment that clustering logits (B, M, N) define: a softmax over the real tokens, each
        token's best cluster with ``hard``, or the logits themselves with ``causal``.

        ``keep`` (B, N) bool is True at real tokens; padded ones join no cluster."""
        if logits.dim() != 3:
            raise ValueError(f"logits must have shape (B, M, N), got {tuple(logits.shape)}")
        if hard and causal:
            raise ValueError("a hard assignment is not causal: pass hard=True or causal=True, not both")
        if causal:
            return cls(logits=logits, keep=keep)
        if hard:
            index, weight = hard_assign(logits, keep)
            counts = cluster_counts(index, weight, logits.shape[1])
            return cls(index=index, weight=weight, counts=counts, keep=keep, backend=backend)
        return cls(matrix=soft_assign(logits, keep), keep=keep)

    @classmethod
    def from_matrix(cls, matrix: Tensor, keep: Tensor | None = None) -> Assignment:
        """A soft assignment from a normalised (B, M, N) tensor (rows that sum to 1 over the real tokens)."""
        if matrix.dim() != 3:
            raise ValueError(f"an assignment matrix must have shape (B, M, N), got {tuple(matrix.shape)}")
        return cls(matrix=matrix, keep=keep)

    @property
    def form(self) -> str:
        """``"soft"``, ``"hard"`` or ``"causal"``."""
        if self.matrix is not None:
            return "soft"
        return "hard" if self.index is not None else "causal"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, M, N)."""
        if self.index is not None:
            return (*self.index.shape[:1], self.counts.shape[1], self.index.shape[1])
        return tuple((self.matrix if self.matrix is not None else self.logits).shape)

    def detach(self) -> Assignment:
        """The same assignment cut from the autograd graph (a teacher's, used as a fixed target)."""
        return self._map(lambda name, t: t.detach())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Assignment:
        """The assignment on ``device``, with its weights (matrix, logits, hard weights) in ``dtype``; the
        indices, the mask and the member counts keep theirs."""
        weights = ("logits", "matrix", "weight")
        return self._map(lambda name, t: t.to(device=device, dtype=dtype if name in weights else None))

    def _map(self, fn: Callable[[str, Tensor], Tensor]) -> Assignment:
        fields = ("logits", "matrix", "index", "weight", "counts", "keep")
        changed = {f: fn(f, getattr(self, f)) for f in fields if getattr(self, f) is not None}
        return dataclasses.replace(self, **changed)

    def pool(self, x: Tensor) -> Tensor:
        """Cluster tokens (B, M, C) from tokens x (B, N, C): ``matrix · x``, or the members' means (hard)."""
        if self.form == "soft":
            return pool(self.matrix.to(x.dtype), x)
        if self.form == "hard":
            return scatter_mean_pool(x, self.index, self.weight, self.counts, self.backend)
        raise ValueError(
            "a causal assignment has no cluster tokens of its own (every position pools its own prefix): a causal "
            "layer consumes it; for a non-causal layer build it with Assignment.from_logits(logits, causal=False)"
        )

    def dense(self) -> Tensor:
        """The (B, M, N) matrix: built on request for the hard form (``weight / count`` at the members)
        and, for the causal form, the softmax over all N tokens (what the last position sees)."""
        if self.form == "soft":
            return self.matrix
        if self.form == "hard":
            return hard_assignment_matrix(self.index, self.weight, self.counts)
        return soft_assign(self.logits, self.keep)
