"""Input validation for :class:`tocalib.ToCaAttention`: what was wrong, what was expected, how to fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tocalib.causal import ClusterState, KVCache
from tocalib.pooling import Assignment

if TYPE_CHECKING:
    from tocalib.attention import ToCaAttention


_LAYOUT_HINT = (
    "; for an image feature map (B, C, H, W) pass x.flatten(2).transpose(1, 2) and size=(H, W); "
    "for packed sequences pass cu_seqlens"
)


_NOT_SCRIPTABLE = (
    "{} cannot be compiled by torch.jit.script (TorchScript lacks the Python it uses); use torch.compile for "
    "speed, or torch.export / torch.onnx.export(dynamo=True) for deployment"
)


def _check_tokens(name: str, t: Tensor, dim: int, hint: str = _LAYOUT_HINT) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, C), got {type(t).__name__}")
    if t.dim() != 3 or t.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (B, N, C) with C = dim = {dim}, got {tuple(t.shape)}{hint}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (the layer's weights are), got {t.dtype}; use {name}.float()"
        )


def check_forward(
    layer: ToCaAttention,
    x: Tensor,
    context: Tensor | None,
    key_padding_mask: Tensor | None,
    assignment: Tensor | Assignment | None,
) -> Tensor | None:
    """Validate a forward call; return ``keep`` (B, L) bool (True = real clustered token) or None."""
    _check_tokens("x", x, layer.dim)
    source = x
    if context is not None:
        _check_tokens("context", context, layer.dim)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context has batch size {context.shape[0]} but x has {x.shape[0]}; they must match")
        if layer.causal:
            raise ValueError("causal=True is self-attention only: a context has no order relative to x")
        source = context
    b, length, _ = source.shape
    expected = (b, layer.num_clusters, length)
    if assignment is not None:
        if layer.num_clusters == 0:
            raise ValueError("assignment= was given but this layer has num_clusters=0 (plain self-attention)")
        if isinstance(assignment, Assignment):
            _check_given(layer, assignment, expected)
        elif not isinstance(assignment, Tensor):
            raise TypeError(
                f"assignment must be a tocalib.Assignment or a (B, M, L) tensor, got {type(assignment).__name__}"
            )
        elif layer.causal:
            raise ValueError(
                "a causal layer renormalises its assignment per prefix, so it takes logits, not a normalised matrix "
                "(one normalised over the whole sequence would leak the future): pass "
                "assignment=Assignment.from_logits(logits, causal=True), or a causal provider's output"
            )
        elif tuple(assignment.shape) != expected or not assignment.is_floating_point():
            raise ValueError(
                f"assignment must be a floating tensor of shape (B, M, L) = {expected}, "
                f"got {assignment.dtype} {tuple(assignment.shape)}"
            )
    keep = _keep(key_padding_mask, b, length)
    check_values = layer.check_assignment and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
    if isinstance(assignment, Assignment):
        keep = _same_padding(keep, assignment.keep, (b, length), check_values)
    matrix = assignment.matrix if isinstance(assignment, Assignment) else assignment
    if matrix is not None and check_values:
        _check_assignment(matrix, keep)
    return keep


def _same_padding(
    keep: Tensor | None, given: Tensor | None, shape: tuple[int, int], check_values: bool
) -> Tensor | None:
    """The real tokens of a call with a given Assignment: the layer's padding and the assignment's must agree
    (their values are compared, one reduction and a host sync, only with ``check_values``)."""
    if given is None:
        if keep is not None:
            raise ValueError(
                "key_padding_mask marks padding, but the given Assignment was built without it (its keep is None): "
                "build it with keep=~key_padding_mask, or call its provider with the same key_padding_mask"
            )
        return None
    if given.dtype != torch.bool or tuple(given.shape) != shape:
        raise ValueError(f"the Assignment's keep must be a bool (B, L) = {shape} tensor, got {given.dtype} "
                         f"{tuple(given.shape)}")  # fmt: skip
    if keep is not None and keep is not given and check_values and not torch.equal(keep, given):
        raise ValueError(
            "the given Assignment was built for other padding than this call's key_padding_mask: build it (or call "
            "its provider) with the same key_padding_mask"
        )
    return given if keep is None else keep


def _check_given(layer: ToCaAttention, assignment: Assignment, expected: tuple[int, int, int]) -> None:
    """A given :class:`~tocalib.Assignment` must fit the layer: its (B, M, L) and causal or not."""
    if tuple(assignment.shape) != expected:
        raise ValueError(
            f"the given Assignment is (B, M, L) = {tuple(assignment.shape)} but this layer and input need "
            f"{expected}; share assignments only between layers with the same num_clusters, on the same tokens"
        )
    if layer.causal != (assignment.form == "causal"):
        raise ValueError(
            f"a {'causal' if layer.causal else 'non-causal'} layer got a {assignment.form} Assignment: a causal "
            "layer needs the causal form (logits, renormalised per prefix; Assignment.from_logits(logits, "
            "causal=True), or a causal provider), a non-causal one a soft or hard form"
        )


def _check_assignment(assignment: Tensor, keep: Tensor | None) -> None:
    """A given assignment must be a distribution over the tokens: non-negative, each row summing to 1
    over the real tokens (or to 0: a cluster nobody joins), within a tolerance for its dtype."""
    tolerance = 1e-2 if torch.finfo(assignment.dtype).bits <= 16 else 1e-3
    with torch.no_grad():
        lowest = assignment.min() if assignment.numel() else assignment.new_zeros(())
        sums = (assignment if keep is None else assignment * keep.unsqueeze(1)).float().sum(-1)
        bad = ((sums - 1).abs() > tolerance) & (sums.abs() > tolerance)
        if lowest < -tolerance or bad.any():
            raise ValueError(
                f"assignment must hold, per cluster, weights >= 0 that sum to 1 over the real tokens (a softmax over "
                f"the token axis), got a minimum of {float(lowest):.3g} and row sums from {float(sums.min()):.3g} "
                f"to {float(sums.max()):.3g}; build it with tocalib.Assignment.from_logits(logits, "
                "keep=~key_padding_mask), or set layer.check_assignment = False to skip this check"
            )


def _keep(key_padding_mask: Tensor | None, b: int, length: int) -> Tensor | None:
    """``~key_padding_mask`` after checking it is (B, L) bool, or None."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, length):
        advice = (
            "convert with `mask.bool()` (a Hugging Face attention_mask, 1 = real token, is `~attention_mask.bool()`)"
            if key_padding_mask.dtype != torch.bool
            else "pass one entry per clustered token"
        )
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape (B, L) = {(b, length)} over the clustered tokens, with "
            f"True = padding, got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}; {advice}"
        )
    return ~key_padding_mask


def check_step(
    layer: ToCaAttention, x: Tensor, key_padding_mask: Tensor | None, state: ClusterState | KVCache | None
) -> Tensor | None:
    """Validate a :meth:`ToCaAttention.step` call; return ``keep`` (B, T) bool or None."""
    if not layer.causal:
        raise ValueError("step() decodes causally: build the layer with causal=True")
    _check_tokens("x", x, layer.dim, hint=": the new positions of B sequences")
    b, t, _ = x.shape
    if t < 1:
        raise ValueError(f"step() needs at least one new position, got x of shape {tuple(x.shape)}")
    expected = ClusterState if layer.num_clusters else KVCache
    if state is not None and not isinstance(state, expected):
        raise TypeError(
            f"state must be the {expected.__name__} a previous step() of this layer returned (or None), "
            f"got {type(state).__name__}"
        )
    if layer.num_clusters:
        if layer.clustering is None:
            raise ValueError(
                "step() runs the layer's own clustering on the new positions, and this layer has none (it takes "
                "shared logits in forward(assignment=)); decode with a layer that has a causal clustering"
            )
        if getattr(layer.clustering, "causal_lookback", None) is None:
            raise ValueError(
                f"step() needs to know how many past tokens the clustering {type(layer.clustering).__name__} reads: "
                "give it an int attribute causal_lookback (0 for a per-token function)"
            )
        if state is not None:
            width = (3 if isinstance(layer.cluster_norm, torch.nn.LayerNorm) else 2) * layer.dim
            lookback = layer.clustering.causal_lookback
            m = layer.num_clusters
            expected = [(b, m), (b, m, width), (b, lookback, layer.dim) if lookback else None]
            expected.append((b, lookback) if lookback else None)
            found = [tuple(state.log_normalizer.shape), tuple(state.pooled.shape)]
            found += [None if t is None else tuple(t.shape) for t in (state.window, state.window_padding)]
            if found != expected:
                raise ValueError(
                    f"state has shapes (log_normalizer, pooled, window, window_padding) {found}, but this layer and x "
                    f"need {expected}; "
                    "pass the state this layer returned for this batch"
                )
    elif state is not None and state.keys.shape[0] != b:
        raise ValueError(f"the KV cache holds batch size {state.keys.shape[0]} but x has {b}")
    if state is not None and next(iter(vars(state).values())).device != x.device:
        raise ValueError(f"state is on another device than x ({x.device}): move it with state.to(x.device)")
    return _keep(key_padding_mask, b, t)
