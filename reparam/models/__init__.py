"""Training-time re-parameterizable blocks and the networks of their papers.

Blocks: ``RepVGGBlock``, ``ACBlock``, ``DBBlock``, ``MobileOneBlock``. Networks: RepVGG-A0..B3g4,
MobileOne-S0..S4, ResNet-18 (plain, ACNet, DBB). Every one of these traces with
``torch.fx.symbolic_trace``.

The wider re-parameterization family: ``DOConv2d`` / ``DODConv2d`` (DO-Conv), ``DiracConv2d``,
``ResidualConv2d`` and DiracNet, ``RepMLPUnit`` / ``RepMLPBlock`` and RepMLPNet, ``PSConv2d``,
``ExpandCL`` / ``ExpandCK`` and the ExpandNets SmallNet, RepVGG-D2se and RepVGGplus-L2pse. Some
compute their kernels in forward, read shapes at run time or shuffle channels, as their authors'
code does.

These modules hold no fold code: fold them with ``reparam.fold``.
"""

from ._blocks import ACBlock, DBBlock, MobileOneBlock, RepVGGBlock
from ._dirac import (
    DiracBlock,
    DiracConv2d,
    DiracNet,
    ResidualConv2d,
    diracnet18,
    diracnet34,
    diracnet_cifar,
)
from ._doconv import DOConv2d, DODConv2d
from ._expandnet import ExpandCK, ExpandCL, SmallNet, smallnet
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
from ._psconv import PSConv2d
from ._repmlp import (
    GlobalPerceptron,
    RepMLPBlock,
    RepMLPNet,
    RepMLPNetUnit,
    RepMLPUnit,
    repmlpnet_b224,
    repmlpnet_b256,
    repmlpnet_d256,
    repmlpnet_l256,
    repmlpnet_t224,
    repmlpnet_t256,
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
from ._repvggplus import (
    RepVGGplus,
    RepVGGSEBlock,
    RepVGGSqueezeExcite,
    repvgg_d2se,
    repvggplus_l2pse,
)
from ._resnet import BasicBlock, ResNet, acnet_resnet18, dbb_resnet18, resnet18

__all__ = [
    "ACBlock",
    "BasicBlock",
    "DBBlock",
    "DOConv2d",
    "DODConv2d",
    "DiracBlock",
    "DiracConv2d",
    "DiracNet",
    "ExpandCK",
    "ExpandCL",
    "GlobalPerceptron",
    "MobileOne",
    "MobileOneBlock",
    "PSConv2d",
    "RepMLPBlock",
    "RepMLPNet",
    "RepMLPNetUnit",
    "RepMLPUnit",
    "RepVGG",
    "RepVGGBlock",
    "RepVGGSEBlock",
    "RepVGGSqueezeExcite",
    "RepVGGplus",
    "ResNet",
    "ResidualConv2d",
    "SmallNet",
    "SqueezeExcite",
    "ZeroPad",
    "acnet_resnet18",
    "conv_bn",
    "dbb_resnet18",
    "diracnet18",
    "diracnet34",
    "diracnet_cifar",
    "mobileone_block",
    "mobileone_s0",
    "mobileone_s1",
    "mobileone_s2",
    "mobileone_s3",
    "mobileone_s4",
    "repmlpnet_b224",
    "repmlpnet_b256",
    "repmlpnet_d256",
    "repmlpnet_l256",
    "repmlpnet_t224",
    "repmlpnet_t256",
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
    "repvgg_d2se",
    "repvggplus_l2pse",
    "resnet18",
    "smallnet",
]
