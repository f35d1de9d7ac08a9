"""tocalib: token-to-cluster attention (ToCa) layers, after PaCa-ViT (CVPR 2023)."""

from tocalib.attention import ToCaAttention, ToCaIntermediates
from tocalib.clustering import (
    Clustering,
    Conv1dClustering,
    Conv2dClustering,
    HardClustering,
    LinearClustering,
    MlpClustering,
    build_clustering,
    list_clusterings,
    register_clustering,
)
from tocalib.compat import ToCaMultiheadAttention

__all__ = [
    "Clustering",
    "Conv1dClustering",
    "Conv2dClustering",
    "HardClustering",
    "LinearClustering",
    "MlpClustering",
    "ToCaAttention",
    "ToCaIntermediates",
    "ToCaMultiheadAttention",
    "build_clustering",
    "list_clusterings",
    "register_clustering",
]

__version__ = "0.1.0"
