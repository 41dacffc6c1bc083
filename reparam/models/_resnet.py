"""ResNet-18 (He et al., 2016) with its 3x3 conv+BN pairs optionally replaced by ``ACBlock``
(ACNet, Ding et al., 2019) or ``DBBlock`` (DBB, Ding et al., 2021)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._blocks import ACBlock, DBBlock
from ._layers import batch_norm, conv, conv_bn

ConvBN = Callable[[int, int, int], nn.Module]
"""Builds the module that stands for one "3x3 conv + BN": ``(in_ch, out_ch, stride) -> module``."""


def plain_conv3x3(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """A 3x3 conv (padding 1, no bias) + BN."""
    return conv_bn(in_ch, out_ch, 3, stride, 1)


def ac_conv3x3(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """A 3x3 ``ACBlock``."""
    return ACBlock(in_ch, out_ch, 3, stride)


def dbb_conv3x3(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """A 3x3 ``DBBlock``."""
    return DBBlock(in_ch, out_ch, 3, stride)


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(conv2(relu(conv1(x))) + shortcut(x))``, where ``conv1``,
    ``conv2`` are 3x3 conv+BN (or the block ``conv3x3`` builds) and ``downsample`` a plain 1x1
    conv+BN when the stride or the width changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, conv3x3: ConvBN = plain_conv3x3):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.act1 = nn.ReLU()
        self.conv2 = conv3x3(out_ch, out_ch, 1)
        need = stride != 1 or in_ch != out_ch
        self.downsample = conv_bn(in_ch, out_ch, 1, stride, 0) if need else None
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act1(self.conv1(x)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act2(y + shortcut)


class ResNet(nn.Module):
    """ResNet with basic blocks: a 7x7 stride-2 stem conv+BN+ReLU and 3x3 stride-2 max pool,
    ``layer1`` .. ``layer4`` (widths 64, 128, 256, 512; stride 2 from ``layer2`` on), then global
    average pooling, flatten and a linear layer.

    ``default_input_size`` is the paper's ImageNet input, ``(in_ch, 224, 224)``: what
    ``reparam.fold`` traces and measures on when it is given no example inputs."""

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        conv3x3: ConvBN = plain_conv3x3,
        num_classes: int = 1000,
        in_ch: int = 3,
    ) -> None:
        super().__init__()
        self.default_input_size = (in_ch, 224, 224)  # the paper's ImageNet size
        self.stem = nn.Sequential(
            OrderedDict(
                conv=conv(in_ch, 64, 7, 2, 3),
                bn=batch_norm(64),
                act=nn.ReLU(),
                pool=nn.MaxPool2d(3, 2, 1),
            )
        )
        ch = 64
        for i, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True), 1):
            stride = 1 if i == 1 else 2
            stage = [BasicBlock(ch, width, stride, conv3x3)]
            stage += [BasicBlock(width, width, 1, conv3x3) for _ in range(blocks - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*stage))
            ch = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.fc(self.flatten(self.pool(x)))


def resnet18(num_classes: int = 1000) -> ResNet:
    """Plain ResNet-18 (11.69M parameters)."""
    return ResNet((2, 2, 2, 2), plain_conv3x3, num_classes)


def acnet_resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 with every 3x3 conv+BN an ``ACBlock`` (19.0M training, 11.7M deploy)."""
    return ResNet((2, 2, 2, 2), ac_conv3x3, num_classes)


def dbb_resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 with every 3x3 conv+BN a ``DBBlock`` (26.3M training, 11.7M deploy)."""
    return ResNet((2, 2, 2, 2), dbb_conv3x3, num_classes)
