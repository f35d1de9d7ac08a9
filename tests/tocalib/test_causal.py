"""Causal ToCa: the prefix definition, exact causality, incremental decoding, numerics, compile and costs."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import tocalib._scan as scan
from tocalib import ToCaAttention, ToCaMultiheadAttention
from tocalib.causal import ClusterState, KVCache, causal_cluster_attention
from tocalib.clustering import Clustering
from tocalib.flops import count_macs

CAUSAL_CLUSTERINGS = [("mlp", {}), ("linear", {}), ("conv1d", {"causal": True, "kernel_size": 3})]
PATHS = ["factored", "exact"]


def causal_layer(
    clustering: str | nn.Module = "mlp",
    kwargs: dict | None = None,
    chunk: int = 4,
    cluster_norm: bool = True,
    clusters: int = 4,
    seed: int = 0,
    dim: int = 16,
    heads: int = 2,
) -> ToCaAttention:
    torch.manual_seed(seed)
    layer = ToCaAttention(
        dim, heads, clusters, clustering, clustering_kwargs=kwargs, causal=True, chunk_size=chunk,
        cluster_norm=cluster_norm,
    )  # fmt: skip
    return layer.eval()


def prefix_reference(layer: ToCaAttention, x: Tensor, pad: Tensor | None = None) -> Tensor:
    """The definition: position t's output is the non-causal layer's output at t when run on x[:, :t+1]."""
    layer.causal = False
    try:
        outs = [
            layer(x[:, : t + 1], key_padding_mask=None if pad is None else pad[:, : t + 1])[:, t]
            for t in range(x.shape[1])
        ]
    finally:
        layer.causal = True
    return torch.stack(outs, dim=1)


@contextlib.contextmanager
def scan_settings(path: str = "factored", block: int = scan.BLOCK) -> Iterator[list[str]]:
    """Force the exact or the factored intra-chunk weights and a block size; yields the paths taken."""
    taken: list[str] = []
    choose = scan._weights

    def spy(z: scan._BlockInputs) -> scan.ExactWeights | scan.FactoredWeights:
        weights = choose(z)
        taken.append(type(weights).__name__)
        return weights

    rise = scan.RISE if path == "factored" else -1.0
    with (
        mock.patch.object(scan, "RISE", rise),
        mock.patch.object(scan, "BLOCK", block),
        mock.patch.object(scan, "_weights", spy),
    ):
        yield taken


def random_padding(gen: torch.Generator, b: int, n: int, p: float = 0.3) -> Tensor:
    pad = torch.rand(b, n, generator=gen) < p
    pad[:, 0] = False  # a real first token keeps every real query's prefix non-empty in both layouts
    return pad


@settings(max_examples=30)
@given(
    n=st.integers(1, 23),
    chunk=st.integers(1, 9),
    block=st.sampled_from([4, 8, 1024]),
    spec=st.sampled_from(CAUSAL_CLUSTERINGS),
    cluster_norm=st.booleans(),
    path=st.sampled_from(PATHS),
    seed=st.integers(0, 2**16),
)
def test_the_causal_output_is_the_non_causal_layer_on_the_prefix(n, chunk, block, spec, cluster_norm, path, seed):
    layer = causal_layer(*spec, chunk=chunk, cluster_norm=cluster_norm, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 16, generator=gen)
    pad = random_padding(gen, 2, n)
    with scan_settings(path, block) as taken:
        plain, padded = layer(x), layer(x, key_padding_mask=pad)
    assert set(taken) == ({"FactoredWeights" if path == "factored" else "ExactWeights"} if n > 1 else set())
    torch.testing.assert_close(plain, prefix_reference(layer, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[~pad], prefix_reference(layer, x, pad)[~pad], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(padded).all()  # padded query positions too


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cluster_norm", [True, False])
@pytest.mark.parametrize(("clustering", "kwargs"), CAUSAL_CLUSTERINGS)
def test_the_hand_written_backward_is_autograd_through_the_prefix_definition(
    path, cluster_norm, clustering, kwargs, recompute
):
    """Gradients of every input and parameter, in float64, against autograd through the definition."""
    layer = causal_layer(clustering, kwargs, chunk=3, cluster_norm=cluster_norm).double()
    layer.recompute = recompute
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    pad = random_padding(gen, 2, 13)
    probe = torch.randn(2, 13, 16, dtype=torch.float64, generator=gen) * (~pad).unsqueeze(-1)
    params = [x, *layer.parameters()]
    with scan_settings(path, block=6):  # three blocks with a ragged end
        ours = torch.autograd.grad((layer(x, key_padding_mask=pad) * probe).sum(), params, materialize_grads=True)
    reference = torch.autograd.grad(
        (prefix_reference(layer, x, pad) * probe).sum(), params, allow_unused=True, materialize_grads=True
    )
    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("clustering", "kwargs", "clusters"), [*[(*c, 4) for c in CAUSAL_CLUSTERINGS], ("mlp", {}, 0)])
@pytest.mark.parametrize("cluster_norm", [True, False])
def test_no_output_depends_on_a_later_token(path, clustering, kwargs, clusters, cluster_norm):
    """∂y_t/∂x_s is exactly 0 for every s > t, and not 0 for s ≤ t (so the test can tell a leak from nothing)."""
    layer = causal_layer(clustering, kwargs, chunk=3, clusters=clusters, cluster_norm=cluster_norm)
    x = torch.randn(1, 11, 16, requires_grad=True)
    with scan_settings(path, block=6):
        y = layer(x)
    probe = torch.randn(16)  # a random read-out of y_t, so no dependence can cancel out
    influence = torch.stack(
        [torch.autograd.grad(y[0, t] @ probe, x, retain_graph=True)[0][0].abs().sum(-1) for t in range(11)]
    )  # (t, s)
    future = torch.ones(11, 11, dtype=torch.bool).triu(1)
    assert torch.all(influence[future] == 0)
    assert torch.all(influence[~future] > 0)


@settings(max_examples=25)
@given(
    n=st.integers(1, 30),
    cuts=st.lists(st.integers(1, 29), max_size=4),
    spec=st.sampled_from([*CAUSAL_CLUSTERINGS, ("mlp", {}, 0)]),
    cluster_norm=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_step_over_any_split_equals_the_parallel_forward(n, cuts, spec, cluster_norm, padded, seed):
    clustering, kwargs, *clusters = spec
    layer = causal_layer(
        clustering, kwargs, chunk=4, cluster_norm=cluster_norm, clusters=clusters[0] if clusters else 4
    )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 16, generator=gen)
    pad = random_padding(gen, 2, n) if padded else None
    bounds = [0, *sorted({c for c in cuts if c < n}), n]
    outs, state = [], None
    for lo, hi in itertools.pairwise(bounds):
        out, state = layer.step(x[:, lo:hi], state, key_padding_mask=None if pad is None else pad[:, lo:hi])
        outs.append(out)
    expected = layer(x, key_padding_mask=pad)
    real = torch.ones(2, n, dtype=torch.bool) if pad is None else ~pad
    torch.testing.assert_close(torch.cat(outs, dim=1)[real], expected[real], atol=1e-5, rtol=1e-5)


def test_the_decoding_state_has_a_constant_size_and_the_kv_cache_grows():
    layer = causal_layer("conv1d", {"causal": True, "kernel_size": 3}, clusters=4)
    x = torch.randn(3, 300, 16)
    _, short = layer.step(x[:, :3])
    _, long = layer.step(x[:, 3:], short)
    assert isinstance(long, ClusterState)
    # L (M), k/v/x̄ (M×3C), the window (2×C) in float32, and the window's padding (2 bools)
    assert short.nbytes == long.nbytes == 4 * 3 * (4 + 4 * 3 * 16 + 2 * 16) + 3 * 2
    full = causal_layer(clusters=0)
    _, cache = full.step(x[:, :3])
    _, cache = full.step(x[:, 3:], cache)
    assert isinstance(cache, KVCache) and cache.nbytes == 4 * 3 * 300 * 2 * 16


def test_decoding_states_hold_only_their_own_memory_and_support_beam_search():
    layer = causal_layer("conv1d", {"causal": True, "kernel_size": 3})
    x = torch.randn(3, 200, 16)
    _, state = layer.step(x)
    assert all(t._base is None for t in (state.log_normalizer, state.window, state.window_padding))  # no O(N) views
    assert state.pooled._base is None or state.pooled._base.numel() == state.pooled.numel()
    beams = state.select(torch.tensor([2, 2, 0]))
    new = torch.randn(3, 1, 16)
    y_beams, _ = layer.step(new, beams)
    y_rows, _ = layer.step(new[[0]], state.select(torch.tensor([2])))
    torch.testing.assert_close(y_beams[0], y_rows[0])
    assert state.to(dtype=torch.float64).pooled.dtype == torch.float64 and state.detach().nbytes == state.nbytes


def test_gradients_flow_through_the_decoding_state():
    layer = causal_layer(chunk=3).double()
    x = torch.randn(2, 14, 16, dtype=torch.float64, requires_grad=True)
    first, state = layer.step(x[:, :5])
    second, _ = layer.step(x[:, 5:], state)
    probe = torch.randn(2, 14, 16, dtype=torch.float64)
    params = [x, *layer.parameters()]
    ours = torch.autograd.grad((torch.cat([first, second], 1) * probe).sum(), params, materialize_grads=True)
    parallel = torch.autograd.grad((layer(x) * probe).sum(), params, materialize_grads=True)
    for mine, theirs in zip(ours, parallel, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=1e-9)


class ProjectedClustering(Clustering):
    """A causal clustering made of one linear map; subclasses say what the map reads."""

    causal_safe = True
    causal_lookback = 0

    def __init__(self, dim: int, num_clusters: int) -> None:
        super().__init__(dim, num_clusters)
        self.proj = nn.Linear(dim, num_clusters)

    def macs(self, num_tokens: int) -> int:
        return num_tokens * self.dim * self.num_clusters


class WideLogits(ProjectedClustering):
    """Logits spread over ±100 (a random sign and size per token and cluster): a stress test."""

    def forward(self, x: Tensor, size: object = None, key_padding_mask: Tensor | None = None) -> Tensor:
        return (100 * torch.tanh(3 * self.proj(x))).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cluster_norm", [True, False])
def test_logits_spanning_hundreds_within_a_chunk_stay_finite_and_exact(dtype, cluster_norm):
    torch.manual_seed(0)
    layer = causal_layer(WideLogits(16, 4), chunk=8, cluster_norm=cluster_norm).to(dtype)
    x = torch.randn(2, 40, 16, dtype=dtype, requires_grad=True)
    logits = layer.clustering(x)
    assert logits.amax() > 90 and logits.amin() < -90
    with scan_settings() as taken:  # the rise within a chunk exceeds RISE: the materialised weights
        y = layer(x)
    assert "ExactWeights" in taken
    (grad,) = torch.autograd.grad(y.float().square().sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(grad).all()
    if dtype == torch.float32:
        reference = prefix_reference(layer.double(), x.detach().double())
        torch.testing.assert_close(y.double(), reference, atol=1e-5, rtol=1e-5)


def test_under_autocast_the_scan_keeps_float32():
    layer = causal_layer(chunk=4)
    x = torch.randn(2, 21, 16, requires_grad=True)
    expected = layer(x)
    seen = []
    block_forward = scan._block_forward

    def spy(config: scan.ScanConfig, z: scan._BlockInputs, *args: object) -> scan._BlockForward:
        seen.append((z.q.dtype, torch.is_autocast_enabled("cpu")))
        return block_forward(config, z, *args)

    with torch.autocast("cpu", dtype=torch.bfloat16), mock.patch.object(scan, "_block_forward", spy):
        y = layer(x)
        (grad,) = torch.autograd.grad(y.float().sum(), x)
    assert seen and set(seen) == {(torch.float32, False)}
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=5e-2)  # the projections ran in bfloat16


@pytest.mark.filterwarnings(  # dynamo's own, about how it handles autograd functions
    r"ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning"
)
def test_causal_forward_compiles_into_one_graph_at_a_fixed_length():
    torch._dynamo.reset()
    layer = causal_layer(chunk=4)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 18, 16)
    with torch.no_grad():
        expected = layer(x)  # an eager inference first (it fills the projection cache)
        for _ in range(2):
            torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)  # with autograd on


@pytest.mark.parametrize("n", [3, 40])  # a few positions (projected directly) and many (one folded product)
def test_both_forms_of_the_projection_give_the_prefix_definition(n):
    layer = causal_layer(dim=32, heads=4)
    x = torch.randn(2, n, 32)
    torch.testing.assert_close(layer(x), prefix_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_the_key_bias_is_in_the_graph_with_an_exactly_zero_gradient():
    """k's bias cancels in the softmax over clusters; DDP still needs every parameter in the graph."""
    layer = causal_layer()
    layer(torch.randn(2, 9, 16)).sum().backward()
    assert layer.k.bias.grad is not None and torch.all(layer.k.bias.grad == 0)


@pytest.mark.parametrize("cluster_norm", [True, False])
@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_causal_macs_are_analytic_and_exactly_linear_in_n(cluster_norm, chunk):
    """Measured == analytic, and with N_k = k·chunk (≥ 2), f(N_1) − 2 f(N_2) + f(N_3) = 0 (cost linear in N)."""
    layer = causal_layer(chunk=chunk, cluster_norm=cluster_norm)
    f = []
    for k in (2, 3, 4):
        n = k * chunk
        measured = count_macs(layer, torch.randn(1, n, 16))
        assert measured == layer.macs(n)
        f.append(measured)
    assert f[0] - 2 * f[1] + f[2] == 0 and f[1] > f[0]
    for n in (1, 7):  # one position (the recurrent form), a ragged last chunk
        assert count_macs(layer, torch.randn(1, n, 16)) == layer.macs(n)


def test_the_cost_per_position_has_no_m_c_squared_or_m_t_c_term():
    """Doubling C multiplies the per-position cost by < 4 · (1 + small); doubling M at fixed C and T adds O(M·C)."""
    per_position = {}
    for c, m, t in ((128, 16, 16), (128, 32, 16), (128, 16, 32)):
        layer = ToCaAttention(c, 4, m, "linear", causal=True, chunk_size=t)
        per_position[(c, m, t)] = (layer.macs(64 * t) - layer.macs(32 * t)) / (32 * t)
    base = per_position[(128, 16, 16)]
    # M·C² would add ≥ 16·128² = 262k per position when M doubles; the real growth is O(M·C + T·M).
    assert per_position[(128, 32, 16)] - base < 16 * 128 * 16
    assert per_position[(128, 16, 32)] - base < 16 * 128 * 8  # the T·C and h·M·T terms


def test_causal_full_attention_macs_count_the_pairs_a_causal_kernel_computes():
    layer = causal_layer(clusters=0)
    for n in (1, 9):
        assert count_macs(layer, torch.randn(1, n, 16)) == layer.macs(n)
    assert layer.macs(9) == 4 * 9 * 16 * 16 + 2 * (9 * 10 // 2) * 16


def test_causal_full_attention_takes_sdpas_is_causal_path(multihead_like):
    torch.manual_seed(0)
    layer = ToCaAttention(16, 2, 0, causal=True).eval()
    x = torch.randn(2, 11, 16)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((args[3] if len(args) > 3 else kwargs.get("attn_mask"), args[5] if len(args) > 5 else None))
        return sdpa(*args, **kwargs)

    with mock.patch("tocalib.attention.F.scaled_dot_product_attention", spy):
        y = layer(x)
    assert seen == [(None, True)]  # no explicit (N, N) mask: the fused causal kernel
    mask = nn.Transformer.generate_square_subsequent_mask(11)
    expected, _ = multihead_like(layer)(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cluster_norm", [True, False])
def test_causal_weights_are_per_position_distributions(cluster_norm):
    layer = causal_layer(chunk=4, cluster_norm=cluster_norm)
    x = torch.randn(2, 10, 16)
    y, record = layer(x, return_intermediates=True, need_weights=True)
    assert record.attn_weights.shape == (2, 2, 10, 4)
    torch.testing.assert_close(record.attn_weights.sum(-1), torch.ones(2, 2, 10))
    torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_attention_dropout_in_training_has_exact_gradients(path):
    """gradcheck with a fixed seed inside the function, so that every call draws the same dropout mask."""
    layer = ToCaAttention(8, 2, 3, "linear", causal=True, chunk_size=3, attn_drop=0.3).double().train()
    x = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)

    def seeded(inputs: Tensor) -> Tensor:
        torch.manual_seed(0)
        return layer(inputs)

    with scan_settings(path, block=6):
        assert torch.autograd.gradcheck(seeded, (x,))
        dropped = seeded(x)
    assert not torch.allclose(dropped, layer.eval()(x))  # the dropout did something


def test_the_scan_function_has_exact_gradients_for_every_input_and_the_state():
    torch.manual_seed(0)
    b, n, c, m, h = 1, 9, 4, 3, 2
    f64 = {"dtype": torch.float64, "requires_grad": True}
    q, k, v, x = (torch.randn(b, n, c, **f64) for _ in range(4))
    logits, bias = torch.randn(b, m, n, **f64), torch.randn(c, **f64)
    state = ClusterState(torch.randn(b, m, **f64), torch.randn(b, m, 3 * c, **f64))

    def run(*tensors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, x, logits, bias, log_normalizer, pooled = tensors
        out, _, after = causal_cluster_attention(
            q, k, v, logits, h, tokens=x, eps=1e-3, value_bias=bias, state=ClusterState(log_normalizer, pooled),
            chunk_size=2,
        )  # fmt: skip
        return out, after.log_normalizer, after.pooled

    with scan_settings(block=4):
        assert torch.autograd.gradcheck(run, (q, k, v, x, logits, bias, state.log_normalizer, state.pooled))


def test_the_multihead_drop_in_decodes_with_the_same_state():
    torch.manual_seed(0)
    mha = ToCaMultiheadAttention(16, 2, causal=True, num_clusters=4).eval()
    x = torch.randn(9, 2, 16)  # (L, B, E): batch_first=False
    full, _ = mha(x, x, x, is_causal=True, need_weights=False)
    head, state = mha.step(x[:4])
    tail, _ = mha.step(x[4:], state)
    torch.testing.assert_close(torch.cat([head, tail]), full, atol=1e-5, rtol=1e-5)


def test_step_refuses_what_it_cannot_decode():
    with pytest.raises(ValueError, match="build the layer with causal=True"):
        ToCaAttention(16, 2, 4).step(torch.randn(1, 3, 16))
    layer = causal_layer()
    with pytest.raises(ValueError, match="at least one new position"):
        layer.step(torch.randn(1, 0, 16))
    with pytest.raises(TypeError, match="state must be the ClusterState"):
        layer.step(torch.randn(1, 3, 16), KVCache(torch.zeros(1, 1, 16), torch.zeros(1, 1, 16)))
    _, state = layer.step(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"state has shapes .* \[\(2, 4\), \(2, 4, 48\), None, None\].* \[\(1, 4\)"):
        layer.step(torch.randn(1, 3, 16), state)
    with pytest.raises(ValueError, match="pass the state this layer returned"):
        causal_layer(cluster_norm=False).step(torch.randn(2, 3, 16), state)  # F = 2C there, 3C here
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, C\) .* the new positions of B sequences"):
        layer.step(torch.randn(3, 16))
    no_lookback = WideLogits(16, 4)
    no_lookback.causal_lookback = None
    with pytest.raises(ValueError, match="causal_lookback"):
        causal_layer(no_lookback).step(torch.randn(1, 3, 16))


class MeanOfRealWindow(ProjectedClustering):
    """Logits from the mean of the real tokens among the last three (it reads key_padding_mask)."""

    causal_lookback = 2

    def forward(self, x: Tensor, size: object = None, key_padding_mask: Tensor | None = None) -> Tensor:
        real = torch.ones_like(x[..., 0]) if key_padding_mask is None else (~key_padding_mask).to(x.dtype)
        real = nn.functional.pad(real, (2, 0))  # before the first token: nothing real
        summed = nn.functional.pad(x * real[:, 2:, None], (0, 0, 2, 0)).unfold(1, 3, 1).sum(-1)
        counts = real.unfold(1, 3, 1).sum(-1, keepdim=True).clamp_min(1)
        return self.proj(summed / counts).transpose(1, 2)


def test_a_clustering_that_reads_the_padding_mask_sees_the_same_window_in_step_and_forward():
    layer = causal_layer(MeanOfRealWindow(16, 4), chunk=3).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 16, dtype=torch.float64, generator=gen)
    pad = random_padding(gen, 2, 11, p=0.4)
    expected = layer(x, key_padding_mask=pad)
    torch.testing.assert_close(expected[~pad], prefix_reference(layer, x, pad)[~pad])
    outs, state = [], None
    for lo, hi in ((0, 4), (4, 5), (5, 11)):
        out, state = layer.step(x[:, lo:hi], state, key_padding_mask=pad[:, lo:hi])
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1)[~pad], expected[~pad])


def test_a_float16_causal_layer_takes_a_padding_mask():
    layer = causal_layer().half()
    x = torch.randn(1, 9, 16).half()
    pad = torch.zeros(1, 9, dtype=torch.bool)
    pad[0, :2] = True  # left padding
    y = layer(x, key_padding_mask=pad)
    out, _ = layer.step(x, key_padding_mask=pad)
    assert torch.isfinite(y).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out[~pad], y[~pad], atol=1e-2, rtol=1e-2)


def test_the_attention_weights_are_differentiable_like_the_non_causal_ones():
    layer = causal_layer(chunk=3).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64, requires_grad=True)

    def entropy(inputs: Tensor) -> Tensor:
        _, record = layer(inputs, return_intermediates=True, need_weights=True)
        weights = record.attn_weights
        return -(weights * weights.log()).sum()

    with scan_settings(block=6):
        assert torch.autograd.gradcheck(entropy, (x,))
