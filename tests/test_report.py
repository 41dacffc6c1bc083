"""What ``str(report)`` shows: an aligned table (columns as wide as their widest cell, so they
never run together), the input its MACs were measured at, leftovers in graph order; and the
input a zoo network is measured at by default (its paper's)."""

from __future__ import annotations

import torch
from test_new_block import _block
from torch import fx, nn

import reparam
from reparam.models import conv_bn, mobileone_s0, repvgg_a0, resnet18
from reparam.report import Leftover, Region, Report


def wide_report() -> Report:
    long = "stage3.very_long_module_name_of_a_timm_model.with.many.parts.square.conv"
    return Report(
        regions=[Region(long, ("a", "b"), ("conv", "conv_bn"), "conv3x3(1024->2048,s2x2,g32)",
                        123_456_789, 98_765_432, 12_345_678_901, 9_876_543_210),
                 Region("b", ("c",), ("conv",), "conv1x1(8->8,g1)", 64, 64, 10, 9)],
        leftovers=[Leftover("add_1", "add", "why")], input_shapes=[(1, 3, 224, 224)],
        params_before=123_456_853, params_after=98_765_496)


def test_columns_are_as_wide_as_their_cells():
    lines = str(wide_report()).splitlines()
    assert lines[1] == "input: 1x3x224x224 (MACs are per sample at this size)"
    header = next(i for i, line in enumerate(lines) if line.startswith("module"))
    rows = lines[header:header + 3]
    starts = [rows[0].index(word) for word in ("folded", "nodes", "params", "MACs", "rules")]
    # every cell ends at least two spaces before the next column starts
    for row in rows[1:]:
        for start in starts:
            assert row[start - 2:start] == "  ", (row, start)
    assert "123,456,789 -> 98,765,432" in rows[1]
    assert rows[1].index(" -> ") == rows[2].index(" -> ")  # the arrows of a column line up
    assert rows[2].split()[:3] == ["b", "conv1x1(8->8,g1)", "1"]


def test_leftovers_come_in_graph_order():
    block = _block(8, relu_in="chain")  # the fold finds its leftovers in another order
    report = reparam.explain(block, torch.randn(1, 8, 12, 12))
    order = {n.name: i for i, n in enumerate(fx.symbolic_trace(block).graph.nodes)}
    names = [x.node for x in report.leftovers]
    assert len(names) > 3 and names == sorted(names, key=order.__getitem__), names
    table = str(report).split("left unfolded:\n", 1)[1].split("\n\n", 1)[0]
    assert [row.split()[0] for row in table.splitlines()[1:]] == names


def test_zoo_networks_are_measured_at_their_papers_input_size():
    for build in (repvgg_a0, mobileone_s0, resnet18):
        model = build().eval()
        assert model.default_input_size == (3, 224, 224)
        report = reparam.fold(model).reparam_report
        assert report.input_shapes == [(1, 3, 224, 224)], build.__name__
    macs = sum(r.macs_after for r in report.regions)
    assert macs > 1e9  # ResNet-18 at 224x224: 1.8G multiply-adds in its convs
    blocks = nn.Sequential(conv_bn(3, 8, 3, 1, 1))  # a block keeps the first-layer guess
    assert reparam.fold(blocks.eval()).reparam_report.input_shapes == [(2, 3, 64, 64)]
