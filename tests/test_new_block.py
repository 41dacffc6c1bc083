"""A rep block the project has never seen, checked the way a user would check their own.

``MixBlock`` sums five linear branches of the kinds the design guide lists: a depthwise 5x5
conv+BN, a dense 3x3 conv+BN, a DBB-style 1x1 -> 3x3 chain (1x1 conv without bias, ``F.pad`` with
zeros, BN, 3x3 conv with padding 0, BN), a 1x1 conv scaled by a learnable per-channel parameter,
and an identity BN. ``reparam.explain`` must fold all of it into one dense 5x5 conv, exactly; with
a ReLU inside one branch it must say the block is incomplete and name the ReLU. This is also the
worked example of "Writing a new rep block" in docs/research.md.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from helpers import assert_equivalent, n_ops, randomize_bn
from torch import nn

import reparam
from reparam.models import ZeroPad, conv_bn


class MixBlock(nn.Module):
    """``dw5x5+BN + 3x3+BN + (1x1 -> pad -> BN -> 3x3+BN) + gamma * 1x1 + BN(x)``.

    ``relu_in`` puts a ReLU inside one branch (``"chain"``: between the chain's BN and its 3x3;
    ``"point"``: after the scaled 1x1), which makes the block not foldable as a whole.
    ``mid`` is the chain's internal width (default ``2 * channels``: with it the whole block as
    one dense 5x5 needs fewer multiply-adds than its branches, so the default cost policy folds it).
    """

    def __init__(self, channels: int, mid: int | None = None, relu_in: str | None = None) -> None:
        super().__init__()
        c, mid = channels, 2 * channels if mid is None else mid
        self.dw5 = conv_bn(c, c, 5, 1, 2, groups=c)
        self.dense3 = conv_bn(c, c, 3, 1, 1)
        self.chain = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(c, mid, 1, bias=False),
                pad=ZeroPad(1),
                bn=nn.BatchNorm2d(mid),
                act=nn.ReLU() if relu_in == "chain" else nn.Identity(),
                square=conv_bn(mid, c, 3, 1, 0),
            )
        )
        self.point = nn.Conv2d(c, c, 1, bias=False)
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))
        self.point_act = nn.ReLU() if relu_in == "point" else nn.Identity()
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dw5(x) + self.dense3(x) + self.chain(x)
                + self.point_act(self.point(x) * self.gamma) + self.identity(x))


def _block(channels: int = 8, seed: int = 0, **kw) -> MixBlock:
    torch.manual_seed(seed)
    block = MixBlock(channels, **kw)
    with torch.no_grad():
        block.gamma.uniform_(-1.5, 1.5)  # a trained scale, not the initial ones
    return randomize_bn(block, seed)  # random BN statistics and affine parameters; eval mode


@pytest.mark.parametrize("channels", [4, 8, 16])
def test_new_block_folds_completely_and_exactly(channels):
    block = _block(channels)
    x = torch.randn(2, channels, 12, 12)
    report = reparam.explain(block, x)
    assert report.complete, str(report)
    assert report.leftovers == [] and report.untraced == []
    assert report.max_error is not None and report.max_error < 1e-5, str(report)
    assert len(report.regions) == 1
    region = report.regions[0]
    assert region.geometry.startswith("conv5x5"), region.geometry
    assert {"sequential_1x1_kxk", "zero_pad", "parallel_sum", "identity_as_dirac",
            "scale_shift"} <= set(region.rules), region.rules

    folded = reparam.fold(block, x)
    assert reparam.count_ops(folded) == {"conv": 1}
    (conv,) = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (5, 5) and conv.padding == (2, 2) and conv.groups == 1
    assert conv.bias is not None
    assert_equivalent(block, folded, torch.randn(3, channels, 9, 14))  # other sizes too


def test_new_block_fold_leaves_the_block_alone():
    block = _block(8)
    before = copy.deepcopy(block.state_dict())
    reparam.fold(block, torch.randn(1, 8, 10, 10), check=True)  # float64 check: raises if off
    after = block.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("where", ["chain", "point"])
def test_relu_inside_a_branch_is_reported(where):
    block = _block(8, relu_in=where)
    x = torch.randn(2, 8, 12, 12)
    report = reparam.explain(block, x)
    # the ReLU's branch joins the others as a different tensor: named among the joins
    assert report.joins, str(report)
    assert any("ReLU" in x.reason for x in report.leftovers + report.joins), str(report)
    assert report.max_error < 1e-5  # what did fold is still exact
    folded = reparam.fold(block, x)
    assert n_ops(folded, "conv") > 1  # the block is not one conv any more
    assert_equivalent(block, folded, x)


def test_costs_before_and_after_are_reported():
    channels = 8
    block = _block(channels)
    x = torch.randn(1, channels, 12, 12)
    report = reparam.explain(block, x)
    (region,) = report.regions
    assert 0 < region.params_after <= region.params_before
    assert 0 < region.macs_after <= region.macs_before
    # the one conv: dense 5x5 with a bias, one multiply-add per weight per output pixel
    assert region.params_after == channels * channels * 25 + channels
    assert region.macs_after == channels * channels * 25 * 12 * 12
    assert report.params_before == sum(p.numel() for p in block.parameters())
    assert 0 < report.params_after <= report.params_before

    folded = reparam.fold(block, x)
    assert report.params_after == sum(p.numel() for p in folded.parameters())
    macs_before, macs_after = reparam.count_macs(block, x), reparam.count_macs(folded, x)
    assert 0 < macs_after <= macs_before
    assert macs_after == region.macs_after


def test_costs_are_reported_when_the_block_does_not_fold():
    block = _block(8, relu_in="chain")
    report = reparam.explain(block, torch.randn(1, 8, 12, 12))
    assert report.regions
    for region in report.regions:
        assert 0 < region.params_after <= region.params_before
        assert 0 < region.macs_after <= region.macs_before
    assert report.params_after <= report.params_before
