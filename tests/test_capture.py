"""The torch.export capture path: what a capture is valid for (its guard), the pad whose border
is filled per channel (rule ``filled_pad``, property-tested in float64), chunk lists in torch.fx,
and a capture where a part cannot be traced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_exact64, randomize_bn, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam.functional import pad_filled


class BNAndPad(nn.Module):
    """DBB's BN-and-pad: a BN, then zero padding whose border is overwritten (slice assignment)
    with the BN's output at zero, so that the next conv sees the BN's padding, not zeros."""

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(channels), pad

    def forward(self, x):
        y = self.bn(x)
        y = F.pad(y, [self.pad] * 4)
        fill = (self.bn.bias - self.bn.running_mean * self.bn.weight /
                torch.sqrt(self.bn.running_var + self.bn.eps)).view(1, -1, 1, 1)
        p = self.pad
        y[:, :, :p, :] = fill
        y[:, :, -p:, :] = fill
        y[:, :, :, :p] = fill
        y[:, :, :, -p:] = fill
        return y


class PadThenConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, pad: int, functional: bool) -> None:
        super().__init__()
        self.pw = nn.Conv2d(cin, cin, 1, bias=False)
        self.bnpad = BNAndPad(cin, pad)
        self.conv = nn.Conv2d(cin, cout, k)
        self.functional = functional

    def forward(self, x):
        y = self.pw(x)
        if self.functional:  # the form a capture writes, called directly: torch.fx traces it
            bn = self.bnpad.bn
            fill = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
            return self.conv(pad_filled(bn(y), [self.bnpad.pad] * 4, fill))
        return self.conv(self.bnpad(y))


@settings(max_examples=5, deadline=None)  # each example is a torch.export capture (seconds)
@given(cin=st.integers(1, 4), cout=st.integers(1, 4), k=st.sampled_from([1, 3]),
       pad=st.integers(1, 2), side=st.integers(3, 7))
def test_filled_pad_folds_into_one_conv_exactly(cin, cout, k, pad, side):
    model = randomize_bn(PadThenConv(cin, cout, k, pad, functional=False))
    folded = assert_exact64(model, torch.randn(2, cin, side, side), verify=False)
    counts = reparam.count_ops(folded)
    assert counts.get("conv", 0) == 1 and not counts.get("batch_norm"), counts


def test_a_fill_that_is_not_the_bias_is_kept():
    class Wrong(PadThenConv):
        def forward(self, x):
            bn = self.bnpad.bn
            return self.conv(pad_filled(bn(self.pw(x)), [1] * 4, bn.bias + 1.0))

    model = randomize_bn(Wrong(3, 3, 3, 1, True))
    x = torch.randn(2, 3, 5, 5)
    folded = reparam.fold(model, x)
    assert rel_err(folded(x), model(x)) < 1e-5
    assert reparam.count_ops(folded).get("conv", 0) >= 2  # the border is not a conv's padding


def test_a_capture_is_guarded_against_another_dtype():
    model = randomize_bn(PadThenConv(3, 4, 3, 1, functional=False))
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, x)
    report = folded.reparam_report
    assert report.captured, "the slice assignment should have been captured"
    assert rel_err(folded(torch.randn(3, 3, 9, 7)), model(torch.randn(3, 3, 9, 7))) < 2  # runs
    with pytest.raises(reparam.GuardError, match="float64"):
        folded(x.double())


def test_a_capture_keeps_sizes_symbolic():
    model = randomize_bn(PadThenConv(3, 4, 3, 1, functional=False))
    folded = reparam.fold(model, torch.randn(1, 3, 6, 6))  # a batch of 1 is not fixed to 1
    for shape in ((1, 3, 6, 6), (4, 3, 11, 5)):
        x = torch.randn(*shape)
        with torch.no_grad():
            assert rel_err(folded(x), model(x)) < 1e-5
    assert reparam.count_ops(folded).get("conv", 0) == 1


class ChunkList(nn.Module):
    """C2f's ``y = list(cv1(x).chunk(2, 1))``, extended by a ModuleList, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))
        self.m = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
                               for _ in range(2))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(torch.relu(m(y[-1])) for m in self.m)
        return torch.cat(y, 1)


def test_a_chunk_list_traces_with_torch_fx():
    model = randomize_bn(ChunkList())
    x = torch.randn(2, 4, 6, 6)
    folded = reparam.fold(model, x)
    report = folded.reparam_report
    assert not report.captured and not report.untraced  # torch.fx followed it
    assert not reparam.count_ops(folded).get("batch_norm")
    assert rel_err(folded(x), model(x)) < 1e-5


class TwoScales(nn.Module):
    """A head over two feature maps, the second twice the size of the first (an FPN's levels),
    with a slice assignment (so torch.fx stops): torch.export writes the second size as 2*s."""

    def __init__(self) -> None:
        super().__init__()
        self.square = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
        self.point = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, small, big):
        y = self.square(big) + self.point(big) + F.interpolate(small, scale_factor=2.0)
        y[:, :, 0, 0] = 0.0
        return y


def test_a_size_derived_from_another_stays_symbolic():
    model = randomize_bn(TwoScales())
    folded = reparam.fold(model, (torch.randn(1, 3, 5, 5), torch.randn(1, 3, 10, 10)))
    assert "symbolic" in folded.reparam_report.captured[0][1]
    for side in (4, 7):
        args = (torch.randn(2, 3, side, side), torch.randn(2, 3, 2 * side, 2 * side))
        with torch.no_grad():
            assert rel_err(folded(*args), model(*args)) < 1e-5
    with pytest.raises(reparam.GuardError):
        folded(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 9, 9))
