"""Dirac-parameterized convolutions and DiracNet (Zagoruyko & Komodakis, "DiracNets: Training
Very Deep Neural Networks Without Skip-Connections", 2017; the v2 networks of the authors' code).

The kernels here are computed from parameters in every forward; nothing here folds anything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import check_odd


class _DeltaConv(nn.Module):
    """A stride-1 conv whose kernel is computed from ``weight`` and the Dirac delta ``I`` (the
    buffer ``delta``: ``conv2d(x, I)`` copies input channel ``i`` to output ``i`` for
    ``i < min(out_ch, in_ch)``); ``weight`` and ``bias`` start as ``nn.Conv2d``'s own."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int | None,
                 dilation: int, bias: bool) -> None:
        super().__init__()
        check_odd(kernel_size)
        self.padding = dilation * (kernel_size // 2) if padding is None else padding
        self.dilation = dilation
        conv = nn.Conv2d(in_ch, out_ch, kernel_size, bias=bias)
        self.weight, self.bias = conv.weight, conv.bias
        self.register_buffer("delta", nn.init.dirac_(torch.empty_like(conv.weight)))

    def kernel(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), self.bias, 1, self.padding, self.dilation)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, padding={self.padding}, dilation={self.dilation}"


class DiracConv2d(_DeltaConv):
    """Dirac parameterization with weight normalization: ``conv2d(x, alpha I + beta W_hat)``.

    ``I`` is the Dirac delta kernel (a buffer ``delta``), ``W_hat = W / ||W||`` with the norm
    taken over each filter (all of one output channel's inputs and taps), ``alpha`` and
    ``beta`` are per-output-channel parameters initialized to 1 and 0.1 as in the paper. Stride 1
    only (the delta is an identity only then); ``padding`` defaults to "same"
    (``dilation * (k // 2)``).

    Deploy form: one ``nn.Conv2d`` with the same geometry and the kernel ``alpha I + beta W_hat``
    (exact: it depends on the parameters alone).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        padding: int | None = None,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(in_ch, out_ch, kernel_size, padding, dilation, bias)
        self.alpha = nn.Parameter(torch.ones(out_ch))
        self.beta = nn.Parameter(torch.full((out_ch,), 0.1))

    def kernel(self) -> torch.Tensor:
        """``alpha I + beta W_hat``, the kernel the layer convolves with."""
        out_ch = self.weight.shape[0]
        w_hat = F.normalize(self.weight.reshape(out_ch, -1)).reshape(self.weight.shape)
        scale = (-1, 1, 1, 1)
        return self.alpha.reshape(scale) * self.delta + self.beta.reshape(scale) * w_hat


class ResidualConv2d(_DeltaConv):
    """The trivial re-parameterization ``conv2d(x, W + I)``, i.e. ``conv2d(x, W) + x`` in one
    kernel (``I`` the Dirac delta, a buffer ``delta``). Same channels in and out, stride 1,
    "same" padding by default.

    Deploy form: one ``nn.Conv2d`` with kernel ``W + I``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        padding: int | None = None,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(channels, channels, kernel_size, padding, dilation, bias)

    def kernel(self) -> torch.Tensor:
        """``W + I``."""
        return self.weight + self.delta


class DiracBlock(nn.Module):
    """One DiracNet layer: ``bn(dirac_conv(relu(x)))`` (3x3, no conv bias), as the v2 code."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.conv = DiracConv2d(in_ch, out_ch, 3, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.act(x)))


class DiracNet(nn.Module):
    """A plain chain of ``DiracBlock`` groups (``group0``, ...), with a 2x2 max pool before every
    group but the first; no skip connections.

    ``imagenet=True`` (DiracNet-18/34): stem 7x7 stride-2 conv (no bias), BN, 3x3 stride-2 max
    pool; head ReLU, average pool over the whole map (its size read from the input at run time,
    ``x.size(-1)``, as the authors' code), linear. ``imagenet=False`` (CIFAR DiracNet-d-w): stem
    3x3 conv, BN, ReLU; head ReLU, 8x8 average pool, linear.
    """

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 1000,
        *,
        imagenet: bool = True,
        in_ch: int = 3,
    ) -> None:
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError("give one depth per width")
        ch = widths[0]
        if imagenet:
            stem = OrderedDict(conv=nn.Conv2d(in_ch, ch, 7, 2, 3, bias=False),
                               bn=nn.BatchNorm2d(ch), pool=nn.MaxPool2d(3, 2, 1))
        else:
            stem = OrderedDict(conv=nn.Conv2d(in_ch, ch, 3, 1, 1, bias=False),
                               bn=nn.BatchNorm2d(ch), act=nn.ReLU())
        self.stem = nn.Sequential(stem)
        self.pool_size = None if imagenet else 8
        groups = []
        for g, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if g else []
            for _ in range(depth):
                layers.append(DiracBlock(ch, width))
                ch = width
            groups.append(nn.Sequential(*layers))
        self.groups = nn.ModuleList(groups)
        self.head_act = nn.ReLU()
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for group in self.groups:
            x = group(x)
        x = self.head_act(x)
        x = F.avg_pool2d(x, x.size(-1) if self.pool_size is None else self.pool_size)
        return self.fc(x.flatten(1))


IMAGENET_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def diracnet18(num_classes: int = 1000) -> DiracNet:
    """DiracNet-18 (v2): groups of 4, 4, 4, 4 blocks, widths 64, 128, 256, 512.
    11.52M training parameters; deploy (BN and Dirac folded into each conv): 11.51M."""
    return DiracNet([2 * b for b in IMAGENET_DEPTHS[18]], (64, 128, 256, 512), num_classes)


def diracnet34(num_classes: int = 1000) -> DiracNet:
    """DiracNet-34 (v2): groups of 6, 8, 12, 6 blocks, widths 64, 128, 256, 512.
    21.64M training parameters; deploy: 21.62M."""
    return DiracNet([2 * b for b in IMAGENET_DEPTHS[34]], (64, 128, 256, 512), num_classes)


def diracnet_cifar(depth: int = 28, width: int = 10, num_classes: int = 10) -> DiracNet:
    """CIFAR DiracNet-``depth``-``width``: three groups of ``2 (depth - 4) / 6`` blocks, widths
    16, 32, 64 times ``width`` (DiracNet-28-10: 36.5M training parameters)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
    n = (depth - 4) // 6
    return DiracNet([2 * n] * 3, [16 * width, 32 * width, 64 * width], num_classes,
                    imagenet=False)
