"""Training-time re-parameterizable blocks and the networks of their papers.

Blocks: ``RepVGGBlock``, ``ACBlock``, ``DBBlock``, ``MobileOneBlock``. Networks: RepVGG-A0..B3g4,
MobileOne-S0..S4, ResNet-18 (plain, ACNet, DBB). These modules hold no fold code: fold any of
them with ``reparam.fold``. Every network traces with ``torch.fx.symbolic_trace``.
"""

from ._blocks import ACBlock, DBBlock, MobileOneBlock, RepVGGBlock
from ._layers import SqueezeExcite, ZeroPad, conv_bn
from ._mobileone import (
    MobileOne,
    mobileone_block,
    mobileone_s0,
    mobileone_s1,
    mobileone_s2,
    mobileone_s3,
    mobileone_s4,
)
from ._repvgg import (
    RepVGG,
    repvgg_a0,
    repvgg_a1,
    repvgg_a2,
    repvgg_b0,
    repvgg_b1,
    repvgg_b1g2,
    repvgg_b1g4,
    repvgg_b2,
    repvgg_b2g2,
    repvgg_b2g4,
    repvgg_b3,
    repvgg_b3g2,
    repvgg_b3g4,
)
from ._resnet import BasicBlock, ResNet, acnet_resnet18, dbb_resnet18, resnet18

__all__ = [
    "ACBlock",
    "BasicBlock",
    "DBBlock",
    "MobileOne",
    "MobileOneBlock",
    "RepVGG",
    "RepVGGBlock",
    "ResNet",
    "SqueezeExcite",
    "ZeroPad",
    "acnet_resnet18",
    "conv_bn",
    "dbb_resnet18",
    "mobileone_block",
    "mobileone_s0",
    "mobileone_s1",
    "mobileone_s2",
    "mobileone_s3",
    "mobileone_s4",
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_a2",
    "repvgg_b0",
    "repvgg_b1",
    "repvgg_b1g2",
    "repvgg_b1g4",
    "repvgg_b2",
    "repvgg_b2g2",
    "repvgg_b2g4",
    "repvgg_b3",
    "repvgg_b3g2",
    "repvgg_b3g4",
    "resnet18",
]
