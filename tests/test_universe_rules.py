"""The rules of the wider re-parameterization universe, property-tested against a float64 run of
the unfolded graph over dims, kernel sizes, strides, dilations, groups and amounts:

- ``spatial_crop``: a conv reading ``x[..., a:-b]`` is a conv on ``x`` with a negative padding,
  summed with the branches beside it (ACNet's block for padding < K//2);
- ``mixed_dilations``: branches at different dilations meet on the common grid (PSConv), judged
  by the cost policy and reached with ``max_cost``;
- ``channel_pieces``: chunks and splits of the input, concatenated in another order (a channel
  shuffle), are a permutation the conv after them takes in.

Where a fold is not exact the engine keeps the ops and stays correct."""

from __future__ import annotations

import torch
from helpers import assert_exact64, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam.models import ACBlock

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class CroppedBranches(nn.Module):
    """``square(x) + side(x[crop])``: a padded square conv beside a conv on a crop of x."""

    def __init__(self, dims, ch, out, k, stride, dilation, groups, crops, side_k) -> None:
        super().__init__()
        conv = CONV[dims]
        self.crops = crops  # the side conv's taps are the square's middle ones: same output size
        self.square = conv(ch, out, k, stride, padding=0, dilation=dilation, groups=groups)
        self.side = conv(ch, out, side_k, stride, padding=0, dilation=dilation, groups=groups)

    def forward(self, x):
        index = (slice(None), slice(None)) + tuple(slice(c, -c) if c else slice(None)
                                                   for c in self.crops)
        return self.square(x) + self.side(x[index])


@settings(max_examples=40, deadline=None)
@given(dims=st.integers(1, 3), ch=st.sampled_from([2, 4]), out=st.sampled_from([2, 6]),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), grouped=st.booleans(),
       data=st.data())
def test_a_conv_on_a_crop_folds_with_the_conv_beside_it(dims, ch, out, stride, dilation,
                                                         grouped, data):
    k = 3
    # the side conv is k' = k - 2c taps (odd), reading x cropped by c * dilation
    crops = [data.draw(st.integers(0, 1)) for _ in range(dims)]
    side_k = [k - 2 * c for c in crops]
    model = CroppedBranches(dims, ch, out, k, stride, dilation, 2 if grouped else 1,
                            [c * dilation for c in crops], side_k).eval()
    side = 10 if dims < 3 else 7
    x = torch.randn(2, ch, *([side] * dims))
    folded = assert_exact64(model, x, verify=False)
    assert reparam.count_ops(folded).get("conv", 0) == 1


@settings(max_examples=20, deadline=None)
@given(k=st.sampled_from([3, 5]), dims=st.integers(2, 3), stride=st.integers(1, 2),
       data=st.data())
def test_acnet_block_with_less_padding_folds_to_one_conv(k, dims, stride, data):
    padding = data.draw(st.integers(0, k // 2 - 1))
    block = randomize_bn(ACBlock(4, 6, k, stride=stride, padding=padding, dims=dims))
    x = torch.randn(2, 4, *([9] * dims))
    folded = assert_exact64(block, x, verify=False)
    assert reparam.count_ops(folded).get("conv", 0) == 1


class PaddedOnCrop(nn.Module):
    """A padded conv on a crop: it reads zeros where the whole input has pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x[:, :, 1:-1, 1:-1])


def test_a_padded_conv_on_a_crop_is_kept_and_stays_exact():
    model = PaddedOnCrop().eval()
    x = torch.randn(2, 3, 8, 8)
    folded = reparam.fold(model, x)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
    assert reparam.count_ops(folded).get("conv", 0) == 1  # the conv itself, not merged wrongly


class Dilated(nn.Module):
    """Branches of one kernel size at different dilations, each padded to keep the size."""

    def __init__(self, dims, ch, k, dilations, stride) -> None:
        super().__init__()
        conv = CONV[dims]
        self.branches = nn.ModuleList(
            conv(ch, ch, k, stride, padding=(k - 1) * d // 2, dilation=d) for d in dilations)

    def forward(self, x):
        return sum(b(x) for b in self.branches)


@settings(max_examples=30, deadline=None)
@given(dims=st.integers(1, 3), k=st.sampled_from([1, 3]), stride=st.integers(1, 2),
       dilations=st.lists(st.integers(1, 3), min_size=2, max_size=3))
def test_mixed_dilations_meet_on_the_common_grid(dims, k, stride, dilations):
    model = Dilated(dims, 3, k, dilations, stride).eval()
    x = torch.randn(2, 3, *([9 if dims < 3 else 7] * dims))
    folded = assert_exact64(model, x, verify=False, max_cost=100.0)
    assert reparam.count_ops(folded).get("conv", 0) == 1


class Shuffled(nn.Module):
    """A channel shuffle by pieces (PSConv's halves swapped in each group, or a split in sizes),
    then a conv: the conv takes the permutation in."""

    def __init__(self, ch, groups, sizes) -> None:
        super().__init__()
        self.groups, self.sizes = groups, sizes
        self.conv = nn.Conv2d(ch, 5, 3, padding=1)

    def forward(self, x):
        if self.sizes:
            return self.conv(torch.cat(list(reversed(x.split(self.sizes, 1))), 1))
        pieces = []
        for chunk in x.chunk(self.groups, 1):
            first, second = chunk.chunk(2, 1)
            pieces += [second, first]
        return self.conv(torch.cat(pieces, 1))


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), split=st.booleans(), data=st.data())
def test_a_channel_shuffle_by_pieces_goes_into_the_conv(groups, split, data):
    ch = 8
    sizes = None
    if split:
        first = data.draw(st.integers(1, ch - 1))
        sizes = [first, ch - first]
    model = Shuffled(ch, groups, sizes).eval()
    x = torch.randn(2, ch, 6, 6)
    folded = assert_exact64(model, x, verify=False)
    assert reparam.count_ops(folded) == {"conv": 1}


def test_pieces_of_a_folded_map_are_taken_after_it():
    """conv+BN, then its halves used apart: the conv+BN stays one conv (not one per half)."""

    class Halves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            left, right = self.bn(self.conv(x)).chunk(2, 1)
            return torch.relu(self.a(left)) * torch.sigmoid(self.b(right))

    model = randomize_bn(Halves())
    folded = assert_exact64(model, torch.randn(2, 4, 6, 6), verify=False)
    counts = reparam.count_ops(folded)
    assert counts.get("conv") == 3 and not counts.get("batch_norm"), counts
