"""Packed variable-length batches (``cu_seqlens``, as flash-attention's varlen API) and padding.

S sequences of lengths l_0 … l_{S-1} packed back to back form x (T, C) with T = Σ l_s and
``cu_seqlens = [0, l_0, l_0 + l_1, …, T]``. :func:`unpack` turns them into a padded batch
(S, max_len, C) with its key-padding mask, :func:`pack` turns a padded batch back.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack", "unpack"]


def unpack(x: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """Packed (T, C) → padded (S, max_len, C) and its padding mask (S, max_len), True = padding."""
    if x.dim() != 2:
        raise ValueError(f"packed x must have shape (T, C), got {tuple(x.shape)}")
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(
            f"cu_seqlens must be a 1-D int tensor [0, l_0, l_0 + l_1, ..., T], got a {type(cu_seqlens).__name__}; "
            "wrap it with torch.tensor(cu_seqlens)"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int tensor [0, l_0, l_0 + l_1, ..., T] with at least 2 entries, got "
            f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    lengths = cu_seqlens.diff()
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != x.shape[0] or (lengths < 0).any():
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at T = {x.shape[0]}, got {cu_seqlens.tolist()}"
        )
    real = torch.arange(int(lengths.max()), device=x.device) < lengths.to(x.device).unsqueeze(1)  # (S, max_len)
    padded = x.new_zeros(*real.shape, x.shape[1])
    padded[real] = x  # row-major order of `real` is exactly the packing order
    return padded, ~real


def pack(padded: Tensor, key_padding_mask: Tensor) -> Tensor:
    """Padded (S, max_len, C) → packed (T, C), keeping the positions where the mask is False."""
    return padded[~key_padding_mask]
