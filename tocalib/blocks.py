"""Composable ToCa blocks: :class:`ToCaBlock` (one pre-norm Transformer block) and :class:`ToCaStack` (a
sequence of blocks that share their cluster assignments by a policy, or take them from a provider).

Where the assignment comes from is the stack's ``share`` (the PaCa paper's "where to compute the cluster
assignments?", its Sec. 3.2 and Table 6):

* ``"block"`` (or ``1``): every block runs its own clustering;
* ``"stage"``: block 0 clusters, every later block reuses its assignment (with its own ``cluster_norm``,
  keys and values, on its own tokens);
* an int ``k ≥ 2``: blocks 0, k, 2k, … cluster, the others reuse the latest;
* ``"given"``: no block clusters; ``forward(..., assignment=)`` brings the assignment (from a provider
  that lives elsewhere, e.g. one teacher for the stages of a hierarchical model);
* ``teacher=`` a :class:`~tocalib.providers.AssignmentProvider`: no block clusters; the stack runs the
  teacher on its input and feeds its G assignments to G equal groups of consecutive blocks.

The assignment flows as an :class:`~tocalib.Assignment`: soft as a (B, M, N) matrix, hard as (index,
weight) pooled by scatter (never a dense matrix), causal as logits that every causal block renormalises
per prefix, so a causal stack stays causal (∂y_t/∂x_s = 0 for s > t).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tocalib._registry import takes_kwargs
from tocalib.attention import ToCaAttention, ToCaIntermediates
from tocalib.pooling import Assignment
from tocalib.providers import AssignmentProvider
from tocalib.validation import check_int

__all__ = ["DWConvMlp", "DropPath", "Mlp", "ToCaBlock", "ToCaStack", "cluster_parameter_names"]

Factory = dict[str, Any]


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        scale = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)  # 0 or 1 / keep
        return x * scale  # one pass over x (and one in backward), not a product and a quotient

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """The Transformer FFN on tokens: fc1 (C → hidden) → GELU → fc2 (hidden → C), dropout after both;
    (B, N, C) → (B, N, C), token by token (so padding and causality are kept)."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        drop: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **factory)
        self._add_mixer(hidden_dim, factory)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, **factory)
        self.drop = nn.Dropout(drop)

    def _add_mixer(self, hidden_dim: int, factory: Factory) -> None:
        """Where a subclass adds a token mixer between fc1 and the activation (so that the modules keep the
        order, and a seeded initialisation the values, of the layer it rebuilds)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def macs(self, num_tokens: int) -> int:
        """fc1 and fc2 on ``num_tokens`` tokens."""
        return 2 * num_tokens * self.fc1.in_features * self.fc1.out_features


class _DWConv(nn.Module):
    """Depthwise 3×3 conv on grid tokens with a shortcut: (B, N, C) → (B, N, C), key ``dwconv``."""

    def __init__(self, dim: int, factory: Factory) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **factory)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        # The tokens seen as a channels-last (B, C, H, W) map, with no copy: the conv then works and answers in
        # channels-last memory, so back to tokens is a view too and the shortcut adds like-strided tensors
        # (PyTorch otherwise copies the map to NCHW and back: 19x slower at 1280x800's stride-8 map).
        grid = x.unflatten(1, tuple(size)).permute(0, 3, 1, 2)
        return self.dwconv(grid).permute(0, 2, 3, 1).flatten(1, 2) + x


class DWConvMlp(Mlp):
    """PaCa's FFN for 2-D grids: fc1 → x + DWConv3×3(x) → GELU → fc2 (PaCaViT@4307018 paca_vit.py ``Mlp``;
    keys ``fc1``, ``dwconv.dwconv``, ``fc2``). Needs ``size=(H, W)``; the conv mixes neighbours, so it
    suits grids without padding."""

    def _add_mixer(self, hidden_dim: int, factory: Factory) -> None:
        self.dwconv = _DWConv(hidden_dim, factory)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        if size is None or len(size) != 2 or size[0] * size[1] != x.shape[1]:
            raise ValueError(
                f"DWConvMlp works on 2-D grids: pass size=(H, W) with H*W = N = {x.shape[1]}, got size={size!r}"
            )
        return self.drop(self.fc2(self.drop(self.act(self.dwconv(self.fc1(x), size)))))

    def macs(self, num_tokens: int) -> int:
        """fc1, fc2 and the 3×3 depthwise conv."""
        return super().macs(num_tokens) + 9 * num_tokens * self.fc1.out_features


def _build(layer: Callable[..., nn.Module], *args: Any, factory: Factory, **kwargs: Any) -> nn.Module:
    """``layer(*args, **kwargs)``, with ``device``/``dtype`` where given and accepted (else a clear error)."""
    given = {k: v for k, v in factory.items() if v is not None}
    if given and not takes_kwargs(layer, given):
        raise ValueError(
            f"{getattr(layer, '__name__', layer)!r} does not take {sorted(given)}: add PyTorch's factory kwargs "
            "to it, or build the block without device/dtype and move it with .to()"
        )
    return layer(*args, **kwargs, **given)


class ToCaBlock(nn.Module):
    """Pre-norm Transformer block around :class:`~tocalib.ToCaAttention`::

        x = x + drop_path(attn(norm1(x)))
        x = x + drop_path(mlp(norm2(x)))

    Args:
        dim: token width C.
        num_heads: attention heads.
        num_clusters: M (0: plain multi-head self-attention).
        clustering: the attention's clustering (a registered name or a module), or None for a block that
            always reuses a given assignment.
        mlp_ratio: the MLP's hidden width / C.
        mlp_layer: builds the MLP as ``mlp_layer(dim, hidden_dim, drop=drop)`` (:class:`Mlp`, or
            :class:`DWConvMlp` for grids, or your own: a (B, N, C) → (B, N, C) module whose forward may take
            ``size``, and with ``macs(num_tokens)`` for :meth:`macs`).
        norm_layer: builds each norm as ``norm_layer(dim)``; default LayerNorm with eps 1e-6 (PaCa's, timm's).
        drop_path: stochastic-depth rate of both residual branches.
        drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention weights.
        causal: causal attention (then the MLP must be token-wise, as :class:`Mlp` is).
        attention_kwargs: further :class:`~tocalib.ToCaAttention` arguments (``qkv_bias``, ``cluster_norm``,
            ``clustering_kwargs``, ``chunk_size``, ...).
        device, dtype: PyTorch's factory kwargs.

    Example:
        >>> block = ToCaBlock(64, num_heads=4, num_clusters=8)
        >>> block(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    norm_names: ClassVar[tuple[str, str]] = ("norm1", "norm2")
    """The attribute names of the two norms. A subclass that must keep a checkpoint's key names may rename
    them (PaCa-ViT's block calls them ``norm1_before`` and ``norm2_before``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_clusters: int = 64,
        clustering: str | nn.Module | None = "mlp",
        *,
        mlp_ratio: float = 4.0,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        norm_layer: Callable[..., nn.Module] | None = None,
        drop_path: float = 0.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        causal: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        norm_layer = partial(nn.LayerNorm, eps=1e-6) if norm_layer is None else norm_layer
        setattr(self, self.norm_names[0], _build(norm_layer, dim, factory=factory))
        self.attn = ToCaAttention(
            dim, num_heads, num_clusters, clustering, attn_drop=attn_drop, proj_drop=drop, causal=causal,
            **(attention_kwargs or {}), **factory,
        )  # fmt: skip
        setattr(self, self.norm_names[1], _build(norm_layer, dim, factory=factory))
        self.mlp = _build(mlp_layer, dim, int(dim * mlp_ratio), drop=drop, factory=factory)
        self.drop_path = DropPath(drop_path)
        self._mlp_takes_size = "size" in inspect.signature(self.mlp.forward).parameters
        if causal and self._mlp_takes_size:
            raise ValueError(
                f"a causal block needs a token-wise MLP, and {type(self.mlp).__name__} takes size= (it mixes "
                "neighbouring tokens, so position t would see t + 1): use mlp_layer=Mlp"
            )

    @property
    def computes_assignment(self) -> bool:
        """Whether this block runs its own clustering function."""
        return self.attn.clustering is not None

    def forward(
        self,
        x: Tensor,
        *,
        size: Sequence[int] | None = None,
        key_padding_mask: Tensor | None = None,
        assignment: Tensor | Assignment | None = None,
        return_intermediates: bool = False,
    ) -> Tensor | tuple[Tensor, ToCaIntermediates]:
        """x (B, N, C) → (B, N, C); with ``return_intermediates`` also the attention's
        :class:`~tocalib.ToCaIntermediates` (its ``assignment`` is what a later block may reuse).

        ``size``, ``key_padding_mask`` and ``assignment`` are the attention's (see :meth:`ToCaAttention.forward`)."""
        norm1, norm2 = (getattr(self, name) for name in self.norm_names)
        y, record = self.attn(
            norm1(x), size=size, key_padding_mask=key_padding_mask, assignment=assignment, return_intermediates=True
        )
        x = x + self.drop_path(y)
        h = norm2(x)
        x = x + self.drop_path(self.mlp(h, size=size) if self._mlp_takes_size else self.mlp(h))
        return (x, record) if return_intermediates else x

    def macs(self, num_tokens: int, *, computes_assignment: bool | None = None, hard: bool | None = None) -> int:
        """Analytic MACs of one forward pass on one sequence of ``num_tokens`` tokens: the two norms (5 per
        element), the attention (see :meth:`ToCaAttention.macs`) and the MLP (its own ``macs``)."""
        if not callable(getattr(self.mlp, "macs", None)):
            raise TypeError(f"the MLP {type(self.mlp).__name__} has no macs(num_tokens) method to count it with")
        norms = [type(getattr(self, name)) for name in self.norm_names]
        if any(norm is not nn.LayerNorm for norm in norms):
            raise TypeError(
                f"macs() counts LayerNorm norms (5 per element), not {[n.__name__ for n in norms]}: measure this "
                "block with tocalib.flops.count_macs"
            )
        attention = self.attn.macs(num_tokens, computes_assignment=computes_assignment, hard=hard)
        return 10 * num_tokens * self.attn.dim + attention + self.mlp.macs(num_tokens)


_POLICIES = ("block", "stage", "given")


class ToCaStack(nn.Module):
    """``depth`` :class:`ToCaBlock` s that share their assignments by a policy (see the module docstring).

    The blocks are the stack's children ``0`` … ``depth - 1`` (``stack[j]``, ``len(stack)``, iteration), and a
    teacher, if any, is ``stack.teacher``.

    Args:
        dim, num_heads, num_clusters, clustering: every block's (a block that reuses gets no clustering); a
            clustering module instance is copied for each block that clusters, as ``nn.TransformerEncoder``
            copies its layer.
        depth: number of blocks.
        share: ``"block"`` (the default without a teacher), ``"stage"``, an int k ≥ 1 (cluster in blocks 0, k,
            2k, …) or ``"given"``; None with a teacher (the policy is then ``"teacher"``).
        teacher: an :class:`~tocalib.providers.AssignmentProvider` that feeds the blocks (then no block
            clusters); its G assignments go to G equal groups of consecutive blocks.
        causal: causal blocks (a teacher must be causal too).
        drop_path: one stochastic-depth rate for all blocks, or one per block.
        block_layer: the block class (a :class:`ToCaBlock` subclass), built as
            ``block_layer(dim, num_heads, num_clusters, clustering_or_None, **block_kwargs)``.
        device, dtype: PyTorch's factory kwargs.
        **block_kwargs: further :class:`ToCaBlock` arguments (``mlp_ratio``, ``mlp_layer``, ``norm_layer``,
            ``drop``, ``attn_drop``, ``attention_kwargs``).

    Example — a teacher-fed encoder for sequences:
        >>> from tocalib.providers import Conv1dTeacher
        >>> encoder = ToCaStack(64, depth=4, num_heads=4, num_clusters=16, teacher=Conv1dTeacher(64, 16))
        >>> encoder(torch.randn(2, 300, 64)).shape
        torch.Size([2, 300, 64])
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int = 8,
        num_clusters: int = 64,
        clustering: str | nn.Module | None = "mlp",
        *,
        share: str | int | None = None,
        teacher: AssignmentProvider | None = None,
        causal: bool = False,
        drop_path: float | Sequence[float] = 0.0,
        block_layer: type[ToCaBlock] = ToCaBlock,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        depth = check_int("depth", depth, 1)
        num_clusters = check_int("num_clusters", num_clusters, 0)
        self.share = _check_share(share, teacher)
        self.num_clusters, self.causal = num_clusters, causal
        rates = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
        if len(rates) != depth:
            raise ValueError(f"drop_path must be one rate or one per block ({depth}), got {len(rates)}")
        if teacher is not None:
            _check_teacher(teacher, dim, depth, num_clusters, causal)
            self.teacher = teacher
        else:
            self.teacher = None
        self.depth = depth
        for j in range(depth):
            owns = self.computes_assignment(j)
            own = (copy.deepcopy(clustering) if isinstance(clustering, nn.Module) else clustering) if owns else None
            try:
                block = block_layer(
                    dim, num_heads, num_clusters, own, causal=causal, drop_path=rates[j], device=device, dtype=dtype,
                    **block_kwargs,
                )  # fmt: skip
            except TypeError as err:
                raise TypeError(
                    f"{err} (ToCaStack passes its other keyword arguments to {block_layer.__name__}; the attention's "
                    "own, such as clustering_kwargs, go in attention_kwargs={...})"
                ) from err
            if not owns and not (j == 0 and self.share == "given"):
                block.attn.check_assignment = False  # it reuses what block 0 checked, or built normalised
            self.add_module(str(j), block)

    def computes_assignment(self, block: int) -> bool:
        """Whether block ``block`` runs its own clustering under this stack's policy."""
        if self.share in ("teacher", "given") or not self.num_clusters:
            return False
        every = 1 if self.share == "block" else self.share
        return block == 0 or (every != "stage" and block % every == 0)

    def __len__(self) -> int:
        return self.depth

    def __iter__(self) -> Iterator[ToCaBlock]:
        return (self._modules[str(j)] for j in range(self.depth))

    def __getitem__(self, index: int | slice) -> ToCaBlock | list[ToCaBlock]:
        """Block ``index`` (negative counts from the end), or a list of blocks for a slice."""
        if isinstance(index, slice):
            return [self._modules[str(j)] for j in range(self.depth)[index]]
        return self._modules[str(range(self.depth)[index])]

    def extra_repr(self) -> str:
        return f"depth={self.depth}, share={self.share!r}, causal={self.causal}"

    def forward(
        self,
        x: Tensor,
        *,
        size: Sequence[int] | None = None,
        key_padding_mask: Tensor | None = None,
        assignment: Tensor | Assignment | None = None,
        return_intermediates: bool = False,
    ) -> Tensor | tuple[Tensor, list[ToCaIntermediates]]:
        """x (B, N, C) → (B, N, C); with ``return_intermediates`` also every block's
        :class:`~tocalib.ToCaIntermediates`.

        Args:
            x: (B, N, C) tokens.
            size: their layout (``(H, W)`` for grids), given to every block and the teacher.
            key_padding_mask: (B, N) bool, True at padding, for every block and the teacher.
            assignment: with ``share="given"``, the assignment of every block (an
                :class:`~tocalib.Assignment`, or a normalised (B, M, N) tensor).
        """
        if assignment is not None and self.share != "given":
            raise ValueError(f"assignment= feeds a stack built with share='given'; this one has share={self.share!r}")
        if assignment is None and self.share == "given" and self.num_clusters:
            raise ValueError("this stack has share='given': pass assignment= (e.g. a provider's output)")
        groups = None if self.teacher is None else self._taught(x, size, key_padding_mask)
        per_group = self.depth // len(groups) if groups is not None else self.depth
        shared, records = assignment, []
        for j, block in enumerate(self):
            if groups is not None:
                shared = groups[j // per_group]
            given = None if block.computes_assignment else shared
            x, record = block(
                x, size=size, key_padding_mask=key_padding_mask, assignment=given, return_intermediates=True
            )
            shared = record.assignment
            if return_intermediates:
                records.append(record)
        return (x, records) if return_intermediates else x

    def _taught(self, x: Tensor, size: Sequence[int] | None, key_padding_mask: Tensor | None) -> list[Assignment]:
        """The teacher's assignments for x, one per group of blocks, each over x's N tokens."""
        groups = self.teacher(x, size=size, key_padding_mask=key_padding_mask).assignments
        for g, group in enumerate(groups):
            if group is not None and group.shape[-1] != x.shape[1]:
                raise ValueError(
                    f"the teacher's assignment {g} covers {group.shape[-1]} tokens, but the stack's input has "
                    f"{x.shape[1]}: a stack's teacher must cluster its own tokens (a hierarchical teacher, such as a "
                    "multi-level Conv2dTeacher, feeds one share='given' stack per level instead)"
                )
        return groups

    def macs(self, num_tokens: int, *, size: Sequence[int] | None = None, hard: bool | None = None) -> int:
        """Analytic MACs of one forward pass on one sequence of ``num_tokens`` tokens (with its ``size`` for a
        teacher on a grid): the teacher, then every block as it computes or reuses its assignment. ``hard``:
        whether the assignment is pooled by scatter (default: the blocks' clustering is hard; a given or
        taught assignment is soft unless you say so)."""
        total = 0 if self.teacher is None else self.teacher.macs(num_tokens, size=size)
        if hard is None:
            first = self[0].attn.clustering
            hard = self.share not in ("teacher", "given") and getattr(first, "hard", False)
        for block in self:
            total += block.macs(num_tokens, computes_assignment=block.computes_assignment, hard=hard)
        return total


def _check_share(share: str | int | None, teacher: AssignmentProvider | None) -> str | int:
    """The stack's policy: ``"teacher"`` with a teacher, else a name in :data:`_POLICIES` or an int k ≥ 2
    (default and 1: ``"block"``)."""
    if teacher is not None:
        if share is not None:
            raise ValueError(f"a stack with a teacher takes every assignment from it: drop share={share!r}")
        return "teacher"
    if share is None:
        return "block"
    if isinstance(share, str):
        if share not in _POLICIES:
            raise ValueError(f"share must be one of {_POLICIES} or an int k >= 1, got {share!r}")
        return share
    share = check_int("share", share, 1)
    return "block" if share == 1 else share


def _check_teacher(teacher: AssignmentProvider, dim: int, depth: int, num_clusters: int, causal: bool) -> None:
    """A stack's teacher must fit its blocks: its width, M per group, groups that divide the depth, causality."""
    if not isinstance(teacher, AssignmentProvider):
        raise TypeError(f"teacher must be a tocalib.providers.AssignmentProvider, got {type(teacher).__name__}")
    width = getattr(teacher, "dim", None) or getattr(teacher, "embed_dims", (dim,))[0]
    if width != dim:
        raise ValueError(
            f"the teacher reads tokens of width {width}, but the stack's dim is {dim}: build it with {dim}"
        )
    groups = teacher.num_clusters
    if depth % len(groups):
        raise ValueError(
            f"the teacher gives {len(groups)} assignments, which cannot feed {depth} blocks in equal groups: "
            "use a depth that the number of groups divides"
        )
    if any(m != num_clusters for m in groups):
        raise ValueError(f"the teacher's num_clusters {groups} must all equal the blocks' num_clusters={num_clusters}")
    if causal != teacher.causal:
        needs = "a causal teacher (one that looks only back)" if causal else "a non-causal teacher"
        raise ValueError(
            f"a {'causal' if causal else 'non-causal'} stack needs {needs}, got {type(teacher).__name__} with "
            f"causal={teacher.causal}; build the teacher with causal={causal}"
        )


def cluster_parameter_names(module: nn.Module) -> set[str]:
    """The state-dict names of ``module``'s parameters whose shape follows a number of clusters: the output layers
    of every :class:`~tocalib.ToCaAttention`'s clustering and every provider's cluster heads (those whose leading
    dimension is their M). They are what must be re-initialised when a checkpoint meets a model built with other
    ``num_clusters`` (PaCa-ViT's downstream override)."""
    names = set()
    for prefix, sub in module.named_modules():
        if isinstance(sub, ToCaAttention) and sub.clustering is not None:
            owner, counts = f"{prefix}.clustering" if prefix else "clustering", {sub.num_clusters}
            params = sub.clustering.named_parameters()
        elif isinstance(sub, AssignmentProvider):
            owner, counts, params = prefix, set(sub.num_clusters) - {0}, sub.named_parameters()
        else:
            continue
        names.update(f"{owner}.{name}".lstrip(".") for name, p in params if p.dim() and p.shape[0] in counts)
    return names
