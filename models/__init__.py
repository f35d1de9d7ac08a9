"""Models built from tocalib: PaCa-ViT backbones, the clustering teacher and the checkpoint loader.

>>> from tocalib.models import create_model, list_models
>>> model = create_model("pacavit_tiny_p2cconv_100_0", num_classes=10)
>>> sorted(list_models("pacavit_convmixer_*"))
['pacavit_convmixer_base_100', 'pacavit_convmixer_small_100', 'pacavit_convmixer_tiny_100']

``create_model(name, pretrained=False, **overrides)``: ``pretrained`` is a checkpoint path (official
format, see :func:`load_official_state_dict`); overrides are :class:`~tocalib.models.paca_vit.PaCaViT`
arguments, e.g. ``num_classes`` (0 = no head), ``drop_path_rate``, ``num_clusters`` (per stage, the
downstream override), ``features_only=True`` (``model(x)`` returns the 4 NCHW maps).

Every registered backbone implements one contract (:class:`Backbone`, timm's): ``model.feature_info`` (per stage
map its channels, stride and module; ``.channels()``, ``.reductions()``), ``model.pretrained_cfg`` (input size,
mean/std, interpolation, crop ratio, classifier name, as data), ``forward_features`` (the stage maps),
``forward_head``, ``reset_classifier(num_classes)``, and ``features_only`` / ``out_indices``.

PaCa-ViT outputs: ``model(x)`` logits; ``model.forward_features(x)`` the 4 NCHW maps after the stage
norms (strides 4, 8, 16, 32); ``model.forward_features(x, return_assignments=True)`` also returns
each stage's cluster assignment as a (B, M_i, H_i, W_i) map from the same pass (see
:mod:`tocalib.models.paca_vit`). Heat-maps: ``python -m tocalib.models.viz_cli IMAGE MODEL --out grid.png``.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from tocalib.models import paca_vit, pvt_v2, swin  # noqa: F401  (importing a family registers its models)
from tocalib.models._layers import Backbone, FeatureInfo, PretrainedCfg
from tocalib.models._registry import get_model_factory, list_models, register_model
from tocalib.models.loading import LoadReport, StateDictMismatchError, load_official_state_dict

__all__ = [
    "Backbone",
    "FeatureInfo",
    "LoadReport",
    "PretrainedCfg",
    "StateDictMismatchError",
    "create_model",
    "get_model_factory",
    "list_models",
    "load_official_state_dict",
    "register_model",
]


def create_model(name: str, pretrained: str | os.PathLike[str] | bool = False, **overrides: Any) -> nn.Module:
    """A fresh model registered as ``name``, optionally loaded from the checkpoint path ``pretrained``."""
    return get_model_factory(name)(pretrained=pretrained, **overrides)
