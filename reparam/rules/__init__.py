"""Rules and rule sets. A rule set is a plain tuple of :class:`~reparam.values.Rule` values:
concatenate them to build your own (``REPVGG + (my_rule,)``)."""

from ..values import Rule, law, rule
from . import ops
from .common import (
    COMMON,
    avg_pool_as_conv,
    bn_conv,
    channel_pieces,
    concat_branches,
    conv,
    conv_bn,
    filled_pad,
    identity_as_dirac,
    identity_ops,
    mixed_dilations,
    pad_small_kernel,
    parallel_sum,
    regroup,
    scale_shift,
    sequential_1x1_kxk,
    sequential_kxk_1x1,
    sequential_kxk_kxk,
    spatial_crop,
    zero_pad,
)
from .layout import LAYOUT, layout_affine
from .patches import PATCHES, PATCHES_FIRST, conv_into_fc, flat_bn, flat_reshape, flat_sum
from .tokens import TOKENS, token_reshape

#: RepVGG and MobileOne: conv+BN, 1x1 padded into KxK, BN identity as a (grouped) Dirac kernel.
REPVGG: tuple[Rule, ...] = COMMON + (pad_small_kernel, identity_as_dirac)
#: ACNet: KxK, 1xK and Kx1 with BN, summed (asymmetric kernels padded into KxK; for padding
#: < K//2 the side branches read a crop of the input).
ACNET: tuple[Rule, ...] = COMMON + (pad_small_kernel, spatial_crop)
#: Diverse Branch Block: adds sequential 1x1 -> KxK, 1x1 -> avg-pool, zero-pad, concat.
DBB: tuple[Rule, ...] = COMMON + (
    pad_small_kernel, identity_as_dirac, sequential_1x1_kxk, sequential_kxk_1x1,
    avg_pool_as_conv, zero_pad, filled_pad, concat_branches, spatial_crop,
)
#: Everything reparam knows (the default): DBB plus BN before a conv, regrouping, KxK then KxK,
#: per-channel ops inside a flatten/reshape of tokens (LeViT), a per-channel map moved past
#: layout ops and averages into the linear layer after them (FastViT, NextViT), and convs on
#: fixed patches folded into the FC beside them (RepMLP). The layout rule comes first: where
#: nothing takes a BN in after an average pool, the pool takes it in instead; the rules that
#: read flat values come before all (to the others a flat value is an opaque tensor).
ALL: tuple[Rule, ...] = PATCHES_FIRST + LAYOUT + DBB + (
    bn_conv, regroup, sequential_kxk_kxk, channel_pieces, mixed_dilations) + TOKENS + PATCHES

__all__ = [
    "ACNET", "ALL", "COMMON", "DBB", "LAYOUT", "PATCHES", "PATCHES_FIRST", "REPVGG", "TOKENS",
    "Rule", "avg_pool_as_conv", "bn_conv", "channel_pieces", "concat_branches", "conv",
    "conv_bn", "conv_into_fc", "filled_pad", "flat_bn", "flat_reshape", "flat_sum",
    "identity_as_dirac", "identity_ops", "law", "layout_affine", "mixed_dilations", "ops",
    "pad_small_kernel", "parallel_sum", "regroup", "rule", "scale_shift", "sequential_1x1_kxk",
    "sequential_kxk_1x1", "sequential_kxk_kxk", "spatial_crop", "token_reshape", "zero_pad",
]
