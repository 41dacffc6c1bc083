"""Graph-level folding: rep blocks of every paper, random blocks of random branches, both the
module and the functional form, and the geometry variants (stride, groups, 1d/3d, transposed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import BN, CONV, POOL, assert_equivalent, assert_exact64, n_ops, ops, randomize_bn
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import reparam


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1, nd=2, bias=False):
    return nn.Sequential(CONV[nd](cin, cout, k, stride, padding, groups=groups, bias=bias),
                         BN[nd](cout))


class Branches(nn.Module):
    """A block that sums (or concatenates) the given branches of one input."""

    def __init__(self, *branches: nn.Module, cat: bool = False) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.cat = cat

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        if self.cat:
            return torch.cat(outs, 1)
        total = outs[0]
        for o in outs[1:]:
            total = total + o
        return total


class PadBN(nn.Module):
    """DBB's BN-and-pad, traceably: zero-pad first, then BN (the border becomes BN(0))."""

    def __init__(self, c: int, p: int, nd: int) -> None:
        super().__init__()
        self.p, self.bn = p, BN[nd](c)

    def forward(self, x):
        return self.bn(F.pad(x, [self.p] * (2 * (x.dim() - 2))))


def dbb_seq(cin, cout, k, stride, groups, nd):
    return nn.Sequential(CONV[nd](cin, cin, 1, groups=groups, bias=False), PadBN(cin, k // 2, nd),
                         CONV[nd](cin, cout, k, stride, 0, groups=groups, bias=False),
                         BN[nd](cout))


def dbb_avg(cin, cout, k, stride, groups, nd):
    return nn.Sequential(CONV[nd](cin, cout, 1, groups=groups, bias=False),
                         PadBN(cout, k // 2, nd), POOL[nd](k, stride, 0), BN[nd](cout))


def repvgg(c_in, c_out, stride=1, groups=1, nd=2):
    branches = [conv_bn(c_in, c_out, 3, stride, 1, groups, nd),
                conv_bn(c_in, c_out, 1, stride, 0, groups, nd)]
    if c_in == c_out and stride == 1:
        branches.append(BN[nd](c_in))
    return Branches(*branches)


def acnet(c_in, c_out, stride=1, groups=1):
    return Branches(conv_bn(c_in, c_out, 3, stride, 1, groups),
                    conv_bn(c_in, c_out, (1, 3), stride, (0, 1), groups),
                    conv_bn(c_in, c_out, (3, 1), stride, (1, 0), groups))


def dbb(c_in, c_out, stride=1, groups=1, nd=2, k=3):
    return Branches(conv_bn(c_in, c_out, k, stride, k // 2, groups, nd),
                    conv_bn(c_in, c_out, 1, stride, 0, groups, nd),
                    dbb_seq(c_in, c_out, k, stride, groups, nd),
                    dbb_avg(c_in, c_out, k, stride, groups, nd))


class MobileOneDW(nn.Module):
    """MobileOne's depthwise block: k depthwise 3x3+BN, a 1x1 scale branch+BN, BN identity."""

    def __init__(self, c: int, k: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv_bn(c, c, 3, stride, 1, c) for _ in range(k))
        self.scale = conv_bn(c, c, 1, stride, 0, c)
        self.identity = BN[2](c) if stride == 1 else None

    def forward(self, x):
        out = self.scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        for conv in self.convs:
            out = out + conv(x)
        return out


def check_one_conv(block: nn.Module, x: torch.Tensor, tol: float = 1e-5, **kw) -> nn.Module:
    """Folds to exactly one conv, no BN, no add, no cat; fp32 within tol of fp64; fp64 exact."""
    block = randomize_bn(block)
    folded = reparam.fold(block, (x,), **kw)
    counts = ops(folded)
    assert counts.get("conv", 0) == 1, counts
    for kind in ("batch_norm", "add", "cat", "avg_pool", "pad", "mul"):
        assert counts.get(kind, 0) == 0, counts
    assert_equivalent(block, folded, x, tol=tol)
    assert_exact64(block, x, **kw)
    assert folded.reparam_report.complete
    return folded


def test_repvgg_block_folds_to_one_conv():
    folded = check_one_conv(repvgg(8, 8), torch.randn(2, 8, 9, 9))
    (region,) = folded.reparam_report.regions
    assert region.geometry == "conv3x3(8->8,g1)"
    assert {"conv_bn", "parallel_sum", "pad_small_kernel", "identity_as_dirac"} <= set(
        region.rules)


def test_acnet_block_folds_to_one_conv():
    check_one_conv(acnet(6, 8), torch.randn(2, 6, 9, 9))


def test_dbb_block_folds_to_one_conv():
    check_one_conv(dbb(6, 8), torch.randn(2, 6, 9, 9))


def test_mobileone_block_folds_to_one_depthwise_conv():
    folded = check_one_conv(MobileOneDW(8, k=4), torch.randn(2, 8, 9, 9))
    assert folded.reparam_report.regions[0].geometry == "conv3x3(8->8,g8)"


def test_stride_2_groups_and_depthwise_variants():
    x = torch.randn(2, 8, 10, 10)
    check_one_conv(repvgg(8, 8, stride=2), x)
    check_one_conv(repvgg(8, 8, groups=2), x)
    check_one_conv(repvgg(8, 8, groups=4), x)
    check_one_conv(repvgg(8, 8, groups=8), x)
    check_one_conv(acnet(8, 8, stride=2, groups=4), x)
    check_one_conv(dbb(8, 8, stride=2, groups=2), x)
    check_one_conv(dbb(8, 16, groups=4), x)
    check_one_conv(MobileOneDW(8, k=2, stride=2), x)


def test_conv1d_and_conv3d_blocks():
    check_one_conv(repvgg(4, 4, nd=1), torch.randn(2, 4, 11))
    check_one_conv(dbb(4, 6, nd=1, stride=2), torch.randn(2, 4, 11))
    check_one_conv(repvgg(4, 4, nd=3, groups=2), torch.randn(2, 4, 5, 6, 5))
    check_one_conv(dbb(4, 4, nd=3), torch.randn(2, 4, 5, 5, 5))


def test_transposed_conv_with_bn():
    block = nn.Sequential(nn.ConvTranspose2d(6, 4, 4, 2, 1, groups=2), nn.BatchNorm2d(4))
    check_one_conv(block, torch.randn(2, 6, 5, 5))
    block = nn.Sequential(nn.ConvTranspose1d(3, 5, 3, 2, 1, output_padding=1), nn.BatchNorm1d(5))
    check_one_conv(block, torch.randn(2, 3, 7))


def test_linear_with_batchnorm1d():
    block = randomize_bn(nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5)))
    x = torch.randn(4, 7)
    folded = reparam.fold(block, (x,))
    assert ops(folded) == {"linear": 1}
    assert_equivalent(block, folded, x)
    assert_exact64(block, x)


def test_concatenated_branches_of_one_kernel_size():
    block = Branches(conv_bn(4, 3, 3, 1, 1), conv_bn(4, 5, 3, 1, 1), conv_bn(4, 2, 3, 1, 1),
                     cat=True)
    folded = check_one_conv(block, torch.randn(2, 4, 7, 7))
    assert folded.reparam_report.regions[0].geometry == "conv3x3(4->10,g1)"


class FunctionalRep(nn.Module):
    """The functional form: F.conv2d on parameters, F.batch_norm, a learned scale."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(c, c, 3, 3) * 0.2)
        self.w1 = nn.Parameter(torch.randn(c, c, 1, 1) * 0.2)
        self.alpha = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.conv2d(x, self.w3, None, 1, 1) + F.conv2d(x, self.w1) * self.alpha
        return F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight,
                            self.bn.bias, False, 0.1, self.bn.eps) - x * 0.5


def test_functional_form_folds():
    check_one_conv(FunctionalRep(6), torch.randn(2, 6, 8, 8))


class Resnetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 1, 1)
        self.a = conv_bn(8, 8, 3, 1, 1)
        self.b = conv_bn(8, 8, 3, 1, 1)
        self.down = conv_bn(8, 16, 1, 2, 0)
        self.c = conv_bn(8, 16, 3, 2, 1)
        self.d = conv_bn(16, 16, 3, 1, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.b(F.relu(self.a(x))) + x)
        return F.relu(self.d(F.relu(self.c(x))) + self.down(x))


def test_resnet_folds_every_bn_and_keeps_residual_adds():
    m = randomize_bn(Resnetish())
    x = torch.randn(2, 3, 12, 12)
    folded = reparam.fold(m, (x,))
    assert ops(folded) == {"conv": 6, "add": 2}
    assert_equivalent(m, folded, x)
    report = folded.reparam_report
    # the residual adds join different tensors: joins of the network, not leftovers
    assert report.complete and not report.leftovers, str(report)
    assert len(report.joins) == 2
    assert all("different tensors" in x.reason for x in report.joins)
    assert any("relu" in x.reason for x in report.joins)


# --- random blocks of random branches ----------------------------------------------------------

BRANCHES = ("kxk", "1x1", "identity", "seq", "avg", "1xk", "kx1", "scale")


@st.composite
def random_block(draw):
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 4]))
    c_in = groups * draw(st.integers(1, 2))
    same = draw(st.booleans())
    c_out = c_in if same else groups * draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 2]))
    k = draw(st.sampled_from([3, 5])) if nd < 3 else 3
    kinds = draw(st.lists(st.sampled_from(BRANCHES), min_size=1, max_size=4, unique=True))
    if "kxk" not in kinds:
        kinds.append("kxk")  # a main branch keeps the folded conv no dearer than the branches
    branches = []
    for kind in kinds:
        if kind == "kxk":
            branches.append(conv_bn(c_in, c_out, k, stride, k // 2, groups, nd))
        elif kind == "1x1":
            branches.append(conv_bn(c_in, c_out, 1, stride, 0, groups, nd))
        elif kind == "identity" and c_in == c_out and stride == 1:
            branches.append(BN[nd](c_in))
        elif kind == "seq":
            branches.append(dbb_seq(c_in, c_out, k, stride, groups, nd))
        elif kind == "avg":
            branches.append(dbb_avg(c_in, c_out, k, stride, groups, nd))
        elif kind in ("1xk", "kx1") and nd == 2:
            ks, pad = ((1, k), (0, k // 2)) if kind == "1xk" else ((k, 1), (k // 2, 0))
            branches.append(conv_bn(c_in, c_out, ks, stride, pad, groups, nd))
        elif kind == "scale":
            branches.append(Scaled(conv_bn(c_in, c_out, 1, stride, 0, groups, nd)))
    size = draw(st.integers(k, k + 4))
    seed = draw(st.integers(0, 10_000))
    torch.manual_seed(seed)
    block = Branches(*branches)
    for p in block.parameters():
        p.data.normal_(0, 0.5)
    return randomize_bn(block, seed), torch.randn(2, c_in, *([size] * nd)), kinds


class Scaled(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.gamma = nn.Parameter(torch.rand(inner[1].num_features) + 0.5)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.inner(x) * self.gamma.view(shape)


@given(random_block())
def test_random_rep_block_folds_to_one_conv(case):
    block, x, kinds = case
    check_one_conv(block, x)


@given(random_block(), st.sampled_from(["REPVGG", "ACNET", "DBB"]))
def test_smaller_rule_sets_stay_equivalent_and_say_why(case, name):
    """A rule set that lacks a law leaves that part unfolded, names the law, stays exact."""
    block, x, _ = case
    folded = reparam.fold(block, (x,), rules=getattr(reparam.rules, name))
    assert_equivalent(block, folded, x)
    report = folded.reparam_report
    if n_ops(folded, "conv") > 1:
        assert report.leftovers and not report.complete


# --- the cost policy ---------------------------------------------------------------------------

def test_cost_policy_splits_where_the_cost_arises():
    """depthwise 3x3+BN then 1x1+BN: one dense 3x3 would cost more, so the two convs stay
    apart, each with its BN folded (no BN is left behind)."""
    block = nn.Sequential(conv_bn(16, 16, 3, 1, 1, groups=16), conv_bn(16, 32, 1))
    block = randomize_bn(block)
    x = torch.randn(2, 16, 8, 8)
    folded = reparam.fold(block, (x,))
    assert ops(folded) == {"conv": 2}
    assert any("cost" in left.reason for left in folded.reparam_report.leftovers)
    assert_equivalent(block, folded, x)
    widened = reparam.fold(block, (x,), max_cost=10.0)
    assert ops(widened) == {"conv": 1}
    assert_equivalent(block, widened, x)


def test_cost_is_judged_over_the_whole_region():
    """dw 5x5 + dense 3x3 alone: a dense 5x5 is dearer, the add stays. With two dense
    1x1 -> 3x3 chains and a 1x1 beside them, one dense 5x5 is cheaper than all the branches."""
    c = 16
    pair = randomize_bn(Branches(conv_bn(c, c, 5, 1, 2, groups=c), conv_bn(c, c, 3, 1, 1)))
    x = torch.randn(2, c, 9, 9)
    folded = reparam.fold(pair, (x,))
    assert ops(folded) == {"conv": 2, "add": 1}
    assert_equivalent(pair, folded, x)
    block = randomize_bn(Branches(conv_bn(c, c, 5, 1, 2, groups=c), conv_bn(c, c, 3, 1, 1),
                                  dbb_seq(c, c, 3, 1, 1, 2), dbb_seq(c, c, 3, 1, 1, 2),
                                  conv_bn(c, c, 1)))
    check_one_conv(block, x)
    report = reparam.explain(block, x)
    (region,) = report.regions
    assert region.geometry == f"conv5x5({c}->{c},g1)"
    assert region.macs_after <= region.macs_before


class GhostLike(nn.Module):
    """y = conv3x3(P) + BN(P), P = conv1x1+BN(x): the 3x3 cannot compose with P's biased 1x1, so
    it reads P; the BN branch passes through P. They meet once P is a boundary (RepGhost)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = conv_bn(4, 6, 1)
        self.k = conv_bn(6, 6, 3, 1, 1, groups=6)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        p = self.p(x)
        return F.relu(self.k(p) + self.bn(p))


def test_branches_meet_where_one_starts_and_the_other_passes():
    block = randomize_bn(GhostLike())
    x = torch.randn(2, 4, 7, 7)
    folded = reparam.fold(block, (x,))
    assert ops(folded) == {"conv": 2}
    assert_equivalent(block, folded, x)
    assert_exact64(block, x)


class NormAct(nn.BatchNorm2d):
    """A third-party norm+activation module: a BN subclass outside torch.nn whose forward calls
    F.batch_norm itself, so torch.fx traces into it (timm's BatchNormAct2d does this)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-d input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


def test_functional_batch_norm_inside_a_third_party_module_folds():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c3 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), NormAct(6))
            self.c1 = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), NormAct(6))
            self.identity = NormAct(6)

        def forward(self, x):
            return F.relu(self.c3(x) + self.c1(x) + self.identity(x))

    check = randomize_bn(Block())
    x = torch.randn(2, 6, 7, 7)
    folded = reparam.fold(check, (x,))
    assert ops(folded) == {"conv": 1}
    assert_equivalent(check, folded, x)
    assert "_assert" not in folded.code
