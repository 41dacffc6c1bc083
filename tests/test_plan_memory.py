"""What the fold's plan holds: intermediate kernels are released as the walk passes them and
recomputed when a later walk needs them; only the regions' results keep a kernel, in the dtype of
the module they become."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_equivalent, assert_exact64, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import reparam
from reparam import rewrite
from reparam.models import RepVGGBlock
from reparam.observe import observe
from reparam.rules import ALL


class Escaping(nn.Module):
    """``conv -> bn`` read by a ReLU and by a linear sum: the BN escapes its region, which only the
    second walk knows, so that walk must recompute the kernels the first one released."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.side = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y) + (y + self.side(x))


def plan_of(model: nn.Module, x: torch.Tensor):
    gm = fx.symbolic_trace(model)
    obs = observe(gm, (x,))
    rewrite.drop_identities(gm, obs)
    for i, node in enumerate(gm.graph.nodes):
        node.meta["_reparam_order"] = i
    folder = rewrite.Folder(gm, ALL, obs=obs)
    return folder, folder.plan()


def test_only_region_results_keep_a_kernel_in_the_model_dtype():
    model = randomize_bn(nn.Sequential(*[RepVGGBlock(8, 8) for _ in range(4)]))
    _, plan = plan_of(model, torch.randn(1, 8, 8, 8))
    lins = {n: v for n, v in plan.values.items() if isinstance(v, reparam.values.Lin)}
    kept = {n for n, v in lins.items() if not v.kernel.weight.is_meta}
    assert kept and kept <= plan.barriers
    assert all(lins[n].kernel.weight.dtype == torch.float32 for n in kept)
    assert len(lins) > 4 * len(kept)  # every inner node was released


def test_a_later_walk_recomputes_released_kernels(monkeypatch):
    revived = []
    original = rewrite.Folder._revive

    def spy(self, inputs, values, barriers):
        done = original(self, inputs, values, barriers)
        revived.extend(done)
        return done

    monkeypatch.setattr(rewrite.Folder, "_revive", spy)
    model = randomize_bn(Escaping(4))
    x = torch.randn(2, 4, 6, 6)
    folded = reparam.fold(model, x)
    assert {n.name for n in revived} >= {"bn", "conv"}
    assert_equivalent(model, folded, x)


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
        mp.setattr(rewrite.Folder, "_spend", lambda self, node, values: None)
        kept = reparam.fold(model, x).state_dict()
    wide = assert_exact64(model, x).state_dict()
    assert released.keys() == kept.keys() == wide.keys()
    for key, t in released.items():
        assert torch.equal(t, kept[key]), key
        assert torch.equal(t, wide[key].float()), key
