"""What the benchmark scripts share: an acceptance target and its verdict, the training step they time, and the
floor of a call's kernels.

Nothing here imports tocalib: ``benchmarks.revisions`` runs this code against other revisions' tocalib.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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


def _default_overloads(*names: str) -> frozenset[Any]:
    """The ``default`` (out-of-place) overloads of the named ATen operators."""
    return frozenset(getattr(torch.ops.aten, name).default for name in names)


KERNELS = _default_overloads(
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "convolution",
    "convolution_backward",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
)
"""The operators a kernel floor counts: matrix products, convolutions and the fused attention kernels (their
out-of-place overloads only, so that a replay writes nothing it was given)."""

POINTWISE_MATH = _default_overloads(
    "gelu", "gelu_backward", "_softmax", "_softmax_backward_data", "native_layer_norm", "native_layer_norm_backward"
)
"""The element-wise math of ToCa's layers and PaCa's blocks, forward and backward: GELU, the softmax over tokens,
LayerNorm (out-of-place overloads). Unlike copies, bias sums, residual or gradient sums, no arrangement of PyTorch's
operators avoids them: only a kernel that fuses them into the products' passes over memory could."""


@dataclass(frozen=True)
class Floors:
    """What a call's operators take, each run again on its recorded inputs (:func:`kernel_floor`), summed, and what
    the call itself took in the same rounds."""

    kernels: float
    """Seconds of its :data:`KERNELS`."""
    math: float
    """Seconds of its :data:`POINTWISE_MATH`."""
    call: float
    """Seconds of the whole call, timed in the same rounds as the replays."""

    def scaled(self, seconds: float) -> tuple[float, float]:
        """(kernels, kernels + math) in the time base of a call measured elsewhere at ``seconds`` (the same share of
        it), so that a drifting machine's speed between that measurement and this one cancels."""
        return seconds * self.kernels / self.call, seconds * (self.kernels + self.math) / self.call


class _FloorRecorder(TorchDispatchMode):
    """Keeps every call of a :data:`KERNELS` or :data:`POINTWISE_MATH` operator (and so its inputs) made while it is
    active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in KERNELS or func in POINTWISE_MATH:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _replay(calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]]) -> tuple[float, float]:
    """Runs every recorded operator once more on its recorded inputs, in order, without autograd; returns the seconds
    of the :data:`KERNELS` and of the :data:`POINTWISE_MATH` among them."""
    spent = {True: 0.0, False: 0.0}  # keyed by "is a kernel"
    with torch.no_grad():
        for func, args, kwargs in calls:
            t0 = time.perf_counter()
            func(*args, **kwargs)
            spent[func in KERNELS] += time.perf_counter() - t0
    return spent[True], spent[False]


def kernel_floor(call: Callable[[], Any], reps: int) -> Floors:
    """Seconds that the :data:`KERNELS` and the :data:`POINTWISE_MATH` of one ``call()`` take as it issues them (the
    same shapes and strides), run again on their own recorded inputs and summed per set, and the seconds of
    ``call()`` itself: after a warm-up round, each of ``reps`` rounds times one ``call()`` and then every recorded
    operator once, in the call's order; medians over the rounds.

    Everything else the call does (copies, bias and gradient sums, the Python and autograd around them) counts zero:
    ``peer / kernels`` is the speed-up over a peer that this implementation's kernels would allow if all the rest
    cost nothing (a faster kernel, another blocking or batching of the products, could go below it), and
    ``peer / (kernels + math)`` the most that this operator sequence allows if everything else cost nothing
    (:meth:`Floors.scaled` puts both on the time base of the peer's run)."""
    if reps < 1:
        raise ValueError(f"kernel_floor needs reps >= 1 timed rounds (after the warm-up round), got reps={reps}")
    recorder = _FloorRecorder()
    with recorder:
        call()
    calls: list[float] = []
    kernels: list[float] = []
    math: list[float] = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        call()
        calls.append(time.perf_counter() - t0)
        round_kernels, round_math = _replay(recorder.calls)
        kernels.append(round_kernels)
        math.append(round_math)
    return Floors(*(statistics.median(values[1:]) for values in (kernels, math, calls)))  # warm-up round left out
