"""ToCa beyond vision: forecasting weekly Mauna Loa CO2 with a small Transformer, ToCa vs full attention.

The data is the weekly Mauna Loa CO2 record (March 1958 – December 2001, 2,284 weeks, public domain)
that ships inside ``statsmodels`` (``statsmodels/datasets/co2/co2.csv``): nothing is downloaded at run
time. Each token is one week. A bidirectional encoder reads ``context`` weeks (1,024 ≈ 19.7 years by
default) and forecasts the next ``horizon`` weeks (52 = one year): the last H tokens each predict the
value H weeks after themselves, so every token's representation must carry the trend and the
seasonal cycle gathered by attention.

Four models with the same code, seed, batches and budget differ only in the attention of their
:class:`tocalib.ToCaStack` encoder: full multi-head self-attention (``num_clusters=0``, O(N²·C)), or
token-to-cluster attention with M clusters (O(N·M·C)) whose assignment is computed in every block by PaCa's
MLP clustering (block-wise), once in the first block and reused (stage-wise), or by a small
CNN teacher (:class:`tocalib.Conv1dTeacher`) that feeds every block. All are compared with the seasonal
naive forecast (same week one year earlier) and the seasonal naive forecast plus the last year's drift.

Run ``python examples/sequence_demo.py`` (or ``nox -s demo_sequence``); it writes ``results.md``,
``results.json`` and ``assignments.png`` to ``outputs/sequence_demo/``. Needs ``statsmodels`` (data),
``fvcore`` (MAC counts) and ``Pillow`` (picture).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib import Conv1dTeacher, ToCaStack
from tocalib.flops import count_macs

PERIOD = 52  # weeks per year: the seasonal period of a weekly series
VARIANTS = (  # key, ToCa or full attention, where the assignment comes from (a ToCaStack policy), label
    ("full", False, "block", "full attention (M = 0)"),
    ("toca", True, "block", "ToCa, MLP clustering in every block"),
    ("toca_stage", True, "stage", "ToCa, MLP clustering in block 1, shared"),
    ("toca_teacher", True, "teacher", "ToCa, Conv1dTeacher feeds every block"),
)
CO2_CSV = ("datasets", "co2", "co2.csv")
# a few anchors of the viridis colour map, low → high
VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; the models share all of it but their attention (see :data:`VARIANTS`)."""

    context: int = 1024  # N: weeks the encoder reads (tokens per sequence)
    horizon: int = 52  # H: weeks forecast; must be <= context
    dim: int = 32  # C: token width
    heads: int = 2
    depth: int = 2  # encoder blocks
    mlp_ratio: int = 2
    clusters: int = 32  # M of the ToCa models (the full-attention model has 0)
    teacher_depth: int = 2  # ConvMixer layers of the teacher-fed model's Conv1dTeacher
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 20
    seed: int = 0
    test_fraction: float = 0.2  # the last weeks of the record, never seen in training
    eval_batch: int = 32
    log_every: int = 20
    scaling_lengths: tuple[int, ...] = (512, 1024, 2048, 4096)  # forward-speed sweep over N (random weights)


@dataclass(frozen=True)
class Series:
    """A univariate series: ``values`` (T,) float64 and their ``dates`` (T,) datetime64[D]."""

    name: str
    values: np.ndarray
    dates: np.ndarray


@dataclass(frozen=True)
class Split:
    """Forecasting windows. Context x (W, N), target y (W, H); ``*_origin`` (W,): index of y's first step."""

    train_x: Tensor
    train_y: Tensor
    train_origin: np.ndarray
    test_x: Tensor
    test_y: Tensor
    test_origin: np.ndarray


class MissingDataError(RuntimeError):
    """The package that ships the data set is not installed."""


# --------------------------------------------------------------------------------------------- data


def load_co2() -> Series:
    """Weekly Mauna Loa CO2 (ppm) from the CSV inside ``statsmodels``; the 59 missing weeks are
    linearly interpolated. The package is located, not imported (no pandas/scipy import needed)."""
    spec = importlib.util.find_spec("statsmodels")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            "the CO2 data ships inside statsmodels, which is not installed: "
            "`pip install -c constraints.txt statsmodels` (or run `nox -s demo_sequence`)"
        )
    path = Path(spec.submodule_search_locations[0]).joinpath(*CO2_CSV)
    if not path.is_file():
        raise MissingDataError(f"statsmodels is installed but has no {path}; reinstall statsmodels")
    table = np.genfromtxt(path, delimiter=",", skip_header=1, dtype=np.float64)  # columns: yyyymmdd, ppm
    stamps = [f"{int(d):08d}" for d in table[:, 0]]
    dates = np.array([f"{s[:4]}-{s[4:6]}-{s[6:]}" for s in stamps], dtype="datetime64[D]")
    values = table[:, 1]
    missing = np.isnan(values)
    values[missing] = np.interp(np.flatnonzero(missing), np.flatnonzero(~missing), values[~missing])
    return Series("Mauna Loa weekly CO2 (ppm), statsmodels.datasets.co2", values, dates)


def synthetic_series(length: int, seed: int = 0) -> Series:
    """A CO2-like weekly series (trend + yearly cycle + noise) for tests that must not need statsmodels."""
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)
    values = 315 + 0.025 * t + 3 * np.sin(2 * np.pi * t / PERIOD) + 0.3 * rng.standard_normal(length)
    dates = np.datetime64("1958-03-29") + 7 * t.astype(np.int64)
    return Series("synthetic weekly series", values, dates)


def make_split(values: np.ndarray, context: int, horizon: int, test_fraction: float) -> Split:
    """Sliding windows over (T,) ``values``. A training window's target ends before the test period
    (the last ``test_fraction`` of the record); a test window's target starts inside it."""
    if not 1 <= horizon <= context:
        raise ValueError(f"need 1 <= horizon ({horizon}) <= context ({context})")
    if horizon > PERIOD:
        raise ValueError(f"horizon ({horizon}) must be <= {PERIOD}: the seasonal naive baseline looks one year back")
    total = len(values)
    test_start = total - round(test_fraction * total)
    origins = np.arange(context, total - horizon + 1)
    train, test = origins[origins + horizon <= test_start], origins[origins >= test_start]
    if len(train) == 0 or len(test) == 0:
        raise ValueError(
            f"a series of {total} points cannot hold train and test windows of context {context} + horizon "
            f"{horizon} with test_fraction {test_fraction}: shorten the context or use a longer series"
        )
    windows = torch.from_numpy(np.lib.stride_tricks.sliding_window_view(values, context + horizon).copy()).float()

    def cut(starts: np.ndarray) -> tuple[Tensor, Tensor]:
        rows = windows[starts - context]
        return rows[:, :context], rows[:, context:]

    return Split(*cut(train), train, *cut(test), test)


def seasonal_baselines(x: Tensor, horizon: int) -> dict[str, Tensor]:
    """Naive forecasts (W, H) from contexts x (W, N), N >= 2·PERIOD: the value one year earlier,
    and that plus the drift between the last two years' means."""
    if x.shape[1] < 2 * PERIOD:
        raise ValueError(f"the baselines need a context of at least {2 * PERIOD} weeks, got {x.shape[1]}")
    last_year = x[:, -PERIOD:][:, :horizon]
    drift = x[:, -PERIOD:].mean(1, keepdim=True) - x[:, -2 * PERIOD : -PERIOD].mean(1, keepdim=True)
    return {"seasonal naive": last_year, "seasonal naive + drift": last_year + drift}


# -------------------------------------------------------------------------------------------- model


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """(length, dim) fixed sine/cosine position codes (Vaswani et al.); dim must be even."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    codes = torch.zeros(length, dim)
    codes[:, 0::2], codes[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
    return codes


class Forecaster(nn.Module):
    """Context (B, N) in data units → forecast (B, H) in data units.

    Each window is normalised by its last year's mean and its standard deviation, embedded per week
    (Linear(1, C) plus sine/cosine positions), encoded by ``depth`` blocks; the last H tokens each
    predict the value H weeks after themselves through one shared Linear(C, 1).
    """

    def __init__(self, config: Config, clusters: int, context: int | None = None, share: str = "block") -> None:
        super().__init__()
        self.context = config.context if context is None else context
        self.horizon = config.horizon
        self.embed = nn.Linear(1, config.dim)
        self.register_buffer("positions", sinusoidal_positions(self.context, config.dim), persistent=False)
        teacher = None
        if share == "teacher":
            teacher = Conv1dTeacher(config.dim, clusters, depths=config.teacher_depth)
        self.encoder = ToCaStack(
            config.dim, config.depth, config.heads, clusters, "mlp", share=None if teacher else share, teacher=teacher,
            mlp_ratio=config.mlp_ratio, norm_layer=nn.LayerNorm,
        )  # fmt: skip
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, 1)

    def scale(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-window level and scale, each (B, 1), from contexts x (B, N)."""
        return x[:, -PERIOD:].mean(1, keepdim=True), x.std(1, keepdim=True) + 1e-3

    def forward(self, x: Tensor, return_assignments: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """x (B, N) → forecast (B, H), and with ``return_assignments`` the (B, M, N) assignment of every block."""
        if x.shape[1] != self.context:
            raise ValueError(f"this model reads contexts of {self.context} steps, got x of shape {tuple(x.shape)}")
        level, scale = self.scale(x)
        tokens = self.embed(((x - level) / scale).unsqueeze(-1)) + self.positions
        tokens, records = self.encoder(tokens, return_intermediates=True)
        forecast = self.head(self.norm(tokens[:, -self.horizon :])).squeeze(-1) * scale + level
        if not return_assignments:
            return forecast
        return forecast, [None if r.assignment is None else r.assignment.dense() for r in records]


# ------------------------------------------------------------------------------ training, evaluation


def train(model: Forecaster, split: Split, config: Config, label: str) -> dict[str, float]:
    """AdamW with linear warm-up and cosine decay on the MSE in normalised units; the batches are drawn
    from a generator seeded with ``config.seed``, so every model sees the same ones."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - config.warmup) / max(1, config.steps - config.warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    running, start = 0.0, time.perf_counter()
    for step in range(1, config.steps + 1):
        index = torch.randint(len(split.train_x), (config.batch_size,), generator=generator)
        x, y = split.train_x[index], split.train_y[index]
        _, scale = model.scale(x)
        loss = F.mse_loss(model(x) / scale, y / scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % config.log_every == 0 or step == config.steps:
            seen = config.log_every if step % config.log_every == 0 else step % config.log_every
            elapsed = time.perf_counter() - start
            print(f"  [{label}] step {step:4d}/{config.steps}  loss {running / seen:.4f}  {elapsed:6.1f} s", flush=True)
            running = 0.0
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "ms_per_step": 1000 * seconds / config.steps}


@torch.inference_mode()
def predict(model: Forecaster, x: Tensor, batch: int) -> Tensor:
    """Forecasts (W, H) for contexts x (W, N), ``batch`` windows at a time."""
    model.eval()
    return torch.cat([model(chunk) for chunk in x.split(batch)])


def errors(forecast: Tensor, target: Tensor) -> dict[str, float]:
    """MAE and RMSE in data units over all windows and horizon steps of (W, H) tensors."""
    diff = forecast - target
    return {"mae": diff.abs().mean().item(), "rmse": diff.pow(2).mean().sqrt().item()}


def seconds_per_call(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls of ``fn()`` after one warm-up call (the machine is shared)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# ------------------------------------------------------------------------------- cluster inspection


@torch.inference_mode()
def cluster_statistics(model: Forecaster, split: Split, dates: np.ndarray, batch: int) -> list[dict[str, float]]:
    """Per block, averaged over clusters and test windows: how seasonal, how local and how spread the
    clusters are.

    * ``season_focus``: |Σ_n c_n·e^{iφ_n}| with φ_n the token's phase in the calendar year, 1 when a
      cluster draws from a single week of the year, about 0 when it draws from all seasons alike;
      ``season_focus_uniform`` is the same for uniform weights over the window (the chance level).
    * ``time_spread``: the weighted standard deviation of a cluster's token positions over N
      (0.29 for uniform weights, 0 for a single token).
    * ``tokens_per_cluster``: the effective number of tokens 1 / Σ_n c_n² (N for uniform weights).
    * ``peak_over_uniform``: a cluster's largest token weight times N (1 for uniform weights).
    """
    model.eval()
    sums: list[dict[str, float]] = []
    count = 0
    positions = torch.arange(model.context, dtype=torch.float64) / model.context
    for start in range(0, len(split.test_x), batch):
        x = split.test_x[start : start + batch]
        _, assignments = model(x, return_assignments=True)
        origins = split.test_origin[start : start + batch]
        index = origins[:, None] - model.context + np.arange(model.context)[None]
        phase = torch.from_numpy(year_phase(dates[index]))  # (B, N) radians
        rotor = torch.polar(torch.ones_like(phase), phase)
        uniform = (rotor.mean(1).abs()).sum().item()
        for layer, c in enumerate(assignments):
            c = c.double()  # (B, M, N)
            mean_pos = (c * positions).sum(-1, keepdim=True)
            stats = {
                "season_focus": (c.to(rotor.dtype) @ rotor.unsqueeze(-1)).abs().mean(1).sum().item(),
                "season_focus_uniform": uniform,
                "time_spread": ((c * (positions - mean_pos) ** 2).sum(-1).sqrt()).mean(1).sum().item(),
                "tokens_per_cluster": (1 / c.pow(2).sum(-1)).mean(1).sum().item(),
                "peak_over_uniform": (c.amax(-1) * model.context).mean(1).sum().item(),
            }
            if layer == len(sums):
                sums.append(dict.fromkeys(stats, 0.0))
            for key, value in stats.items():
                sums[layer][key] += value
        count += len(x)
    return [{key: value / count for key, value in layer.items()} for layer in sums]


def year_phase(dates: np.ndarray) -> np.ndarray:
    """Angle in [0, 2π) of each datetime64[D] date within its calendar year, same shape as ``dates``."""
    years = dates.astype("datetime64[Y]")
    day = (dates - years.astype("datetime64[D]")).astype(np.float64)
    return 2 * np.pi * day / 365.25


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] of any shape → uint8 RGB of shape (*values.shape, 3), viridis-like."""
    grid = np.linspace(0, 1, len(VIRIDIS))
    rgb = [np.interp(np.clip(values, 0, 1), grid, VIRIDIS[:, k]) for k in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def render_assignments(
    path: Path,
    series: Series,
    origin: int,
    context: int,
    forecasts: dict[str, np.ndarray],
    assignments: Sequence[np.ndarray],
) -> None:
    """Draw one test window: the series (context, truth and forecasts (H,)), and below it one heat strip per
    cluster and block, each (M, N) assignment row scaled to its own maximum; clusters are ordered by the
    calendar phase they draw from; thin lines mark every 1 January."""
    from PIL import Image, ImageDraw

    horizon = len(next(iter(forecasts.values())))
    left, right, top, plot_h, row_h, gap = 110, 20, 30, 220, 6, 34
    steps = context + horizon
    step_px = max(1, round(1200 / steps))
    width = left + steps * step_px + right
    rows = sum(a.shape[0] for a in assignments)
    height = top + plot_h + gap * len(assignments) + rows * row_h + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = series.values[origin - context : origin + horizon]
    dates = series.dates[origin - context : origin + horizon]
    everything = np.concatenate([values, *forecasts.values()])
    low, high = everything.min(), everything.max()

    def xy(t: np.ndarray, v: np.ndarray) -> list[tuple[float, float]]:
        y = top + plot_h - 10 - (v - low) / (high - low + 1e-9) * (plot_h - 20)
        return list(zip((left + (t + 0.5) * step_px).tolist(), y.tolist(), strict=True))

    new_year = np.flatnonzero(dates.astype("datetime64[Y]")[1:] != dates.astype("datetime64[Y]")[:-1]) + 1
    for t in new_year:
        x = left + t * step_px
        draw.line([(x, top), (x, height - 20)], fill=(225, 225, 225))
        if dates[t].astype(object).year % 5 == 0:
            draw.text((x + 2, top + plot_h - 12), str(dates[t].astype(object).year), fill=(120, 120, 120))
    draw.line([(left + context * step_px, top), (left + context * step_px, top + plot_h)], fill=(150, 150, 150))
    draw.line(xy(np.arange(context), values[:context]), fill="black", width=1)
    draw.line(xy(np.arange(context, steps), values[context:]), fill=(120, 120, 120), width=2)
    palette = [((214, 96, 0), 4), ((31, 119, 180), 2), ((44, 160, 44), 1)]  # wide lines first: overlaps stay visible
    legend = [("context / truth", (0, 0, 0))]
    for (name, forecast), (colour, line_width) in zip(forecasts.items(), palette, strict=False):
        draw.line(xy(np.arange(context, steps), forecast), fill=colour, width=line_width)
        legend.append((name, colour))
    for k, (name, colour) in enumerate(legend):  # Pillow's default font has no dashes: draw the key as a line
        draw.line([(left + 10 + 260 * k, 14), (left + 30 + 260 * k, 14)], fill=colour, width=2)
        draw.text((left + 36 + 260 * k, 8), name, fill=colour)
    draw.text((4, top + 6), f"{high:.1f}", fill="black")
    draw.text((4, top + plot_h - 16), f"{low:.1f}", fill="black")

    phase = year_phase(dates[:context])
    rotor = np.exp(1j * phase)
    y = top + plot_h
    for layer, c in enumerate(assignments):
        order = np.argsort(np.angle(c @ rotor) % (2 * np.pi))
        low_w, high_w = c.min(axis=1, keepdims=True), c.max(axis=1, keepdims=True)
        strips = colormap((c - low_w)[order] / (high_w - low_w + 1e-12)[order])  # (M, N, 3)
        strips = np.repeat(np.repeat(strips, row_h, axis=0), step_px, axis=1)
        draw.text(
            (4, y + 12),
            f"block {layer + 1}: {c.shape[0]} clusters (rows, sorted by the calendar phase they draw from), each row "
            f"scaled from its smallest (dark) to its largest (yellow) token weight; mean largest weight = "
            f"{high_w.mean() * context:.2f} x uniform",
            fill="black",
        )
        y += gap
        image.paste(Image.fromarray(strips), (left, y))
        draw.text((4, y + 2), "one row", fill="black")
        draw.text((4, y + 14), "per cluster", fill="black")
        y += strips.shape[0]
    image.save(path)


# ------------------------------------------------------------------------------------------- report


def macs_per_sequence(model: Forecaster) -> int:
    """Measured (fvcore + tocalib handles) MACs of one forward pass on one sequence."""
    # the window mean and standard deviation that normalise the input are element-wise statistics, not MACs
    return count_macs(model.eval(), torch.full((1, model.context), 300.0), not_macs=["aten::mean", "aten::std"])


def scaling_sweep(config: Config) -> list[dict[str, float]]:
    """Forward time and MACs of both architectures (random weights) at each of ``config.scaling_lengths``."""
    rows = []
    for length in config.scaling_lengths:
        x = torch.randn(8, length) + 350
        row: dict[str, float] = {"context": length}
        for name, clusters in (("full", 0), ("toca", config.clusters)):
            torch.manual_seed(config.seed)
            model = Forecaster(config, clusters, context=length).eval()
            with torch.inference_mode():
                row[f"{name}_ms"] = 1000 * seconds_per_call(partial(model, x)) / len(x)
            row[f"{name}_macs"] = macs_per_sequence(model)
        print(f"  N={length:5d}: full {row['full_ms']:7.1f} ms/seq, ToCa {row['toca_ms']:7.1f} ms/seq", flush=True)
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    """The report as Markdown tables."""
    config, data, environment = report["config"], report["data"], report["environment"]
    lines = [
        f"# ToCa vs full attention on {data['name']}",
        "",
        f"{data['points']} weekly points ({data['first']} – {data['last']}); {data['train_windows']} training "
        f"windows, {data['test_windows']} test windows (forecasts from {data['test_first']} on). "
        f"Context N = {config['context']} weeks, horizon H = {config['horizon']} weeks; {config['depth']} blocks, "
        f"C = {config['dim']}, {config['heads']} heads; {config['steps']} steps of batch {config['batch_size']}, "
        f"lr {config['lr']}, seed {config['seed']}; {environment['threads']} CPU threads, 1-min load average "
        f"{environment['load_start']:.1f} at the start and {environment['load_end']:.1f} at the end (timings from "
        "a shared machine: compare them only as ratios within one run).",
        "",
        "| forecaster | test MAE (ppm) | test RMSE (ppm) | params | MMACs / sequence | encoder MMACs (analytic) "
        "| train time (s) | ms / step | inference (seq/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["baselines"].items():
        lines.append(f"| {name} | {row['mae']:.3f} | {row['rmse']:.3f} | – | – | – | – | – | – |")
    for row in report["models"].values():
        lines.append(
            f"| {row['label']} | {row['mae']:.3f} | {row['rmse']:.3f} | {row['params']:,} | {row['macs'] / 1e6:.1f} "
            f"| {row['encoder_macs'] / 1e6:.1f} | {row['train_seconds']:.0f} | {row['ms_per_step']:.0f} "
            f"| {row['sequences_per_second']:.0f} |"
        )
    if report["scaling"]:
        lines += [
            "",
            "Forward pass (batch 8, random weights, best of 3) as the context grows:",
            "",
            "| N | full MMACs | ToCa MMACs | full ms / seq | ToCa ms / seq | ToCa speed-up |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in report["scaling"]:
            lines.append(
                f"| {row['context']} | {row['full_macs'] / 1e6:.0f} | {row['toca_macs'] / 1e6:.0f} | "
                f"{row['full_ms']:.1f} | {row['toca_ms']:.1f} | {row['full_ms'] / row['toca_ms']:.2f}× |"
            )
    lines += [
        "",
        "Block-wise ToCa clusters on the test windows (mean over clusters and windows; chance = uniform weights):",
        "",
        "| block | season focus | chance | time spread (uniform 0.29) | effective tokens per cluster "
        f"(uniform {config['context']}) | largest weight × N (uniform 1) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k, row in enumerate(report["clusters"], start=1):
        lines.append(
            f"| {k} | {row['season_focus']:.3f} | {row['season_focus_uniform']:.3f} | {row['time_spread']:.3f} "
            f"| {row['tokens_per_cluster']:.0f} | {row['peak_over_uniform']:.2f} |"
        )
    lines += ["", f"Picture: `{report['picture']}`.", ""]
    return "\n".join(lines)


def run(config: Config, out_dir: Path, series: Series | None = None) -> dict:
    """Train and evaluate the four models on ``series`` (default: the CO2 record), write results.md,
    results.json and assignments.png to ``out_dir``, and return the report."""
    series = load_co2() if series is None else series
    load_start = os.getloadavg()[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    split = make_split(series.values, config.context, config.horizon, config.test_fraction)
    print(
        f"{series.name}: {len(series.values)} points, {len(split.train_x)} train / {len(split.test_x)} test windows",
        flush=True,
    )
    baselines = {
        name: errors(forecast, split.test_y)
        for name, forecast in seasonal_baselines(split.test_x, config.horizon).items()
    }
    models, rows, forecasts = {}, {}, {}
    for key, toca, share, label in VARIANTS:
        clusters = config.clusters if toca else 0
        label = f"{label} (M = {clusters})" if toca else label
        torch.manual_seed(config.seed)
        model = Forecaster(config, clusters, share=share)
        print(f"training {label}", flush=True)
        row = {"label": label, "clusters": clusters, "share": share, **train(model, split, config, key)}
        forecast = predict(model, split.test_x, config.eval_batch)
        timed = split.test_x[: config.eval_batch]
        seconds = seconds_per_call(partial(predict, model, timed, config.eval_batch))
        row |= errors(forecast, split.test_y)
        row |= {
            "sequences_per_second": len(timed) / seconds,
            "params": sum(p.numel() for p in model.parameters()),
            "macs": macs_per_sequence(model),
            "encoder_macs": model.encoder.macs(config.context),
        }
        print(f"  test MAE {row['mae']:.3f} ppm, RMSE {row['rmse']:.3f} ppm", flush=True)
        models[key], rows[key], forecasts[label] = model, row, forecast
    print("cluster statistics and picture", flush=True)
    clusters = cluster_statistics(models["toca"], split, series.dates, config.eval_batch)
    shown = len(split.test_x) // 2
    with torch.inference_mode():
        _, assignments = models["toca"](split.test_x[shown : shown + 1], return_assignments=True)
    picture = out_dir / "assignments.png"
    render_assignments(
        picture,
        series,
        int(split.test_origin[shown]),
        config.context,
        {label: f[shown].numpy() for label, f in forecasts.items()},
        [a[0].numpy() for a in assignments],
    )
    print("forward-speed sweep over N", flush=True)
    report = {
        "config": dataclasses.asdict(config),
        "data": {
            "name": series.name,
            "points": len(series.values),
            "first": str(series.dates[0]),
            "last": str(series.dates[-1]),
            "train_windows": len(split.train_x),
            "test_windows": len(split.test_x),
            "test_first": str(series.dates[split.test_origin[0]]),
        },
        "baselines": baselines,
        "models": rows,
        "clusters": clusters,
        "scaling": scaling_sweep(config),
        "picture": str(picture),
        "picture_window": {"origin": str(series.dates[split.test_origin[shown]])},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
        },
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(report))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: every :class:`Config` field is an option (``--steps 300``, ``--scaling-lengths 512 1024``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/sequence_demo"), help="output folder")
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "scaling_lengths":
            parser.add_argument(flag, type=int, nargs="*", default=list(field.default), help="N values (none: skip)")
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    args["scaling_lengths"] = tuple(args["scaling_lengths"])
    try:
        report = run(Config(**args), out)
    except MissingDataError as err:
        raise SystemExit(f"error: {err}") from err
    print(markdown(report))


if __name__ == "__main__":
    main()
