"""Conv into FC (RepMLP): convs on fixed patches fold into the fully-connected layer beside them,
property-tested against a float64 run of the unfolded graph over channels, patch sizes, patch
grids, kernel sizes, groups, the FC's form (a grouped 1x1 conv or a linear layer) and its BN's
(1d over the flattened patch, or 2d over its channels); the folded model is also run at another
batch size and, where the code reads the grid from the input, at another map size.

Also the two moves a RepMLP unit's global perceptron needs: a BN flattened with its positions
(``(n, c, h, w) -> (n, c*h*w)``) into the linear layer after it, and an average pool of a tensor
no linear op made kept as a pool, the BN after it moving on into that linear layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_exact64, n_ops, randomize_bn, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam import models as M
from reparam.trace import deep_copy


class PatchMixer(nn.Module):
    """A partition perceptron in RepMLP's style on a ``c x (hp*h) x (wp*w)`` map: an FC over
    each flattened ``h x w`` patch and its BN, conv+BN branches on the same patches read as
    ``(n, c, h, w)`` tiles, summed on the patch grid, merged back to ``(n, o, H, W)``."""

    def __init__(self, c: int, o: int, h: int, w: int, grid: tuple[int, int],
                 kernels: tuple[int, ...], groups: int, linear: bool, bn2d: bool,
                 dynamic: bool) -> None:
        super().__init__()
        self.c, self.o, self.h, self.w, self.grid = c, o, h, w, grid
        self.linear, self.bn2d, self.dynamic = linear, bn2d, dynamic
        d_in, d_out = c * h * w, o * h * w
        self.fc = (nn.Linear(d_in, d_out, bias=False) if linear
                   else nn.Conv2d(d_in, d_out, 1, groups=groups, bias=False))
        self.bn = nn.BatchNorm2d(o) if bn2d else nn.BatchNorm1d(d_out)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, o, k, padding=k // 2, groups=groups, bias=False),
                          nn.BatchNorm2d(o)) for k in kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, o, h, w = self.c, self.o, self.h, self.w
        hp, wp = (x.size(2) // h, x.size(3) // w) if self.dynamic else self.grid
        patches = x.reshape(-1, c, hp, h, wp, w).permute(0, 2, 4, 1, 3, 5)
        flat = patches.reshape(-1, c * h * w) if self.linear else patches.reshape(
            -1, c * h * w, 1, 1)
        y = self.fc(flat)
        y = self.bn(y.reshape(-1, o, h, w)) if self.bn2d else self.bn(y.reshape(-1, o * h * w))
        y = y.reshape(-1, hp, wp, o, h, w)
        tiles = patches.reshape(-1, c, h, w)
        for branch in self.branches:
            y = y + branch(tiles).reshape(-1, hp, wp, o, h, w)
        return y.permute(0, 3, 1, 4, 2, 5).reshape(-1, o, hp * h, wp * w)


def _check_other_input(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-10


@settings(max_examples=30, deadline=None)
@given(c=st.sampled_from([2, 4]), o=st.sampled_from([2, 4]), h=st.integers(1, 4),
       w=st.integers(1, 4), grid=st.tuples(st.integers(1, 2), st.integers(1, 3)),
       kernels=st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3, unique=True),
       grouped=st.booleans(), linear=st.booleans(), bn2d=st.booleans(), dynamic=st.booleans())
def test_convs_on_patches_fold_into_the_fc(c, o, h, w, grid, kernels, grouped, linear, bn2d,
                                           dynamic):
    groups = 2 if grouped and not linear else 1
    model = randomize_bn(PatchMixer(c, o, h, w, grid, tuple(kernels), groups, linear, bn2d,
                                    dynamic)).eval()
    x = torch.randn(2, c, grid[0] * h, grid[1] * w)
    folded = assert_exact64(model, x, verify=False)
    assert n_ops(folded, "batch_norm") == 0
    assert n_ops(folded, "conv") == (0 if linear else 1)
    assert n_ops(folded, "linear") == (1 if linear else 0)
    m64 = deep_copy(model).double()
    _check_other_input(m64, folded, torch.randn(3, *x.shape[1:]).double())
    if dynamic:  # the grid is read from the input: another map size, the same patches
        bigger = torch.randn(1, c, (grid[0] + 1) * h, (grid[1] + 2) * w).double()
        _check_other_input(m64, folded, bigger)


class RuntimeTiles(PatchMixer):
    """The conv's tiles sized at run time (``patches.size(4)``): not provably one patch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, o, h, w = self.c, self.o, self.h, self.w
        hp, wp = self.grid
        patches = x.reshape(-1, c, hp, h, wp, w).permute(0, 2, 4, 1, 3, 5)
        y = self.bn(self.fc(patches.reshape(-1, c * h * w, 1, 1)).reshape(-1, o * h * w))
        tiles = patches.reshape(-1, c, patches.size(4), patches.size(5))
        z = self.branches[0](tiles)
        y = y.reshape(-1, hp, wp, o, h, w) + z.reshape(-1, hp, wp, o, h, w)
        return y.permute(0, 3, 1, 4, 2, 5).reshape(-1, o, hp * h, wp * w)


def test_tiles_sized_at_run_time_keep_their_conv() -> None:
    model = randomize_bn(RuntimeTiles(2, 2, 3, 3, (2, 2), (3,), 1, False, False, False)).eval()
    x = torch.randn(2, 2, 6, 6)
    folded = assert_exact64(model, x)
    assert n_ops(folded, "conv") == 2  # the FC (its BN folded in) and the conv beside it
    report = reparam.explain(model, x)
    assert report.regions


def test_a_conv_alone_on_patches_stays_a_conv() -> None:
    """Without an FC beside it the conv is not turned into one (it would cost more)."""

    class Tiles(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            patches = x.reshape(-1, 3, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5)
            y = self.bn(self.conv(patches.reshape(-1, 3, 4, 4))).reshape(-1, 2, 2, 3, 4, 4)
            return y.permute(0, 3, 1, 4, 2, 5).reshape(-1, 3, 8, 8)

    model = randomize_bn(Tiles()).eval()
    folded = assert_exact64(model, torch.randn(2, 3, 8, 8))
    assert n_ops(folded, "conv") == 1
    assert sum(p.numel() for p in folded.parameters()) == 3 * 3 * 9 + 3


class FlatHead(nn.Module):
    """``linear(flatten(bn(x)))``, optionally behind an average pool: a VGG-style head."""

    def __init__(self, c: int, h: int, w: int, pool: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c * (h // pool) * (w // pool), 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.bn(self.pool(x)), 1))


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 4), h=st.integers(2, 4), w=st.integers(2, 4), pool=st.integers(1, 2))
def test_a_bn_flattened_with_its_positions_folds_into_the_linear_layer(c, h, w, pool):
    h, w = h * pool, w * pool
    model = randomize_bn(FlatHead(c, h, w, pool)).eval()
    folded = assert_exact64(model, torch.randn(2, c, h, w), verify=False)
    assert n_ops(folded, "batch_norm") == 0 and n_ops(folded, "linear") == 1
    assert n_ops(folded, "conv") == 0  # a pool before the BN stays a pool
    assert n_ops(folded, "avg_pool") == (1 if pool > 1 else 0)


def test_a_pool_then_bn_with_nothing_after_becomes_a_conv() -> None:
    """Where nothing takes the BN in after the pool, the pool takes it in as a conv (as before)."""

    class PoolBn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool, self.bn = nn.AvgPool2d(2), nn.BatchNorm2d(3)

        def forward(self, x):
            return F.relu(self.bn(self.pool(x)))

    folded = assert_exact64(randomize_bn(PoolBn()).eval(), torch.randn(2, 3, 8, 8))
    assert n_ops(folded, "batch_norm") == 0


# --- reparam.models: RepMLP and RepMLPNet reach (or beat) their authors' deploy forms ----------


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_repmlp_unit_folds_to_its_authors_form() -> None:
    """The authors' test case: every local conv and BN in ``fc3`` (groups 4), ``avg``'s BN in
    ``fc1``, the pool kept: 40,920 parameters, as ``switch_to_deploy`` leaves."""
    unit = randomize_bn(M.RepMLPUnit(8, 8, 14, 14, 7, 7, (1, 3, 5), 1, 4)).eval()
    folded = assert_exact64(unit, torch.randn(2, 8, 14, 14), verify=False)
    assert n_params(folded) == 40_920
    assert reparam.count_ops(folded) == {"avg_pool": 1, "reshape": 6, "linear": 2, "add": 1,
                                         "permute": 2, "conv": 1}


@pytest.mark.parametrize(("args", "size", "authors"), [
    ((16, 4, 4, (1, 3), 4, 4), (8, 8), 1_236),
    ((8, 8, 8, (3,), 4, 1), (16, 16), 4_202),
    ((32, 4, 4, (1, 3), 4, 8), (12, 12), 2_728),
])
def test_repmlpnet_block_folds_its_convs_into_the_fc(args, size, authors) -> None:
    block = randomize_bn(M.RepMLPBlock(*args)).eval()
    folded = assert_exact64(block, torch.randn(2, args[0], *size), verify=False)
    assert n_params(folded) == authors  # fc3 with a bias of S*h*w, the gate's two convs
    assert n_ops(folded, "conv") == 3 and n_ops(folded, "batch_norm") == 0
    bigger = torch.randn(1, args[0], size[0] * 2, size[1] + args[1]).double()  # another grid
    _check_other_input(deep_copy(block).double(), folded, bigger)


def test_repmlpnet_folds_leaner_than_locality_injection() -> None:
    net = randomize_bn(M.RepMLPNet((8, 16, 32, 64), (8, 4, 2, 1), (8, 4, 2, 1), (1, 1, 1, 1),
                                   (1, 2, 4, 8), num_classes=10)).eval()
    folded = assert_exact64(net, torch.randn(2, 3, 32, 32), verify=False)
    assert n_params(folded) <= 65_024  # the authors' locality_injection keeps every other BN
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                   for m in folded.modules())  # no local conv left beside an FC
    _check_other_input(deep_copy(net).double(), folded, torch.randn(1, 3, 64, 64).double())
