"""ToCa for language: a character-level model of the King James Bible, causal ToCa against full attention.

The text is Debian's public-domain ``bible-kjv`` package: ``bible -f "Gen1:1-Rev22:21"`` prints all
31,102 verses, one per line after its reference (``Ge1:1 In the beginning ...``). The references are
dropped, so the corpus is the 4.3 MB of verse text, one verse per line. Whole books are held out for
validation (:data:`VALIDATION_BOOKS`, 4 % of the text: narrative, wisdom, prophecy, a gospel and
letters), so validation text is never seen in training, not even as a neighbouring verse.

Two models share the code, the seed, the batches and the step budget. They differ only in their
attention layers (``num_clusters``): causal :class:`tocalib.ToCaAttention` with M clusters, or M = 0,
which is causal full attention through SDPA's ``is_causal``. A block is pre-norm. A causal depthwise
convolution over the last 4 characters gives both models local order (no position embeddings), then
comes the attention, then an MLP. Generation decodes one character at a time with
:meth:`~tocalib.ToCaAttention.step`. ToCa keeps an M-entry state per layer; full attention keeps a
KV cache that grows by one entry per character.

Run ``python examples/lm_demo.py`` (or ``nox -s demo_lm``, which installs ``bible-kjv`` when it is
missing). It writes ``results.md``, ``results.json``, ``samples.txt``, ``assignments.png`` and the
trained weights (``toca.pt``, ``full.pt``) to ``outputs/lm_demo/``. It needs the ``bible`` program and,
for the picture, matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib import ToCaAttention
from tocalib.causal import ClusterState, KVCache
from tocalib.flops import peak_bytes

VALIDATION_BOOKS = ("Ruth", "Eccl", "Joel", "Jonah", "Mark", "Gal", "Jas", "Jude")
"""The held-out books, by the reference prefixes the ``bible`` program prints."""

PASSAGE = 96
"""Characters of the picture of the cluster assignments: the start of the validation text (Ruth 1:1)."""


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; the two models share all of it except ``clusters``."""

    context: int = 1024  # characters per training sequence
    dim: int = 256
    heads: int = 4
    depth: int = 4
    conv_width: int = 4  # the causal depthwise convolution's reach, in characters
    clusters: int = 32  # M of the ToCa model (the full-attention model has 0)
    clustering: str = "conv1d"  # a causal conv1d clustering: each logit sees the last 3 characters
    steps: int = 400
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 30
    seed: int = 0
    eval_sequences: int = 48  # validation windows of ``context`` characters
    log_every: int = 25
    sample_length: int = 400  # generated characters per model
    long_context: int = 8192  # the prefix of the long-context generation and memory measurements


@dataclass(frozen=True)
class Corpus:
    """The text as character ids: ``train`` and ``valid`` (1-D int64), and the alphabet."""

    train: Tensor
    valid: Tensor
    alphabet: str

    def encode(self, text: str) -> Tensor:
        index = {ch: i for i, ch in enumerate(self.alphabet)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the corpus' alphabet {self.alphabet!r}")
        return torch.tensor([index[ch] for ch in text], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.alphabet[i] for i in ids.tolist())


class MissingDataError(RuntimeError):
    """The program that prints the text is not installed."""


def read_bible() -> list[tuple[str, str]]:
    """(book, verse text) for every verse, from the ``bible`` program of Debian's ``bible-kjv``."""
    program = shutil.which("bible")
    if program is None:
        raise MissingDataError(
            "the King James text comes from Debian's bible-kjv package: `apt-get install -y bible-kjv` "
            "(or run `nox -s demo_lm`, which installs it)"
        )
    lines = subprocess.run([program, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses = []
    for line in lines.splitlines():
        reference, _, text = line.partition(" ")
        book = reference.rstrip("0123456789:")
        if text:
            verses.append((book, text.strip()))
    if len(verses) < 31_000:
        raise MissingDataError(f"`bible -f` printed {len(verses)} verses, expected 31,102: reinstall bible-kjv")
    return verses


def make_corpus(verses: list[tuple[str, str]], validation_books: tuple[str, ...] = VALIDATION_BOOKS) -> Corpus:
    """Training and validation text, one verse per line, split by whole books."""
    missing = set(validation_books) - {book for book, _ in verses}
    if missing:
        raise ValueError(f"validation books {sorted(missing)} are not in the text")
    train = "\n".join(text for book, text in verses if book not in validation_books) + "\n"
    valid = "\n".join(text for book, text in verses if book in validation_books) + "\n"
    alphabet = "".join(sorted(set(train) | set(valid)))
    corpus = Corpus(torch.empty(0), torch.empty(0), alphabet)
    return Corpus(corpus.encode(train), corpus.encode(valid), alphabet)


class ShortConv(nn.Module):
    """A causal depthwise convolution over the last ``width`` positions; ``past`` carries its window."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.conv = nn.Conv1d(dim, dim, width, groups=dim)

    def forward(self, x: Tensor, past: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, C) → (y (B, T, C), the last width - 1 inputs, for the next call)."""
        if past is None:
            past = x.new_zeros(x.shape[0], self.width - 1, x.shape[2])
        joined = torch.cat([past, x], dim=1)
        return self.conv(joined.transpose(1, 2)).transpose(1, 2), joined[:, 1 - self.width :].clone()


class Block(nn.Module):
    """x + conv(norm(x)), then x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config, clusters: int) -> None:
        super().__init__()
        dim = config.dim
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.mix = ShortConv(dim, config.conv_width)
        conv = clusters and config.clustering == "conv1d"
        self.attn = ToCaAttention(
            dim, config.heads, clusters, config.clustering if clusters else None, causal=True,
            clustering_kwargs={"causal": True, "kernel_size": 3} if conv else None,
        )  # fmt: skip
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, cache: tuple | None = None) -> tuple[Tensor, tuple | None]:
        """x (B, T, C). Without ``cache`` a parallel forward; with one (``()`` at the start) a decoding step."""
        mixed, window = self.mix(self.norms[0](x), None if not cache else cache[0])
        x = x + mixed
        if cache is None:
            x, state = x + self.attn(self.norms[1](x)), None
        else:
            attended, state = self.attn.step(self.norms[1](x), cache[1] if cache else None)
            x = x + attended
        return x + self.mlp(self.norms[2](x)), None if cache is None else (window, state)


class CharLM(nn.Module):
    """Character ids (B, T) → next-character logits (B, T, V)."""

    def __init__(self, config: Config, vocab: int, clusters: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, config.dim)
        self.blocks = nn.ModuleList(Block(config, clusters) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)  # logits start near 0: about log2(V) bits per character

    def forward(self, ids: Tensor, caches: list | None = None) -> tuple[Tensor, list | None]:
        """A parallel forward without ``caches``; a decoding step with them (``[]`` at the start of a
        sequence), which returns the caches for the next step."""
        x = self.embed(ids)
        new_caches = None if caches is None else []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, None if caches is None else (caches[i] if caches else ()))
            if new_caches is not None:
                new_caches.append(cache)
        return self.head(self.norm(x)), new_caches


def batches(corpus: Corpus, config: Config) -> Tensor:
    """(steps, B, context + 1) random training windows, the same for every model (seeded)."""
    gen = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, len(corpus.train) - config.context - 1, (config.steps, config.batch_size), generator=gen)
    return corpus.train[starts.unsqueeze(-1) + torch.arange(config.context + 1)]


def learning_rate(config: Config, step: int) -> float:
    """Linear warmup, then cosine decay to a tenth."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Evaluation mode and no autograd inside; the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def bits_per_character(model: CharLM, text: Tensor, context: int, windows: int) -> float:
    """Mean next-character cross-entropy in bits over the first ``windows`` non-overlapping windows."""
    count = min(windows, (len(text) - 1) // context)
    starts = torch.arange(count) * context
    ids = text[starts.unsqueeze(-1) + torch.arange(context + 1)]
    total = 0.0
    with evaluating(model):
        for rows in ids.split(8):
            logits, _ = model(rows[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
    return total / (count * context) / math.log(2)


@dataclass
class Run:
    """One trained model's measurements."""

    name: str
    clusters: int
    params: int
    train_seconds: float = 0.0
    train_tokens_per_s: float = 0.0
    curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, training bpc)
    valid_bpc: float = 0.0
    generate_tokens_per_s: float = 0.0
    long_generate_tokens_per_s: float = 0.0
    decoding_state_bytes: int = 0  # after the long prefix
    train_peak_bytes: int = 0  # one training step at the training context
    long_forward_peak_bytes: int = 0  # one forward over the long context
    sample: str = ""


def train(model: CharLM, data: Tensor, config: Config, log: Callable[[str], None], run: Run) -> None:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
    model.train()
    start = time.perf_counter()
    window = []
    for step, rows in enumerate(data):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        logits, _ = model(rows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(loss.item() / math.log(2))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            run.curve.append((step + 1, sum(window) / len(window)))
            elapsed = time.perf_counter() - start
            log(f"{run.name}: step {step + 1}/{config.steps}  train bpc {run.curve[-1][1]:.3f}  ({elapsed:.0f} s)")
            window = []
    run.train_seconds = time.perf_counter() - start
    run.train_tokens_per_s = config.steps * config.batch_size * config.context / run.train_seconds


def generate(model: CharLM, prompt: Tensor, length: int, seed: int, temperature: float = 0.8) -> tuple[Tensor, float]:
    """Sample ``length`` characters after ``prompt`` (1-D) with the step decoder: (ids, tokens/s of the sampling)."""
    gen = torch.Generator().manual_seed(seed)
    with evaluating(model):
        logits, caches = model(prompt.unsqueeze(0), [])  # the prefix in one step call
        out = []
        start = time.perf_counter()
        for _ in range(length):
            probs = (logits[0, -1] / temperature).softmax(-1)
            token = torch.multinomial(probs, 1, generator=gen)
            out.append(token)
            logits, caches = model(token.view(1, 1), caches)
        rate = length / (time.perf_counter() - start)
    return torch.cat(out), rate


def state_bytes(caches: list) -> int:
    """Bytes of every layer's attention state (ClusterState or KVCache) and convolution window."""
    total = 0
    for window, state in caches:
        total += window.numel() * window.element_size()
        total += state.nbytes if isinstance(state, ClusterState | KVCache) else 0
    return total


def measure(model: CharLM, corpus: Corpus, config: Config, run: Run, log: Callable[[str], None]) -> None:
    """Validation bpc, generation speed (a short prompt and a long prefix), memory, and a sample."""
    run.valid_bpc = bits_per_character(model, corpus.valid, config.context, config.eval_sequences)
    prompt = corpus.encode("And God said, ")
    sample, run.generate_tokens_per_s = generate(model, prompt, config.sample_length, config.seed)
    run.sample = corpus.decode(prompt) + corpus.decode(sample)
    long_prefix = corpus.valid[: config.long_context]
    _, run.long_generate_tokens_per_s = generate(model, long_prefix, 64, config.seed)
    with evaluating(model):
        _, caches = model(long_prefix.unsqueeze(0), [])
        run.decoding_state_bytes = state_bytes(caches)
        run.long_forward_peak_bytes = peak_bytes(lambda: model(long_prefix.unsqueeze(0)))
    rows = corpus.train[: config.batch_size * (config.context + 1)].view(config.batch_size, -1)

    def step() -> None:
        logits, _ = model(rows[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)

    run.train_peak_bytes = peak_bytes(step)
    log(f"{run.name}: valid bpc {run.valid_bpc:.3f}, generation {run.generate_tokens_per_s:.0f} chars/s "
        f"({run.long_generate_tokens_per_s:.0f} after {config.long_context} characters)")  # fmt: skip


def cluster_picture(model: CharLM, corpus: Corpus, path: Path) -> Path | None:
    """The first ToCa layer's assignment over the first :data:`PASSAGE` validation characters, as seen by the
    last of them: one row per cluster, one column per character."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = corpus.valid[:PASSAGE].unsqueeze(0)
    passage = corpus.decode(ids[0])
    block = model.blocks[0]
    with torch.inference_mode():
        x = model.embed(ids)
        x = x + block.mix(block.norms[0](x))[0]
        _, record = block.attn(block.norms[1](x), return_intermediates=True)
    assignment = record.assignment.dense()[0]  # the causal logits' softmax over the passage: the last character's
    maps = assignment / assignment.amax(-1, keepdim=True)  # each cluster scaled to its own peak
    fig, ax = plt.subplots(figsize=(16, 0.25 * maps.shape[0] + 1.2))
    ax.imshow(maps.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(passage)), list(passage.replace(" ", "␣").replace("\n", "⏎")), fontsize=7,
                  family="monospace")  # fmt: skip
    ax.set_ylabel("cluster")
    ax.set_title("layer 1 cluster assignments over the first validation verse (Ruth 1:1) as its last character "
                 "sees them, each row scaled to its peak")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(runs: list[Run], config: Config, header: dict) -> str:
    lines = ["# Character-level KJV language model: causal ToCa vs full causal attention", ""]
    lines += [", ".join(f"{k}: {v}" for k, v in header.items()), ""]
    config_line = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    lines += [f"Config: {config_line}", ""]
    lines += ["| model | params | valid bpc | train wall | train chars/s | generation chars/s (short / after "
              f"{config.long_context}) | decoding state after {config.long_context} | peak memory: train step / "
              f"forward over {config.long_context} |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        lines.append(
            f"| {run.name} | {run.params / 1e6:.2f} M | **{run.valid_bpc:.3f}** | {run.train_seconds / 60:.1f} min "
            f"| {run.train_tokens_per_s:.0f} | {run.generate_tokens_per_s:.0f} / {run.long_generate_tokens_per_s:.0f} "
            f"| {run.decoding_state_bytes / 2**20:.2f} MiB | {run.train_peak_bytes / 2**20:.0f} MiB / "
            f"{run.long_forward_peak_bytes / 2**20:.0f} MiB |"
        )
    lines += ["", "Training bpc (mean over each logging window):", ""]
    lines += ["| step | " + " | ".join(run.name for run in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for i, (step, _) in enumerate(runs[0].curve):
        lines.append(f"| {step} | " + " | ".join(f"{run.curve[i][1]:.3f}" for run in runs) + " |")
    for run in runs:
        lines += ["", f"Sample from {run.name} (temperature 0.8, step decoder):", "", "```", run.sample, "```"]
    return "\n".join(lines) + "\n"


def run(config: Config, out: Path, verses: list[tuple[str, str]]) -> list[Run]:
    """Train and measure both models on ``verses`` ((book, text) pairs); write the report to ``out``."""
    corpus = make_corpus(verses)
    print(f"{len(corpus.train):,} training and {len(corpus.valid):,} validation characters, "
          f"{len(corpus.alphabet)} symbols")  # fmt: skip
    data = batches(corpus, config)
    runs, models = [], {}
    for name, clusters in ((f"ToCa M={config.clusters}", config.clusters), ("full attention", 0)):
        torch.manual_seed(config.seed)
        model = CharLM(config, len(corpus.alphabet), clusters)
        result = Run(name, clusters, sum(p.numel() for p in model.parameters()))
        train(model, data, config, print, result)
        measure(model, corpus, config, result, print)
        runs.append(result)
        models[name] = model
    out.mkdir(parents=True, exist_ok=True)
    header = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "train chars": len(corpus.train),
        "valid chars": len(corpus.valid),
        "validation books": " ".join(VALIDATION_BOOKS),
    }
    text = report(runs, config, header)
    (out / "results.md").write_text(text)
    payload = {"header": header, "config": dataclasses.asdict(config), "runs": [dataclasses.asdict(r) for r in runs]}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "samples.txt").write_text("\n\n".join(f"{r.name}:\n{r.sample}" for r in runs) + "\n")
    for r in runs:  # the trained weights, e.g. for more pictures or for sampling: CharLM(config, V, M)
        torch.save(models[r.name].state_dict(), out / f"{'toca' if r.clusters else 'full'}.pt")
    picture = cluster_picture(models[runs[0].name], corpus, out / "assignments.png")
    print(text)
    print("wrote", ", ".join(str(p) for p in (out / "results.md", out / "results.json", picture) if p))
    return runs


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/lm_demo"))
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(dataclasses.replace(Config(), steps=args.steps), args.out, read_bible())


if __name__ == "__main__":
    main()
