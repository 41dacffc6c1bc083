"""Functions that folded and captured graphs call: plain torch, each computing what the idiom it
stands for computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_filled(x: torch.Tensor, pad: list[int], fill: torch.Tensor) -> torch.Tensor:
    """``F.pad(x, pad)`` with every padded element of channel ``c`` (axis 1) set to
    ``fill.reshape(-1)[c]``: a BN's output at zero around a BN's output (DBB's BN-and-pad), a
    conv's bias around its output (ECBSR). Same values as the slice assignments it stands for."""
    out = F.pad(x, pad)
    value = fill.reshape(1, -1, *([1] * (x.dim() - 2)))
    for i in range(len(pad) // 2):
        axis = x.dim() - 1 - i
        low, high = pad[2 * i], pad[2 * i + 1]
        for start, length in ((0, low), (out.shape[axis] - high, high)):
            if length:
                strip = out.narrow(axis, start, length)
                strip.copy_(value.expand_as(strip))
    return out


__all__ = ["pad_filled"]
