"""Causal ToCa against causal full attention (SDPA ``is_causal=True``), measured side by side in one run.

    python -m benchmarks.causal [--quick] [--threads 2] [--out outputs/bench_causal] [--budget 240]
                                [--device cuda --dtype bfloat16]

(``nox -s bench_causal`` runs it.) The layers have width C = 512, 8 heads. ToCa has M = 64 clusters with
the MLP clustering; B = 1 and fp32 on the CPU. The peer is the plain self-attention block people write
with PyTorch's fused kernel: one q/k/v ``nn.Linear``, ``F.scaled_dot_product_attention(..., is_causal=True)``,
the output ``nn.Linear``. Both have the same width and heads. Three parts:

a. **training** (forward+backward) and **inference** (forward under ``torch.inference_mode``) time at
   N = 1,024 … 65,536. The calls alternate ToCa, peer, ToCa, peer, …, and each cell reports the median.
   A peer cell whose predicted time would exceed ``--budget`` seconds is not run. It is predicted from a
   least-squares fit a·N + b·N² of the peer's measured cells, and marked as predicted.
b. **decoding**: the per-token latency of one new position at context positions 1,024 and 16,384. ToCa
   runs :meth:`~tocalib.ToCaAttention.step` with its fixed-size state. The peer is an SDPA decoder with a
   preallocated, growing KV cache. The report also gives the state bytes against the KV-cache bytes.
c. **costs**: analytic MACs (ToCa: ``layer.macs(N)``; the peer: 4·N·C² for the projections plus N·(N+1)·C
   for the causal QKᵀ and AV, the half that a causal kernel computes) and their ratio, next to the time
   ratio.

The memory allocator matters on the CPU at large N. glibc's malloc returns large freed blocks to the
system, so every large temporary is faulted in again, page by page; at N = 32,768 a ToCa training
call spent 35-70 % as much time in the kernel as in compute here. The report's header names the
allocator settings of the run (``MALLOC_*`` variables, ``GLIBC_TUNABLES``, an ``LD_PRELOAD``ed jemalloc
or tcmalloc, as PyTorch's CPU performance guide suggests). Both layers always run in the same process,
so they share them.

Writes ``causal.md``, ``causal.json`` and a log-log plot ``causal_seconds.png`` (with matplotlib) to ``--out``.
It prints the issue's targets with PASS or MISS. ``--device cuda`` (the clock waits for the device) and
``--dtype bfloat16`` run the same comparison on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import Target
from tocalib import ToCaAttention


@dataclass(frozen=True)
class Settings:
    """What one run measures."""

    dim: int
    heads: int
    clusters: int
    tokens: tuple[int, ...]
    positions: tuple[int, ...]  # decoding: context lengths at which one new token is timed
    reps: int  # interleaved calls per cell (a median of them is reported)
    decode_steps: int  # timed single-token steps per decoding cell


FULL = Settings(512, 8, 64, (1024, 2048, 4096, 8192, 16384, 32768, 65536), (1024, 16384), 5, 128)
QUICK = Settings(32, 2, 8, (64, 128, 256), (32, 128), 2, 32)


class SdpaCausalSelfAttention(nn.Module):
    """The peer: q, k, v from one linear layer, PyTorch's fused causal attention, an output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 × (B, h, N, d)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2))


class SdpaDecoder:
    """Incremental decoding for :class:`SdpaCausalSelfAttention` with a preallocated KV cache."""

    def __init__(self, layer: SdpaCausalSelfAttention, capacity: int, batch: int = 1) -> None:
        dim = layer.proj.in_features
        self.layer = layer
        self.keys = layer.proj.weight.new_empty(batch, layer.heads, capacity, dim // layer.heads)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def step(self, x: Tensor) -> Tensor:
        """x (B, T, C) new positions → their outputs; the cache grows by T."""
        q, k, v = self.layer.qkv(x).unflatten(-1, (3, self.layer.heads, -1)).permute(2, 0, 3, 1, 4)
        end = self.length + x.shape[1]
        self.keys[:, :, self.length : end], self.values[:, :, self.length : end] = k, v
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        if x.shape[1] == 1:  # the newest position sees the whole cache: no mask
            out = F.scaled_dot_product_attention(q, keys, values)
        else:
            allowed = torch.ones(x.shape[1], end, dtype=torch.bool, device=x.device).tril(self.length)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        self.length = end
        return self.layer.proj(out.transpose(1, 2).flatten(-2))

    @property
    def nbytes(self) -> int:
        """Bytes of the filled part of the cache."""
        return 2 * self.keys[:, :, : self.length].numel() * self.keys.element_size()


ALLOCATOR_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
)


def allocator_settings() -> str:
    """The environment's allocator settings, for the report (``glibc defaults`` when none is set)."""
    found = [f"{name}={os.environ[name]}" for name in ALLOCATOR_VARIABLES if os.environ.get(name)]
    return " ".join(found) or "glibc defaults"


def toca_layer(settings: Settings) -> ToCaAttention:
    return ToCaAttention(settings.dim, settings.heads, settings.clusters, "mlp", causal=True)


def peer_macs(tokens: int, dim: int) -> int:
    """The peer's forward MACs: four C×C projections per token, causal QKᵀ and AV over N(N+1)/2 pairs."""
    return 4 * tokens * dim * dim + tokens * (tokens + 1) * dim


@dataclass
class Cell:
    """One (mode, N) comparison."""

    mode: str  # "training" or "inference"
    tokens: int
    toca_s: float
    peer_s: float | None = None
    peer_predicted: bool = False
    toca_macs: int = 0
    peer_macs: int = 0
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return None if self.peer_s is None else self.peer_s / self.toca_s

    @property
    def mac_ratio(self) -> float:
        return self.peer_macs / self.toca_macs


def _sync() -> None:
    """Wait for queued device work, so that the clock measures it (a no-op on the CPU)."""
    if torch.get_default_device().type == "cuda":
        torch.cuda.synchronize()


def _timed(call: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    call()
    _sync()
    return time.perf_counter() - start


def _calls(module: nn.Module, x: Tensor, mode: str) -> Callable[[], object]:
    if mode == "inference":

        def infer() -> None:
            with torch.inference_mode():
                module(x)

        return infer
    grad = torch.randn_like(x)

    def train() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)

    return train


def predict_peer(cells: list[Cell], tokens: int) -> float | None:
    """Least-squares a·N + b·N² (a, b ≥ 0) through the peer's measured cells of one mode, at ``tokens``."""
    points = [(c.tokens, c.peer_s) for c in cells if c.peer_s is not None and not c.peer_predicted]
    if len(points) < 2:
        return None
    a_n = torch.tensor([[n, n * n] for n, _ in points], dtype=torch.float64)
    seconds = torch.tensor([s for _, s in points], dtype=torch.float64)
    a, b = torch.linalg.lstsq(a_n / seconds.unsqueeze(1), torch.ones_like(seconds)).solution.clamp_min(0).tolist()
    return a * tokens + b * tokens * tokens  # relative least squares: every cell weighs the same


def bench_modes(settings: Settings, budget: float, log: Callable[[str], None], dtype: torch.dtype) -> list[Cell]:
    """Part a (with the MACs of part c): interleaved medians of ToCa and the peer, per mode and N."""
    torch.manual_seed(0)
    toca = toca_layer(settings).to(dtype)
    peer = SdpaCausalSelfAttention(settings.dim, settings.heads).to(dtype)
    cells: list[Cell] = []
    for mode in ("training", "inference"):
        mode_cells: list[Cell] = []
        for tokens in settings.tokens:
            x = torch.randn(1, tokens, settings.dim, dtype=dtype, requires_grad=mode == "training")
            run_toca, run_peer = _calls(toca, x, mode), _calls(peer, x, mode)
            predicted = predict_peer(mode_cells, tokens)
            run_the_peer = predicted is None or predicted * (settings.reps + 1) <= budget
            run_toca()  # warm-up
            if run_the_peer:
                run_peer()
            toca_s, peer_s = [], []
            for _ in range(settings.reps):
                toca_s.append(_timed(run_toca))
                if run_the_peer:
                    peer_s.append(_timed(run_peer))
            cell = Cell(mode, tokens, statistics.median(toca_s), toca_macs=toca.macs(tokens))
            cell.peer_macs = peer_macs(tokens, settings.dim)
            cell.samples = {"toca": toca_s, "peer": peer_s}
            if run_the_peer:
                cell.peer_s = statistics.median(peer_s)
            else:
                cell.peer_s, cell.peer_predicted = predicted, True
            mode_cells.append(cell)
            speed = f"{cell.speedup:.2f}×" + (" (peer predicted)" if cell.peer_predicted else "")
            log(
                f"{mode:9s} N={tokens:6d}  ToCa {cell.toca_s * 1e3:9.1f} ms  peer {cell.peer_s * 1e3:10.1f} ms  {speed}"
            )
        cells += mode_cells
    return cells


WARM_TOKENS = 4
"""Tokens at the start of each decoding round that are not timed."""


@dataclass
class Decoding:
    """Part b: per-token latency at one context position."""

    position: int
    toca_ms: float
    peer_ms: float
    state_bytes: int
    kv_cache_bytes: int


def bench_decoding(settings: Settings, log: Callable[[str], None], dtype: torch.dtype) -> list[Decoding]:
    """Per-token latency of one new position after a prefix of ``position`` tokens (medians)."""
    torch.manual_seed(0)
    toca = toca_layer(settings).to(dtype).eval()
    peer = SdpaCausalSelfAttention(settings.dim, settings.heads).to(dtype).eval()
    rows = []
    with torch.inference_mode():
        for position in settings.positions:
            prefix = torch.randn(1, position, settings.dim, dtype=dtype)
            new = torch.randn(settings.decode_steps, 1, 1, settings.dim, dtype=dtype)
            _, state = toca.step(prefix)
            decoder = SdpaDecoder(peer, position + settings.decode_steps)
            decoder.step(prefix)
            toca_s, peer_s = [], []
            # Rounds of tokens, alternating between the two: one token each would let the peer's reads of its
            # cache evict ToCa's weights from the CPU caches every time. The first tokens of a round warm up.
            for round_ in new.chunk(4):
                for timings, decode in ((toca_s, toca.step), (peer_s, None)):
                    for i, token in enumerate(round_):
                        _sync()
                        start = time.perf_counter()
                        if decode is None:
                            decoder.step(token)
                        else:
                            _, state = decode(token, state)
                        _sync()
                        if i >= WARM_TOKENS:
                            timings.append(time.perf_counter() - start)
            row = Decoding(position, 1e3 * statistics.median(toca_s), 1e3 * statistics.median(peer_s), state.nbytes,
                           decoder.nbytes)  # fmt: skip
            rows.append(row)
            state_kib, cache_mib = row.state_bytes / 2**10, row.kv_cache_bytes / 2**20
            log(f"decoding at {position:6d}: ToCa {row.toca_ms:.3f} ms/token ({state_kib:.0f} KiB state), "
                f"SDPA + KV cache {row.peer_ms:.3f} ms/token ({cache_mib:.1f} MiB cache)")  # fmt: skip
    return rows


def targets(cells: list[Cell], decoding: list[Decoding]) -> list[Target]:
    """The issue's targets, from this run."""
    by = {(c.mode, c.tokens): c for c in cells}
    result = []
    for tokens, factor in ((8192, 1.0), (16384, 3.0), (65536, 10.0)):
        cell = by.get(("training", tokens))
        if cell is not None:
            note = " (peer predicted)" if cell.peer_predicted else ""
            result.append(Target(f"training speed-up over SDPA at N={tokens}{note}", cell.speedup, factor))
    for cell in cells:
        if cell.mode == "training" and cell.tokens >= 16384:
            name = f"training time ratio / MAC ratio ({cell.mac_ratio:.1f}) at N={cell.tokens}"
            result.append(Target(name, cell.speedup / cell.mac_ratio, 0.6))
    positions = {row.position: row for row in decoding}
    if 1024 in positions and 16384 in positions:
        ratio = positions[16384].toca_ms / positions[1024].toca_ms
        result.append(Target("ToCa per-token latency at 16,384 / at 1,024", ratio, 1.2, higher_is_better=False))
    return result


def markdown(cells: list[Cell], decoding: list[Decoding], goals: list[Target], header: dict) -> str:
    lines = ["# Causal ToCa vs SDPA is_causal=True", "", ", ".join(f"{k}: {v}" for k, v in header.items()), ""]
    lines += ["## Targets", "", "| target | measured | threshold | verdict |", "|---|---|---|---|"]
    for goal in goals:
        sign = "≥" if goal.higher_is_better else "≤"
        value = "—" if goal.value is None else f"{goal.value:.3g}"
        lines.append(f"| {goal.name} | {value} | {sign} {goal.threshold:g} | {goal.verdict} |")
    for mode in ("training", "inference"):
        rows = [c for c in cells if c.mode == mode]
        what = "forward+backward" if mode == "training" else "forward, inference mode"
        lines += ["", f"## {mode.capitalize()} ({what}), ms, medians of interleaved calls", ""]
        lines += [
            "| N | ToCa | SDPA is_causal | speed-up | MAC ratio | speed-up / MAC ratio |",
            "|---|---|---|---|---|---|",
        ]
        for c in rows:
            peer = f"{c.peer_s * 1e3:.1f}" + (" (predicted)" if c.peer_predicted else "")
            lines.append(f"| {c.tokens} | {c.toca_s * 1e3:.1f} | {peer} | {c.speedup:.2f}× | {c.mac_ratio:.2f} "
                         f"| {c.speedup / c.mac_ratio:.2f} |")  # fmt: skip
    if decoding:
        lines += ["", "## Decoding one token (inference mode), ms, medians", ""]
        lines += ["| context position | ToCa step | SDPA + KV cache | ToCa state | KV cache |", "|---|---|---|---|---|"]
        for row in decoding:
            sizes = f"{row.state_bytes / 2**10:.0f} KiB | {row.kv_cache_bytes / 2**20:.2f} MiB"
            lines.append(f"| {row.position} | {row.toca_ms:.3f} | {row.peer_ms:.3f} | {sizes} |")
    return "\n".join(lines) + "\n"


def plot(cells: list[Cell], out: Path, header: dict) -> Path | None:
    """Log-log time against N, both modes; predicted peer cells drawn hollow and dashed."""
    dim, heads, where = header["C"], header["heads"], f"{header['dtype']} {header['device']}"
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot (`nox -s bench_causal` installs it)")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, mode in zip(axes, ("training", "inference"), strict=True):
        rows = [c for c in cells if c.mode == mode]
        ax.loglog([c.tokens for c in rows], [c.toca_s for c in rows], "o-", lw=2.5, label="ToCa (M=64, mlp)")
        measured = [c for c in rows if not c.peer_predicted]
        ax.loglog([c.tokens for c in measured], [c.peer_s for c in measured], "s-", label="SDPA is_causal=True")
        guessed = [c for c in rows if c.peer_predicted]
        if guessed:
            tail = measured[-1:] + guessed
            ax.loglog([c.tokens for c in tail], [c.peer_s for c in tail], "s--", mfc="none", color="C1",
                      label="SDPA (predicted)")  # fmt: skip
        ax.set(title=f"{mode}: C={dim}, {heads} heads, B=1, {where}", xlabel="sequence length N", ylabel="seconds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "causal_seconds.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> tuple[list[Cell], list[Decoding], list[Target]]:
    """Run the benchmark, write the reports, print the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every code path")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_causal"), help="output folder")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every measurement")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds a peer cell may take, else predicted")
    parser.add_argument("--device", default="cpu", help="where to run, e.g. cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    header = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "C": settings.dim,
        "heads": settings.heads,
        "M": settings.clusters,
        "chunk": toca_layer(settings).chunk_size,
        "device": args.device,
        "dtype": args.dtype,
        "reps": settings.reps,
        "allocator": allocator_settings(),
    }
    start = time.perf_counter()
    with torch.device(args.device):  # every factory call of the run, scoped to it
        cells = bench_modes(settings, args.budget, print, dtype)
        decoding = bench_decoding(settings, print, dtype)
    header["wall_s"] = round(time.perf_counter() - start)
    goals = targets(cells, decoding)
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(cells, decoding, goals, header)
    (args.out / "causal.md").write_text(report)
    payload = {
        "header": header,
        "cells": [{**asdict(c), "speedup": c.speedup, "mac_ratio": c.mac_ratio} for c in cells],
        "decoding": [asdict(row) for row in decoding],
        "targets": [{**asdict(g), "verdict": g.verdict} for g in goals],
    }
    (args.out / "causal.json").write_text(json.dumps(payload, indent=1))
    figure = plot(cells, args.out, header)
    print(report)
    print("wrote", ", ".join(str(p) for p in (args.out / "causal.md", args.out / "causal.json", figure) if p))
    return cells, decoding, goals


if __name__ == "__main__":
    main()
