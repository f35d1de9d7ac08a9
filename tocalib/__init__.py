"""tocalib: token-to-cluster attention (ToCa) layers, after PaCa-ViT (CVPR 2023)."""

from tocalib.attention import ToCaAttention, ToCaIntermediates
from tocalib.blocks import ToCaBlock, ToCaStack, cluster_parameter_names
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
from tocalib.pooling import Assignment
from tocalib.providers import (
    AssignmentProvider,
    Conv1dTeacher,
    Conv2dTeacher,
    Provided,
    build_provider,
    list_providers,
    register_provider,
)

__all__ = [
    "Assignment",
    "AssignmentProvider",
    "Clustering",
    "Conv1dClustering",
    "Conv1dTeacher",
    "Conv2dClustering",
    "Conv2dTeacher",
    "HardClustering",
    "LinearClustering",
    "MlpClustering",
    "Provided",
    "ToCaAttention",
    "ToCaBlock",
    "ToCaIntermediates",
    "ToCaMultiheadAttention",
    "ToCaStack",
    "build_clustering",
    "build_provider",
    "cluster_parameter_names",
    "list_clusterings",
    "list_providers",
    "register_clustering",
    "register_provider",
]

__version__ = "0.1.0"
