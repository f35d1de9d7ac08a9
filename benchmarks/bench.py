"""CPU benchmarks: the speed goals, ToCa against full attention and peers, PaCa-ViT against PVTv2 and Swin.

    python -m benchmarks.bench [--quick] [--out outputs/bench] [--threads 2] [--parts goals,layers,...]

(``nox -s bench`` installs the peers and timm, and runs it.) Seven parts, all measured in one run so that the ratios
compare like with like on a shared, noisy machine:

a. **goals**: the CPU-speed goals, each comparison interleaved (the calls take turns, medians): the ToCa layer
   (conv2d clustering, M=100, C=96, 2 heads) against full SDPA self-attention, forward+backward at N = 3136 and
   16384, 1 and 2 threads, with the ToCa layer's kernel floor (its matrix products, convolutions and attention
   kernels as it calls them, replayed beside timed calls, summed: its time if all the rest cost nothing) and its
   kernel+math floor (those and its GELUs, softmax and LayerNorm: the most this operator sequence allows); PaCa-Small's
   features against timm's own ``pvt_v2_b2`` and ``swin_tiny_patch4_window7_224`` (``img_size`` set) at
   1×3×800×1280, PaCa-Tiny's against timm's Swin-T at 8×3×224² (with the project's own PVTv2-b2 and Swin-T next to
   timm's: params, MACs, speed); training-step throughput and peak memory of PaCa-Tiny at 8×224² and PaCa-Small
   at 2×512².
b. **layers**: forward+backward time and peak memory of one attention layer on B=1 sequences of N tokens
   (a √N×√N grid), N = 256 … 65,536, at (C=96, heads=2) and (C=320, heads=8): ToCa (conv2d clustering,
   M = 49, 100), full SDPA attention, PVTv2 spatial-reduction attention (R = 8) and the PyPI peers
   (Nyström, Perceiver IO, ISAB, Linformer; M = landmarks = latents = k = 100). "ToCa M=100 mlp" swaps PaCa's
   conv2d clustering for the MLP one (no layout needed). A cell whose time or memory,
   extrapolated from the smaller N of the same method, would exceed the budget is skipped with that reason.
c. **models**: inference throughput (images/s) and peak memory of the project's backbones (features only) at
   224², 512² and 1280×800.
d. **roof**: forward GFLOP/s (2 × analytic MACs / time) of the ToCa layer against a 2048² fp32 matmul.
e. **profile**: the operators that take the ToCa layer's forward+backward time (``torch.profiler``).
f. **model_profile**: the operators that take PaCa-Small's forward at 1×3×800×1280.
g. **heap** (always last): the layer goals and the training steps of part a again, after
   :func:`tocalib.allocator.tune_cpu_allocator` (freed memory stays in glibc's heap, so a step does not
   page-fault in anew what the previous one freed; it stays so for the rest of the process, hence last). Every
   goal cell also counts the minor page faults per call.

Parts b–d report the best of several calls (the sample least disturbed by other processes); parts a and g medians.

Peak memory is the high-water mark of the CPU allocator during one call (``torch.profiler`` memory events),
relative to what was allocated before it. Writes ``bench.md``, ``bench.json`` and log-log ``*.png`` plots
(when matplotlib is installed) to ``--out``, and prints every target with its measured ratio and PASS/MISS
(``--quick`` measures tiny sizes, where the goals' thresholds do not apply: their targets read N/A).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from benchmarks.common import TRAINING, TRAINING_QUICK, Target, kernel_floor, training_step
from tocalib import ToCaAttention, flops
from tocalib.allocator import tune_cpu_allocator
from tocalib.flops import toca_macs
from tocalib.models import create_model
from tocalib.models.pvt_v2 import SpatialReductionAttention


@dataclass(frozen=True)
class Settings:
    """What one run measures, and its budgets."""

    layer_configs: tuple[tuple[int, int], ...]  # (C, heads)
    layer_tokens: tuple[int, ...]  # N, each a square number
    models: tuple[str, ...]
    resolutions: tuple[tuple[int, int, int], ...]  # (H, W, batch)
    roof_size: int  # side of the square matmul
    roof_tokens: tuple[int, ...]  # N at which the ToCa layer's GFLOP/s is measured
    exponent_range: tuple[int, int]  # N range of the fitted time exponent
    min_reps: int
    min_seconds: float  # keep repeating a timed call until this much time has passed
    max_seconds: float  # but stop repeating after this long
    cell_seconds: float  # skip a cell whose predicted time for all its calls exceeds this
    cell_bytes: float  # skip a cell whose predicted peak memory exceeds this
    goal_threads: tuple[int, ...]  # thread counts of the layer goals
    goal_tokens: tuple[int, ...]  # N of the layer goals (C=96, 2 heads, M=100)
    goal_detection: tuple[int, int]  # (H, W) of the backbone goals at batch 1 (the detection input)
    goal_classification: tuple[int, int]  # (batch, side) of the small-image backbone goal and its checks
    goal_training: tuple[tuple[str, int, int], ...]  # (model, batch, side) of the training throughputs
    goal_reps: int  # interleaved rounds of every goal measurement
    goals_apply: bool  # the goals' thresholds hold for these sizes (not for --quick's)


FULL = Settings(
    layer_configs=((96, 2), (320, 8)),
    layer_tokens=(256, 1024, 3136, 16384, 65536),
    models=(
        "pacavit_tiny_p2cconv_100_0",
        "pacavit_small_p2cconv_100_0",
        "pvt_v2_b1",
        "pvt_v2_b2",
        "swin_tiny_patch4_window7_224",
    ),
    resolutions=((224, 224, 4), (512, 512, 1), (800, 1280, 1)),
    roof_size=2048,
    roof_tokens=(16384, 65536),
    exponent_range=(1024, 65536),
    min_reps=3,
    min_seconds=0.75,
    max_seconds=5.0,
    cell_seconds=90.0,
    cell_bytes=6 * 2**30,
    goal_threads=(1, 2),
    goal_tokens=(3136, 16384),
    goal_detection=(800, 1280),
    goal_classification=(8, 224),
    goal_training=TRAINING,
    goal_reps=5,
    goals_apply=True,
)
QUICK = Settings(
    layer_configs=((32, 2),),
    layer_tokens=(64, 256),
    models=("pvt_v2_b0", "swin_tiny_patch4_window7_224"),
    resolutions=((64, 64, 1),),
    roof_size=256,
    roof_tokens=(256,),
    exponent_range=(64, 256),
    min_reps=1,
    min_seconds=0.0,
    max_seconds=1.0,
    cell_seconds=30.0,
    cell_bytes=2**30,
    goal_threads=(1,),
    goal_tokens=(64, 256),
    goal_detection=(64, 96),
    goal_classification=(1, 64),
    goal_training=TRAINING_QUICK,
    goal_reps=1,
    goals_apply=False,
)


@dataclass
class Cell:
    """One measurement (or the reason it was skipped)."""

    part: str  # "layers", "models" or "roof"
    config: str  # e.g. "C=96,h=2" or "800x1280"
    method: str
    size: int  # N tokens, pixels per image, or matmul side
    seconds: float | None = None  # median time of one call
    peak_bytes: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None


# --- measuring ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_profiler() -> Iterator[None]:
    """Silence file descriptor 2 while the profiler runs: it prints a line at every start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(call: Callable[[], Any]) -> int:
    """:func:`tocalib.flops.peak_bytes` with the profiler's start and stop lines silenced."""
    with _quiet_profiler():
        return flops.peak_bytes(call)


def time_call(call: Callable[[], Any], settings: Settings) -> float:
    """Best (minimum) seconds of ``call()``, the sample least disturbed by other processes on a shared machine.

    Repeats until ``min_reps`` calls and ``min_seconds`` have passed, or ``max_seconds`` (at least one call).
    """
    times: list[float] = []
    start = time.perf_counter()
    while not times or (
        (len(times) < settings.min_reps or time.perf_counter() - start < settings.min_seconds)
        and time.perf_counter() - start < settings.max_seconds
    ):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times)


def predict(history: list[tuple[int, float]], size: int) -> float | None:
    """Extrapolate a cost to ``size`` from the last two (size, cost) points, with an exponent in [1, 2]."""
    if len(history) < 2:
        return None
    (s0, c0), (s1, c1) = history[-2:]
    exponent = min(2.0, max(1.0, math.log(c1 / c0) / math.log(s1 / s0))) if c0 > 0 and c1 > 0 else 2.0
    return c1 * (size / s1) ** exponent


def fit_exponent(points: Iterable[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) against log(N); None with fewer than two points."""
    logs = [(math.log(n), math.log(t)) for n, t in points]
    if len(logs) < 2:
        return None
    xs, ys = zip(*logs, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


# --- part b: layers -----------------------------------------------------------------------------------


class _Layer(nn.Module):
    """Adapts an attention module to ``forward(x (B, N, C), size (H, W)) -> (B, N, C)``."""

    def __init__(self, module: nn.Module, call: Callable[[nn.Module, Tensor, tuple[int, int]], Tensor]) -> None:
        super().__init__()
        self.module = module
        self.call = call

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.call(self.module, x, size)


def _peer(package: str, build: Callable[[Any], _Layer]) -> Callable[[int, int, int], _Layer]:
    """A layer factory for a PyPI peer; importing it is deferred so that a missing peer only skips its rows."""

    def factory(dim: int, heads: int, tokens: int) -> _Layer:
        if importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(f"{package} is not installed (`nox -s bench` installs it)")
        return build(importlib.import_module(package), dim, heads, tokens)

    return factory


PEER_M = 100
"""Landmarks (Nyström), latents (Perceiver IO, ISAB) and projected length k (Linformer) of the peers."""

LAYERS: dict[str, Callable[[int, int, int], _Layer]] = {
    "ToCa M=49": lambda c, h, n: _Layer(ToCaAttention(c, h, 49, "conv2d"), lambda m, x, s: m(x, size=s)),
    "ToCa M=100": lambda c, h, n: _Layer(ToCaAttention(c, h, 100, "conv2d"), lambda m, x, s: m(x, size=s)),
    "ToCa M=100 mlp": lambda c, h, n: _Layer(ToCaAttention(c, h, 100, "mlp"), lambda m, x, s: m(x)),
    "full SDPA": lambda c, h, n: _Layer(ToCaAttention(c, h, 0), lambda m, x, s: m(x)),
    "PVTv2 SRA R=8": lambda c, h, n: _Layer(SpatialReductionAttention(c, h, sr_ratio=8), lambda m, x, s: m(x, s)),
    "Nystrom": _peer(
        "nystrom_attention",
        lambda p, c, h, n: _Layer(
            p.NystromAttention(c, dim_head=c // h, heads=h, num_landmarks=PEER_M), lambda m, x, s: m(x)
        ),
    ),
    "Perceiver IO": _peer(
        "perceiver_pytorch",
        lambda p, c, h, n: _Layer(
            p.PerceiverIO(
                depth=0, dim=c, queries_dim=c, num_latents=PEER_M, latent_dim=c, cross_heads=h, cross_dim_head=c // h
            ),
            lambda m, x, s: m(x, queries=x),
        ),
    ),
    "ISAB": _peer(
        "isab_pytorch",
        lambda p, c, h, n: _Layer(p.ISAB(dim=c, heads=h, num_latents=PEER_M), lambda m, x, s: m(x)[0]),
    ),
    "Linformer": _peer(
        "linformer",
        lambda p, c, h, n: _Layer(p.LinformerSelfAttention(c, seq_len=n, k=PEER_M, heads=h), lambda m, x, s: m(x)),
    ),
}


def bench_layers(settings: Settings, bar: tqdm) -> list[Cell]:
    """Part b: forward+backward seconds and peak bytes of every layer at every N (B = 1)."""
    cells = []
    for dim, heads in settings.layer_configs:
        config = f"C={dim},h={heads}"
        for name, factory in LAYERS.items():
            times: list[tuple[int, float]] = []
            peaks: list[tuple[int, float]] = []
            for tokens in settings.layer_tokens:
                bar.set_description(f"layers {config} {name} N={tokens}")
                cell = Cell("layers", config, name, tokens)
                cells.append(cell)
                bar.update()
                cell.skipped = _over_budget(settings, times, peaks, tokens)
                if cell.skipped:
                    continue
                try:
                    layer = factory(dim, heads, tokens)
                except ModuleNotFoundError as err:
                    cell.skipped = str(err)
                    continue
                side = math.isqrt(tokens)
                x = torch.randn(1, tokens, dim, requires_grad=True)
                grad = torch.randn(1, tokens, dim)

                def step(layer: nn.Module = layer, x: Tensor = x, grad: Tensor = grad, side: int = side) -> None:
                    x.grad = None
                    layer.zero_grad(set_to_none=True)
                    layer(x, (side, side)).backward(grad)

                cell.peak_bytes = peak_bytes(step)  # also the warm-up
                cell.seconds = time_call(step, settings)
                times.append((tokens, cell.seconds))
                peaks.append((tokens, cell.peak_bytes))
    return cells


def _over_budget(
    settings: Settings, times: list[tuple[int, float]], peaks: list[tuple[int, float]], size: int
) -> str | None:
    """The reason to skip a cell whose extrapolated time (of its two calls at least: the profiled warm-up and
    one timed call) or memory exceeds the budget, else None."""
    seconds, nbytes = predict(times, size), predict(peaks, size)
    if seconds is not None and 2 * seconds > settings.cell_seconds:
        return f"skipped: predicted 2 calls × {seconds:.0f} s > {settings.cell_seconds:.0f} s budget"
    if nbytes is not None and nbytes > settings.cell_bytes:
        return f"skipped: predicted peak {nbytes / 2**30:.1f} GiB > {settings.cell_bytes / 2**30:.1f} GiB budget"
    return None


# --- part c: models -----------------------------------------------------------------------------------


def _backbone(name: str) -> nn.Module:
    """A registered model in features-only mode, in eval mode."""
    return create_model(name, features_only=True).eval()


def bench_models(settings: Settings, bar: tqdm) -> list[Cell]:
    """Part c: inference images/s and peak bytes of every backbone at every resolution."""
    cells = []
    for name in settings.models:
        model: nn.Module | None = None
        skipped = None
        try:
            model = _backbone(name)
        except ValueError as err:  # not registered (yet)
            skipped = f"skipped: {err}"
        for height, width, batch in settings.resolutions:
            bar.set_description(f"models {name} {height}x{width}")
            bar.update()
            cell = Cell("models", f"{height}x{width}", name, height * width, extra={"batch": batch})
            cells.append(cell)
            if model is None:
                cell.skipped = skipped
                continue
            images = torch.randn(batch, 3, height, width)

            def infer(model: nn.Module = model, images: Tensor = images) -> None:
                with torch.inference_mode():
                    model(images)

            cell.peak_bytes = peak_bytes(infer)
            cell.seconds = time_call(infer, settings)
            cell.extra["images_per_s"] = batch / cell.seconds
    return cells


# --- part d: roof -------------------------------------------------------------------------------------


def bench_roof(settings: Settings, bar: tqdm) -> list[Cell]:
    """Part d: GFLOP/s of a square fp32 matmul and of the ToCa layer's forward pass (M = 100)."""
    n = settings.roof_size
    a, b = torch.randn(n, n), torch.randn(n, n)
    bar.set_description(f"roof matmul {n}²")
    bar.update()
    roof = Cell("roof", f"{n}x{n}", "matmul", n)
    roof.seconds = time_call(lambda: torch.mm(a, b), settings)
    roof.extra["gflops"] = 2 * n**3 / roof.seconds / 1e9
    cells = [roof]
    for dim, heads in settings.layer_configs:
        for tokens in settings.roof_tokens:
            bar.set_description(f"roof ToCa C={dim} N={tokens}")
            bar.update()
            layer = ToCaAttention(dim, heads, 100, "conv2d").eval()
            side = math.isqrt(tokens)
            x = torch.randn(1, tokens, dim)

            def forward(layer: nn.Module = layer, x: Tensor = x, side: int = side) -> None:
                with torch.inference_mode():
                    layer(x, size=(side, side))

            cell = Cell("roof", f"C={dim},h={heads}", "ToCa M=100 forward", tokens)
            cell.seconds = time_call(forward, settings)
            cell.extra["gflops"] = 2 * layer.macs(tokens) / cell.seconds / 1e9
            cell.extra["fraction_of_matmul"] = cell.extra["gflops"] / roof.extra["gflops"]
            cells.append(cell)
    return cells


# --- part e: profile ----------------------------------------------------------------------------------

PROFILE_TOP = 10
"""Operators listed per profiled configuration."""


def bench_profile(settings: Settings, bar: tqdm) -> list[Cell]:
    """Part e: where the ToCa layer (M = 100) spends a forward+backward pass at the largest N ≤ 16,384.

    One cell per operator and input shapes, ``seconds`` = its self CPU time, the top ``PROFILE_TOP`` kept.
    """
    tokens = max(n for n in settings.layer_tokens if n <= 16384)
    side = math.isqrt(tokens)
    cells = []
    for dim, heads in settings.layer_configs:
        bar.set_description(f"profile ToCa C={dim} N={tokens}")
        bar.update()
        layer = ToCaAttention(dim, heads, 100, "conv2d")
        x = torch.randn(1, tokens, dim, requires_grad=True)
        layer(x, size=(side, side)).sum().backward()  # warm-up
        with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            layer(x, size=(side, side)).sum().backward()
        cells += _top_operators(prof, "profile", f"C={dim},h={heads}", tokens)
    return cells


def _top_operators(prof: profile, part: str, config: str, size: int) -> list[Cell]:
    """One cell per operator and input shapes of a profile, ``seconds`` = its self CPU time, the top
    ``PROFILE_TOP``."""
    ops = prof.key_averages(group_by_input_shape=True)
    total = sum(op.self_cpu_time_total for op in ops)
    cells = []
    for op in sorted(ops, key=lambda op: op.self_cpu_time_total, reverse=True)[:PROFILE_TOP]:
        shapes = ", ".join(str(tuple(shape)) for shape in op.input_shapes if shape)
        cell = Cell(part, config, f"{op.key} {shapes}", size, op.self_cpu_time_total / 1e6)
        cell.extra["share"] = op.self_cpu_time_total / total
        cells.append(cell)
    return cells


# --- part a: the goals, measured side by side; part f: the model profile -----------------------------


def interleaved_medians(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, tuple[float, float]]:
    """Median seconds of each call over ``rounds`` rounds in which every call runs once, in turn (one warm-up
    call each first), so that a slow spell of a shared machine hits every call alike; with the mean number of
    minor page faults per call (first touches of memory the allocator took from the OS, see
    :mod:`tocalib.allocator`)."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    faults = dict.fromkeys(calls, 0)
    for _ in range(rounds):
        for name, call in calls.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {name: (statistics.median(samples), faults[name] / rounds) for name, samples in times.items()}


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    """timm's own ``name`` in features-only mode, eval (``nox -s bench`` installs timm and a torchvision stand-in)."""
    try:
        import timm
    except ImportError as err:
        raise ModuleNotFoundError(
            f"timm is not importable ({err}): `nox -s bench` installs it with its torchvision stand-in"
        ) from err
    return timm.create_model(name, features_only=True, **kwargs).eval()


ELEMENTWISE = ("aten::rsub",)
"""Element-wise operators of timm's models that tocalib's MAC counter does not know (they do no MACs)."""

GOAL_LAYER = {"ToCa M=100": 100, "full SDPA": 0}
"""The layers of the layer goals (C=96, 2 heads; ToCa with PaCa's conv2d clustering)."""

FLOOR = "ToCa M=100 kernel floor"
"""The method name of a layer goal's :func:`~benchmarks.common.kernel_floor` cell (the ToCa layer's kernels alone),
in the time base of the interleaved calls: the layer's interleaved median times the kernels' share of the layer in
the floor's own rounds (``extra`` keeps the replayed and call seconds)."""

MATH_FLOOR = "ToCa M=100 kernel+math floor"
"""The method name of a layer goal's cell of its kernels and its element-wise math alone, on the same time base."""


KEPT = ",heap kept"
"""The config suffix of the goals measured again after :func:`tocalib.allocator.tune_cpu_allocator` (part g)."""


def _goal_layers(settings: Settings, bar: tqdm, allocator: str = "") -> list[Cell]:
    """The layer goals at each of ``settings.goal_threads`` (the run's thread count restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        return _goal_layers_at_threads(settings, bar, allocator)
    finally:
        torch.set_num_threads(threads)


def _rerun_steps(settings: Settings) -> int:
    """Progress steps of the goals that part g measures again: the layers and the training steps."""
    return len(settings.goal_threads) * len(settings.goal_tokens) + len(settings.goal_training)


def _goal_layers_at_threads(settings: Settings, bar: tqdm, allocator: str) -> list[Cell]:
    cells = []
    for threads in settings.goal_threads:
        torch.set_num_threads(threads)
        for tokens in settings.goal_tokens:
            bar.set_description(f"goals: layers N={tokens}, {threads} threads{allocator}")
            bar.update()
            side = math.isqrt(tokens)
            x, grad = torch.randn(1, tokens, 96, requires_grad=True), torch.randn(1, tokens, 96)
            layers = {
                name: ToCaAttention(96, 2, m, "conv2d") if m else ToCaAttention(96, 2, 0)
                for name, m in GOAL_LAYER.items()
            }

            def step(layer: ToCaAttention, x: Tensor = x, grad: Tensor = grad, side: int = side) -> None:
                x.grad = None
                layer.zero_grad(set_to_none=True)
                (layer(x, size=(side, side)) if layer.num_clusters else layer(x)).backward(grad)

            medians = interleaved_medians(
                {n: functools.partial(step, layer) for n, layer in layers.items()}, settings.goal_reps
            )
            config = f"layer,threads={threads}{allocator}"
            cells += [
                Cell("goals", config, n, tokens, t, extra={"faults": faults}) for n, (t, faults) in medians.items()
            ]
            floors = kernel_floor(functools.partial(step, layers["ToCa M=100"]), settings.goal_reps)
            replayed = {"replayed": floors.kernels, "replayed_math": floors.math, "call": floors.call}
            for name, seconds in zip((FLOOR, MATH_FLOOR), floors.scaled(medians["ToCa M=100"][0]), strict=True):
                cells.append(Cell("goals", config, name, tokens, seconds, extra=replayed))
    return cells


def _inference(model: nn.Module, images: Tensor) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            model(images)

    return call


def _goal_backbones(settings: Settings, bar: tqdm) -> list[Cell]:
    """PaCa-ViT against timm's PVTv2-b2 and Swin-T (and the project's own PVTv2-b2 and Swin-T, a check of those
    re-implementations) at the detection input and on a batch of small images, forward, features only."""
    height, width = settings.goal_detection
    batch, side = settings.goal_classification
    swin = "swin_tiny_patch4_window7_224"
    groups = {
        f"1x3x{height}x{width}": (
            torch.randn(1, 3, height, width),
            {
                "PaCa-Small": lambda: _backbone("pacavit_small_p2cconv_100_0"),
                "timm pvt_v2_b2": lambda: timm_model("pvt_v2_b2"),
                "timm swin_tiny": lambda: timm_model(swin, img_size=(height, width)),
            },
        ),
        f"{batch}x3x{side}x{side}": (
            torch.randn(batch, 3, side, side),
            {
                "PaCa-Tiny": lambda: _backbone("pacavit_tiny_p2cconv_100_0"),
                "timm swin_tiny": lambda: timm_model(swin, img_size=(side, side)),
                "own swin_tiny": lambda: _backbone(swin),
                "timm pvt_v2_b2": lambda: timm_model("pvt_v2_b2"),
                "own pvt_v2_b2": lambda: _backbone("pvt_v2_b2"),
            },
        ),
    }
    cells = []
    for config, (images, builders) in groups.items():
        bar.set_description(f"goals: backbones {config}")
        bar.update()
        calls, built = {}, {}
        for name, build in builders.items():
            try:
                built[name] = build()
            except ModuleNotFoundError as err:
                cells.append(
                    Cell("goals", config, name, images.shape[-2] * images.shape[-1], skipped=f"skipped: {err}")
                )
                continue
            calls[name] = _inference(built[name], images)
        for name, (seconds, faults) in interleaved_medians(calls, settings.goal_reps).items():
            params = sum(p.numel() for p in built[name].parameters())
            with torch.no_grad():
                macs = flops.mac_analysis(built[name], images[:1], not_macs=ELEMENTWISE).total()
            extra = {"images_per_s": len(images) / seconds, "params": params, "macs": macs, "faults": faults}
            cells.append(Cell("goals", config, name, images.shape[-2] * images.shape[-1], seconds, extra=extra))
    return cells


def _goal_training(settings: Settings, bar: tqdm, allocator: str = "") -> list[Cell]:
    """Forward+backward throughput and peak memory: a classifier at small images, features at large ones."""
    cells = []
    for name, batch, side in settings.goal_training:
        bar.set_description(f"goals: training {name} {batch}x{side}²{allocator}")
        bar.update()
        step = training_step(create_model, name, batch, side)
        peak = peak_bytes(step)
        seconds, faults = interleaved_medians({name: step}, settings.goal_reps)[name]
        config = f"train,{batch}x3x{side}x{side}{allocator}"
        cell = Cell("goals", config, name, side * side, seconds, float(peak))
        cell.extra.update(images_per_s=batch / seconds, faults=faults)
        cells.append(cell)
    return cells


def bench_goals(settings: Settings, bar: tqdm) -> list[Cell]:
    """Part a: the goals of the CPU-speed issue, each pair measured interleaved in one run (medians): the ToCa
    layer against full SDPA at 1 and 2 threads, PaCa-ViT against timm's PVTv2 and Swin, the training
    throughput; the backbones and the training at the run's ``--threads``."""
    return _goal_layers(settings, bar) + _goal_backbones(settings, bar) + _goal_training(settings, bar)


def bench_heap(settings: Settings, bar: tqdm) -> list[Cell]:
    """Part g (always last: the setting stays for the rest of the process): the layer goals and the training
    steps again after :func:`tocalib.allocator.tune_cpu_allocator`, so that each step reuses the memory the
    previous one freed instead of page-faulting it in anew (both sides of every comparison alike)."""
    if not tune_cpu_allocator():
        bar.update(_rerun_steps(settings))
        reason = "skipped: not glibc, or an allocator in LD_PRELOAD"
        return [Cell("goals", f"train{KEPT}", "allocator", 0, skipped=reason)]
    return _goal_layers(settings, bar, KEPT) + _goal_training(settings, bar, KEPT)


def bench_model_profile(settings: Settings, bar: tqdm) -> list[Cell]:
    """Part f: the top operators of PaCa-Small's forward (features) at the detection input."""
    height, width = settings.goal_detection
    bar.set_description(f"profile PaCa-Small {height}x{width}")
    bar.update()
    model = _backbone("pacavit_small_p2cconv_100_0")
    images = torch.randn(1, 3, height, width)
    _inference(model, images)()
    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _inference(model, images)()
    return _top_operators(prof, "model profile", f"PaCa-Small {height}x{width}", height * width)


# --- targets, report, plots ---------------------------------------------------------------------------


def _seconds(cells: list[Cell], part: str, config: str, method: str, size: int) -> float | None:
    found = [c.seconds for c in cells if (c.part, c.config, c.method, c.size) == (part, config, method, size)]
    return found[0] if found else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def targets(cells: list[Cell], settings: Settings) -> list[Target]:
    """The issue's targets, per layer config, from this run's cells."""
    result = []
    low, high = settings.exponent_range
    for dim, heads in settings.layer_configs:
        config = f"C={dim},h={heads}"
        points = [
            (c.size, c.seconds)
            for c in cells
            if (c.part, c.config, c.method) == ("layers", config, "ToCa M=100") and c.seconds and low <= c.size <= high
        ]
        result.append(
            Target(f"{config}: ToCa M=100 time exponent in N, {low}..{high}", fit_exponent(points), 1.1, False)
        )
        for c in cells:
            if (c.part, c.config) == ("roof", config) and c.size >= 16384:
                result.append(
                    Target(f"{config}: ToCa forward GFLOP/s / matmul at N={c.size}", c.extra["fraction_of_matmul"], 0.5)
                )
    return result + goal_targets(cells, settings)


def goal_targets(cells: list[Cell], settings: Settings) -> list[Target]:
    """The CPU-speed issue's goals from the cells of parts a and g (speed-ups: the peer's time over ours; for the
    training steps, the time with glibc's defaults over the time with the heap kept)."""
    result = []
    configs = {f"layer,threads={t}{kept}": (t, kept) for kept in ("", KEPT) for t in settings.goal_threads}
    for config, (threads, kept) in configs.items():
        for tokens, goal in zip(settings.goal_tokens, (8.0, 40.0), strict=True):
            ceiling = toca_macs(tokens, 96, 2, 0, None) / toca_macs(tokens, 96, 2, 100, "conv2d")
            peer, ours, floor, math_floor = (
                _seconds(cells, "goals", config, m, tokens) for m in ("full SDPA", "ToCa M=100", FLOOR, MATH_FLOOR)
            )
            where = f"N={tokens}, {threads} thread(s){', heap kept' if kept else ''}"
            for name, time_ in (
                (f"ToCa layer fwd+bwd speed-up over full SDPA, {where} (MAC ratio {ceiling:.1f})", ours),
                (
                    f"ToCa layer kernel floor (its matmuls, convolutions and attention alone) speed-up over full "
                    f"SDPA, {where}: what these kernels would allow",
                    floor,
                ),
                (
                    f"ToCa layer kernel+math floor (those kernels and its GELUs, softmax and LayerNorm alone) "
                    f"speed-up over full SDPA, {where}: the most this operator sequence allows",
                    math_floor,
                ),
            ):
                result.append(Target(name, _ratio(peer, time_) if settings.goals_apply else None, goal))
    height, width = settings.goal_detection
    batch, side = settings.goal_classification
    big, small = f"1x3x{height}x{width}", f"{batch}x3x{side}x{side}"
    for config, ours, peer, goal in (
        (big, "PaCa-Small", "timm pvt_v2_b2", 1.5),
        (big, "PaCa-Small", "timm swin_tiny", 0.7),
        (small, "PaCa-Tiny", "timm swin_tiny", 1.1),
    ):
        pixels = height * width if config == big else side * side
        speedup = _ratio(*(_seconds(cells, "goals", config, m, pixels) for m in (peer, ours)))
        name = f"{ours} features speed-up over {peer} at {config}"
        result.append(Target(name, speedup if settings.goals_apply else None, goal))
    for model, batch, side in settings.goal_training:
        config = f"train,{batch}x3x{side}x{side}"
        before, after = (_seconds(cells, "goals", config + kept, model, side * side) for kept in ("", KEPT))
        name = (
            f"{model} training step at {batch}x3x{side}², heap kept (tocalib.allocator) over glibc's default "
            "(parts g and a: not interleaved)"
        )
        result.append(Target(name, _ratio(before, after) if settings.goals_apply else None, 1.3))
    return result


def _fmt(value: float | None, unit: str = "", digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}{unit}"


def markdown(cells: list[Cell], goals: list[Target], header: dict[str, Any]) -> str:
    """The Markdown report: run settings, targets, then one table per part."""
    lines = ["# tocalib CPU benchmarks", "", ", ".join(f"{k}: {v}" for k, v in header.items()), ""]
    lines += ["## Targets", "", "| target | measured | threshold | verdict |", "|---|---|---|---|"]
    for goal in goals:
        sign = "≥" if goal.higher_is_better else "≤"
        lines.append(f"| {goal.name} | {_fmt(goal.value)} | {sign} {goal.threshold:g} | {goal.verdict} |")
    lines += _goal_tables(cells)
    for config in dict.fromkeys(c.config for c in cells if c.part == "layers"):
        rows = [c for c in cells if (c.part, c.config) == ("layers", config)]
        sizes = list(dict.fromkeys(c.size for c in rows))
        lines += ["", f"## Layers, {config}: forward+backward ms (peak MiB), B=1", ""]
        lines += ["| method | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        for method in dict.fromkeys(c.method for c in rows):
            entries = []
            for c in rows:
                if c.method == method:
                    measured = f"{c.seconds * 1e3:.3g} ({c.peak_bytes / 2**20:.0f})" if c.seconds else None
                    entries.append(measured or c.skipped or "—")
            lines.append(f"| {method} | " + " | ".join(entries) + " |")
    models = [c for c in cells if c.part == "models"]
    if models:
        configs = list(dict.fromkeys(c.config for c in models))
        lines += ["", "## Backbones (features only, inference): images/s (peak MiB above the weights)", ""]
        lines += ["| model | " + " | ".join(configs) + " |", "|---" * (len(configs) + 1) + "|"]
        for method in dict.fromkeys(c.method for c in models):
            entries = [
                f"{c.extra['images_per_s']:.3g} ({c.peak_bytes / 2**20:.0f})" if c.seconds else c.skipped or "—"
                for c in models
                if c.method == method
            ]
            lines.append(f"| {method} | " + " | ".join(entries) + " |")
    profiles = dict.fromkeys((c.part, c.config) for c in cells if c.part in ("profile", "model profile"))
    for part, config in profiles:
        rows = [c for c in cells if (c.part, c.config) == (part, config)]
        what = f"ToCa M=100 forward+backward, {config}, N={rows[0].size}" if part == "profile" else f"{config} forward"
        lines += ["", f"## Profile: {what} (top self CPU time)", ""]
        lines += ["| operator (input shapes) | ms | share |", "|---|---|---|"]
        lines += [f"| {c.method} | {c.seconds * 1e3:.1f} | {c.extra['share'] * 100:.0f} % |" for c in rows]
    lines += ["", "## Roof: forward GFLOP/s (2 × MACs / time)", "", "| what | N / side | GFLOP/s | of matmul |"]
    lines.append("|---|---|---|---|")
    for c in (c for c in cells if c.part == "roof"):
        fraction = _fmt(c.extra.get("fraction_of_matmul", 1.0) * 100, " %")
        lines.append(f"| {c.method} {c.config} | {c.size} | {c.extra['gflops']:.1f} | {fraction} |")
    return "\n".join(lines) + "\n"


def _goal_tables(cells: list[Cell]) -> list[str]:
    """Part a's measurements: the layers, the backbones (with params and MACs), the training throughput."""
    goals = [c for c in cells if c.part == "goals"]
    lines = []
    layers = [c for c in goals if c.config.startswith("layer,")]
    if layers:
        lines += ["", "## Goals: ToCa layer vs full SDPA (C=96, 2 heads, M=100), forward+backward ms, medians", ""]
        lines += [
            "| threads | allocator | N | ToCa M=100 | its kernel floor | kernel+math floor | full SDPA | speed-up "
            "| at the kernel floor | at the kernel+math floor | page faults per call (ToCa, SDPA) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for config, size in dict.fromkeys((c.config, c.size) for c in layers):
            found = {c.method: c for c in layers if (c.config, c.size) == (config, size)}
            times = [_seconds(cells, "goals", config, m, size) for m in ("ToCa M=100", FLOOR, MATH_FLOOR, "full SDPA")]
            base, allocator = _allocator(config)
            threads = base.partition("=")[2]
            shown = " | ".join(_fmt(None if t is None else t * 1e3) for t in times)
            ratios = " | ".join(_fmt(_ratio(times[-1], t)) for t in times[:-1])
            faults = ", ".join(f"{found[m].extra['faults']:.0f}" for m in ("ToCa M=100", "full SDPA") if m in found)
            lines.append(f"| {threads} | {allocator} | {size} | {shown} | {ratios} | {faults} |")
    backbones = [c for c in goals if not c.config.startswith(("layer,", "train,"))]
    if backbones:
        lines += ["", "## Goals: backbones, features only, inference (interleaved medians)", ""]
        lines += ["| input | model | ms | images/s | params (M) | GMACs per image |", "|---|---|---|---|---|---|"]
        for c in backbones:
            if c.seconds is None:
                lines.append(f"| {c.config} | {c.method} | {c.skipped} | | | |")
                continue
            cells_text = f"{c.seconds * 1e3:.4g} | {c.extra['images_per_s']:.3g} | {c.extra['params'] / 1e6:.2f}"
            lines.append(f"| {c.config} | {c.method} | {cells_text} | {c.extra['macs'] / 1e9:.2f} |")
    training = [c for c in goals if c.config.startswith("train,")]
    if training:
        lines += ["", "## Goals: training step (forward+backward), medians", ""]
        lines += [
            "| model | input | allocator | ms | images/s | peak MiB | page faults per step |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in training:
            base, allocator = _allocator(c.config)
            if c.seconds is None:  # part g's only cell where the allocator was left alone: no input size
                lines.append(f"| {c.method} | | {allocator} | {c.skipped} | | | |")
                continue
            shown = f"{c.seconds * 1e3:.4g} | {c.extra['images_per_s']:.3g} | {c.peak_bytes / 2**20:.0f}"
            lines.append(f"| {c.method} | {base.partition(',')[2]} | {allocator} | {shown} | {c.extra['faults']:.0f} |")
    return lines


def _allocator(config: str) -> tuple[str, str]:
    """A goal cell's config without part g's suffix, and the allocator that suffix names."""
    return (config.removesuffix(KEPT), KEPT[1:]) if config.endswith(KEPT) else (config, "glibc default")


def plots(cells: list[Cell], out: Path) -> list[Path]:
    """Log-log plots of part b (time, memory) and part c (throughput); none without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plots (`nox -s bench` installs it)")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    layer_cells = [c for c in cells if c.part == "layers" and c.seconds]
    configs = list(dict.fromkeys(c.config for c in layer_cells))
    quantities = (("seconds", "forward+backward time (ms)", 1e3), ("peak_bytes", "peak memory (MiB)", 2**-20))
    for key, label, scale in quantities if configs else ():  # none without part b
        fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.5), squeeze=False)
        for ax, config in zip(axes[0], configs, strict=True):
            for method in dict.fromkeys(c.method for c in layer_cells):
                points = [
                    (c.size, getattr(c, key) * scale) for c in layer_cells if (c.config, c.method) == (config, method)
                ]
                if points:
                    ax.loglog(*zip(*points, strict=True), marker="o", label=method, lw=2.5 if "ToCa" in method else 1.2)
            ax.set(title=config, xlabel="tokens N", ylabel=label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        written.append(out / f"layers_{key}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    model_cells = [c for c in cells if c.part == "models" and c.seconds]
    if model_cells:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for method in dict.fromkeys(c.method for c in model_cells):
            points = [(c.size, c.extra["images_per_s"]) for c in model_cells if c.method == method]
            ax.loglog(*zip(*points, strict=True), marker="o", label=method)
        ax.set(xlabel="pixels per image", ylabel="images/s (inference)", title="backbones, features only")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "models_throughput.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> list[Target]:
    """Run the benchmark, write the reports, print the targets; returns them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every code path")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), help="output folder")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every measurement")
    parser.add_argument(
        "--parts",
        default="goals,layers,models,roof,profile,model_profile,heap",
        help="comma-separated subset of the parts to run (heap always runs last)",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    parts = {
        "goals": bench_goals,
        "layers": bench_layers,
        "models": bench_models,
        "roof": bench_roof,
        "profile": bench_profile,
        "model_profile": bench_model_profile,
        "heap": bench_heap,
    }
    chosen = args.parts.split(",")
    if unknown := set(chosen) - set(parts):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {sorted(parts)}")
    chosen = sorted(chosen, key=lambda part: part == "heap")  # its allocator setting stays: it runs after the rest
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    header = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mode": "quick" if args.quick else "full",
    }
    total = (
        ("layers" in chosen) * len(settings.layer_configs) * len(LAYERS) * len(settings.layer_tokens)
        + ("models" in chosen) * len(settings.models) * len(settings.resolutions)
        + ("roof" in chosen) * (1 + len(settings.layer_configs) * len(settings.roof_tokens))
        + ("profile" in chosen) * len(settings.layer_configs)
        + ("goals" in chosen) * (_rerun_steps(settings) + 2)
        + ("model_profile" in chosen)
        + ("heap" in chosen) * _rerun_steps(settings)
    )
    cells: list[Cell] = []
    start = time.perf_counter()
    with tqdm(total=total, file=sys.stderr, dynamic_ncols=True) as bar:
        for part in chosen:
            cells += parts[part](settings, bar)
    header["wall_s"] = round(time.perf_counter() - start)
    goals = targets(cells, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(cells, goals, header)
    (args.out / "bench.md").write_text(report)
    payload = {"header": header, "cells": [asdict(c) for c in cells], "targets": [asdict(g) for g in goals]}
    (args.out / "bench.json").write_text(json.dumps(payload, indent=1))
    written = plots(cells, args.out)
    print(report)
    print("wrote", ", ".join(str(p) for p in [args.out / "bench.md", args.out / "bench.json", *written]))
    return goals


if __name__ == "__main__":
    main()
