"""Smoke tests of examples/lm_demo.py (tiny config, synthetic verses) and of benchmarks/causal.py --quick."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import causal as bench_causal
from examples import lm_demo as demo

TINY = demo.Config(
    context=32, dim=16, heads=2, depth=2, clusters=4, steps=3, batch_size=2, warmup=1, eval_sequences=2, log_every=2,
    sample_length=8, long_context=64,
)  # fmt: skip


def synthetic_verses() -> list[tuple[str, str]]:
    """Verses of every book the demo holds out, and of two training books (with the prompt's characters)."""
    gen = torch.Generator().manual_seed(0)
    words = ["and", "the", "lord", "said", "unto", "him", "light", "was", "good"]
    books = ["Ge", "Exo", *demo.VALIDATION_BOOKS]
    verses = []
    for i in range(400):
        picks = torch.randint(0, len(words), (8,), generator=gen).tolist()
        verses.append((books[i % len(books)], " ".join(words[j] for j in picks).capitalize() + ", said God."))
    return verses


def test_the_corpus_holds_out_whole_books_and_round_trips():
    verses = synthetic_verses()
    corpus = demo.make_corpus(verses)
    valid = {text for book, text in verses if book in demo.VALIDATION_BOOKS}
    train_text = corpus.decode(corpus.train)
    assert not any(text in train_text.splitlines() for text in valid)
    assert set(corpus.decode(corpus.valid).splitlines()) == valid
    assert corpus.decode(corpus.encode("And the lord.")) == "And the lord."
    with pytest.raises(ValueError, match="not in the text"):
        demo.make_corpus(verses, ("Ge", "NoSuchBook"))


def test_the_step_decoder_gives_the_parallel_forward_for_both_models():
    corpus = demo.make_corpus(synthetic_verses())
    ids = corpus.train[:40].unsqueeze(0)
    for clusters in (4, 0):
        torch.manual_seed(0)
        model = demo.CharLM(TINY, len(corpus.alphabet), clusters).eval()
        parallel, _ = model(ids)
        logits, caches = model(ids[:, :25], [])
        steps = [logits]
        for t in range(25, 40):
            logits, caches = model(ids[:, t : t + 1], caches)
            steps.append(logits)
        torch.testing.assert_close(torch.cat(steps, 1), parallel, atol=1e-5, rtol=1e-5)


def test_the_demo_trains_both_models_and_writes_its_report(tmp_path):
    runs = demo.run(TINY, tmp_path, synthetic_verses())
    assert [r.clusters for r in runs] == [4, 0]
    for r in runs:
        assert 0 < r.valid_bpc < 10 and len(r.curve) == 2 and r.sample.startswith("And God said, ")
        assert r.train_tokens_per_s > 0 and r.generate_tokens_per_s > 0 and r.train_peak_bytes > 0
    toca, full = runs
    assert toca.decoding_state_bytes < full.decoding_state_bytes  # M entries against 64 cached positions
    report = (tmp_path / "results.md").read_text()
    assert "ToCa M=4" in report and "full attention" in report
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["config"]["clusters"] == 4 and len(payload["runs"]) == 2


def test_the_causal_benchmark_measures_and_predicts_every_cell(tmp_path):
    threads = torch.get_num_threads()
    try:
        cells, decoding, goals = bench_causal.main(
            ["--quick", "--threads", "1", "--out", str(tmp_path), "--budget", "0"]
        )
    finally:
        torch.set_num_threads(threads)
    by_mode = {mode: [c for c in cells if c.mode == mode] for mode in ("training", "inference")}
    for rows in by_mode.values():
        assert [c.tokens for c in rows] == list(bench_causal.QUICK.tokens)
        measured, predicted = rows[:2], rows[2:]  # a zero budget: every cell the fit can predict is predicted
        assert not any(c.peer_predicted for c in measured) and all(c.peer_predicted for c in predicted)
        assert all(c.toca_macs == bench_causal.toca_layer(bench_causal.QUICK).macs(c.tokens) for c in rows)
        assert all(c.peer_macs == bench_causal.peer_macs(c.tokens, 32) for c in rows)
    assert [row.position for row in decoding] == list(bench_causal.QUICK.positions)
    assert decoding[0].state_bytes == decoding[1].state_bytes < decoding[1].kv_cache_bytes
    assert (tmp_path / "causal.md").exists() and json.loads((tmp_path / "causal.json").read_text())["cells"]
    assert goals == []  # the quick sizes reach no target's N


def test_the_sdpa_decoder_peer_is_the_sdpa_layer_run_incrementally():
    torch.manual_seed(0)
    layer = bench_causal.SdpaCausalSelfAttention(32, 4).eval()
    x = torch.randn(2, 20, 32)
    decoder = bench_causal.SdpaDecoder(layer, 20, batch=2)
    steps = [decoder.step(x[:, :7]), *(decoder.step(x[:, t : t + 1]) for t in range(7, 20))]
    torch.testing.assert_close(torch.cat(steps, 1), layer(x), atol=1e-5, rtol=1e-5)
