"""PaCa-ViT's clustering teacher: the ConvMixer-FPN CNN that provides one assignment per stage.

It is a configuration of the core's 2-D teacher, :class:`tocalib.providers.Conv2dTeacher` (kernel 7,
blurred stride-2 transitions), which is PaCaViT@4307018 paca_vit.py's ``PaCaTeacher_ConvMixer`` with the
same module names, so its keys, shapes and outputs are those of the official checkpoints. It reads the
backbone's stem output (as tokens, with its size) and returns, per stage i,

* ``assignments[i]``: a soft :class:`tocalib.Assignment` (B, M_i, H_i·W_i), a softmax over the positions,
  fed to **every** block of stage i (None where M_i = 0);
* ``features[i]``: (B, H_i·W_i, C_i), the bottom-up ConvMixer outputs, which the backbone adds to its
  stage output before the stage norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tocalib.providers import Conv2dTeacher

__all__ = ["ConvMixerFPNTeacher"]


class ConvMixerFPNTeacher(Conv2dTeacher):
    """PaCa's ConvMixer-FPN clustering teacher.

    Args:
        embed_dims: channels C_i per level; level 1 must match the stem output.
        depths: ConvMixer layers per level (2,2,2,2 for Tiny/Small, 2,2,4,2 for Base).
        num_clusters: M_i per level; 0 builds no ``to_clusters`` layer and yields no assignment.
        kernel_size: depthwise kernel of the ConvMixer layers.
        device, dtype: PyTorch's factory kwargs.
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_clusters: Sequence[int],
        kernel_size: int = 7,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(embed_dims, depths, num_clusters, kernel_size, stride=2, blur=True, device=device, dtype=dtype)
