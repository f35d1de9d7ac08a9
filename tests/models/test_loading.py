"""The official checkpoint layout (PaCaViT@4307018 paca_vit.py, its module tree) and load_official_state_dict.

The expected keys and shapes are generated here from the official module tree's key list, independently of the model
code, and anchored by the official models' tensor counts (Tiny 239, Small-teacher 555).
"""

from __future__ import annotations

import pytest
import torch

from tocalib.models import StateDictMismatchError, create_model, list_models, load_official_state_dict

Layout = dict[str, tuple[int, ...]]

TINY = dict(dims=(96, 192, 320, 384), depths=(2, 2, 4, 2))
SMALL = dict(dims=(96, 192, 320, 384), depths=(3, 3, 10, 3))
BASE = dict(dims=(96, 192, 384, 512), depths=(3, 3, 18, 3))
# PaCaViT@4307018 paca_vit.py `_arch_settings`, one row per registered name
SPEC: dict[str, dict] = {
    "pacavit_tiny_p2cconv_100_0": dict(TINY, clusters=(100, 100, 100, 0)),
    "pacavit_small_p2cconv_100_0": dict(SMALL, clusters=(100, 100, 100, 0)),
    "pacavit_small_p2cmlp_100_0": dict(SMALL, clusters=(100, 100, 100, 0), clustering="mlp"),
    "pacavit_base_p2cconv_100_0": dict(BASE, clusters=(100, 100, 100, 0)),
    "pacavit_convmixer_tiny_100": dict(TINY, depths=(2, 2, 2, 2), clusters=(100,) * 4, teacher=(2, 2, 2, 2)),
    "pacavit_convmixer_small_100": dict(SMALL, depths=(3, 3, 7, 3), clusters=(100,) * 4, teacher=(2, 2, 2, 2)),
    "pacavit_convmixer_base_100": dict(BASE, depths=(3, 3, 16, 3), clusters=(100,) * 4, teacher=(2, 2, 4, 2)),
    "pacavit_small_p2cconv_2_0": dict(SMALL, clusters=(2, 2, 2, 0)),
    "pacavit_small_p2cconv_49_0": dict(SMALL, clusters=(49, 49, 49, 0)),
    "pacavit_small_p2cconv_49_100": dict(SMALL, clusters=(49, 64, 81, 100)),
    "pacavit_small_p2cconv_100_49": dict(SMALL, clusters=(100, 81, 64, 49)),
    "pacavit_small_p2cconv_100": dict(SMALL, clusters=(100,) * 4),
    "pacavit_small_p2cconv_100_blockwise": dict(SMALL, clusters=(100,) * 4, every=(1, 1, 1, 1)),
}


def official_layout(
    dims: tuple[int, ...],
    depths: tuple[int, ...],
    clusters: tuple[int, ...],
    clustering: str = "conv",
    every: tuple[int, ...] = (0, 0, 0, 0),
    teacher: tuple[int, ...] | None = None,
    num_classes: int = 1000,
) -> Layout:
    """The official state-dict keys → shapes, written from PaCaViT@4307018 paca_vit.py (its module tree)."""
    shapes: Layout = {}

    def linear(p: str, cin: int, cout: int) -> None:
        shapes.update({f"{p}.weight": (cout, cin), f"{p}.bias": (cout,)})

    def conv(p: str, cin: int, cout: int, k: int, groups: int = 1, bias: bool = True) -> None:
        shapes[f"{p}.weight"] = (cout, cin // groups, k, k)
        if bias:
            shapes[f"{p}.bias"] = (cout,)

    def norm(p: str, c: int) -> None:
        shapes.update({f"{p}.weight": (c,), f"{p}.bias": (c,)})

    def batchnorm(p: str, c: int) -> None:
        norm(p, c)
        shapes.update({f"{p}.running_mean": (c,), f"{p}.running_var": (c,), f"{p}.num_batches_tracked": ()})

    def convmixer(p: str, c: int) -> None:
        conv(f"{p}.0.fn.0", c, c, 7, groups=c)
        batchnorm(f"{p}.0.fn.2", c)
        conv(f"{p}.1", c, c, 1)
        batchnorm(f"{p}.3", c)

    conv("patch_embed.proj.0", 3, dims[0] // 2, 3)
    conv("patch_embed.proj.1", dims[0] // 2, dims[0], 3)
    norm("patch_embed.norm", dims[0])
    for i, (c, m) in enumerate(zip(dims, clusters, strict=True)):
        for j in range(depths[i]):
            p = f"stage{i + 1}.{j}"
            norm(f"{p}.norm1_before", c)
            norm(f"{p}.norm2_before", c)
            if m:
                norm(f"{p}.attn.cluster_norm", c)
            onsite = j == 0 or every[i] == 1 or (every[i] >= 2 and j % every[i] == 0)
            if m and teacher is None and onsite:
                q = f"{p}.attn.clustering.clustering"
                if clustering == "conv":
                    conv(f"{q}.0", c, c, 7, groups=c)
                    conv(f"{q}.2", c, c, 1)
                    conv(f"{q}.4", c, m, 1, bias=False)
                else:
                    linear(f"{q}.0", c, 4 * c)
                    linear(f"{q}.2", 4 * c, m)
            for name in ("q", "k", "v", "proj"):
                linear(f"{p}.attn.{name}", c, c)
            linear(f"{p}.mlp.fc1", c, 4 * c)
            conv(f"{p}.mlp.dwconv.dwconv", 4 * c, 4 * c, 3, groups=4 * c)
            linear(f"{p}.mlp.fc2", 4 * c, c)
        norm(f"norm{i + 1}", c)
        if i < 3:
            conv(f"transition{i + 1}.proj", c, dims[i + 1], 3)
            norm(f"transition{i + 1}.norm", dims[i + 1])
        if teacher is not None:
            t = "paca_teacher"
            for j in range(teacher[i]):
                convmixer(f"{t}.block{i + 1}.{j}", c)
            if i < 3:
                shapes[f"{t}.transition{i + 1}.0.blur_filter"] = (c, 1, 3, 3)  # one kernel per input channel
                conv(f"{t}.transition{i + 1}.0.conv", c, dims[i + 1], 3)
                batchnorm(f"{t}.transition{i + 1}.2", dims[i + 1])
                conv(f"{t}.lateral{i + 1}.0", dims[i + 1], c, 1)
                batchnorm(f"{t}.lateral{i + 1}.2", c)
                convmixer(f"{t}.fpn{i + 1}", c)
            if m:
                conv(f"{t}.to_clusters{i + 1}", c, m, 1)
    if num_classes:
        linear("head", dims[-1], num_classes)
    return shapes


def layout_of(model: torch.nn.Module) -> Layout:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def synthetic_checkpoint(layout: Layout, seed: int = 0) -> dict[str, torch.Tensor]:
    """An official-format state dict with random values (BN variances positive, fixed blur kernel)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("blur_filter"):
            taps = torch.tensor([1.0, 2, 1])
            state[key] = (torch.outer(taps, taps) / 16).expand(shape).clone()
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


def test_the_spec_table_covers_every_registered_paca_model():
    assert sorted(SPEC) == list_models("pacavit_*")


@pytest.mark.parametrize("name", sorted(SPEC))
def test_every_model_has_exactly_the_official_keys_and_shapes(name):
    with torch.device("meta"):
        model = create_model(name)
    expected = official_layout(**SPEC[name])
    got = layout_of(model)
    assert sorted(got.keys() - expected.keys()) == [], "keys the official layout does not have"
    assert sorted(expected.keys() - got.keys()) == [], "official keys the model lacks"
    assert {k: v for k, v in got.items() if expected[k] != v} == {}


def test_the_layout_generator_reproduces_the_spec_tensor_counts():
    assert len(official_layout(**SPEC["pacavit_tiny_p2cconv_100_0"])) == 239
    assert len(official_layout(**SPEC["pacavit_convmixer_small_100"])) == 555


@pytest.mark.parametrize("name", ["pacavit_tiny_p2cconv_100_0", "pacavit_convmixer_tiny_100"])
def test_a_synthetic_official_checkpoint_loads_every_tensor_and_fixes_the_outputs(name):
    checkpoint = synthetic_checkpoint(official_layout(**SPEC[name]))
    x = torch.randn(1, 3, 64, 96)
    outputs = []
    for seed in (1, 2):  # two differently initialised models end up identical
        torch.manual_seed(seed)
        model = create_model(name)
        report = load_official_state_dict(model, checkpoint)
        assert sorted(report.loaded) == sorted(checkpoint)
        for key, value in model.state_dict().items():
            assert torch.equal(value, checkpoint[key]), key
        with torch.no_grad():
            outputs.append(model.eval()(x, return_assignments=True))
    (logits_a, maps_a), (logits_b, maps_b) = outputs
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)
    for a, b in zip(maps_a, maps_b, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.fixture(scope="module")
def tiny_checkpoint() -> dict[str, torch.Tensor]:
    return synthetic_checkpoint(official_layout(**SPEC["pacavit_tiny_p2cconv_100_0"]))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "meta": {"epoch": 3}},
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["raw", "state_dict", "model", "state_dict+module", "model+module"],
)
def test_all_official_wrappers_and_prefixes_load(wrap, tiny_checkpoint):
    model = create_model("pacavit_tiny_p2cconv_100_0")
    report = load_official_state_dict(model, wrap(tiny_checkpoint))
    assert len(report.loaded) == 239
    assert torch.equal(model.head.weight, tiny_checkpoint["head.weight"])


def test_an_mmengine_detection_checkpoint_loads_its_backbone_and_ignores_the_rest(tiny_checkpoint):
    body = {f"backbone.{k}": v for k, v in tiny_checkpoint.items() if not k.startswith("head.")}
    extra = {"neck.lateral_convs.0.conv.weight": torch.zeros(256, 96, 1, 1), "rpn_head.rpn_cls.bias": torch.zeros(3)}
    model = create_model("pacavit_tiny_p2cconv_100_0", features_only=True)
    report = load_official_state_dict(model, {"meta": {}, "state_dict": {**body, **extra}})
    assert sorted(report.ignored) == sorted(extra)
    assert len(report.loaded) == 237
    assert torch.equal(model.stage1[0].attn.q.weight, tiny_checkpoint["stage1.0.attn.q.weight"])


def test_a_headless_model_ignores_the_classifier_head(tiny_checkpoint):
    model = create_model("pacavit_tiny_p2cconv_100_0", num_classes=0)
    report = load_official_state_dict(model, tiny_checkpoint)
    assert report.ignored == ["head.bias", "head.weight"]


def test_a_checkpoint_file_loads_by_path_and_through_create_model(tmp_path, tiny_checkpoint):
    path = tmp_path / "IMNET_224_pacavit_tiny_p2cconv_100_0.pth"
    torch.save({"state_dict": tiny_checkpoint}, path)
    model = create_model("pacavit_tiny_p2cconv_100_0", pretrained=str(path))
    assert torch.equal(model.norm4.weight, tiny_checkpoint["norm4.weight"])
    assert len(load_official_state_dict(create_model("pacavit_tiny_p2cconv_100_0"), path).loaded) == 239


def test_a_missing_checkpoint_file_is_an_error_not_a_silent_skip(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("pacavit_tiny_p2cconv_100_0", pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="no download URLs"):
        create_model("pacavit_tiny_p2cconv_100_0", pretrained=True)


def test_strict_loading_lists_missing_unexpected_and_mismatched_keys(tiny_checkpoint):
    bad = dict(tiny_checkpoint)
    del bad["stage2.1.mlp.fc2.bias"]
    bad["stage9.0.attn.q.weight"] = torch.zeros(3, 3)
    bad["norm1.weight"] = torch.zeros(95)
    model = create_model("pacavit_tiny_p2cconv_100_0")
    before = model.head.weight.clone()
    with pytest.raises(StateDictMismatchError) as err:
        load_official_state_dict(model, bad)
    message = str(err.value)
    assert "missing" in message and "stage2.1.mlp.fc2.bias" in message
    assert "unexpected" in message and "stage9.0.attn.q.weight" in message
    assert "shape mismatch" in message and "norm1.weight: checkpoint [95] vs model [96]" in message
    assert torch.equal(model.head.weight, before), "a failed strict load must copy nothing"


def test_non_strict_loading_reports_what_it_left_out(tiny_checkpoint):
    bad = {k: v for k, v in tiny_checkpoint.items() if k != "norm1.bias"}
    report = load_official_state_dict(create_model("pacavit_tiny_p2cconv_100_0"), bad, strict=False)
    assert report.missing == ["norm1.bias"] and len(report.loaded) == 238


def test_a_head_with_another_class_count_is_a_shape_mismatch(tiny_checkpoint):
    with pytest.raises(StateDictMismatchError, match=r"head.weight: checkpoint \[1000, 384\] vs model \[10, 384\]"):
        load_official_state_dict(create_model("pacavit_tiny_p2cconv_100_0", num_classes=10), tiny_checkpoint)


def test_the_200_cluster_downstream_override_needs_the_explicit_skip_and_names_each_key(tiny_checkpoint):
    model = create_model("pacavit_tiny_p2cconv_100_0", features_only=True, num_clusters=(200, 200, 200, 0))
    with pytest.raises(StateDictMismatchError, match="skip_mismatched_clusters=True"):
        load_official_state_dict(model, tiny_checkpoint)
    expected = [f"stage{i}.0.attn.clustering.clustering.4.weight" for i in (1, 2, 3)]
    fresh = model.stage1[0].attn.clustering.clustering[4].weight.clone()
    with pytest.warns(UserWarning, match=r"stage1\.0\.attn\.clustering\.clustering\.4\.weight"):
        report = load_official_state_dict(model, tiny_checkpoint, skip_mismatched_clusters=True)
    assert report.skipped_clusters == expected
    assert torch.equal(model.stage1[0].attn.clustering.clustering[4].weight, fresh)
    assert torch.equal(
        model.stage1[0].attn.clustering.clustering[2].weight,
        tiny_checkpoint["stage1.0.attn.clustering.clustering.2.weight"],
    )
    assert len(report.loaded) == 239 - 2 - 3  # all but the head and the three cluster convs


def test_the_teacher_cluster_override_skips_the_to_clusters_layers():
    checkpoint = synthetic_checkpoint(official_layout(**SPEC["pacavit_convmixer_tiny_100"]))
    model = create_model("pacavit_convmixer_tiny_100", features_only=True, num_clusters=200)
    with pytest.warns(UserWarning, match="to_clusters"):
        report = load_official_state_dict(model, checkpoint, skip_mismatched_clusters=True)
    assert report.skipped_clusters == sorted(
        f"paca_teacher.to_clusters{i}.{p}" for i in range(1, 5) for p in ("weight", "bias")
    )
    assert torch.equal(
        model.paca_teacher.transition1[0].blur_filter, checkpoint["paca_teacher.transition1.0.blur_filter"]
    )


def test_the_skip_option_never_hides_a_mismatch_outside_the_cluster_layers(tiny_checkpoint):
    bad = dict(tiny_checkpoint, **{"stage1.0.attn.q.weight": torch.zeros(96, 95)})
    with pytest.raises(StateDictMismatchError, match=r"stage1\.0\.attn\.q\.weight"):
        load_official_state_dict(create_model("pacavit_tiny_p2cconv_100_0"), bad, skip_mismatched_clusters=True)


def test_non_tensor_entries_get_a_clear_error():
    with pytest.raises(ValueError, match="not tensors"):
        load_official_state_dict(create_model("pacavit_tiny_p2cconv_100_0"), {"epoch": 3, "arch": "paca"})
