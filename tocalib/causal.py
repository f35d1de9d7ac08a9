"""Causal token-to-cluster attention in linear time, with a constant-size decoding state.

**Definition (the prefix rule).** The causal output at position t is the output at t of the non-causal
layer run on the prefix ``x[:, :t+1]``. For clustering logits l (B, M, N) that prefix softmax is

    a_t[m, s] = exp(l[m, s] - L[m, t])   for s ≤ t,      L[m, t] = log Σ_{s≤t} exp l[m, s]

so each cluster is a gated running average, Z_t = ρ_t Z_{t-1} + α_t x_t with α_t = exp(l_t - L_t) and
ρ_t = exp(L_{t-1} - L_t) = 1 - α_t. Nothing here ever builds a per-position cluster token. Three facts
make that possible:

1. k(·) and v(·) are affine, so k(Z_t) = Σ_s a_t[m, s] k(x_s): the tokens are projected once, and the
   projections are pooled.
2. ``cluster_norm`` is LayerNorm(Z) = γ ⊙ (Z - mean Z) / σ + β, and the channel mean of a weighted
   average is the weighted average of the channel means. So Z - mean Z pools the centred tokens
   x̄_s = x_s - mean x_s, and k(LN(Z_t)) = (Σ_s a_t[m, s] W_k (γ ⊙ x̄_s)) / σ_t[m] + W_k β + b_k. That
   last term is the same for every cluster, and a softmax over clusters drops it. For v it adds
   W_v β + b_v to the output.
3. σ_t² = |Z̄_t|² / C + eps, with Z̄_t = Σ_s a_t[m, s] x̄_s, follows the recursion
   |Z̄_t|² = ρ_t² |Z̄_{t-1}|² + 2 α_t ⟨Z̄_t, x̄_t⟩ - α_t² |x̄_t|². The term ⟨Z̄_t, x̄_t⟩ is a dot product
   with the carried state plus an intra-chunk sum of token Gram entries.

**Chunked evaluation** (the split of chunked linear attention, ABC and Gated Slot Attention). The N
positions are cut into chunks of T. Within a chunk every term is a (T, T) block weighted by
W[t, m, s] = a_t[m, s]. Across chunks a carried state holds, per cluster, the log-normaliser L and
the prefix averages of the token keys, values and centred tokens (M × 3C). Only that (B, M, 3C)
update runs sequentially over the chunks; everything else is batched over all chunks at once. Within
a chunk W factors as exp(l_s - c)·exp(c - L_t) for a reference c, which turns its products into GEMMs,
as long as L rises by at most 60 within the chunk; a block where it rises more builds W itself
(:mod:`tocalib._scan`). One new position, the usual decoding step, is the recurrence itself.

Multiply-accumulates per position, h heads of width d = C / h:
  * the state update: 3·M·C;
  * per-head scores and values against the carried clusters: 2·M·C;
  * intra-chunk scores and values: 2·T·C + 2·h·M·T;
  * the LayerNorm statistics: T·C + M·C + M·T.

On top come the four C² projections and the clustering. No term is M·C² or M·T·C.

**Numerics.** Every weight is exp(l_s - L_t) ≤ 1. It is taken directly from logits and log-normalisers
(or, where that is exact, as a product of two factors bounded by e^60), never as a product that could
overflow or underflow. So logits that span hundreds of units inside one chunk give finite results,
the same guarantee a per-position running maximum gives. The scan runs in float32 for half-precision
inputs (in float64 for float64 ones), with autocast off. Padding enters as a finite sentinel logit, not
as -inf, so no -inf - -inf can form, forward or backward. One loss of accuracy is inherent to
projecting before pooling. When a cluster's average of centred tokens nearly cancels (|Z̄| ≪ |x̄|),
``cluster_norm`` divides two separately rounded sums, so the float32 error grows like eps·|x̄|/|Z̄|,
where LayerNorm on the rounded Z would not. Use float64 where that matters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib._scan import BLOCK, PAD_LOGIT, Scan, ScanConfig, decode_one, scan_forward

if TYPE_CHECKING:
    from typing import Self  # Python 3.11

__all__ = [
    "BLOCK",
    "PAD_LOGIT",
    "ClusterState",
    "KVCache",
    "Projections",
    "causal_cluster_attention",
    "causal_cluster_macs",
    "causal_toca",
    "causal_toca_step",
    "full_attention_mask",
    "full_attention_step",
]


class _DecodingState:
    """Batch-wise tensor fields, with what beam search and device moves need."""

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Self:
        return type(self)(*(None if t is None else fn(t) for t in (getattr(self, f.name) for f in fields(self))))

    @property
    def nbytes(self) -> int:
        """Bytes of the state's tensors."""
        tensors = (getattr(self, f.name) for f in fields(self))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def select(self, index: Tensor) -> Self:
        """The states of the batch rows ``index`` (1-D long), in that order, e.g. the beams kept at a step."""
        return self._map(lambda t: t.index_select(0, index))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Self:
        """Moved to ``device``; floating fields cast to ``dtype`` (a bool mask stays bool)."""
        return self._map(lambda t: t.to(device, dtype if dtype is not None and t.is_floating_point() else None))

    def detach(self) -> Self:
        """Detached from the autograd graph (truncated backpropagation through time)."""
        return self._map(Tensor.detach)


@dataclass(frozen=True)
class ClusterState(_DecodingState):
    """What a causal ToCa layer carries between :meth:`~tocalib.ToCaAttention.step` calls.

    Its size is fixed by B, M and C, whatever the number of positions seen: a KV cache of M cluster
    entries instead of N tokens. It is never modified in place, so one state can be continued twice.

    Attributes:
        log_normalizer: (B, M) L[m] = log Σ exp l[m, s] over the real tokens seen so far (the sentinel
            :data:`PAD_LOGIT` before the first one).
        pooled: (B, M, F) the prefix averages Σ_s a[m, s] f_s of the token keys and values, and of the
            centred tokens with ``cluster_norm`` (F = 3·C, or 2·C without it).
        window: (B, K, C) the last K inputs, for a clustering whose logits look K tokens back (a causal
            conv1d: K = kernel_size - 1), or None when K = 0.
        window_padding: (B, K) bool, True where ``window`` holds padding (or the zeros before the first
            token), or None when K = 0.
    """

    log_normalizer: Tensor
    pooled: Tensor
    window: Tensor | None = None
    window_padding: Tensor | None = None


@dataclass(frozen=True)
class KVCache(_DecodingState):
    """The decoding state of a causal layer with ``num_clusters=0`` (full attention): it grows with
    every position, as any KV cache does.

    Attributes:
        keys: (B, L, C) the projected keys of the L positions seen.
        values: (B, L, C) their projected values.
        keep: (B, L) bool, False at padded positions, or None when no padding was ever given.
    """

    keys: Tensor
    values: Tensor
    keep: Tensor | None = None


def causal_cluster_attention(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    logits: Tensor,
    num_heads: int,
    *,
    tokens: Tensor | None = None,
    eps: float = 0.0,
    value_bias: Tensor | None = None,
    state: ClusterState | None = None,
    chunk_size: int = 64,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    final_state: bool = True,
    recompute: bool = False,
) -> tuple[Tensor, Tensor | None, ClusterState | None]:
    """Causal attention from N positions to their prefix clusters, chunk by chunk.

    Args:
        queries: (B, N, C) query projections, already scaled by 1/√d (d = C / h, SDPA's default scale).
        keys: (B, N, C) token keys W_k(γ ⊙ x̄), pooled into cluster keys.
        values: (B, N, C) token values, pooled likewise.
        logits: (B, M, N) clustering logits, :data:`PAD_LOGIT` at padded tokens.
        num_heads: h; C must be a multiple of it.
        tokens: (B, N, C) centred tokens x̄ for the ``cluster_norm`` statistics, or None without it.
        eps: the LayerNorm eps (used with ``tokens``).
        value_bias: (C,) added to every cluster value (W_v β + b_v with ``cluster_norm``, else b_v).
        state: the state after the positions before these, or None at the start of a sequence.
        chunk_size: T, the positions per chunk.
        dropout_p: dropout on the attention weights over the clusters (pass 0 in evaluation).
        need_weights: also return the (B, h, N, M) attention weights (not differentiable).
        final_state: compute the state after the last position (False skips the last chunk's update).
        recompute: for the backward pass keep only the state before each block and recompute the rest
            (training memory O(N·C) instead of O(N·(C + h·M + h·T + M·C/T)), one forward pass slower).

    Returns:
        ``(out, weights, state)``: out (B, N, C) in the queries' dtype (heads merged, before the output
        projection), weights (B, h, N, M) or None, and the state after the last position (or None).

    The work runs in blocks of about :data:`BLOCK` positions (over the batch), each a batch of whole
    chunks, so no temporary grows with N, inside one autograd function with a hand-written backward pass. Training
    keeps O(C + h·M + h·T + M·C/T) floats per position for it (O(C + M) with ``recompute``; M·T more
    for a block whose logits rise so far that its intra-chunk weights are materialised). Gradients
    flow to every input, to the state and to the returned weights; a second derivative is not
    implemented for N > 1 (it raises).
    """
    b, n, c = queries.shape
    m = logits.shape[1]
    f32 = torch.promote_types(queries.dtype, torch.float32)  # the scan's dtype
    width = (2 if tokens is None else 3) * c
    if state is None:
        state = ClusterState(logits.new_full((b, m), PAD_LOGIT, dtype=f32), queries.new_zeros(b, m, width, dtype=f32))
    start, pooled = state.log_normalizer.to(f32), state.pooled.to(f32).transpose(-1, -2)  # the scan's (B, F, M)
    if n == 0 or b == 0:  # nothing to attend: no position, or no sequence
        weights = queries.new_zeros(b, num_heads, n, m) if need_weights else None
        return queries * 0.0, weights, state if final_state else None  # empty, and in the graph
    logits = logits.to(f32).clamp_min(PAD_LOGIT)
    config = ScanConfig(num_heads, min(chunk_size, n), eps, dropout_p, need_weights, final_state, recompute)
    streams = [queries.to(f32), keys.to(f32), values.to(f32), None if tokens is None else tokens.to(f32)]
    bias = None if value_bias is None else value_bias.to(f32)
    if n == 1:  # decoding one position: the recurrent form
        with torch.autocast(queries.device.type, enabled=False):
            out, weights, end, pooled = decode_one(config, *streams, logits, start, pooled, bias)
        next_state = ClusterState(end, pooled.transpose(-1, -2)) if final_state else None
        return out.to(queries.dtype), weights.to(queries.dtype) if need_weights else None, next_state
    log_norm = torch.logcumsumexp(torch.cat([start.unsqueeze(-1), logits], dim=-1), dim=-1)  # (B, M, N + 1)
    inputs = (*streams, logits, log_norm[..., :-1], log_norm[..., 1:], pooled, bias)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if differentiable and not torch.jit.is_tracing():
        out, weights, pooled = Scan.apply(config, *inputs)
    else:  # inference, or a trace (fvcore's MAC count), which sees the operators themselves
        with torch.no_grad(), torch.autocast(queries.device.type, enabled=False):
            out, weights, pooled = scan_forward(config, *inputs)
    out, weights = out.to(queries.dtype), weights.to(queries.dtype)
    next_state = ClusterState(log_norm[..., -1].clone(), pooled.transpose(-1, -2)) if final_state else None
    return out, weights if need_weights else None, next_state


@dataclass(frozen=True)
class Projections:
    """The weights a causal layer applies to its tokens before it attends.

    Attributes:
        q_weight, k_weight, v_weight: (C, C) each (views of a packed (3C, C) weight work as well).
        q_bias, k_bias, v_bias: (C,) each, or None.
        norm: the LayerNorm on the cluster tokens (``cluster_norm``), or None.
        heads: h.
    """

    q_weight: Tensor
    q_bias: Tensor | None
    k_weight: Tensor
    k_bias: Tensor | None
    v_weight: Tensor
    v_bias: Tensor | None
    norm: nn.LayerNorm | None
    heads: int

    def tokens(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """The scan's inputs from x (B, N, C): q / √d, the token keys and values (B, N, C) each, the centred
        tokens (with the norm, else None) and the value bias.

        With the norm, the keys and values are those of the centred tokens scaled by its weight,
        W_k (γ ⊙ (x - mean x)). For many positions that is folded into one (3C, C) product with q:
        W_k (γ ⊙ (x - mean x)) = (W_k diag γ - its row means) x. For a few (decoding), building that
        weight would cost more than the products, so the centred tokens are projected directly. The
        norm's bias reaches the output through v (the value bias W_v β + b_v). k's bias is the same for
        every cluster, so the softmax over clusters drops it: its gradient is exactly 0, and it enters
        with weight 0 so that it still belongs to the graph (as DDP expects of every parameter).
        """
        norm, c = self.norm, self.q_weight.shape[0]
        scale = (c // self.heads) ** -0.5
        tokens = None if norm is None else x - x.mean(-1, keepdim=True)
        if 4 * x.shape[1] >= c:
            w_k, w_v = self.k_weight, self.v_weight
            if norm is not None:
                w_k, w_v = (w * norm.weight for w in (w_k, w_v))
                w_k, w_v = (w - w.mean(-1, keepdim=True) for w in (w_k, w_v))
            bias = None if self.q_bias is None else F.pad(self.q_bias * scale, (0, 2 * c))
            q, keys, values = F.linear(x, torch.cat([self.q_weight * scale, w_k, w_v]), bias).split(c, -1)
        else:
            scaled = x if norm is None else tokens * norm.weight
            q = F.linear(x, self.q_weight, self.q_bias) * scale
            keys, values = F.linear(scaled, self.k_weight), F.linear(scaled, self.v_weight)
        value_bias = self.v_bias if norm is None else (self.v_weight * norm.bias).sum(-1) + _or_zero(self.v_bias)
        if self.k_bias is not None:
            value_bias = _or_zero(value_bias) + 0.0 * self.k_bias
        return q, keys, values, tokens, value_bias


def _or_zero(t: Tensor | None) -> Tensor | float:
    return 0.0 if t is None else t


def causal_toca(
    x: Tensor,
    logits: Tensor,
    projections: Projections,
    *,
    keep: Tensor | None = None,
    state: ClusterState | None = None,
    chunk_size: int = 64,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    final_state: bool = True,
    recompute: bool = False,
) -> tuple[Tensor, Tensor | None, ClusterState | None]:
    """Causal ToCa on tokens x (B, N, C) with their clustering logits (B, M, N).

    ``keep`` (B, N) bool is False at padded tokens (whose rows of x should be zeroed). Returns the
    attention output (B, N, C) before the output projection, the attention weights (B, h, N, M) with
    ``need_weights``, and the state after the last position (the window of a clustering that looks back
    is the caller's: see :func:`causal_toca_step`).
    """
    if keep is not None:  # in the scan's dtype: a float16 tensor cannot hold the sentinel
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logits = logits.masked_fill(~keep.unsqueeze(1), PAD_LOGIT)
    q, keys, values, tokens, value_bias = projections.tokens(x)
    norm = projections.norm
    return causal_cluster_attention(
        q, keys, values, logits, projections.heads, tokens=tokens, eps=0.0 if norm is None else norm.eps,
        value_bias=value_bias, state=state, chunk_size=chunk_size, dropout_p=dropout_p, need_weights=need_weights,
        final_state=final_state, recompute=recompute,
    )  # fmt: skip


def causal_toca_step(
    x: Tensor,
    clustering: nn.Module,
    projections: Projections,
    state: ClusterState | None,
    *,
    keep: Tensor | None = None,
    chunk_size: int = 64,
    dropout_p: float = 0.0,
) -> tuple[Tensor, ClusterState]:
    """One decoding call: x (B, T, C) new positions (padded rows zeroed, ``keep`` False there) after
    ``state``. Returns their attention output (B, T, C) before the output projection, and the next state.

    A clustering that looks back K tokens (``causal_lookback``) gets the last K inputs of the state in
    front of x, and is told which of them were padding (the zeros before the first token are).
    """
    lookback = clustering.causal_lookback
    window = window_padding = None
    b, t, c = x.shape
    padding = x.new_zeros(b, t, dtype=torch.bool) if keep is None else ~keep
    if lookback:
        if state is None:
            past, past_padding = x.new_zeros(b, lookback, c), x.new_ones(b, lookback, dtype=torch.bool)
        else:
            past, past_padding = state.window, state.window_padding
        joined, joined_padding = torch.cat([past, x], dim=1), torch.cat([past_padding, padding], dim=1)
        logits = clustering(joined, key_padding_mask=joined_padding)[..., lookback:]
        window, window_padding = joined[:, -lookback:].clone(), joined_padding[:, -lookback:].clone()
    else:
        logits = clustering(x, key_padding_mask=None if keep is None else padding)
    out, _, core = causal_toca(
        x, logits, projections, keep=keep, state=state, chunk_size=chunk_size, dropout_p=dropout_p
    )
    return out, ClusterState(core.log_normalizer, core.pooled, window, window_padding)


def full_attention_mask(keep: Tensor | None, n: int, length: int, causal: bool, device: torch.device) -> Tensor | None:
    """Bool (B or 1, 1, N, L) mask for attention over raw tokens (M = 0), or None when none is needed.

    ``keep`` (B, L) is False at padded keys. The N queries are the last N of the L positions. Without
    padding a causal layer needs no mask when N = L (SDPA's ``is_causal``) or N = 1 (the last position
    sees everything).
    """
    causal = causal and n > 1
    if keep is None and (not causal or n == length):
        return None
    allowed = torch.ones(1, 1, n, length, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(length - n)
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    # a query with no allowed key would get NaN: it attends to every key it could see without padding
    visible = torch.ones_like(allowed).tril(length - n) if causal else torch.ones_like(allowed)
    return allowed | (~allowed.any(-1, keepdim=True) & visible)


def full_attention_step(
    x: Tensor, projections: Projections, cache: KVCache | None, *, keep: Tensor | None = None, dropout_p: float = 0.0
) -> tuple[Tensor, KVCache]:
    """One decoding call of causal full attention (M = 0): x (B, T, C) new positions after the cached ones.
    Returns their attention output (B, T, C) before the output projection, and the grown cache."""
    p = projections
    keys, values = F.linear(x, p.k_weight, p.k_bias), F.linear(x, p.v_weight, p.v_bias)
    if cache is not None:
        keys, values = torch.cat([cache.keys, keys], dim=1), torch.cat([cache.values, values], dim=1)
    seen = 0 if cache is None else cache.keys.shape[1]
    if keep is None and (cache is None or cache.keep is None):
        keep_all = None
    else:
        old = x.new_ones(x.shape[0], seen, dtype=torch.bool) if cache is None or cache.keep is None else cache.keep
        new = torch.ones_like(x[..., 0], dtype=torch.bool) if keep is None else keep
        keep_all = torch.cat([old, new], dim=1)
    mask = full_attention_mask(keep_all, x.shape[1], keys.shape[1], True, x.device)
    is_causal = mask is None and x.shape[1] == keys.shape[1]  # the first call; else one position or a mask

    def heads(z: Tensor) -> Tensor:  # (B, L, C) -> (B, h, L, d)
        return z.unflatten(-1, (p.heads, -1)).transpose(1, 2)

    q = F.linear(x, p.q_weight, p.q_bias)
    out = F.scaled_dot_product_attention(heads(q), heads(keys), heads(values), mask, dropout_p, is_causal)
    return out.transpose(1, 2).flatten(-2), KVCache(keys, values, keep_all)


def causal_cluster_macs(
    num_tokens: int,
    dim: int,
    num_heads: int,
    num_clusters: int,
    chunk_size: int,
    cluster_norm: bool,
    final_state: bool = False,
) -> int:
    """Multiply-accumulates of :func:`causal_cluster_attention` on one sequence of ``num_tokens`` positions.

    N = 1 is the recurrent form (scores and values against the M clusters of the updated state: 2·M·C).
    Otherwise the positions are padded to whole chunks of T = min(chunk_size, N), so the count is
    chunks × (cost of one chunk), less one chunk's state update without ``final_state``: linear in N
    from N = T on.
    """
    n, c, m, h = num_tokens, dim, num_clusters, num_heads
    if n <= 1:
        return 2 * n * m * c
    t = min(chunk_size, n)
    chunks = -(-n // t)
    update = m * t * (3 if cluster_norm else 2) * c
    per_chunk = 2 * t * t * c + 2 * t * t * h * m + 2 * t * m * c
    if cluster_norm:
        per_chunk += t * t * c + t * t * m + t * c * m  # the Gram block, its weighted sum, ⟨x̄_t, S_x⟩
    return chunks * per_chunk + (chunks if final_state else chunks - 1) * update
