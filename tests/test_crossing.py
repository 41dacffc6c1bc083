"""reparam.crossing.merges_across: a capture is tried only where parameterized linear ops meet
across a module's parts; each case here is one a capture gains on, or one where it gains nothing
(and costs seconds)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reparam.crossing import merges_across


def conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class Chain(nn.Module):
    """a(x) then b(...), with ``between`` in the parent's forward."""

    def __init__(self, between=lambda y: y) -> None:
        super().__init__()
        self.a, self.b, self.between = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), between

    def forward(self, x):
        return self.b(self.between(self.a(x)))


class Branches(nn.Module):
    def __init__(self, same_input: bool = True) -> None:
        super().__init__()
        self.a, self.b, self.same = conv_bn(4, 4), conv_bn(4, 4, 1), same_input

    def forward(self, x):
        return self.a(x) + self.b(x if self.same else torch.relu(x))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = conv_bn(4, 4)

    def forward(self, x):
        return x + self.f(x)


class Generated(nn.Module):
    """OREPA-style: the forward computes its kernel from parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.scale = nn.Parameter(torch.rand(4, 1, 1, 1))

    def forward(self, x):
        return F.conv2d(x, self.w * self.scale, padding=1)


X = (torch.randn(2, 4, 8, 8),)


def test_a_chain_across_children_through_a_pad_crosses():
    assert merges_across(Chain(lambda y: F.pad(y, (1, 1, 1, 1))).eval(), X)


def test_a_chain_broken_by_a_non_linear_op_does_not_cross():
    assert not merges_across(Chain(torch.relu).eval(), X)


def test_branches_from_one_input_summed_cross():
    assert merges_across(Branches().eval(), X)


def test_branches_from_different_inputs_are_a_join():
    assert not merges_across(Branches(same_input=False).eval(), X)


def test_a_residual_sum_with_the_input_is_a_join():
    assert not merges_across(Residual().eval(), X)


def test_a_kernel_computed_in_an_opaque_forward_crosses():
    assert merges_across(Generated(), X)


def test_named_parts_beside_a_traced_rest():
    """With ``parts``, only ops of a named part meeting other ops cross: the rest was traced."""
    model = nn.Sequential(conv_bn(4, 4), conv_bn(4, 4)).eval()
    assert not merges_across(model, X, parts=[])
    assert merges_across(model, X, parts=["1"])  # 0's BN feeds 1's conv
    assert not merges_across(nn.Sequential(conv_bn(4, 4), nn.ReLU(), conv_bn(4, 4)).eval(), X,
                             parts=["2"])


def test_the_probe_leaves_no_hooks_and_runs_no_grad():
    model = Branches().eval()
    merges_across(model, X)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
