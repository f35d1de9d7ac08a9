"""One backbone contract for every registered family: feature_info, pretrained_cfg, forward_features,
forward_head, reset_classifier, features_only / out_indices."""

from __future__ import annotations

import pytest
import torch

from tocalib.models import Backbone, PretrainedCfg, create_model

FAMILIES = ["pacavit_tiny_p2cconv_100_0", "pacavit_convmixer_tiny_100", "pvt_v2_b0", "swin_tiny_patch4_window7_224"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_backbone_reports_its_stage_maps_and_how_its_inputs_are_prepared(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    assert isinstance(model, Backbone) and isinstance(model.pretrained_cfg, PretrainedCfg)
    cfg = model.pretrained_cfg
    assert len(cfg.mean) == len(cfg.std) == cfg.input_size[0] == 3 and 0 < cfg.crop_pct <= 1
    assert getattr(model, cfg.classifier) is model.head
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        maps = model.forward_features(x)
        assert [m.shape[1] for m in maps] == model.feature_info.channels()
        assert [128 // m.shape[-1] for m in maps] == model.feature_info.reductions() == [4, 8, 16, 32]
        assert all(dict(model.named_modules()).get(info.module) is not None for info in model.feature_info)
        assert model(x).shape == (2, 7) and model.num_classes == 7
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and model.num_classes == 3
        model.reset_classifier(0)
        assert model.forward_head(maps[-1]).shape == (2, model.num_features) and model.num_classes == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_features_only_returns_the_chosen_stage_maps(name):
    model = create_model(name, features_only=True, out_indices=(1, 3), num_classes=0).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    channels = model.feature_info.channels()
    assert [m.shape[1] for m in maps] == [channels[1], channels[3]]


@pytest.mark.parametrize("name", ["pvt_v2_b0", "swin_tiny_patch4_window7_224"])
def test_the_baselines_take_stochastic_depth_that_is_off_in_evaluation(name):
    torch.manual_seed(0)
    plain, deep = create_model(name, num_classes=5), create_model(name, num_classes=5, drop_path_rate=0.5)
    deep.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deep.eval()(x), plain.eval()(x))
        deep.train()
        assert not torch.allclose(deep(x), deep(x))
