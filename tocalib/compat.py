"""Drop-in use: ToCa where code expects PyTorch's ``nn.MultiheadAttention``.

:class:`ToCaMultiheadAttention` *is* an ``nn.MultiheadAttention`` (a subclass). It has the same
constructor, parameters, attribute names and shapes, the same call and the same return. So it can replace
``self_attn`` or ``multihead_attn`` in PyTorch's own Transformer layers, before or after they are built,
and a trained ``nn.MultiheadAttention`` loads into it::

    layer = nn.TransformerEncoderLayer(256, 8, batch_first=True)
    layer.self_attn = ToCaMultiheadAttention(256, 8, batch_first=True, num_clusters=32)
    toca = ToCaMultiheadAttention.from_mha(trained_mha, num_clusters=32)  # the MHA's weights, new clusters

With ``num_clusters=0`` it is ``nn.MultiheadAttention`` itself, and every call goes to PyTorch's code.
With M > 0 the keys and values are M cluster tokens, pooled from the ``key`` and ``value`` inputs with
one assignment computed from the keys. The pooling excludes padded keys. Then comes PyTorch's
multi-head attention from the queries to those clusters, with the same weights, biases and dropout.
What that changes:

* **Attention weights** are over the M clusters: (B, L, M) averaged over heads, or (B, h, L, M).
* **key_padding_mask** follows PyTorch's rules. A bool mask is True at padding. A float mask is added, here
  to the clustering logits, because the softmax over keys is the assignment's softmax. Entries at -1e4
  or below (``-inf``, ``finfo.min``, ``-1e9``) are padding: those keys are zeroed and get weight 0 in
  every cluster. An int mask raises, as in PyTorch.
* **attn_mask**: only the causal mask can apply to clusters. That is ``is_causal=True``, a
  ``generate_square_subsequent_mask``, or any bool or float mask that blocks exactly the future. It
  selects causal ToCa (:mod:`tocalib.causal`) for self-attention. Any other mask raises.
* **add_bias_kv / add_zero_attn** add a learned, or a zero, entry to the M clusters (M + 1 or M + 2 keys),
  as they add one to the keys in PyTorch. Causal ToCa has no room for them and raises.
* **Nested tensors** (what ``nn.TransformerEncoder`` passes in evaluation with a padding mask) are unpacked
  to a padded batch and packed again. PyTorch's fused encoder-layer fast path, which could only run full
  attention, is declined: a no-op forward pre-hook is one of the conditions PyTorch checks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib._checks import _NOT_SCRIPTABLE
from tocalib.causal import ClusterState, KVCache, Projections, causal_toca, causal_toca_step, full_attention_step
from tocalib.clustering import build_clustering
from tocalib.pooling import Assignment
from tocalib.validation import check_int

__all__ = ["ToCaMultiheadAttention"]

PADDING = -1e4
"""A float mask entry at or below this is padding (``exp`` of it vanishes in every floating dtype)."""


def _no_op(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence makes PyTorch's encoder layers decline their
    fused full-attention fast path (they check for hooks), which would bypass the clusters."""


class ToCaMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with token-to-cluster attention (see the module docstring).

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype: as
            in ``nn.MultiheadAttention``, in its order.
        num_clusters: M clusters; 0 gives ``nn.MultiheadAttention`` exactly.
        clustering, cluster_norm, norm_eps, clustering_kwargs, chunk_size, recompute: as in
            :class:`~tocalib.ToCaAttention`. The clustering reads the keys (width ``kdim``). With
            ``cluster_norm`` one LayerNorm serves the pooled keys and values, or two when kdim ≠ vdim
            (``cluster_norm`` and ``value_norm``).
        causal: attend causally even where a call passes no causal mask (PyTorch's layers make
            attention causal per call, with ``attn_mask``/``is_causal``, which work without this).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_clusters: int = 64,
        clustering: str | nn.Module = "mlp",
        cluster_norm: bool = True,
        norm_eps: float = 1e-6,
        clustering_kwargs: dict[str, Any] | None = None,
        causal: bool = False,
        chunk_size: int = 64,
        recompute: bool = False,
    ) -> None:
        super().__init__(
            embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype
        )
        num_clusters, chunk_size = check_int("num_clusters", num_clusters, 0), check_int("chunk_size", chunk_size, 1)
        self.num_clusters, self.causal, self.chunk_size, self.recompute = num_clusters, causal, chunk_size, recompute
        factory = {"device": device, "dtype": dtype}
        self.clustering = self.cluster_norm = self.value_norm = None
        if num_clusters:
            factory_if_named = {} if isinstance(clustering, nn.Module) else factory
            kwargs = clustering_kwargs or {}
            self.clustering = build_clustering(clustering, self.kdim, num_clusters, **factory_if_named, **kwargs)
            if cluster_norm:
                self.cluster_norm = nn.LayerNorm(self.kdim, eps=norm_eps, **factory)
                if self.vdim != self.kdim:
                    self.value_norm = nn.LayerNorm(self.vdim, eps=norm_eps, **factory)
        if causal and num_clusters and not getattr(self.clustering, "causal_safe", False):
            raise ValueError(
                f"causal=True needs a clustering whose logit for token s uses only tokens <= s, got {clustering!r}; "
                "use 'linear', 'mlp', or 'conv1d' with clustering_kwargs={'causal': True}"
            )
        if num_clusters or causal:
            self.register_forward_pre_hook(_no_op)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, **kwargs: Any) -> ToCaMultiheadAttention:
        """A ToCa layer with ``mha``'s configuration and trained weights; only the clustering (and the
        cluster norm) start fresh. ``kwargs`` are the ToCa arguments, e.g. ``num_clusters=32``."""
        weight = mha.out_proj.weight
        layer = cls(
            mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.bias_k is not None,
            mha.add_zero_attn, mha.kdim, mha.vdim, mha.batch_first, weight.device, weight.dtype, **kwargs,
        )  # fmt: skip
        missing, unexpected = layer.load_state_dict(mha.state_dict(), strict=False)
        fresh = ("clustering.", "cluster_norm.", "value_norm.")
        if unexpected or any(not key.startswith(fresh) for key in missing):
            raise ValueError(f"{type(mha).__name__} does not match: missing {missing}, unexpected {unexpected}")
        return layer.train(mha.training)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this first: this forward is not TorchScript (with num_clusters=0, a
        plain ``nn.MultiheadAttention`` takes this layer's state dict and scripts)."""
        raise TypeError(_NOT_SCRIPTABLE.format(type(self).__name__))

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, causal={self.causal}, batch_first={self.batch_first}"

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
        """``nn.MultiheadAttention``'s call: query (L, E), (L, B, E) or (B, L, E) with ``batch_first``; key and
        value likewise with S positions. Returns ``(attn_output, attn_weights)`` (see the module docstring)."""
        if query.is_nested:
            return self._nested(query, key, value, need_weights, attn_mask, average_attn_weights, is_causal)
        if not self.num_clusters:  # nn.MultiheadAttention itself (made causal here by causal=True only)
            if self.causal and attn_mask is None:
                length = query.shape[1 if self.batch_first and query.dim() == 3 else 0]
                attn_mask = nn.Transformer.generate_square_subsequent_mask(length, query.device, query.dtype)
                is_causal = True
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        causal = self._is_causal(query, key, value, attn_mask, is_causal)
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=None, other_name="",
            target_type=query.dtype,
        )  # fmt: skip
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if causal:
            out, weights = self._causal(query, key_padding_mask, need_weights, average_attn_weights)
        else:
            out, weights = self._clustered(query, key, value, key_padding_mask, need_weights, average_attn_weights)
        if not batched:
            return out[0], None if weights is None else weights[0]
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _is_causal(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, is_causal: bool) -> bool:
        """Whether this call (M > 0) attends causally; refuses an attn_mask that M clusters cannot honour."""
        causal = self.causal or is_causal
        if attn_mask is not None:
            length = query.shape[-2] if self.batch_first or query.dim() == 2 else query.shape[0]
            if not _blocks_exactly_the_future(attn_mask, length, key.shape[-2] if self.batch_first else key.shape[0]):
                raise ValueError(
                    f"with num_clusters={self.num_clusters} an attn_mask can only be the causal mask (True or -inf "
                    f"exactly above the diagonal), got a {attn_mask.dtype} mask of shape {tuple(attn_mask.shape)}; "
                    "ToCa mixes the keys into clusters, so a per-key mask cannot apply (num_clusters=0 takes any mask)"
                )
            causal = True
        if causal and not (query is key and key is value):
            raise ValueError("causal attention is self-attention: pass the same tensor as query, key and value")
        if causal and not getattr(self.clustering, "causal_safe", False):
            raise ValueError(
                f"causal attention needs a clustering whose logits look only back, got "
                f"{type(self.clustering).__name__}; build it with clustering 'linear', 'mlp', or 'conv1d' with "
                "clustering_kwargs={'causal': True}"
            )
        if causal and (self.bias_k is not None or self.add_zero_attn):
            raise ValueError(
                "causal ToCa has no extra key or value entries: build the layer without add_bias_kv and add_zero_attn"
            )
        return causal

    def _clustered(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        average_attn_weights: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Batch-first query (B, L, E), key (B, S, kdim), value (B, S, vdim) → PyTorch's multi-head attention
        from the queries to M clusters pooled from the keys and values."""
        same = key is value
        padding, bias = _split_mask(key_padding_mask)
        if padding is not None:
            key = key.masked_fill(padding.unsqueeze(-1), 0.0)
            value = key if same else value.masked_fill(padding.unsqueeze(-1), 0.0)
        logits = self.clustering(key, key_padding_mask=padding)
        if bias is not None:
            logits = logits + bias.unsqueeze(1)
        keep = None if padding is None else ~padding
        hard = getattr(self.clustering, "hard", False)
        backend = getattr(self.clustering, "scatter_backend", "torch")
        assignment = Assignment.from_logits(logits, keep, hard=hard, backend=backend)
        clusters = [assignment.pool(t) for t in ((key,) if same else (key, value))]
        if self.cluster_norm is not None:
            clusters[0] = self.cluster_norm(clusters[0])
            if not same:
                clusters[1] = (self.value_norm or self.cluster_norm)(clusters[1])
        keys, values = clusters[0], clusters[-1]
        out, weights = F.multi_head_attention_forward(
            query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), self.embed_dim, self.num_heads,
            self.in_proj_weight, self.in_proj_bias, self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            self.out_proj.weight, self.out_proj.bias, training=self.training, need_weights=need_weights,
            use_separate_proj_weight=not self._qkv_same_embed_dim, q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights,
        )  # fmt: skip
        return out.transpose(0, 1), weights

    def _causal(
        self, x: Tensor, key_padding_mask: Tensor | None, need_weights: bool, average_attn_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Causal ToCa self-attention on batch-first x (B, N, E)."""
        padding, bias = _split_mask(key_padding_mask)
        keep = None if padding is None else ~padding
        if padding is not None:
            x = x.masked_fill(padding.unsqueeze(-1), 0.0)
        logits = self.clustering(x, key_padding_mask=padding)
        if bias is not None:
            logits = logits + bias.unsqueeze(1)
        out, weights, _ = causal_toca(
            x, logits, self._projections(), keep=keep, chunk_size=self.chunk_size, need_weights=need_weights,
            dropout_p=self.dropout if self.training else 0.0, final_state=False, recompute=self.recompute,
        )  # fmt: skip
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        return self.out_proj(out), weights

    def _projections(self) -> Projections:
        """The q, k and v weights (slices of ``in_proj_weight``) and the cluster norm, for the causal scan."""
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = zip(weights, biases, strict=True)
        return Projections(*q, *k, *v, self.cluster_norm, self.num_heads)

    def _nested(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """A nested batch (``nn.TransformerEncoder`` in evaluation): padded, attended, packed again."""
        if not (query is key and key is value and self.batch_first):
            raise ValueError("a nested tensor input must be batch-first self-attention (query, key and value the same)")
        lengths = [t.shape[0] for t in query.unbind()]
        padded = query.to_padded_tensor(0.0)
        ends = torch.tensor(lengths, device=padded.device).unsqueeze(1)
        padding = torch.arange(padded.shape[1], device=padded.device) >= ends
        out, weights = self(padded, padded, padded, padding, need_weights, attn_mask, average_attn_weights, is_causal)
        return torch.nested.nested_tensor([o[:n] for o, n in zip(out, lengths, strict=True)]), weights

    def step(
        self, query: Tensor, state: ClusterState | KVCache | None = None, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, ClusterState | KVCache]:
        """Incremental causal decoding of self-attention: the outputs of T new positions (``query`` (B, T, E),
        or (T, B, E) without ``batch_first``) and the state to pass to the next call. For M > 0 the state
        has a fixed size (a :class:`~tocalib.causal.ClusterState`); for M = 0 it is a KV cache. See
        :meth:`tocalib.ToCaAttention.step`."""
        if not self.batch_first:
            query = query.transpose(0, 1)
        padding, bias = _split_mask(key_padding_mask)
        if bias is not None:
            raise ValueError("step() takes a bool key_padding_mask (or a float one of 0 and -inf entries)")
        keep = None if padding is None else ~padding
        if keep is not None:
            query = query.masked_fill(padding.unsqueeze(-1), 0.0)
        dropout_p = self.dropout if self.training else 0.0
        if self.num_clusters:
            out, state = causal_toca_step(
                query, self.clustering, self._projections(), state, keep=keep, chunk_size=self.chunk_size,
                dropout_p=dropout_p,
            )  # fmt: skip
        else:
            out, state = full_attention_step(query, self._projections(), state, keep=keep, dropout_p=dropout_p)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), state


def _split_mask(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """A key padding mask → (bool padding (B, S) or None, the float bias on the other entries or None)."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return mask, None
    padding = mask <= PADDING
    bias = mask.masked_fill(padding, 0.0)
    return (padding if padding.any() else None), (bias if bias.any() else None)


def _blocks_exactly_the_future(mask: Tensor, queries: int, keys: int) -> bool:
    """Whether ``mask`` (L, S), or (B·h, L, S) of identical slices, blocks exactly the keys after each query."""
    if mask.shape[-2:] != (queries, keys) or queries != keys or mask.dim() not in (2, 3):
        return False
    blocked = mask if mask.dtype == torch.bool else mask <= PADDING
    if mask.dtype != torch.bool and bool((mask.masked_fill(blocked, 0.0) != 0).any()):
        return False  # a float mask that also shifts some allowed scores
    future = torch.ones(queries, keys, dtype=torch.bool, device=mask.device).triu(1)
    return bool((blocked == future).all())
