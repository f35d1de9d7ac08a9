"""What the benchmark scripts share: an acceptance target and its verdict, and the training step they time.

Nothing here imports tocalib: ``benchmarks.revisions`` runs this code against other revisions' tocalib.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

TRAINING = (("pacavit_tiny_p2cconv_100_0", 8, 224), ("pacavit_small_p2cconv_100_0", 2, 512))
"""(model, batch, image side) of the training-step goals: a classifier at 224², features at a dense task's input."""

TRAINING_QUICK = (("pacavit_tiny_p2cconv_100_0", 1, 64),)
"""The smoke-test size of the same."""


@dataclass
class Target:
    """One acceptance target: ``value`` (measured) against ``threshold``."""

    name: str
    value: float | None
    threshold: float
    higher_is_better: bool = True

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "N/A"
        ok = self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold
        return "PASS" if ok else "MISS"


def training_step(create_model: Callable[..., nn.Module], name: str, batch: int, side: int) -> Callable[[], None]:
    """One forward+backward pass of ``create_model(name)`` in training mode on ``batch`` random ``side``² images
    (seed 0), gradients zeroed first: the classifier's mean output up to 224², the features' means above."""
    torch.manual_seed(0)
    model = create_model(name, features_only=side > 224).train()
    images = torch.randn(batch, 3, side, side)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(images)
        loss = out.float().mean() if isinstance(out, torch.Tensor) else sum(o.float().mean() for o in out)
        loss.backward()

    return step
