"""Causal token-to-cluster pooling: position t sees only clusters built from tokens s ≤ t.

For logits l (B, M, N) and features f (B, N, F), position t uses the prefix-renormalised clusters

    Z_t[m] = Σ_{s≤t} exp(l[m, s]) f[s] / Σ_{s≤t} exp(l[m, s])          (B, M, F) for each t

i.e. PaCa's softmax over tokens restricted to the prefix. The sums are scanned chunk by chunk with a
running maximum (an online softmax), so nothing larger than (B, M, T, T) and (B, M, T, F) exists
at once for chunk size T. Cost: M·T·F multiply-adds per position inside a chunk plus M·F for the
carried state — linear in N for fixed M and T.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["prefix_pool_chunks"]


def prefix_pool_chunks(
    logits: Tensor, features: Tensor, keep: Tensor | None = None, chunk_size: int = 64
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(positions, Z)`` chunk by chunk, Z (B, T, M, F) holding each position's prefix clusters.

    Args:
        logits: (B, M, N) clustering logits.
        features: (B, N, F) what the clusters average (tokens, or their key/value projections).
        keep: optional (B, N) bool, True for real tokens; padded tokens never enter a cluster, and a
            position with no real token before it gets all-zero clusters.
        chunk_size: T, the number of positions handled at once (memory ∝ B·M·T·max(T, F)).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, m, n = logits.shape
    logits = logits.float()
    if keep is not None:
        logits = logits.masked_fill(~keep.unsqueeze(1), float("-inf"))
    run_max = logits.new_full((b, m), float("-inf"))
    run_den = logits.new_zeros(b, m)
    run_num = features.new_zeros(b, m, features.shape[-1], dtype=torch.float32)
    for start in range(0, n, chunk_size):
        chunk = slice(start, min(start + chunk_size, n))
        scores = logits[:, :, chunk]  # (B, M, T)
        t = scores.shape[-1]
        peak = torch.maximum(scores.cummax(dim=-1).values, run_max.unsqueeze(-1))  # (B, M, T) max over s ≤ t
        ref = peak.masked_fill(peak.isinf(), 0.0)  # no real token yet: any finite reference works
        future = torch.ones(t, t, dtype=torch.bool, device=logits.device).triu(1)  # [t, s] True where s > t
        weights = (scores.unsqueeze(-2) - ref.unsqueeze(-1)).masked_fill(future, float("-inf")).exp()  # (B,M,T,T)
        carry = (run_max.unsqueeze(-1) - ref).exp()  # (B, M, T) rescales the state carried in
        num = weights @ features[:, chunk].float().unsqueeze(1) + carry.unsqueeze(-1) * run_num.unsqueeze(2)
        den = weights.sum(-1) + carry * run_den.unsqueeze(-1)  # (B, M, T)
        run_max, run_den, run_num = peak[..., -1], den[..., -1], num[:, :, -1]
        pooled = num / den.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        yield chunk, pooled.transpose(1, 2).to(features.dtype)
