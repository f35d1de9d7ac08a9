"""The chunked causal scan behind :func:`tocalib.causal.causal_cluster_attention`: forward and backward.

The sequence is processed in blocks of about :data:`BLOCK` positions over the batch. Every block is a batch of whole
chunks of T positions (B, K, T, ·). The only sequential steps are the (B, F, M) state update from one
chunk to the next and the norm recursion over the T positions of a chunk. :class:`Scan` is an autograd
function with a hand-written backward pass. It undoes each block's forward in reverse. In float64 it
agrees with autograd through the prefix definition to about 1e-14, and a test holds it to 1e-10.

Within a chunk, W[t, m, s] = a_t[m, s] = exp(l_s - L_t) weighs every intra-chunk product. It is either
factored into two GEMM operands (:class:`FactoredWeights`, the fast path) or materialised
(:class:`ExactWeights`, for chunks whose log-normaliser rises by more than :data:`RISE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PAD_LOGIT = -1e30
"""The logit of a padded token. exp(PAD_LOGIT - L) is exactly 0 next to any real logit, and unlike -inf it
can never produce NaN (the gradient of ``logcumsumexp`` at -inf is NaN in torch)."""


BLOCK = 4096
"""Positions per block of :func:`causal_cluster_attention`, summed over the batch (so B·n of them, n
rounded to whole chunks): it bounds the block's temporaries at any batch size. Larger blocks mean fewer,
larger operations; at B = 1, C = 512 and M = 64, 4,096 was fastest on the CPU (1,024 and 16,384 were
10-20 % slower)."""


@dataclass(frozen=True)
class ScanConfig:
    """The scan's settings: heads h, chunk length T, the norm's eps (with tokens), attention dropout,
    whether to return the attention weights, and whether the state after the last chunk is needed."""

    heads: int
    chunk: int
    eps: float
    dropout_p: float
    need_weights: bool
    final_state: bool
    recompute: bool = False


class Scan(torch.autograd.Function):
    """The chunked scan with a hand-written backward pass (see :func:`_block_backward`). The forward
    pass keeps each block's intermediates (O(h·M + h·T + M·C/T) floats per position), so the backward
    pass does not recompute them; with ``config.recompute`` it keeps only the state before each block
    and recomputes the block when its gradient is due (memory O(N·C), one forward pass more)."""

    @staticmethod
    def forward(ctx, config: ScanConfig, *inputs: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        with torch.autocast(inputs[0].device.type, enabled=False):  # the scan keeps its float32 or float64
            out, weights, pooled, blocks = scan_forward(config, *inputs, keep=True)
        ctx.config, ctx.blocks = config, blocks  # intermediates, neither inputs nor outputs: kept on ctx
        ctx.save_for_backward(*inputs)
        if not config.need_weights:
            ctx.mark_non_differentiable(weights)  # an empty placeholder
        return out, weights, pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: Tensor, d_weights: Tensor, d_pooled: Tensor) -> tuple[Tensor | None, ...]:
        inputs = ctx.saved_tensors
        d_weights = d_weights if ctx.config.need_weights else None
        with torch.autocast(inputs[0].device.type, enabled=False):
            grads = _scan_backward(ctx.config, inputs, ctx.blocks, d_out, d_weights, d_pooled)
        return (None, *(None if t is None else g for g, t in zip(grads, inputs, strict=True)))


def scan_forward(
    config: ScanConfig,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    x: Tensor | None,
    logits: Tensor,
    before: Tensor,
    here: Tensor,
    pooled: Tensor,
    bias: Tensor | None,
    keep: bool = False,
) -> tuple:
    """Run the blocks in order. With ``keep``, also return what the backward pass needs of each block: its
    positions, the state before it, its dropout mask and (unless ``config.recompute``) its inputs and
    intermediates."""
    n = q.shape[1]
    block = config.chunk * max(1, BLOCK // (config.chunk * max(1, q.shape[0])))
    out = q.new_empty(q.shape)
    weights, blocks = [], []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        update = config.final_state or hi < n
        parts = _block_inputs(config, (q, k, v, x, logits, before, here), lo, hi)
        mask = None
        if config.dropout_p > 0:
            shape = (q.shape[0], parts.chunks, config.chunk, config.heads, logits.shape[1])
            mask = torch.rand(shape, device=q.device) >= config.dropout_p
        fwd = _block_forward(config, parts, pooled, bias, mask, update)
        _put(out[:, lo:hi].unflatten(-1, fwd.out.shape[2:5:2]), fwd.out.transpose(2, 3))
        weights.append(fwd.probs.flatten(1, 2)[:, : hi - lo].transpose(1, 2) if config.need_weights else None)
        if keep:
            blocks.append((lo, hi, update, pooled, mask, None if config.recompute else (parts, fwd)))
        pooled = fwd.states[:, -1].clone()  # not a view that would keep this block's states alive
    probs = torch.cat(weights, dim=2) if config.need_weights else out.new_zeros(0)
    return (out, probs, pooled, blocks) if keep else (out, probs, pooled)


def decode_one(
    config: ScanConfig,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    x: Tensor | None,
    logits: Tensor,
    start: Tensor,
    pooled: Tensor,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One new position (N = 1) straight from the state, the recurrent form of the scan: no chunk at all.

    q, k, v, x (B, 1, C); logits (B, M, 1); start (B, M) and pooled (B, F, M) the state before it. With one
    position, L' = logaddexp(L, l), the new state is S' = ρ S + α f with ρ = exp(L - L'), α = exp(l - L'), and
    the ``cluster_norm`` statistics are read off S' itself. Returns out (B, 1, C), the weights (B, h, 1, M),
    L' (B, M) and S' (B, F, M).
    """
    b, _, c = q.shape
    h = config.heads
    log_norm = torch.logaddexp(start, logits[..., 0])  # (B, M)
    alpha, keep = (logits[..., 0] - log_norm).exp(), (start - log_norm).exp()
    feats = torch.cat([k, v] if x is None else [k, v, x], dim=-1).transpose(-1, -2)  # (B, F, 1)
    pooled = torch.addcmul(keep.unsqueeze(1) * pooled, feats, alpha.unsqueeze(1))  # (B, F, M)
    keys, values = (pooled[:, i * c : (i + 1) * c].unflatten(1, (h, -1)) for i in range(2))  # (B, h, d, M)
    scores = torch.matmul(q.view(b, h, 1, -1), keys)  # (B, h, 1, M)
    inv_sigma = None
    if x is not None:
        inv_sigma = (pooled[:, 2 * c :].square().sum(1) / c + config.eps).rsqrt().view(b, 1, 1, -1)
        scores = scores * inv_sigma
    probs = scores.softmax(dim=-1)
    dropped = probs
    if config.dropout_p > 0:
        dropped = probs * (torch.rand_like(probs) >= config.dropout_p) / (1 - config.dropout_p)
    mix = dropped if inv_sigma is None else dropped * inv_sigma
    out = torch.matmul(mix, values.transpose(-1, -2))  # (B, h, 1, d)
    if bias is not None:
        out = out + dropped.sum(-1, keepdim=True) * bias.view(h, 1, -1)
    return out.transpose(1, 2).reshape(b, 1, c), probs, log_norm, pooled


@dataclass
class _BlockInputs:
    """One block's inputs in chunk layouts (B, K chunks, T positions), padded to whole chunks."""

    chunks: int
    q: Tensor  # (B, K, h, T, d) scaled queries
    k: Tensor  # (B, K, h, T, d)
    v: Tensor  # (B, K, h, T, d)
    x: Tensor | None  # (B, K, T, C) centred tokens
    k_tokens: Tensor  # (B, K, T, C) the keys as tokens (what the state pools), likewise
    v_tokens: Tensor  # (B, K, T, C)
    logits: Tensor  # (B, K, T, M)
    before: Tensor  # (B, K, T, M) L_{t-1}
    here: Tensor  # (B, K, T, M) L_t


def _block_inputs(config: ScanConfig, streams: tuple[Tensor | None, ...], lo: int, hi: int) -> _BlockInputs:
    """Positions lo..hi of the (B, N, ·) and (B, M, N) inputs, cut into chunks (a ragged end is padded:
    padded positions join no cluster and are dropped from the output). ``streams`` are the scan's inputs
    q, k, v, x (B, N, C) and logits, before, here (B, M, N)."""
    q, k, v, x, logits, before, here = streams
    c = q.shape[-1]
    h, t = config.heads, config.chunk
    chunks = -(-(hi - lo) // t)
    pad = chunks * t - (hi - lo)

    def tokens(z: Tensor) -> Tensor:  # (B, N, C) -> (B, K, T, C)
        part = F.pad(z[:, lo:hi], (0, 0, 0, pad)) if pad else z[:, lo:hi]
        return part.unflatten(1, (chunks, t))

    def heads(z: Tensor) -> Tensor:  # (B, N, C) -> (B, K, h, T, d), contiguous
        return tokens(z).unflatten(-1, (h, c // h)).transpose(2, 3).contiguous()

    def per_chunk(part: Tensor, end: Tensor) -> Tensor:  # (B, M, n) -> (B, K, T, M), padded with `end`
        if pad:
            part = torch.cat([part, end.expand(-1, -1, pad)], dim=-1)
        return part.unflatten(-1, (chunks, t)).permute(0, 2, 3, 1)

    k_c, v_c = tokens(k), tokens(v)
    last = here[..., hi - 1 : hi]  # a padded position keeps the last L
    sentinel = logits.new_full(last.shape, PAD_LOGIT)
    return _BlockInputs(
        chunks, heads(q), heads(k), heads(v), None if x is None else tokens(x), k_c, v_c,
        per_chunk(logits[..., lo:hi], sentinel), per_chunk(before[..., lo:hi], last), per_chunk(here[..., lo:hi], last),
    )  # fmt: skip


@dataclass
class _BlockForward:
    """Everything one block computed (the backward pass reuses it)."""

    weights: ExactWeights | FactoredWeights  # the intra-chunk weights W[t, m, s] = a_t[m, s]
    last: Tensor  # (B, K, M, T) a_end[m, s] = W[T - 1, m, s], what the state update pools with
    carried: Tensor  # (B, K, T, M) g_t = exp(L_start - L_t), the weight of the carried state
    states: Tensor  # (B, K + 1, F, M): the state before each chunk and after the last, F = [k | v | x̄]
    pairs: Tensor  # (B, K, T, h (+1), T) q_t · k_s (and x̄_t · x̄_s)
    intra: Tensor  # (B, K, T, h (+1), M) Σ_s W[t, m, s] pairs[t, ·, s]
    inter: Tensor  # (B, K, T, h, M) q_t · S_k[m]
    raw: Tensor  # (B, K, T, h, M) the scores before the 1/σ of ``cluster_norm``: intra + g_t inter
    pooled_k: Tensor  # (B, K, h, d, M) views of ``states``
    pooled_v: Tensor  # (B, K, h, d, M)
    probs: Tensor  # (B, K, T, h, M) softmax over the clusters
    mix: Tensor  # (B, K, T, h, M) dropped probs / σ, what weighs the cluster values
    mixed: Tensor  # (B, K, T, h, T) Σ_m mix W[t, m, s]
    out: Tensor  # (B, K, h, T, d)
    mass: Tensor | None  # (B, K, T, h, 1) the dropped probs' sum (with dropout)
    norm: _NormForward | None


@dataclass
class _NormForward:
    """The ``cluster_norm`` statistics of one block."""

    alpha: Tensor  # (B, K, T, M) α_t = a_t[m, t]
    product: Tensor  # (B, K, T, M) ⟨Z̄_t, x̄_t⟩
    with_state: Tensor  # (B, K, T, M) ⟨x̄_t, S_x[m]⟩
    own: Tensor  # (B, K, T, 1) |x̄_t|²
    shrink: Tensor  # (B, K, T, M) ρ_t²
    norm2: Tensor  # (B, K, T + 1, M) |Z̄_t|² from t = -1 (the carried state)
    inv_sigma: Tensor  # (B, K, T, M)


def _lower(t: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(T, 1, T) over [t, ·, s]: 1 where s ≤ t, else 0."""
    return torch.ones(t, t, device=device, dtype=dtype).tril().unsqueeze(1)


class ExactWeights:
    """W[t, m, s] = exp(l_s - L_t) materialised, (B, K, T, M, T): exact for any logits, M·T per position."""

    def __init__(self, z: _BlockInputs) -> None:
        t = z.here.shape[2]
        future = _lower(t, z.here.device, z.here.dtype).log()  # 0 on and below the diagonal, -inf above
        self.weight = (z.logits.transpose(-1, -2).unsqueeze(2) - z.here.unsqueeze(-1)).add_(future).exp_()

    def right(self, pairs: Tensor) -> Tensor:
        """(B, K, T, J, T) → (B, K, T, J, M): Σ_s pairs[t, j, s] W[t, m, s]."""
        return torch.matmul(pairs, self.weight.transpose(-1, -2))

    def left(self, mix: Tensor) -> Tensor:
        """(B, K, T, h, M) → (B, K, T, h, T): Σ_m mix[t, h, m] W[t, m, s]."""
        return torch.matmul(mix, self.weight)

    def left_backward(self, d_left: Tensor) -> Tensor:
        """The gradient of ``left``'s input."""
        return torch.matmul(d_left, self.weight.transpose(-1, -2))

    def backward(self, fwd: _BlockForward, d_right: Tensor, d_left: Tensor, grads: _Grads) -> Tensor:
        """The gradient of ``right``'s input (``fwd.pairs``); W's own gradient goes into ``grads``."""
        outer = torch.cat([fwd.mix, d_right], dim=3).transpose(-1, -2)  # (B, K, T, M, h + J)
        d_exp = torch.matmul(outer, torch.cat([d_left, fwd.pairs], dim=3)).mul_(self.weight)  # (B, K, T, M, T)
        grads.logits += d_exp.sum(2).transpose(-1, -2)
        grads.here -= d_exp.sum(-1)
        return torch.matmul(d_right, self.weight)


class FactoredWeights:
    """W[t, m, s] = u[m, s] e[t, m] for s ≤ t, with u = exp(l_s - c) and e = exp(c - L_t) for a reference
    c[m] = the chunk's first real log-normaliser: the chunk's products become GEMMs and W is never built.
    u ≤ exp(rise) and e ≤ 1, where rise is how much L grows within the chunk, so the factors are exact
    to rounding while the rise is at most :data:`RISE` (the caller checks). c depends only on positions
    ≤ t for every position t it weighs (earlier ones have no real token and an all-zero row), so the
    outputs stay exactly causal; and W does not depend on c at all, so its gradient skips c."""

    def __init__(self, z: _BlockInputs, reference: Tensor) -> None:
        self.u = (z.logits - reference).exp_().transpose(-1, -2)  # (B, K, M, T)
        empty = z.here <= PAD_LOGIT / 2
        self.e = (reference - z.here).exp_().masked_fill_(empty, 0.0)  # (B, K, T, M)
        self.lower = _lower(z.here.shape[2], z.here.device, z.here.dtype)

    def right(self, pairs: Tensor) -> Tensor:
        """Masks ``pairs`` in place (s > t is never weighted, so the exact path agrees)."""
        b, k, t, j, _ = pairs.shape
        product = torch.matmul(pairs.mul_(self.lower).view(b, k, t * j, t), self.u.transpose(-1, -2))
        return product.view(b, k, t, j, -1).mul_(self.e.unsqueeze(3))

    def left(self, mix: Tensor) -> Tensor:
        b, k, t, h, m = mix.shape
        self.scaled = mix * self.e.unsqueeze(3)  # (B, K, T, h, M)
        return torch.matmul(self.scaled.view(b, k, t * h, m), self.u).view(b, k, t, h, t).mul_(self.lower)

    def left_backward(self, d_left: Tensor) -> Tensor:
        b, k, t, h, _ = d_left.shape
        self.d_masked = (d_left * self.lower).reshape(b, k, t * h, t)
        self.d_scaled = torch.matmul(self.d_masked, self.u.transpose(-1, -2)).view(b, k, t, h, -1)
        return self.d_scaled * self.e.unsqueeze(3)

    def backward(self, fwd: _BlockForward, d_right: Tensor, d_left: Tensor, grads: _Grads) -> Tensor:
        b, k, t, j, m = d_right.shape
        h = d_left.shape[3]
        d_product = (d_right * self.e.unsqueeze(3)).reshape(b, k, t * j, m)
        grads.here -= torch.linalg.vecdot(d_right, fwd.intra, dim=3)  # e ∂/∂e, e = exp(c - L_t)
        grads.here -= torch.linalg.vecdot(self.d_scaled, self.scaled, dim=3)
        u_grad = torch.matmul(d_product.transpose(-1, -2), fwd.pairs.view(b, k, t * j, t))
        u_grad += torch.matmul(self.scaled.view(b, k, t * h, m).transpose(-1, -2), self.d_masked)
        grads.logits += u_grad.mul_(self.u).transpose(-1, -2)  # u = exp(l_s - c)
        return torch.matmul(d_product, self.u).view(b, k, t, j, t).mul_(self.lower)


RISE = 60.0
"""The largest rise of a log-normaliser within one chunk for which :class:`FactoredWeights` is used
(e^60 ≈ 1e26 stays far from float32's range); a block with a larger rise uses :class:`ExactWeights`."""


def _weights(z: _BlockInputs) -> ExactWeights | FactoredWeights:
    """The factored weights when they are exact for this block, else the materialised ones. Under
    ``torch.compile`` or a trace (no data-dependent branch there) always the materialised ones; both
    do the same multiply-accumulates."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return ExactWeights(z)
    real = z.here > PAD_LOGIT / 2
    reference = z.here.masked_fill(~real, float("inf")).amin(dim=2, keepdim=True)  # (B, K, 1, M) first real L
    reference = reference.masked_fill(reference.isinf(), 0.0)
    rise = (z.here - reference).masked_fill(~real, 0.0).amax()
    return FactoredWeights(z, reference) if rise.item() <= RISE else ExactWeights(z)


def _block_forward(
    config: ScanConfig, z: _BlockInputs, pooled: Tensor, bias: Tensor | None, mask: Tensor | None, update: bool
) -> _BlockForward:
    """One block, batched over its chunks; only the state update runs chunk after chunk."""
    b, chunks, h, _, d = z.q.shape
    c = h * d
    carried = (z.before[:, :, :1] - z.here).exp()  # g_t, from L before each chunk
    last = (z.logits - z.here[:, :, -1:]).exp_().transpose(-1, -2)  # (B, K, M, T)
    weights = _weights(z)

    # The state before every chunk: S' = g_end S + Σ_s a_end[s] f_s, one (B, F, M) update per chunk
    # (stored transposed, so every consumer reads it without a copy).
    ends = chunks if update else chunks - 1
    normed = z.x is not None
    m = last.shape[2]
    states = z.q.new_empty(b, chunks + 1, pooled.shape[-2], m)
    states[:, 0] = pooled
    last_t = last[:, :ends].transpose(-1, -2)  # (B, ends, T, M)
    deltas = [torch.matmul(z_h[:, :ends].transpose(-1, -2), last_t.unsqueeze(2)).flatten(2, 3) for z_h in (z.k, z.v)]
    if normed:
        deltas.append(torch.matmul(z.x[:, :ends].transpose(-1, -2), last_t))
    deltas = torch.cat(deltas, dim=2)  # (B, ends, F, M)
    keep = carried[:, :ends, -1].unsqueeze(-2)  # (B, ends, 1, M)
    for i in range(ends):
        states[:, i + 1] = torch.addcmul(deltas[:, i], keep[:, i], states[:, i])
    if ends < chunks:
        states[:, chunks] = states[:, chunks - 1]
    pooled_k = states[:, :chunks, :c].view(b, chunks, h, d, m)
    pooled_v = states[:, :chunks, c : 2 * c].view(b, chunks, h, d, m)

    pairs = [torch.matmul(z.q, z.k.transpose(-1, -2)).transpose(2, 3)]  # (B, K, T, h, T) q_t · k_s
    if normed:
        pairs.append(torch.matmul(z.x, z.x.transpose(-1, -2)).unsqueeze(3))  # (B, K, T, 1, T) x̄_t · x̄_s
    pairs = torch.cat(pairs, dim=3)
    intra = weights.right(pairs)  # (B, K, T, h (+1), M)
    inter = torch.matmul(z.q, pooled_k).transpose(2, 3)  # (B, K, T, h, M)
    raw = torch.addcmul(intra[:, :, :, :h], carried.unsqueeze(3), inter)
    scores, norm = raw, None
    if normed:
        norm = _norm_forward(z, pairs[:, :, :, h], intra[:, :, :, h], states[:, :chunks, 2 * c :], carried, config.eps)
        scores = raw * norm.inv_sigma.unsqueeze(3)
    probs = scores.softmax(dim=-1)
    dropped = probs if mask is None else probs * mask / (1 - config.dropout_p)
    mix = dropped if norm is None else dropped * norm.inv_sigma.unsqueeze(3)
    mixed = weights.left(mix)  # (B, K, T, h, T)
    out = torch.matmul(mixed.transpose(2, 3), z.v)  # (B, K, h, T, d)
    out.add_(torch.matmul((mix * carried.unsqueeze(3)).transpose(2, 3), pooled_v.transpose(-1, -2)))
    mass = None if mask is None else dropped.sum(-1, keepdim=True)
    if bias is not None:
        out.add_(bias.view(h, 1, d) if mass is None else mass.transpose(2, 3) * bias.view(h, 1, d))
    return _BlockForward(weights, last, carried, states, pairs, intra, inter, raw, pooled_k, pooled_v, probs, mix,
                         mixed, out, mass, norm)  # fmt: skip


def _norm_forward(
    z: _BlockInputs, gram: Tensor, within: Tensor, pooled_x: Tensor, carried: Tensor, eps: float
) -> _NormForward:
    """1 / σ_t[m] with σ_t² = |Z̄_t[m]|² / C + eps, by the recursion of the module docstring:
    |Z̄_t|² = ρ_t² |Z̄_{t-1}|² + 2 α_t ⟨Z̄_t, x̄_t⟩ - α_t² |x̄_t|², from |S_x|² before each chunk.

    gram (B, K, T, T) x̄_t · x̄_s, within (B, K, T, M) Σ_s W[t, m, s] gram[t, s], pooled_x (B, K, C, M).
    The recursion runs over the T positions of all chunks at once.
    """
    alpha = (z.logits - z.here).exp()
    own = gram.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    with_state = torch.matmul(z.x, pooled_x)
    product = torch.addcmul(within, carried, with_state)
    step = 2 * alpha * product - alpha.square() * own
    shrink = (z.before - z.here).mul_(2).exp_()
    rows = [pooled_x.square().sum(-2)]
    for increment, decay in zip(step.unbind(2), shrink.unbind(2), strict=True):
        rows.append(torch.addcmul(increment, decay, rows[-1]))
    norm2 = torch.stack(rows, dim=2)
    inv_sigma = (norm2[:, :, 1:].clamp_min(0.0) / z.x.shape[-1] + eps).rsqrt()
    return _NormForward(alpha, product, with_state, own, shrink, norm2, inv_sigma)


def _scan_backward(
    config: ScanConfig, inputs: tuple, blocks: list, d_out: Tensor, d_weights: Tensor | None, d_pooled: Tensor | None
) -> list[Tensor | None]:
    """Gradients of :func:`scan_forward`'s inputs, block by block from the last; ``d_weights`` (B, h, N, M)
    is the gradient of the returned attention weights (with ``need_weights``)."""
    *streams, pooled, bias = inputs
    q = streams[0]
    grads = [torch.empty_like(t) if t is not None else None for t in streams]
    d_state = torch.zeros_like(pooled) if d_pooled is None else d_pooled.contiguous()
    d_bias = None if bias is None else torch.zeros_like(bias)
    for lo, hi, update, start, mask, kept in reversed(blocks):
        if kept is None:
            parts = _block_inputs(config, tuple(streams), lo, hi)
            fwd = _block_forward(config, parts, start, bias, mask, update)
        else:
            parts, fwd = kept
        pad = parts.chunks * config.chunk - (hi - lo)
        d_block = F.pad(d_out[:, lo:hi], (0, 0, 0, pad))
        d_block = d_block.view(q.shape[0], parts.chunks, config.chunk, config.heads, -1).transpose(2, 3)
        d_probs = None
        if d_weights is not None:  # (B, h, n, M) → (B, K, T, h, M)
            d_probs = F.pad(d_weights[:, :, lo:hi].transpose(1, 2), (0, 0, 0, 0, 0, pad))
            d_probs = d_probs.unflatten(1, (parts.chunks, -1))
        d_state, pieces, tokens, db = _block_backward(config, parts, fwd, bias, mask, update, d_block, d_state, d_probs)
        if d_bias is not None:
            d_bias += db
        _scatter_block(grads, pieces, tokens, lo, hi)
    return [*grads, d_state, d_bias]


def _put(dst: Tensor, src: Tensor, accumulate: bool = False) -> None:
    """Copy (or add) chunks src (B, K, T, ...) into the positions dst (B, n, ...) with one pass and no
    temporary: a ragged end's padded positions are dropped, and chunks past the end of src leave their
    positions alone."""
    t = src.shape[2]
    n = min(dst.shape[1], src.shape[1] * t)
    full = n // t
    write = Tensor.add_ if accumulate else Tensor.copy_
    if full:
        write(dst[:, : full * t].unflatten(1, (full, t)), src[:, :full])
    if n > full * t:
        write(dst[:, full * t : n], src[:, full, : n - full * t])


def _scatter_block(
    grads: list[Tensor | None], pieces: dict[str, Tensor], tokens: dict[str, Tensor], lo: int, hi: int
) -> None:
    """Write one block's gradients (chunk layouts) into its positions of the full (B, N, ·) and (B, M, N)
    gradient buffers: q, k, v (B, K, h, T, d), x (B, K, T, C) and the state update's part of k, v, x
    (``tokens``, (B, K', T, C) for the first K' chunks). A ragged end's padded positions copied L at the
    last position (``before`` and ``here`` alike), so their gradients go there."""
    n = hi - lo
    for index, name in enumerate(("q", "k", "v", "x")):
        if name in pieces:
            piece = pieces[name]
            if piece.dim() == 5:  # heads
                _put(grads[index][:, lo:hi].unflatten(-1, piece.shape[2:5:2]), piece.transpose(2, 3))
            else:
                _put(grads[index][:, lo:hi], piece)
        if name in tokens:
            _put(grads[index][:, lo:hi], tokens[name], accumulate=True)
    for index, name in ((4, "logits"), (5, "before"), (6, "here")):
        _put(grads[index][..., lo:hi].transpose(1, 2), pieces[name])
    for name in ("before", "here"):
        grads[6][..., hi - 1] += pieces[name].flatten(1, 2)[:, n:].sum(1)


@dataclass
class _Grads:
    """Gradients accumulated over one block, in chunk layouts (B, K, T, M) and (B, K, M, T)."""

    logits: Tensor
    before: Tensor
    here: Tensor
    last: Tensor
    carried: Tensor


def _block_backward(
    config: ScanConfig,
    z: _BlockInputs,
    fwd: _BlockForward,
    bias: Tensor | None,
    mask: Tensor | None,
    update: bool,
    d_out: Tensor,
    d_state: Tensor,
    d_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor], Tensor | None]:
    """Backward of :func:`_block_forward`: d_out (B, K, h, T, d), d_state (B, F, M) the gradient of the
    state after the block, d_weights (B, K, T, h, M) that of the returned attention weights (or None).
    Returns the gradient of the state before it, the inputs' gradients in chunk layouts (q, k, v per
    head), the state update's part of the token gradients (k, v, x for the chunks that update it) and
    the value bias' gradient."""
    b, chunks, h, t, d = z.q.shape
    c = h * d
    normed = fwd.norm is not None
    carried, mix = fwd.carried, fwd.mix
    grads = _Grads(torch.zeros_like(z.logits), torch.zeros_like(z.before), torch.zeros_like(z.here),
                   torch.zeros_like(fwd.last), torch.zeros_like(carried))  # fmt: skip

    # out = mixed^T v + (mix g)^T S_v + mass · bias
    d_bias = None
    d_dropped = None
    if bias is not None:
        mass = 1.0 if fwd.mass is None else fwd.mass.transpose(2, 3)
        d_bias = (mass * d_out).sum((0, 1, 3)).flatten()
        if fwd.mass is not None:
            d_dropped = torch.matmul(d_out, bias.view(h, d, 1)).transpose(2, 3)  # (B, K, T, h, 1)
    d_mixed = torch.matmul(d_out, z.v.transpose(-1, -2)).transpose(2, 3).contiguous()  # (B, K, T, h, T) over s
    d_v = torch.matmul(fwd.mixed.permute(0, 1, 3, 4, 2), d_out)  # (B, K, h, T, d)
    d_g_mix = torch.matmul(d_out, fwd.pooled_v).transpose(2, 3)  # (B, K, T, h, M)
    state_grad = d_state.new_zeros(b, chunks + 1, *d_state.shape[1:])  # (B, K + 1, F, M) of the states
    d_pooled_v = torch.matmul(d_out.transpose(-1, -2), (mix * carried.unsqueeze(3)).transpose(2, 3))
    state_grad[:, :chunks, c : 2 * c] = d_pooled_v.flatten(2, 3)
    grads.carried += (d_g_mix * mix).sum(3)

    # mix = dropped / σ, dropped = probs (· mask), probs = softmax(scores); the left product is undone below
    d_mix_rest = d_g_mix * carried.unsqueeze(3)

    def softmax_backward(d_mix: Tensor) -> tuple[Tensor, Tensor | None]:
        inv = fwd.norm.inv_sigma.unsqueeze(3) if normed else None
        d_drop = d_mix * inv if normed else d_mix
        if d_dropped is not None:
            d_drop = d_drop + d_dropped
        d_probs = d_drop if mask is None else d_drop * mask / (1 - config.dropout_p)
        if d_weights is not None:
            d_probs = d_probs + d_weights
        d_scores = torch.ops.aten._softmax_backward_data(d_probs, fwd.probs, -1, fwd.probs.dtype)
        if not normed:
            return d_scores, None
        dropped = fwd.probs if mask is None else fwd.probs * mask / (1 - config.dropout_p)
        d_inv = (d_mix * dropped).sum(3) + (d_scores * fwd.raw).sum(3)
        return d_scores * inv, d_inv

    # The intra-chunk weights enter twice (intra = right(pairs), mixed = left(mix)); their backward
    # needs d_intra, which needs d_mix, which needs the left product's gradient: compute that first.
    d_mix = fwd.weights.left_backward(d_mixed).add_(d_mix_rest)
    d_scores, d_inv = softmax_backward(d_mix)
    d_inter = d_scores * carried.unsqueeze(3)  # (B, K, T, h, M)
    grads.carried += (d_scores * fwd.inter).sum(3)
    d_intra = torch.cat([d_scores, d_scores.new_zeros(b, chunks, t, 1, d_scores.shape[-1])], 3) if normed else d_scores
    d_x = None
    if normed:
        d_pooled_x, d_x = _norm_backward(z, fwd, d_inv, d_intra, grads)
        state_grad[:, :chunks, 2 * c :] = d_pooled_x
    d_pairs = fwd.weights.backward(fwd, d_intra, d_mixed, grads)

    # inter = q · S_k, pairs = q · k (and x̄ · x̄)
    d_inter = d_inter.transpose(2, 3)  # (B, K, h, T, M)
    d_q = torch.matmul(d_inter, fwd.pooled_k.transpose(-1, -2))  # (B, K, h, T, d)
    state_grad[:, :chunks, :c] = torch.matmul(z.q.transpose(-1, -2), d_inter).flatten(2, 3)
    d_a = d_pairs[:, :, :, :h].transpose(2, 3)  # (B, K, h, T, T)
    d_q += torch.matmul(d_a, z.k)
    d_k = torch.matmul(d_a.transpose(-1, -2), z.q)
    if normed:
        d_gram = d_pairs[:, :, :, h]
        d_x += torch.matmul(d_gram + d_gram.transpose(-1, -2), z.x)

    # The state recursion, in reverse: S_{i+1} = g_end,i S_i + Σ_s last_i[s] f_s. First the gradient of
    # every state, in place in ``state_grad`` (slot i: S_i, slot K: the state after the block), then the
    # products for all chunks at once.
    ends = chunks if update else chunks - 1
    state_grad[:, ends] += d_state
    keep = carried[:, :, -1].unsqueeze(-2)  # (B, K, 1, M)
    d_keep = grads.carried[:, :, -1]  # (B, K, M), a view
    for i in reversed(range(ends)):  # one chunk's (F, M) at a time: these stay in cache
        d_keep[:, i] += torch.linalg.vecdot(state_grad[:, i + 1], fwd.states[:, i], dim=-2)
        state_grad[:, i].addcmul_(keep[:, i], state_grad[:, i + 1])
    d_state = state_grad[:, 0]
    d_tokens = {}
    if ends:
        after = state_grad[:, 1 : ends + 1]  # (B, ends, F, M) the gradient of the state after chunk i
        last_t = fwd.last[:, :ends].transpose(-1, -2)  # (B, ends, T, M)
        sources = {"k": z.k_tokens, "v": z.v_tokens, "x": z.x}
        for i, (name, tokens) in enumerate(item for item in sources.items() if item[1] is not None):
            part = after[:, :, i * c : (i + 1) * c]  # (B, ends, C, M)
            grads.last[:, :ends] += torch.matmul(part.transpose(-1, -2), tokens[:, :ends].transpose(-1, -2))
            d_tokens[name] = torch.matmul(last_t, part.transpose(-1, -2))  # (B, ends, T, C)

    # last = exp(l_s - L_end), g = exp(L_start - L_t)
    d_last = grads.last.mul_(fwd.last).transpose(-1, -2)  # (B, K, T, M) over s
    grads.logits += d_last
    grads.here[:, :, -1] -= d_last.sum(2)
    d_g = grads.carried.mul_(carried)
    grads.here -= d_g
    grads.before[:, :, 0] += d_g.sum(2)

    pieces = {
        "q": d_q,
        "k": d_k,
        "v": d_v,
        "logits": grads.logits,
        "before": grads.before,
        "here": grads.here,
    }
    if normed:
        pieces["x"] = d_x
    return d_state, pieces, d_tokens, d_bias


def _norm_backward(
    z: _BlockInputs, fwd: _BlockForward, d_inv: Tensor, d_intra: Tensor, grads: _Grads
) -> tuple[Tensor, Tensor]:
    """Backward of :func:`_norm_forward`. Writes d_intra[..., h, :] (the ``within`` part), accumulates
    into ``grads``; returns the gradients of the carried S_x and of x̄."""
    norm = fwd.norm
    h = fwd.inter.shape[3]
    c = z.x.shape[-1]
    positive = (norm.norm2[:, :, 1:] > 0).to(d_inv.dtype)
    d_norm2 = d_inv * (-0.5 / c) * norm.inv_sigma.pow(3) * positive  # (B, K, T, M)
    # reverse the recursion Y_t = ρ_t² Y_{t-1} + step_t
    acc = torch.zeros_like(d_norm2[:, :, 0])
    d_steps, d_shrinks = [], []
    for i in reversed(range(d_norm2.shape[2])):
        acc = acc + d_norm2[:, :, i]
        d_steps.append(acc)
        d_shrinks.append(acc * norm.norm2[:, :, i])
        acc = acc * norm.shrink[:, :, i]
    d_step = torch.stack(d_steps[::-1], dim=2)
    d_shrink = torch.stack(d_shrinks[::-1], dim=2)
    pooled_x = fwd.states[:, : d_norm2.shape[1], 2 * c :]  # (B, K, C, M)
    d_pooled_x = pooled_x * (2 * acc).unsqueeze(-2)  # from Y_{-1} = |S_x|²
    # step = 2 α P - α² |x̄|², P = within + g ⟨x̄, S_x⟩
    alpha = norm.alpha
    d_alpha = d_step * (2 * norm.product - 2 * alpha * norm.own)
    d_product = 2 * alpha * d_step
    d_own = -(d_step * alpha.square()).sum(-1)  # (B, K, T)
    d_intra[:, :, :, h] = d_product
    grads.carried += d_product * norm.with_state
    d_with = d_product * fwd.carried
    d_pooled_x += torch.matmul(z.x.transpose(-1, -2), d_with)
    d_x = torch.matmul(d_with, pooled_x.transpose(-1, -2)).addcmul_(z.x, d_own.unsqueeze(-1), value=2)
    # α = exp(l - L_t), ρ² = exp(2 (L_{t-1} - L_t))
    d_a = d_alpha * alpha
    grads.logits += d_a
    grads.here -= d_a
    d_r = 2 * d_shrink * norm.shrink
    grads.before += d_r
    grads.here -= d_r
    return d_pooled_x, d_x
