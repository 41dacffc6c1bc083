"""``fold(..., progress=callback)``: the stages a fold reports, with counts over regions and
parts; a callback that fails never stops the fold; the command line's status line."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import reparam
from reparam.cli import _Status
from reparam.models import RepVGGBlock


def _stages(model, x) -> dict[str, list[tuple[int, int]]]:
    seen: dict[str, list[tuple[int, int]]] = {}
    reparam.fold(model, x, progress=lambda stage, done, total: seen.setdefault(
        stage, []).append((done, total)))
    return seen


def test_a_traced_fold_reports_each_region():
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4), nn.ReLU(), RepVGGBlock(4, 4)))
    seen = _stages(model, torch.randn(2, 4, 8, 8))
    assert list(seen) == ["tracing", "running", "regions", "verifying"]
    counts = seen["regions"]
    assert [d for d, _ in counts] == list(range(len(counts)))  # one tick per region end, in order
    assert all(t == len(counts) for _, t in counts) and len(counts) >= 2


class Routed(nn.Module):
    """A forward that does not trace: its parts are folded one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = RepVGGBlock(4, 4), RepVGGBlock(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


def test_a_fold_part_by_part_reports_its_parts():
    seen = _stages(randomize_bn(Routed()), torch.randn(2, 4, 8, 8).abs())
    assert [t for _, t in seen["parts"]][:1] == [2]


def test_a_failing_callback_does_not_stop_the_fold():
    def broken(stage, done, total):
        raise RuntimeError("the terminal went away")

    block = randomize_bn(RepVGGBlock(4, 4))
    folded = reparam.fold(block, torch.randn(2, 4, 6, 6), progress=broken)
    assert len(folded.reparam_report.regions) == 1


def test_progress_must_be_callable():
    with pytest.raises(reparam.ReparamError, match="progress"):
        reparam.fold(RepVGGBlock(4, 4).eval(), torch.randn(1, 4, 6, 6), progress="bar")


def test_the_status_line_draws_a_bar_over_counts():
    status = _Status()
    status("regions", 5, 20)
    assert status.text == "regions 5/20 [#####...............]"
    status("verifying", 0, 0)
    assert status.text == "verifying"
