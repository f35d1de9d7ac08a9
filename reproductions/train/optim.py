"""Parameter groups, the learning-rate scaling rule and the two schedules of the paper's recipes.

* Classification (PaCaViT@4307018 imagenet_vit_adamw.yml, timm): AdamW with no weight decay on 1-D parameters (norms)
and biases
  (:func:`no_decay_groups`), lr scaled by the global batch (:func:`scaled_lr`), linear warmup then cosine
  (:class:`WarmupCosine`).
* Segmentation (PaCaViT@4307018 segmentation configs, mmengine): per-parameter ``custom_keys`` multipliers
(:func:`custom_key_groups`), linear
  warmup then polynomial decay (:class:`WarmupPoly`).

Schedules are step-indexed factors on each group's base lr, used through ``torch.optim.lr_scheduler.LambdaLR``
(so their state is the scheduler's, saved and restored with it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

__all__ = ["WarmupCosine", "WarmupPoly", "custom_key_groups", "no_decay_groups", "scaled_lr"]


def scaled_lr(lr_base: float, global_batch: int, base_batch: int = 512) -> float:
    """The linear scaling rule: ``lr_base × global_batch / base_batch`` (imagenet_vit_adamw.yml: 5e-4 × 1024 / 512 =
    1e-3)."""
    if global_batch <= 0 or base_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got global_batch={global_batch}, base_batch={base_batch}")
    return lr_base * global_batch / base_batch


def _trainable(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)


def no_decay_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> list[dict]:
    """Two AdamW groups: weight decay on weight matrices and kernels; none on 1-D parameters (norm weights,
    biases, …), on names ending in ``.bias`` and on the names in ``skip`` (timm's filter)."""
    skip = set(skip)
    decay, no_decay = [], []
    for name, p in _trainable(model):
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def custom_key_groups(
    model: nn.Module, lr: float, weight_decay: float, custom_keys: Mapping[str, Mapping[str, float]]
) -> list[dict]:
    """mmengine's ``paramwise_cfg.custom_keys``: a parameter takes ``lr × lr_mult`` and ``weight_decay ×
    decay_mult`` of the first key that is a substring of its name, keys tried longest first (ties in alphabetical
    order); parameters no key matches keep ``lr`` and ``weight_decay``.

    Returns one group per distinct (key) with its ``lr``, ``weight_decay`` and ``custom_key`` (``None`` for the
    unmatched group); empty groups are left out.
    """
    allowed = {"lr_mult", "decay_mult"}
    for key, rule in custom_keys.items():
        if not set(rule) <= allowed:
            raise ValueError(f"custom_keys[{key!r}] may set only {sorted(allowed)}, got {sorted(rule)}")
    order = sorted(sorted(custom_keys), key=len, reverse=True)
    members: dict[str | None, list[nn.Parameter]] = {}
    for name, p in _trainable(model):
        key = next((key for key in order if key in name), None)
        members.setdefault(key, []).append(p)
    groups = []
    for key, params in members.items():
        rule = custom_keys[key] if key is not None else {}
        groups.append(
            {
                "params": params,
                "lr": lr * rule.get("lr_mult", 1.0),
                "weight_decay": weight_decay * rule.get("decay_mult", 1.0),
                "custom_key": key,
            }
        )
    return groups


def _check_steps(total_steps: int, warmup_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")


@dataclass
class WarmupCosine:
    """lr factor at optimizer step ``t``: linear from ``warmup_factor`` to 1 over ``warmup_steps``, then the
    cosine ``min + (1 − min)·(1 + cos(π t / total_steps)) / 2`` that reaches ``min_factor`` at ``total_steps``.
    As in timm's cosine scheduler (``warmup_prefix=False``) the cosine is a function of ``t / total_steps`` and the
    warmup only replaces its first steps. (imagenet_vit_adamw.yml with lr 1e-3: warmup_factor = 1e-6/1e-3, min_factor
    = 1e-5/1e-3.)
    timm steps this schedule once per epoch; here it moves every step."""

    total_steps: int
    warmup_steps: int
    warmup_factor: float
    min_factor: float

    def __post_init__(self) -> None:
        _check_steps(self.total_steps, self.warmup_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_factor + (1.0 - self.warmup_factor) * step / self.warmup_steps
        progress = min(1.0, step / self.total_steps)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class WarmupPoly:
    """mmengine's ``LinearLR(start_factor, end=warmup_steps)`` then ``PolyLR(power, eta_min=0, begin=warmup_steps,
    end=total_steps)``, per iteration (its segmentation configs: start 1e-6, 1500 warmup iterations, power 1.0 to 0
    at 160k)."""

    total_steps: int
    warmup_steps: int
    start_factor: float
    power: float = 1.0

    def __post_init__(self) -> None:
        _check_steps(self.total_steps, self.warmup_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return (1.0 - progress) ** self.power
