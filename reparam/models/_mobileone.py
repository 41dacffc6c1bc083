"""MobileOne-S0..S4 (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone")."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ._blocks import MobileOneBlock

# Paper, architecture table: (blocks, base width, stride) for stages 2..6; stage 1 is one 3x3
# block 3 -> min(64, 64 a1) with stride 2. Stages 4 and 5 share the width 256 a3.
STAGES = ((2, 64, 2), (8, 128, 2), (5, 256, 2), (5, 256, 1), (1, 512, 2))


def mobileone_block(
    in_ch: int, out_ch: int, stride: int, num_branches: int, use_se: bool
) -> nn.Sequential:
    """One MobileOne "block" of the paper: a depthwise 3x3 ``MobileOneBlock`` (``groups=in_ch``,
    carrying the stride) then a pointwise 1x1 ``MobileOneBlock``."""
    return nn.Sequential(
        OrderedDict(
            depthwise=MobileOneBlock(in_ch, in_ch, 3, stride, in_ch, num_branches, use_se),
            pointwise=MobileOneBlock(in_ch, out_ch, 1, 1, 1, num_branches, use_se),
        )
    )


class MobileOne(nn.Module):
    """MobileOne backbone: ``stage1`` (a 3x3 stride-2 block), ``stage2`` .. ``stage6`` of
    depthwise/pointwise block pairs, then global average pooling, flatten and a linear layer.

    ``alphas`` are the paper's width multipliers (a1, a2, a3, a4); ``num_branches`` is its k;
    ``se_stages`` lists the stages (of 2..6) whose blocks carry a squeeze-and-excite gate.
    ``default_input_size`` is the paper's ImageNet input, ``(in_ch, 224, 224)``: what
    ``reparam.fold`` traces and measures on when it is given no example inputs.
    """

    def __init__(
        self,
        alphas: Sequence[float],
        num_branches: int = 1,
        se_stages: Sequence[int] = (),
        num_classes: int = 1000,
        in_ch: int = 3,
    ) -> None:
        super().__init__()
        self.default_input_size = (in_ch, 224, 224)  # the paper's ImageNet size
        a1, a2, a3, a4 = alphas
        mults = (a1, a2, a3, a3, a4)
        ch = min(64, int(64 * a1))
        self.stage1 = MobileOneBlock(in_ch, ch, 3, 2, 1, num_branches)
        for s, ((blocks, base, stride), mult) in enumerate(zip(STAGES, mults, strict=True), 2):
            width = int(base * mult)
            layers = []
            use_se = s in se_stages
            for i in range(blocks):
                first_stride = stride if i == 0 else 1
                layers.append(mobileone_block(ch, width, first_stride, num_branches, use_se))
                ch = width
            self.add_module(f"stage{s}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.stage5(x)
        x = self.stage6(x)
        return self.fc(self.flatten(self.pool(x)))


def mobileone_s0(num_classes: int = 1000) -> MobileOne:
    """MobileOne-S0: a = (0.75, 1, 1, 2), k = 4 branches. Deploy: 2.1M parameters."""
    return MobileOne((0.75, 1.0, 1.0, 2.0), 4, (), num_classes)


def mobileone_s1(num_classes: int = 1000) -> MobileOne:
    """MobileOne-S1: a = (1.5, 1.5, 2, 2.5), k = 1. Deploy: 4.8M parameters."""
    return MobileOne((1.5, 1.5, 2.0, 2.5), 1, (), num_classes)


def mobileone_s2(num_classes: int = 1000) -> MobileOne:
    """MobileOne-S2: a = (1.5, 2, 2.5, 4), k = 1. Deploy: 7.8M parameters."""
    return MobileOne((1.5, 2.0, 2.5, 4.0), 1, (), num_classes)


def mobileone_s3(num_classes: int = 1000) -> MobileOne:
    """MobileOne-S3: a = (2, 2.5, 3, 4), k = 1. Deploy: 10.1M parameters."""
    return MobileOne((2.0, 2.5, 3.0, 4.0), 1, (), num_classes)


def mobileone_s4(num_classes: int = 1000, use_se: bool = True) -> MobileOne:
    """MobileOne-S4: a = (3, 3.5, 3.5, 4), k = 1, squeeze-and-excite in stages 5 and 6
    (``use_se=False`` drops it). Deploy: 14.8M parameters (with SE)."""
    return MobileOne((3.0, 3.5, 3.5, 4.0), 1, (5, 6) if use_se else (), num_classes)
