"""PVTv2 and Swin baselines: params and fvcore MACs at 224² against the published numbers, shapes, windows;
and a smoke test of the benchmark script."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from benchmarks import bench, common
from tocalib.flops import count_macs
from tocalib.models import create_model
from tocalib.models.pvt_v2 import SpatialReductionAttention
from tocalib.models.swin import _merge_windows, _relative_position_index, _shift_mask, _windows

PUBLISHED = {
    # name: (params in M, GMACs at 224², both to the published rounding of one decimal)
    "pvt_v2_b0": (3.7, 0.6),  # the paper's table says 3.4M; its released b0 configuration (built here) has 3.67M
    "pvt_v2_b1": (14.0, 2.1),
    "pvt_v2_b2": (25.4, 4.0),
    "pvt_v2_b2_li": (22.6, 3.9),
    "swin_tiny_patch4_window7_224": (28.3, 4.5),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_and_macs_match_published(name: str) -> None:
    model = create_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, torch.ones(1, 3, 224, 224))
    assert (round(params / 1e6, 1), round(macs / 1e9, 1)) == PUBLISHED[name]


SMALL = {  # cheap variants with every code path of the full models (shifted windows, linear SRA, padding)
    "pvt_v2_b0": {},
    "pvt_v2_b2_li": {"embed_dims": (16, 32, 40, 64), "depths": (1, 1, 1, 1)},
    "swin_tiny_patch4_window7_224": {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4)},
}


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("size", [(64, 64), (100, 130)])
def test_forward_shapes(name: str, size: tuple[int, int]) -> None:
    classifier = create_model(name, num_classes=10, **SMALL[name]).eval()
    backbone = create_model(name, features_only=True, **SMALL[name]).eval()
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert classifier(images).shape == (2, 10)
        maps = backbone(images)
    assert [m.shape[1] for m in maps] == backbone.feature_info.channels()
    for i, feature in enumerate(maps):
        stride = 2 ** (i + 2)
        assert feature.shape[0] == 2 and feature.shape[2:] == (-(-size[0] // stride), -(-size[1] // stride))


def test_linear_sra_uses_49_keys_whatever_n() -> None:
    attn = SpatialReductionAttention(32, 2, linear=True).eval()
    seen = []
    attn.kv.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    for side in (14, 28):
        attn(torch.randn(1, side * side, 32), (side, side))
    assert seen == [49, 49]


def test_windows_round_trip() -> None:
    x = torch.randn(2, 14, 21, 5)
    windows = _windows(x, 7)
    assert windows.shape == (2, 6, 49, 5)
    assert torch.equal(windows[0, 1], x[0, :7, 7:14].reshape(49, 5))
    assert torch.equal(_merge_windows(windows, 7, 14, 21), x)


def test_relative_position_index_is_a_relative_offset() -> None:
    index = _relative_position_index(3)
    assert index.shape == (9, 9) and int(index.min()) == 0 and int(index.max()) == 24
    assert torch.equal(index.diagonal(), torch.full((9,), 12))  # zero offset is the table's centre row
    assert int(index[0, 8]) == 0 and int(index[8, 0]) == 24  # offsets (-2, -2) and (+2, +2)


def test_shift_mask_separates_only_wrapped_regions() -> None:
    mask = _shift_mask(14, 14, 7, 3)  # 2×2 windows; only the last row/column of windows mixes regions
    assert mask.shape == (4, 49, 49)
    assert torch.all(mask[0] == 0)
    assert torch.all(mask.diagonal(dim1=1, dim2=2) == 0)
    region_sizes = {1: (4 * 7, 3 * 7), 2: (4 * 7, 3 * 7), 3: (16, 12, 12, 9)}
    for window, sizes in region_sizes.items():
        same = (mask[window] == 0).float()
        assert sorted(same.sum(1).unique().int().tolist()) == sorted(set(sizes))


def test_bench_quick_runs_end_to_end(tmp_path, monkeypatch) -> None:
    tuned = []  # the heap part's allocator setting would stay for the rest of the test process: stubbed
    monkeypatch.setattr(bench, "tune_cpu_allocator", lambda: tuned.append(1) or True)
    threads = torch.get_num_threads()
    try:  # one thread: a busy 2-core CI machine stalls small multi-threaded ops
        parts = "heap,goals,layers,models,roof,profile,model_profile"  # heap named first, run last
        goals = bench.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--parts", parts])
    finally:
        torch.set_num_threads(threads)
    report = (tmp_path / "bench.md").read_text()
    assert "ToCa M=100" in report and "pvt_v2_b0" in report and "matmul" in report
    assert tuned == [1] and "| 1 | heap kept | 64 |" in report
    payload = json.loads((tmp_path / "bench.json").read_text())
    kept = [c["config"].endswith(bench.KEPT) for c in payload["cells"]]
    assert any(kept) and kept == sorted(kept)  # the heap part's cells come after all others
    assert [t["name"] for t in payload["targets"]] == [g.name for g in goals]
    layer_cells = {(c["config"], c["size"], c["method"]): c["seconds"] for c in payload["cells"]}
    floors = {key: t for key, t in layer_cells.items() if key[2] == bench.FLOOR}
    assert len(floors) == 4  # N = 64 and 256, each with glibc's default and with the heap kept
    for (config, size, _), floor in floors.items():  # its kernels alone take less than the whole layer
        assert 0 < floor < layer_cells[config, size, "ToCa M=100"]
        assert floor < layer_cells[config, size, bench.MATH_FLOOR]  # GELU and softmax add to it
    measured = [c for c in payload["cells"] if c["skipped"] is None]
    assert measured and all(c["seconds"] > 0 and (c["peak_bytes"] or 0) >= 0 for c in measured)
    values = {g.name: g.value for g in goals if g.value is not None}
    assert values and all(math.isfinite(v) for v in values.values())
    assert all(v > 0 for name, v in values.items() if "exponent" not in name)  # ratios of measured times
    for goal in goals:  # the report's row of each target carries its verdict
        (row,) = [line for line in report.splitlines() if line.startswith(f"| {goal.name} |")]
        assert row.endswith(f"| {goal.verdict} |")


@pytest.mark.parametrize("name", ["pvt_v2_b0", "swin_tiny_patch4_window7_224"])
def test_pretrained_is_refused_with_a_reason(name: str) -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model(name, pretrained=True)


@pytest.mark.parametrize("name", ["pacavit_tiny_p2cconv_100_0", "pvt_v2_b0", "swin_tiny_patch4_window7_224"])
@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"in_chans": 0}, ValueError, "in_chans must be >= 1, got 0"),
        ({"num_classes": -1}, ValueError, "num_classes must be >= 0, got -1"),
        ({"in_chans": 2.5}, TypeError, "in_chans must be an int, got float 2.5"),
    ],
)
def test_image_models_name_a_bad_channel_or_class_count(name: str, overrides: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        create_model(name, **overrides)


def test_pvt_v2_says_when_an_image_is_too_small_for_its_spatial_reduction() -> None:
    model = create_model("pvt_v2_b0", num_classes=0).eval()
    with pytest.raises(ValueError, match="a 8×5 feature map is smaller than this stage's spatial-reduction ratio 8"):
        model(torch.randn(1, 3, 31, 17))
    assert model(torch.randn(1, 3, 29, 29)).isfinite().all()


def test_bench_heap_part_skips_where_the_allocator_is_left_alone(monkeypatch) -> None:
    """Where tune_cpu_allocator changes nothing (not glibc, or a preloaded allocator), part g measures nothing and
    says why in the training table; its targets read N/A."""
    monkeypatch.setattr(bench, "tune_cpu_allocator", lambda: False)
    with tqdm(disable=True) as bar:
        cells = bench.bench_heap(bench.QUICK, bar)
    (cell,) = cells
    assert cell.seconds is None and "not glibc" in cell.skipped
    goals = bench.goal_targets(cells, bench.FULL)
    report = bench.markdown(cells, goals, {})
    assert "| allocator | | heap kept | skipped: not glibc, or an allocator in LD_PRELOAD | | | |" in report
    assert all(t.value is None for t in goals)


def test_kernel_floor_counts_the_products_apart_from_the_pointwise_math_and_nothing_else() -> None:
    x = torch.randn(64, 64, requires_grad=True)
    plain = common.kernel_floor(lambda: (x.exp() + 1).sum().backward(), reps=1)
    assert (plain.kernels, plain.math) == (0.0, 0.0) and plain.call > 0.0
    softmax = common.kernel_floor(lambda: F.gelu(x).softmax(-1).sum().backward(), reps=1)
    assert softmax.kernels == 0.0 and softmax.math > 0.0  # GELU and softmax, forward and backward
    product = common.kernel_floor(lambda: (x @ x).sum().backward(), reps=2)
    assert product.kernels > 0.0 and product.math == 0.0  # mm forward, two in backward
    kernels, with_math = product.scaled(2 * product.call)  # the same shares of a call twice as long
    assert kernels == with_math == pytest.approx(2 * product.kernels)
    with pytest.raises(ValueError, match="reps >= 1"):
        common.kernel_floor(lambda: None, reps=0)


def test_kernel_floor_replays_only_operators_that_write_nothing_they_are_given() -> None:
    """Every floor operator is an out-of-place overload (its schema writes no argument), and a replay of a recorded
    call (here a Linear, LayerNorm, GELU and softmax, forward and backward) leaves every recorded input as it was."""
    ops = common.KERNELS | common.POINTWISE_MATH
    assert not [op for op in ops if any(a.alias_info and a.alias_info.is_write for a in op._schema.arguments)]
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU())
    x = torch.randn(4, 8, requires_grad=True)
    recorder = common._FloorRecorder()
    with recorder:
        layer(x).softmax(-1).pow(2).sum().backward()
    recorded = {str(func) for func, _, _ in recorder.calls}
    forward = {"addmm", "native_layer_norm", "gelu", "_softmax"}
    backward = {"mm", "native_layer_norm_backward", "gelu_backward", "_softmax_backward_data"}
    assert recorded == {f"aten.{name}.default" for name in forward | backward}
    inputs = [t for _, args, kwargs in recorder.calls for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
    before = [t.clone() for t in inputs]
    kernels, pointwise = common._replay(recorder.calls)
    assert kernels > 0.0 and pointwise > 0.0
    assert all(torch.equal(t, value) for t, value in zip(inputs, before, strict=True))
