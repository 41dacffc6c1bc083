"""Pieces shared by every block: per-dimension layer tables, ``conv_bn``, a traceable zero pad
and a squeeze-and-excite gate. Nothing here folds anything."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

Size = int | tuple[int, ...]

CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORM: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
AVG_POOL: dict[int, type[nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
GLOBAL_AVG_POOL: dict[int, type[nn.Module]] = {
    1: nn.AdaptiveAvgPool1d,
    2: nn.AdaptiveAvgPool2d,
    3: nn.AdaptiveAvgPool3d,
}


def check_dims(dims: int, allowed: tuple[int, ...] = (1, 2, 3)) -> None:
    """Raise ``ValueError`` unless ``dims`` (the number of spatial axes) is one of ``allowed``."""
    if dims not in allowed:
        raise ValueError(f"dims must be one of {allowed} (spatial axes), got {dims!r}")


def check_odd(kernel_size: int) -> None:
    """Raise ``ValueError`` for an even kernel: the branches below are centred on the kernel."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size!r}")


def conv(
    in_ch: int,
    out_ch: int,
    kernel_size: Size,
    stride: Size = 1,
    padding: Size = 0,
    groups: int = 1,
    *,
    dims: int = 2,
    bias: bool = False,
) -> nn.Module:
    """A ``Conv{dims}d`` (no bias unless asked: a BN always follows it in these blocks)."""
    check_dims(dims)
    return CONV[dims](in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=bias)


def batch_norm(channels: int, *, dims: int = 2) -> nn.Module:
    """A ``BatchNorm{dims}d`` over ``channels``."""
    check_dims(dims)
    return BATCH_NORM[dims](channels)


def conv_bn(
    in_ch: int,
    out_ch: int,
    kernel_size: Size,
    stride: Size = 1,
    padding: Size = 0,
    groups: int = 1,
    *,
    dims: int = 2,
) -> nn.Sequential:
    """``Sequential(conv=Conv{dims}d(bias=False), bn=BatchNorm{dims}d)``: every branch's unit."""
    return nn.Sequential(
        OrderedDict(
            conv=conv(in_ch, out_ch, kernel_size, stride, padding, groups, dims=dims),
            bn=batch_norm(out_ch, dims=dims),
        )
    )


class ZeroPad(nn.Module):
    """Zero-pad every spatial side by ``padding`` with ``F.pad``.

    A plain module (not ``nn.ZeroPad2d``), so that ``torch.fx`` records the ``F.pad`` call itself.
    """

    def __init__(self, padding: int, dims: int = 2) -> None:
        super().__init__()
        check_dims(dims)
        self.padding = padding
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, [self.padding] * (2 * self.dims))

    def extra_repr(self) -> str:
        return f"padding={self.padding}, dims={self.dims}"


class SqueezeExcite(nn.Module):
    """Channel gate ``x * sigmoid(conv(relu(conv(avgpool(x)))))``; not linear, never folded.

    The hidden width is ``channels // reduction`` (at least 1); both 1x1 convs have a bias.
    """

    def __init__(self, channels: int, reduction: int = 16, *, dims: int = 2) -> None:
        super().__init__()
        check_dims(dims)
        hidden = max(1, channels // reduction)
        self.pool = GLOBAL_AVG_POOL[dims](1)
        self.reduce = conv(channels, hidden, 1, dims=dims, bias=True)
        self.act = nn.ReLU()
        self.expand = conv(hidden, channels, 1, dims=dims, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
