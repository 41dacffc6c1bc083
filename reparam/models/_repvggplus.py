"""RepVGG-D2se and RepVGGplus-L2pse (the RepVGG authors' repository, an update to Ding et al.,
"RepVGG: Making VGG-style ConvNets Great Again", 2021): deeper RepVGG networks with
squeeze-and-excite gates, and RepVGGplus' auxiliary classifiers used in training.
Nothing here folds anything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import RepVGGBlock
from ._layers import conv_bn
from ._repvgg import RepVGG, repvgg_widths


class RepVGGSqueezeExcite(nn.Module):
    """The SE gate as the RepVGG code writes it: ``x * sigmoid(up(relu(down(pool(x)))))``.

    ``pool`` is ``F.avg_pool2d(x, kernel_size=x.size(3))``: its kernel is the input's *width*,
    read at run time (square maps give the global mean; a taller map averages its top square
    only, as the authors' code does). ``down``/``up`` are 1x1 convs with biases through
    ``hidden`` channels. Not linear; never folded.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"the SE gate needs at least one hidden channel, got {hidden} "
                             f"(channels {channels} divided by the reduction)")
        self.channels = channels
        self.down = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU()
        self.up = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = F.avg_pool2d(x, kernel_size=x.size(3))
        v = torch.sigmoid(self.up(self.act(self.down(v))))
        return x * v.view(-1, self.channels, 1, 1)


class RepVGGSEBlock(RepVGGBlock):
    """A 3x3 ``RepVGGBlock`` (same branches) gated by a ``RepVGGSqueezeExcite`` of
    ``out_ch // reduction`` hidden channels: ``relu(se(sum))`` (RepVGG-D2se: SE before the
    ReLU, reduction 16) or, with ``post_se=True``, ``se(relu(sum))`` (RepVGGplus: "post-SE",
    reduction 4). Deploy form: one 3x3 conv with a bias, then the ReLU and the gate as they are.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, *,
                 reduction: int = 16, post_se: bool = False) -> None:
        super().__init__(in_ch, out_ch, 3, stride, groups)
        self.se = RepVGGSqueezeExcite(out_ch, out_ch // reduction)
        self.post_se = post_se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches(x)
        return self.se(self.act(y)) if self.post_se else self.act(self.se(y))


def repvgg_d2se(num_classes: int = 1000) -> RepVGG:
    """RepVGG-D2se: depths (1, 8, 14, 24, 1), a=2.5, b=5 (widths 64, 160, 320, 640, 2560),
    every layer a ``RepVGGSEBlock`` (SE before the ReLU, reduction 16).
    133,334,836 training parameters; deploy 120,387,572 (the authors' converter)."""
    def make(in_ch: int, out_ch: int, stride: int, groups: int) -> nn.Module:
        return RepVGGSEBlock(in_ch, out_ch, stride, groups, reduction=16)

    return RepVGG((1, 8, 14, 24, 1), repvgg_widths(2.5, 5), num_classes=num_classes,
                  make_block=make)


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    block = conv_bn(in_ch, out_ch, 3, stride, 1)
    block.add_module("act", nn.ReLU())
    return block


def auxiliary_head(channels: int, num_classes: int) -> nn.Sequential:
    """RepVGGplus' auxiliary classifier: 3x3 stride-2 conv+BN+ReLU, global average pool,
    flatten, linear."""
    return nn.Sequential(OrderedDict(
        down=_conv_bn_relu(channels, channels, 2), pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(1), fc=nn.Linear(channels, num_classes)))


class RepVGGplus(nn.Module):
    """RepVGGplus: ``stage0`` (one block, stride 2), ``stage1``, ``stage2``, ``stage3`` cut in
    ``stage3_first`` (the first half of its blocks, stride 2) and ``stage3_second``, ``stage4``,
    then global average pooling, flatten and ``linear``; every layer a post-SE
    ``RepVGGSEBlock`` (reduction 4) unless ``use_post_se=False``.

    Auxiliary classifiers ``stage1_aux``, ``stage2_aux``, ``stage3_first_aux`` read the outputs
    of ``stage1``, ``stage2``, ``stage3_first``. In training mode ``forward`` returns the dict
    ``{"main", "stage1_aux", "stage2_aux", "stage3_first_aux"}`` of logits, as the authors'
    code; in eval mode it returns the main logits alone and never runs the auxiliary heads (the
    authors' training-time model returns the dict in eval mode too and its validation takes
    ``["main"]``; their converter deletes the heads). Deploy form: the main path, each block
    one 3x3 conv with a bias, without the heads.
    """

    def __init__(self, depths: Sequence[int], widths: Sequence[int], num_classes: int = 1000,
                 use_post_se: bool = True, in_ch: int = 3) -> None:
        super().__init__()
        if len(depths) != 4 or len(widths) != 5:
            raise ValueError("RepVGGplus takes four stage depths and five widths (stem first)")

        def block(i: int, o: int, stride: int) -> nn.Module:
            if use_post_se:
                return RepVGGSEBlock(i, o, stride, reduction=4, post_se=True)
            return RepVGGBlock(i, o, 3, stride)

        def stage(i: int, o: int, depth: int, stride: int) -> nn.Sequential:
            return nn.Sequential(*(block(i if n == 0 else o, o, stride if n == 0 else 1)
                                   for n in range(depth)))

        w0, w1, w2, w3, w4 = widths
        d1, d2, d3, d4 = depths
        self.stage0 = block(in_ch, w0, 2)
        self.stage1 = stage(w0, w1, d1, 2)
        self.stage2 = stage(w1, w2, d2, 2)
        self.stage3_first = stage(w2, w3, d3 // 2, 2)
        self.stage3_second = stage(w3, w3, d3 - d3 // 2, 1)
        self.stage4 = stage(w3, w4, d4, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(w4, num_classes)
        self.stage1_aux = auxiliary_head(w1, num_classes)
        self.stage2_aux = auxiliary_head(w2, num_classes)
        self.stage3_first_aux = auxiliary_head(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        s1 = self.stage1(self.stage0(x))
        s2 = self.stage2(s1)
        s3 = self.stage3_first(s2)
        y = self.stage4(self.stage3_second(s3))
        main = self.linear(self.flatten(self.pool(y)))
        if not self.training:
            return main
        return {"main": main, "stage1_aux": self.stage1_aux(s1),
                "stage2_aux": self.stage2_aux(s2), "stage3_first_aux": self.stage3_first_aux(s3)}


def repvggplus_l2pse(num_classes: int = 1000) -> RepVGGplus:
    """RepVGGplus-L2pse: stage depths 8, 14, 24, 1, widths 64, 160, 320, 640, 2560, post-SE
    (reduction 4), three auxiliary heads. 146,062,864 training parameters (5,963,640 of them in
    the heads); deploy 127,151,960 (the authors' converter)."""
    return RepVGGplus((8, 14, 24, 1), repvgg_widths(2.5, 5), num_classes)
