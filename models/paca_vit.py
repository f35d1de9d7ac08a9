"""PaCa-ViT backbones (Grainger et al., CVPR 2023), built from :class:`tocalib.ToCaAttention`.

Architecture (PaCaViT@4307018 paca_vit.py): an overlapping conv stem (stride 4), four stages of pre-norm PaCa blocks
with an overlapping stride-2 conv transition between stages, a LayerNorm per stage and a mean-pool
linear head. Module names and shapes follow the official checkpoints exactly (PaCaViT@4307018 paca_vit.py, its module
tree), so
:func:`tocalib.models.load_official_state_dict` loads them without renaming.

Where the clustering runs (per stage, ``recompute_every``):

* ``0`` stage-wise: block 0 computes the assignment, later blocks reuse it (each with its own
  ``cluster_norm`` and k/v, on its own tokens);
* ``1`` block-wise: every block computes its own;
* ``k ≥ 2``: blocks 0, k, 2k, … compute it, the others reuse the latest;
* with a teacher (``teacher_depths``) no block clusters: the ConvMixer-FPN teacher of
  :mod:`tocalib.models.teacher` feeds one assignment to every block of a stage.

Inputs: (B, in_chans, H, W) of **any** size H, W ≥ 1. The stem and transitions are 3×3 stride-2
convs with padding 1, so stage i has ``ceil(H / 2**(i+2))`` × ``ceil(W / 2**(i+2))`` tokens, exactly as
the official code. Only when H and W are multiples of 32 are the strides exactly 4, 8, 16, 32.

Outputs:

* ``model(x)`` → (B, num_classes) logits (or the feature list in ``features_only`` mode);
* ``model.forward_features(x)`` → 4 NCHW maps after the stage norms, (B, C_i, H_i, W_i);
* **cluster assignments**: ``model.forward_features(x, return_assignments=True)`` (or
  ``model(x, return_assignments=True)``) also returns, from the same pass (SDPA stays on), one
  (B, M_i, H_i, W_i) map per stage: the assignment of the stage's first block (for stage-wise and
  teacher models, the one every block of the stage uses), a softmax over the H_i·W_i positions;
  None for a stage without clusters.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib import ToCaBlock, ToCaStack
from tocalib.blocks import DWConvMlp
from tocalib.models._layers import Backbone, PretrainedCfg, init_weights, stage_info
from tocalib.models._registry import register_model
from tocalib.models.loading import load_official_state_dict
from tocalib.models.teacher import ConvMixerFPNTeacher
from tocalib.validation import check_int

__all__ = ["Downsample", "LayerNorm2d", "PaCaBlock", "PaCaViT", "model_config"]

NUM_STAGES = 4
PRETRAINED_CFG = PretrainedCfg(crop_pct=224 / 248)
"""The released checkpoints' evaluation: resize the shorter side to 248 (bicubic), centre-crop 224, ImageNet mean/std
(PaCaViT@4307018 classification configs)."""


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Overlapping conv patch embedding: (B, C_in, H, W) → (B, C_out, ceil(H/s), ceil(W/s)).

    ``stride=4`` (the stem): 3×3/2 conv to C_out/2 → 3×3/2 conv to C_out, no activation between;
    ``stride=2`` (a transition): one 3×3/2 conv. Both end with :class:`LayerNorm2d` (eps 1e-6).
    Keys: ``proj.{0,1}`` (stem) or ``proj`` (transition), and ``norm``.
    """

    def __init__(self, in_chans: int, out_chans: int, stride: int) -> None:
        super().__init__()
        if stride == 4:
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1),
                nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1),
            )
        elif stride == 2:
            self.proj = nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1)
        else:
            raise ValueError(f"Downsample supports stride 4 (stem) or 2 (transition), got {stride}")
        self.norm = LayerNorm2d(out_chans, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class PaCaBlock(ToCaBlock):
    """PaCa's pre-norm block (PaCaViT@4307018 paca_vit.py ``PaCaBlock``): a :class:`tocalib.ToCaBlock` with
    PaCa's DWConv FFN (:class:`tocalib.blocks.DWConvMlp`) and the official key names ``norm1_before``,
    ``attn``, ``norm2_before``, ``mlp``. The ``"mlp"`` clustering (P2CMlp) takes the FFN's hidden width.

    Args:
        dim, num_heads, num_clusters: as :class:`tocalib.ToCaBlock`.
        clustering: ``"conv2d"`` (P2CConv2d), ``"mlp"`` (P2CMlp) or another registered name for a block that
            computes its assignment; None for one that reuses the previous block's or the teacher's.
        mlp_ratio: FFN hidden width / C.
        **kwargs: further :class:`tocalib.ToCaBlock` arguments (``drop_path``, ``drop``, ``attn_drop``, ...).
    """

    norm_names = ("norm1_before", "norm2_before")

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_clusters: int,
        clustering: str | None,
        *,
        mlp_ratio: float = 4.0,
        attention_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        attention = dict(attention_kwargs or {})
        if clustering == "mlp":  # P2CMlp: the FFN's hidden width
            attention["clustering_kwargs"] = {
                "hidden_dim": int(dim * mlp_ratio),
                **attention.get("clustering_kwargs", {}),
            }
        super().__init__(
            dim, num_heads, num_clusters, clustering, mlp_ratio=mlp_ratio, mlp_layer=DWConvMlp,
            attention_kwargs=attention, **kwargs,
        )  # fmt: skip


def _sharing(every: int) -> str | int:
    """A stage's ``recompute_every`` as a :class:`tocalib.ToCaStack` policy: 0 stage-wise, k every k blocks."""
    return "stage" if every == 0 else every


def _per_stage(value: int | Sequence[int], name: str) -> tuple[int, ...]:
    """An int broadcast to the 4 stages, or a 4-sequence checked for length."""
    values = (value,) * NUM_STAGES if isinstance(value, int) else tuple(value)
    if len(values) != NUM_STAGES or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ValueError(
            f"{name} must be a non-negative int or {NUM_STAGES} non-negative ints (one per stage), got {value!r}"
        )
    return values


class PaCaViT(Backbone):
    """PaCa-ViT backbone and classifier (PaCaViT@4307018 paca_vit.py), with optional ConvMixer-FPN teacher.

    Args:
        embed_dims: width C_i of the 4 stages.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        num_clusters: M_i per stage (an int applies to all); 0 = plain self-attention. This is also
            the downstream override (e.g. ADE20k's 200).
        clustering: ``"conv2d"`` (PaCa's P2CConv2d, kernel 7) or ``"mlp"`` (P2CMlp, hidden ``mlp_ratio``·C);
            any other registered :mod:`tocalib.clustering` name works too (e.g. ``"linear"``).
        recompute_every: per stage, where the clustering runs: 0 stage-wise, 1 block-wise, k every k
            blocks (see the module docstring). Ignored with a teacher.
        teacher_depths: ConvMixer depths per level to use the clustering teacher; None = no teacher.
        mlp_ratio: FFN hidden width / C.
        in_chans: input image channels.
        num_classes: classifier outputs; 0 builds no head.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        drop: dropout after the attention projection and in the FFN.
        attn_drop: dropout on the attention weights.
        features_only: ``forward`` returns the feature maps of ``out_indices`` (needs num_classes=0).
        out_indices: stages returned by ``forward`` in ``features_only`` mode.
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (96, 192, 320, 384),
        depths: Sequence[int] = (2, 2, 4, 2),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        num_clusters: int | Sequence[int] = (100, 100, 100, 0),
        clustering: str = "conv2d",
        recompute_every: int | Sequence[int] = 0,
        teacher_depths: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
    ) -> None:
        super().__init__()
        in_chans, num_classes = check_int("in_chans", in_chans, 1), check_int("num_classes", num_classes, 0)
        embed_dims = _per_stage(embed_dims, "embed_dims")
        depths = _per_stage(depths, "depths")
        num_heads = _per_stage(num_heads, "num_heads")
        num_clusters = _per_stage(num_clusters, "num_clusters")
        recompute_every = _per_stage(recompute_every, "recompute_every")
        if features_only and num_classes:
            raise ValueError(f"features_only=True builds no head: pass num_classes=0 (got {num_classes})")
        if not out_indices or any(i not in range(NUM_STAGES) for i in out_indices):
            raise ValueError(f"out_indices must be stage indices in 0..{NUM_STAGES - 1}, got {tuple(out_indices)}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.embed_dims = embed_dims
        self.feature_info = stage_info(embed_dims, [f"norm{i}" for i in range(1, NUM_STAGES + 1)])
        self.pretrained_cfg = PRETRAINED_CFG
        self.num_clusters = num_clusters
        self.in_chans = in_chans
        self.features_only = features_only
        self.out_indices = tuple(out_indices)

        self.patch_embed = Downsample(in_chans, embed_dims[0], stride=4)
        self.paca_teacher = (
            ConvMixerFPNTeacher(embed_dims, teacher_depths, num_clusters) if teacher_depths is not None else None
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        for i in range(NUM_STAGES):
            stage = ToCaStack(
                embed_dims[i], depths[i], num_heads[i], num_clusters[i], clustering,
                share="given" if self.paca_teacher is not None else _sharing(recompute_every[i]),
                drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])], block_layer=PaCaBlock,
                mlp_ratio=mlp_ratio, drop=drop, attn_drop=attn_drop,
            )  # fmt: skip
            self.add_module(f"stage{i + 1}", stage)
            self.add_module(f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=1e-6))
            if i < NUM_STAGES - 1:
                self.add_module(f"transition{i + 1}", Downsample(embed_dims[i], embed_dims[i + 1], stride=2))
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes else None
        self.init_weights()

    def init_weights(self) -> None:
        """PaCaViT@4307018 ``init_weights``: Linear trunc_normal(0.02), conv normal(0, sqrt(2/fan_out)), norms 1/0,
        biases 0."""
        self.apply(init_weights)

    def forward_features(
        self, x: Tensor, return_assignments: bool = False
    ) -> list[Tensor] | tuple[list[Tensor], list[Tensor | None]]:
        """The 4 stage outputs after the stage norms.

        Args:
            x: (B, in_chans, H, W) images, any H, W ≥ 1.
            return_assignments: also return each stage's cluster assignment from this same pass.

        Returns:
            ``features``: 4 maps (B, C_i, ceil(H/2**(i+2)), ceil(W/2**(i+2))), strides 4, 8, 16, 32;
            with ``return_assignments``, ``(features, assignments)`` where ``assignments[i]`` is the
            (B, M_i, H_i, W_i) assignment of stage i's first block (a softmax over H_i·W_i; for a hard
            clustering, 1 / (members) at each member), or None where M_i = 0.
        """
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"x must be images of shape (B, in_chans={self.in_chans}, H, W), got {tuple(x.shape)}; "
                "add a batch dimension with x[None], or build the model with a matching in_chans"
            )
        x = self.patch_embed(x)
        size = tuple(x.shape[-2:])
        provided = None
        if self.paca_teacher is not None:
            provided = self.paca_teacher(x.flatten(2).transpose(1, 2), size=size)
        features: list[Tensor] = []
        assignments: list[Tensor | None] = []
        for i in range(NUM_STAGES):
            if i:
                x = getattr(self, f"transition{i}")(x)
            b, c, h, w = x.shape
            given = None if provided is None else provided.assignments[i]
            out = getattr(self, f"stage{i + 1}")(
                x.flatten(2).transpose(1, 2), size=(h, w), assignment=given, return_intermediates=return_assignments
            )
            tokens = out[0] if return_assignments else out
            if provided is not None:
                tokens = tokens + provided.features[i]
            tokens = getattr(self, f"norm{i + 1}")(tokens)
            x = tokens.transpose(1, 2).reshape(b, c, h, w)
            features.append(x)
            if return_assignments:
                first = out[1][0].assignment
                assignments.append(None if first is None else first.dense().unflatten(-1, (h, w)))
        return (features, assignments) if return_assignments else features

    def forward(
        self, x: Tensor, return_assignments: bool = False
    ) -> Tensor | list[Tensor] | tuple[Tensor | list[Tensor], list[Tensor | None]]:
        """(B, in_chans, H, W) → (B, num_classes) logits, or in ``features_only`` mode the list of
        the ``out_indices`` feature maps. ``return_assignments`` adds the per-stage (B, M_i, H_i, W_i)
        assignments as a second output (see :meth:`forward_features`)."""
        found = self.forward_features(x, return_assignments=return_assignments)
        features, assignments = found if return_assignments else (found, None)
        out = [features[i] for i in self.out_indices] if self.head is None else self.forward_head(features[-1])
        return (out, assignments) if return_assignments else out


# --- model table (PaCaViT@4307018 paca_vit.py `_arch_settings`) ---

_TINY = dict(embed_dims=(96, 192, 320, 384), depths=(2, 2, 4, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.1)
_SMALL = dict(_TINY, depths=(3, 3, 10, 3))
_BASE = dict(embed_dims=(96, 192, 384, 512), depths=(3, 3, 18, 3), num_heads=(2, 4, 8, 16), drop_path_rate=0.5)

_CONFIGS: dict[str, dict[str, Any]] = {
    "pacavit_tiny_p2cconv_100_0": dict(_TINY, num_clusters=(100, 100, 100, 0)),
    "pacavit_small_p2cconv_100_0": dict(_SMALL, num_clusters=(100, 100, 100, 0)),
    "pacavit_small_p2cmlp_100_0": dict(_SMALL, num_clusters=(100, 100, 100, 0), clustering="mlp"),
    "pacavit_base_p2cconv_100_0": dict(_BASE, num_clusters=(100, 100, 100, 0)),
    "pacavit_convmixer_tiny_100": dict(_TINY, depths=(2, 2, 2, 2), num_clusters=100, teacher_depths=(2, 2, 2, 2)),
    "pacavit_convmixer_small_100": dict(_SMALL, depths=(3, 3, 7, 3), num_clusters=100, teacher_depths=(2, 2, 2, 2)),
    "pacavit_convmixer_base_100": dict(
        _BASE, depths=(3, 3, 16, 3), num_clusters=100, teacher_depths=(2, 2, 4, 2), drop_path_rate=0.1
    ),
    "pacavit_small_p2cconv_2_0": dict(_SMALL, num_clusters=(2, 2, 2, 0)),
    "pacavit_small_p2cconv_49_0": dict(_SMALL, num_clusters=(49, 49, 49, 0)),
    "pacavit_small_p2cconv_49_100": dict(_SMALL, num_clusters=(49, 64, 81, 100)),
    "pacavit_small_p2cconv_100_49": dict(_SMALL, num_clusters=(100, 81, 64, 49)),
    "pacavit_small_p2cconv_100": dict(_SMALL, num_clusters=100),
    "pacavit_small_p2cconv_100_blockwise": dict(_SMALL, num_clusters=100, recompute_every=1),
}


def model_config(name: str) -> dict[str, Any]:
    """A copy of the :class:`PaCaViT` arguments of the registered PaCa-ViT ``name`` (``num_clusters`` per stage
    normalised to a 4-tuple)."""
    if name not in _CONFIGS:
        raise KeyError(f"{name!r} is not a PaCa-ViT model; known: {sorted(_CONFIGS)}")
    config = dict(_CONFIGS[name])
    config["num_clusters"] = _per_stage(config.get("num_clusters", (100, 100, 100, 0)), "num_clusters")
    return config


def _create(name: str, pretrained: str | os.PathLike[str] | bool | None, overrides: dict[str, Any]) -> PaCaViT:
    """Build ``name`` from a fresh copy of its table entry, overridden by ``overrides``, then load
    ``pretrained`` (a checkpoint path, read by :func:`tocalib.models.load_official_state_dict`) after init."""
    if pretrained is True:
        raise ValueError(
            f"pretrained=True: there are no download URLs for {name}; pass the checkpoint path instead, "
            f"e.g. pretrained='IMNET_224_{name}.pth'"
        )
    config = {**_CONFIGS[name], **overrides}
    if config.get("features_only") and "num_classes" not in overrides:
        config["num_classes"] = 0
    try:
        model = PaCaViT(**config)
    except TypeError as err:
        raise TypeError(f"{name}: unsupported override ({err}); see PaCaViT's arguments") from err
    if pretrained:
        load_official_state_dict(model, pretrained)
    return model


@register_model
def pacavit_tiny_p2cconv_100_0(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """PaCa-Tiny, conv clustering, M = 100,100,100,0 stage-wise."""
    return _create("pacavit_tiny_p2cconv_100_0", pretrained, overrides)


@register_model
def pacavit_small_p2cconv_100_0(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """PaCa-Small, conv clustering, M = 100,100,100,0 stage-wise."""
    return _create("pacavit_small_p2cconv_100_0", pretrained, overrides)


@register_model
def pacavit_small_p2cmlp_100_0(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """PaCa-Small, MLP clustering, M = 100,100,100,0 stage-wise."""
    return _create("pacavit_small_p2cmlp_100_0", pretrained, overrides)


@register_model
def pacavit_base_p2cconv_100_0(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """PaCa-Base, conv clustering, M = 100,100,100,0 stage-wise, drop path 0.5."""
    return _create("pacavit_base_p2cconv_100_0", pretrained, overrides)


@register_model
def pacavit_convmixer_tiny_100(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """PaCa-Tiny with the ConvMixer-FPN teacher (depths 2,2,2,2), M = 100 in every stage."""
    return _create("pacavit_convmixer_tiny_100", pretrained, overrides)


@register_model
def pacavit_convmixer_small_100(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """PaCa-Small (depths 3,3,7,3) with the ConvMixer-FPN teacher (2,2,2,2), M = 100 in every stage."""
    return _create("pacavit_convmixer_small_100", pretrained, overrides)


@register_model
def pacavit_convmixer_base_100(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """PaCa-Base (depths 3,3,16,3) with the ConvMixer-FPN teacher (2,2,4,2), M = 100 in every stage."""
    return _create("pacavit_convmixer_base_100", pretrained, overrides)


@register_model
def pacavit_small_p2cconv_2_0(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """Ablation: PaCa-Small, conv clustering, M = 2,2,2,0 stage-wise."""
    return _create("pacavit_small_p2cconv_2_0", pretrained, overrides)


@register_model
def pacavit_small_p2cconv_49_0(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """Ablation: PaCa-Small, conv clustering, M = 49,49,49,0 stage-wise."""
    return _create("pacavit_small_p2cconv_49_0", pretrained, overrides)


@register_model
def pacavit_small_p2cconv_49_100(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """Ablation: PaCa-Small, conv clustering, M = 49,64,81,100 stage-wise."""
    return _create("pacavit_small_p2cconv_49_100", pretrained, overrides)


@register_model
def pacavit_small_p2cconv_100_49(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """Ablation: PaCa-Small, conv clustering, M = 100,81,64,49 stage-wise."""
    return _create("pacavit_small_p2cconv_100_49", pretrained, overrides)


@register_model
def pacavit_small_p2cconv_100(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """Ablation: PaCa-Small, conv clustering, M = 100 in every stage, stage-wise."""
    return _create("pacavit_small_p2cconv_100", pretrained, overrides)


@register_model
def pacavit_small_p2cconv_100_blockwise(pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> PaCaViT:
    """Ablation: PaCa-Small, conv clustering, M = 100 in every stage, block-wise."""
    return _create("pacavit_small_p2cconv_100_blockwise", pretrained, overrides)
