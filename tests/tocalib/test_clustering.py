"""The clustering registry and protocol."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from tocalib import (
    Clustering,
    HardClustering,
    LinearClustering,
    ToCaAttention,
    build_clustering,
    list_clusterings,
    register_clustering,
)


def test_the_built_in_clusterings_are_registered():
    assert {"linear", "mlp", "conv1d", "conv2d", "hard"} <= set(list_clusterings())


def test_paca_state_dict_names_and_shapes_of_the_conv2d_and_mlp_clusterings():
    conv = ToCaAttention(96, 2, 100, clustering="conv2d").state_dict()
    assert {k: tuple(v.shape) for k, v in conv.items() if k.startswith("clustering.")} == {
        "clustering.clustering.0.weight": (96, 1, 7, 7),
        "clustering.clustering.0.bias": (96,),
        "clustering.clustering.2.weight": (96, 96, 1, 1),
        "clustering.clustering.2.bias": (96,),
        "clustering.clustering.4.weight": (100, 96, 1, 1),
    }
    mlp = ToCaAttention(96, 2, 100, clustering="mlp").state_dict()
    assert {k: tuple(v.shape) for k, v in mlp.items() if k.startswith("clustering.")} == {
        "clustering.clustering.0.weight": (384, 96),
        "clustering.clustering.0.bias": (384,),
        "clustering.clustering.2.weight": (100, 384),
        "clustering.clustering.2.bias": (100,),
    }
    assert {k for k in conv if not k.startswith("clustering.")} == {
        f"{name}.{p}" for name in ("cluster_norm", "q", "k", "v", "proj") for p in ("weight", "bias")
    }


def test_a_user_clustering_registers_by_name_and_plugs_into_the_layer():
    @register_clustering("test_first_tokens")
    class FirstTokens(Clustering):
        """Cluster m is token m (a fixed assignment, to exercise the protocol)."""

        def forward(self, x: Tensor, size=None, key_padding_mask=None) -> Tensor:
            logits = torch.full((x.shape[0], self.num_clusters, x.shape[1]), -1e4)
            logits[:, torch.arange(self.num_clusters), torch.arange(self.num_clusters)] = 0.0
            return logits

        def macs(self, num_tokens: int) -> int:
            return 0

    layer = ToCaAttention(8, 2, 3, clustering="test_first_tokens", cluster_norm=False)
    x = torch.randn(2, 6, 8)
    _, record = layer(x, return_intermediates=True)
    torch.testing.assert_close(record.clusters, x[:, :3])
    with pytest.raises(ValueError, match="already registered"):
        register_clustering("test_first_tokens")(FirstTokens)


def test_a_module_instance_is_used_as_given_and_must_agree_on_m():
    module = LinearClustering(8, 3)
    assert ToCaAttention(8, 2, 3, clustering=module).clustering is module
    with pytest.raises(ValueError, match="num_clusters=3 but the layer has num_clusters=4"):
        ToCaAttention(8, 2, 4, clustering=module)
    with pytest.raises(ValueError, match="cannot apply to a module instance"):
        build_clustering(module, 8, 3, kernel_size=3)


def test_a_clustering_that_returns_the_wrong_shape_is_reported():
    class Wrong(LinearClustering):
        def forward(self, x, size=None, key_padding_mask=None):
            return super().forward(x)[:, :, :-1]

    with pytest.raises(ValueError, match=r"logits of shape \(2, 3, 4\), expected \(B, M, N\) = \(2, 3, 5\)"):
        ToCaAttention(8, 2, 3, clustering=Wrong(8, 3))(torch.randn(2, 5, 8))


def test_clustering_arguments_are_checked():
    with pytest.raises(ValueError, match="kernel_size must be a positive odd number, got 4"):
        build_clustering("conv2d", 8, 3, kernel_size=4)
    with pytest.raises(ValueError, match="num_clusters must be >= 1"):
        LinearClustering(8, 0)
    with pytest.raises(ValueError, match="scatter_backend must be one of"):
        HardClustering(8, 3, scatter_backend="numpy")


def test_hard_clustering_takes_its_logits_from_any_base():
    hard = HardClustering(8, 3, base="conv1d", kernel_size=3)
    assert hard.hard and hard.base.kernel_size == 3
    assert hard.macs(10) == hard.base.macs(10)
