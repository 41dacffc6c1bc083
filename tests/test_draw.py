"""Pictures of a block (``reparam.draw``): which block is drawn by default, one node per sum or
cat, the input shape stated, and op counts that agree with ``fold`` and ``explain``."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import randomize_bn
from torch import fx, nn

import reparam
from reparam import draw
from reparam.models import (
    MobileOneBlock,
    RepVGGBlock,
    conv_bn,
    dbb_resnet18,
    mobileone_s0,
    repvgg_a0,
)

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def reloaded(module: nn.Module) -> nn.Module:
    """``module`` through torch.save and torch.load (a graph module loses its nodes' meta)."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False).eval()


@pytest.mark.parametrize(("build", "block"), [
    (repvgg_a0, "stage1.1"),                       # the first block with an identity branch
    (mobileone_s0, "stage2.1.depthwise"),          # four 3x3 branches, a 1x1 and an identity
    (dbb_resnet18, "layer1.0.conv1"),              # a DBB block inside a basic block
    (lambda: nn.Sequential(conv_bn(3, 8, 3, 1, 1), nn.ReLU(), conv_bn(8, 8, 3, 1, 1)), "0"),
    (lambda: fx.symbolic_trace(repvgg_a0().eval()), "stage1.1"),  # a flat graph module
    (lambda: reloaded(fx.symbolic_trace(repvgg_a0().eval())), "stage1.1"),  # without its meta
])
def test_the_default_block_is_the_smallest_submodule_holding_a_region(build, block):
    model = build().eval()
    report = reparam.fold(model, X).reparam_report
    assert draw.block_of(model, report) == block
    picture = draw.picture(model, block, (X,))
    assert picture.report.regions and picture.ops_after < picture.ops_before


def test_a_plain_stack_of_layers_is_drawn_whole():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    assert draw.block_of(model, reparam.fold(model, X).reparam_report) == ""


def test_a_chain_of_sums_is_one_sum_node():
    block = randomize_bn(MobileOneBlock(8, 8, 3, num_branches=4))  # 6 terms: 5 pairwise adds
    gm = fx.symbolic_trace(block)
    graph = draw.op_graph(gm, [(1, 8, 16, 16)])
    sums = [n for n, d in graph.nodes(data=True) if d["label"] == "+"]
    assert len(sums) == 1 and graph.in_degree(sums[0]) == 6
    inputs = [d for _, d in graph.nodes(data=True) if d["kind"] == "io" and d["label"] == "x"]
    assert inputs[0]["detail"] == "1x8x16x16"


class Cats(nn.Module):
    """cat(cat(a, b), c) on ``outer``; the inner cat is on channels."""

    def __init__(self, outer: int, shared: bool = False):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(4, 4, 1) for _ in range(3))
        self.outer, self.shared = outer, shared

    def forward(self, x):
        inner = torch.cat([self.a(x), self.b(x)], 1)
        out = torch.cat([inner, self.c(x)], self.outer)
        return (out, inner) if self.shared else out


@pytest.mark.parametrize(("cats", "inputs"), [
    (Cats(1), [3]),                  # one cat of three
    (Cats(2), [2, 2]),               # another axis: two cats
    (Cats(1, shared=True), [2, 2]),  # the inner cat is read twice: kept
])
def test_a_cat_of_cats_on_one_axis_is_one_cat_node(cats, inputs):
    graph = draw.op_graph(fx.symbolic_trace(cats))
    found = sorted(graph.in_degree(n) for n, d in graph.nodes(data=True) if d["label"] == "cat")
    assert found == inputs


def test_the_input_shape_is_on_the_picture_and_the_page():
    model = nn.Sequential(RepVGGBlock(4, 8, stride=2), RepVGGBlock(8, 8)).eval()
    picture = draw.picture(model, "1", (torch.randn(1, 4, 16, 16),))
    assert picture.input_shapes == ((1, 8, 8, 8),)
    assert "<title>1 (RepVGGBlock), input 1x8x8x8</title>" in picture.svg
    assert "<p>Input 1x8x8x8;" in picture.html()


def test_draw_counts_ops_as_fold_and_explain_do():
    block = randomize_bn(RepVGGBlock(8, 8))
    x = torch.randn(1, 8, 8, 8)
    model = nn.Sequential(block).eval()
    picture = draw.picture(model, "0", (x,))
    report = reparam.explain(block, x)
    folded = reparam.fold(block, x)
    assert picture.ops_before == sum(report.ops_before.values()) == 7  # 2 conv, 3 BN, 2 add
    assert picture.ops_after == sum(report.ops_after.values()) == sum(
        reparam.count_ops(folded).values()) == 1
