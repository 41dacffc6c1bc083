"""RepVGG-A/B networks (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", 2021)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._blocks import RepVGGBlock

BlockMaker = Callable[[int, int, int, int], nn.Module]
"""Builds one RepVGG layer: ``(in_ch, out_ch, stride, groups) -> module``."""

DEPTHS_A = (1, 2, 4, 14, 1)
DEPTHS_B = (1, 4, 6, 16, 1)


def repvgg_widths(a: float, b: float) -> tuple[int, int, int, int, int]:
    """The paper's stage widths: ``min(64, 64a), 64a, 128a, 256a, 512b``."""
    return (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))


def grouped_layers(depths: Sequence[int]) -> frozenset[int]:
    """Indices (from 0, over all layers) of the layers that use group-wise 3x3 convs.

    The paper groups "the 3rd, 5th, 7th, ..., 21st layer of RepVGG-A and the additional 23rd,
    25th and 27th layers of RepVGG-B", i.e. every even index from 2 up to the second-to-last
    layer. None of them is the first layer of a stage, so none changes stride or width.
    """
    return frozenset(range(2, sum(depths) - 1, 2))


class RepVGG(nn.Module):
    """A plain stack of ``RepVGGBlock`` in five stages (``stage0`` .. ``stage4``), the first layer
    of each with stride 2, then global average pooling, flatten and a linear classifier.
    ``make_block`` builds another kind of layer in place of ``RepVGGBlock`` (e.g. RepVGG-D2se's).

    ``default_input_size`` is the paper's ImageNet input, ``(in_ch, 224, 224)``: what
    ``reparam.fold`` traces and measures on when it is given no example inputs."""

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        groups: int = 1,
        num_classes: int = 1000,
        in_ch: int = 3,
        use_se: bool = False,
        *,
        make_block: BlockMaker | None = None,
    ) -> None:
        super().__init__()
        self.default_input_size = (in_ch, 224, 224)  # the paper's ImageNet size
        if len(depths) != 5 or len(widths) != 5:
            raise ValueError("RepVGG has five stages: give five depths and five widths")
        grouped = grouped_layers(depths) if groups > 1 else frozenset()
        index, ch = 0, in_ch
        for s, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            layers = []
            for i in range(depth):
                g = groups if index in grouped else 1
                stride = 2 if i == 0 else 1
                layers.append(RepVGGBlock(ch, width, 3, stride, g, use_se) if make_block is None
                              else make_block(ch, width, stride, g))
                index, ch = index + 1, width
            self.add_module(f"stage{s}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        return self.fc(self.flatten(self.pool(x)))


def _repvgg(depths: Sequence[int], a: float, b: float, groups: int, num_classes: int) -> RepVGG:
    return RepVGG(depths, repvgg_widths(a, b), groups, num_classes)


def repvgg_a0(num_classes: int = 1000) -> RepVGG:
    """RepVGG-A0: depths (1, 2, 4, 14, 1), a=0.75, b=2.5. Deploy: 8.30M parameters."""
    return _repvgg(DEPTHS_A, 0.75, 2.5, 1, num_classes)


def repvgg_a1(num_classes: int = 1000) -> RepVGG:
    """RepVGG-A1: depths (1, 2, 4, 14, 1), a=1, b=2.5. Deploy: 12.78M parameters."""
    return _repvgg(DEPTHS_A, 1, 2.5, 1, num_classes)


def repvgg_a2(num_classes: int = 1000) -> RepVGG:
    """RepVGG-A2: depths (1, 2, 4, 14, 1), a=1.5, b=2.75. Deploy: 25.49M parameters."""
    return _repvgg(DEPTHS_A, 1.5, 2.75, 1, num_classes)


def repvgg_b0(num_classes: int = 1000) -> RepVGG:
    """RepVGG-B0: depths (1, 4, 6, 16, 1), a=1, b=2.5. Deploy: 14.33M parameters."""
    return _repvgg(DEPTHS_B, 1, 2.5, 1, num_classes)


def repvgg_b1(num_classes: int = 1000) -> RepVGG:
    """RepVGG-B1: depths (1, 4, 6, 16, 1), a=2, b=4. Deploy: 51.82M parameters."""
    return _repvgg(DEPTHS_B, 2, 4, 1, num_classes)


def repvgg_b1g2(num_classes: int = 1000) -> RepVGG:
    """RepVGG-B1g2: RepVGG-B1 with groups 2 on the interleaved layers. Deploy: 41.36M."""
    return _repvgg(DEPTHS_B, 2, 4, 2, num_classes)


def repvgg_b1g4(num_classes: int = 1000) -> RepVGG:
    """RepVGG-B1g4: RepVGG-B1 with groups 4 on the interleaved layers. Deploy: 36.12M."""
    return _repvgg(DEPTHS_B, 2, 4, 4, num_classes)


def repvgg_b2(num_classes: int = 1000) -> RepVGG:
    """RepVGG-B2: depths (1, 4, 6, 16, 1), a=2.5, b=5. Deploy: 80.31M parameters."""
    return _repvgg(DEPTHS_B, 2.5, 5, 1, num_classes)


def repvgg_b2g2(num_classes: int = 1000) -> RepVGG:
    """RepVGG-B2g2: RepVGG-B2 with groups 2 on the interleaved layers (not in the paper's table)."""
    return _repvgg(DEPTHS_B, 2.5, 5, 2, num_classes)


def repvgg_b2g4(num_classes: int = 1000) -> RepVGG:
    """RepVGG-B2g4: RepVGG-B2 with groups 4 on the interleaved layers. Deploy: 55.77M."""
    return _repvgg(DEPTHS_B, 2.5, 5, 4, num_classes)


def repvgg_b3(num_classes: int = 1000) -> RepVGG:
    """RepVGG-B3: depths (1, 4, 6, 16, 1), a=3, b=5. Deploy: 110.96M parameters."""
    return _repvgg(DEPTHS_B, 3, 5, 1, num_classes)


def repvgg_b3g2(num_classes: int = 1000) -> RepVGG:
    """RepVGG-B3g2: RepVGG-B3 with groups 2 on the interleaved layers (not in the paper's table)."""
    return _repvgg(DEPTHS_B, 3, 5, 2, num_classes)


def repvgg_b3g4(num_classes: int = 1000) -> RepVGG:
    """RepVGG-B3g4: RepVGG-B3 with groups 4 on the interleaved layers. Deploy: 75.62M."""
    return _repvgg(DEPTHS_B, 3, 5, 4, num_classes)
