"""What the analysis holds while it plans: kernels inside a region are released once a run is
over and recomputed when a later run needs them; only the regions' results keep a kernel, in the
dtype of the module they become. Tested on the public seams of the graph layer: the IR, the
analysis and the driver's plan."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_equivalent, assert_exact64, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import reparam
from reparam.analysis import Analysis
from reparam.api import recognizer_for
from reparam.ir import IR
from reparam.models import RepVGGBlock
from reparam.observe import observe
from reparam.rewrite import plan
from reparam.rules import ALL


class Escaping(nn.Module):
    """``conv -> bn`` read by a ReLU and by a linear sum: the BN escapes its region, which only a
    later run knows, so that run must recompute the kernels the first one released."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.side = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y) + (y + self.side(x))


def analysis_of(model: nn.Module, x: torch.Tensor) -> Analysis:
    gm = fx.symbolic_trace(model)
    obs = observe(gm, (x,))
    ir = IR(gm, gm.graph, recognizer_for(ALL), obs)
    analysis = Analysis(ir, ALL)
    analysis.run()
    plan(analysis, ir, 1.0)
    return analysis


def test_only_region_results_keep_a_kernel_in_the_model_dtype():
    model = randomize_bn(nn.Sequential(*[RepVGGBlock(8, 8) for _ in range(4)]))
    analysis = analysis_of(model, torch.randn(1, 8, 8, 8))
    lins = {n: v for n, v in analysis.values.items() if isinstance(v, reparam.values.Lin)}
    kept = {n for n, v in lins.items() if not v.kernel.weight.is_meta}
    assert kept and kept <= analysis.boundaries
    assert all(lins[n].kernel.weight.dtype == torch.float32 for n in kept if lins[n].nodes)
    assert len(lins) > 4 * len(kept)  # every inner node was released


class SharedTwice(nn.Module):
    """``y = bn(conv(x))`` taken in by two regions: only a later run makes ``y`` their frontier,
    and ``y``'s kernel (released after the first run) must then be recomputed."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y * 2) + torch.sigmoid(y + 1)


def test_a_later_run_recomputes_released_kernels():
    model = randomize_bn(SharedTwice(4))
    x = torch.randn(2, 4, 6, 6)
    analysis = analysis_of(model, x)
    assert {n.name for n in analysis.revived} >= {"conv"}, analysis.revived
    assert_equivalent(model, reparam.fold(model, x), x)


def test_a_kernel_about_to_end_a_region_is_not_released():
    """A value a non-linear op reads (it will be a region's result) keeps its kernel: making it
    a boundary recomputes nothing."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                                       nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    analysis = analysis_of(model, torch.randn(2, 4, 6, 6))
    assert len(analysis.boundaries) == 2 and not analysis.revived


@settings(max_examples=15, deadline=None)
@given(c=st.integers(1, 6), blocks=st.integers(1, 4))
def test_release_and_recompute_change_no_bit(c, blocks):
    """Releasing and recomputing kernels changes nothing: the same fold with every kernel kept
    gives bitwise the same weights, and the float32 fold's weights are bitwise the float64
    fold's, cast once (the kernel arithmetic is float64 in both)."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [Escaping(c), RepVGGBlock(c, c)]
    model = randomize_bn(nn.Sequential(*layers))
    x = torch.randn(2, c, 7, 7)
    released = reparam.fold(model, x).state_dict()
    with pytest.MonkeyPatch.context() as mp:
        real = Analysis.release_kernels

        def cast_only(self):  # cast the regions' results, release nothing inside them
            inside = {n: v for n, v in self.values.items()
                      if isinstance(v, reparam.values.Lin) and n not in self.boundaries}
            real(self)
            self.values.update(inside)

        mp.setattr(Analysis, "release_kernels", cast_only)
        kept = reparam.fold(model, x).state_dict()
    wide = assert_exact64(model, x).state_dict()
    assert released.keys() == kept.keys() == wide.keys()
    for key, t in released.items():
        assert torch.equal(t, kept[key]), key
        assert torch.equal(t, wide[key].float()), key
