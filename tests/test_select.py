"""``fold(model, outputs=pick)``: the folded model returns ``pick(model(x))``, and what only the
dropped outputs needed leaves it (YOLOv10's one-to-many branch, auxiliary heads).

Checked in float64 against ``pick`` of the original's output; a routed, untraceable root (as
Ultralytics' ``DetectionModel``) carries the selection into the part whose output it returns
and keeps its class; where no part's output is the root's, the model is wrapped in
:class:`reparam.select.Selected`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from deployed_blocks import ConvNormAct, _route, run_routed
from helpers import randomize_bn, rel_err, run64
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam.models import RepVGGBlock
from reparam.select import Selected


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _bns(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


class Heads(nn.Module):
    """A trunk and ``n`` heads of different sizes, returned as a tuple (a network with
    auxiliary heads, as RepVGGplus returns them)."""

    def __init__(self, n: int, c: int, k: int) -> None:
        super().__init__()
        self.trunk = RepVGGBlock(c, c)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c + i, k, padding=k // 2), nn.BatchNorm2d(c + i))
            for i in range(n))

    def forward(self, x):
        y = self.trunk(x)
        return tuple(h(y) for h in self.heads)


class Only(nn.Module):
    """The same trunk and heads, returning only the heads ``keep``: the model ``outputs=``
    must fold into."""

    def __init__(self, model: Heads, keep: list[int]) -> None:
        super().__init__()
        self.model, self.keep = model, keep

    def forward(self, x):
        y = self.model.trunk(x)
        return tuple(self.model.heads[i](y) for i in self.keep)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(2, 6), k=st.sampled_from([1, 3]),
       data=st.data())
def test_outputs_keeps_the_selected_heads_exactly(n, c, k, data):
    keep = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    model = randomize_bn(Heads(n, c, k)).double().eval()
    x = torch.randn(2, c, 7, 7, dtype=torch.float64)

    def pick(out):
        return tuple(out[i] for i in keep)

    folded = reparam.fold(model, x, outputs=pick, verify=False)
    want = pick(run64(model, x))
    got = folded(x)
    assert len(got) == len(keep)
    assert max(rel_err(g, w) for g, w in zip(got, want, strict=True)) < 1e-10
    # another batch and map size
    x2 = torch.randn(3, c, 9, 5, dtype=torch.float64)
    assert max(rel_err(g, w) for g, w in
               zip(folded(x2), pick(run64(model, x2)), strict=True)) < 1e-10
    # as lean as the model that computes only those heads
    alone = reparam.fold(Only(model, keep).eval(), x, verify=False)
    assert _params(folded) == _params(alone) < _params(model) or len(keep) == n
    assert _bns(folded) == 0


def test_outputs_without_selection_keeps_every_head():
    model = randomize_bn(Heads(3, 4, 3)).eval()
    x = torch.randn(1, 4, 6, 6)
    whole = reparam.fold(model, x)
    some = reparam.fold(model, x, outputs=lambda out: out[1], check=True)
    assert _params(some) < _params(whole)
    assert rel_err(some(x), model(x)[1]) < 1e-5
    assert any("outputs=" in note for note in some.reparam_report.notes)
    assert reparam.explain(model, x, outputs=lambda out: out[1]).max_error < 1e-5


def test_outputs_may_compute():
    """Tensor code in the selection is traced into the graph and checked like the rest."""
    model = randomize_bn(Heads(2, 4, 3)).eval()
    x = torch.randn(1, 4, 6, 6)
    folded = reparam.fold(model, x, outputs=lambda out: out[0] * 2 + out[1][:, :4])
    want = model(x)
    assert rel_err(folded(x), want[0] * 2 + want[1][:, :4]) < 1e-5


# --- a routed root, as Ultralytics' DetectionModel -----------------------------------------------


class DualHead(nn.Module):
    """A YOLOv10-style head: a one-to-many and a one-to-one branch per level; in eval mode it
    returns the predictions of one branch and the raw outputs of both. It caches the input
    shape on the module, as Ultralytics' heads do (so torch.fx cannot trace it)."""

    shape = None

    def __init__(self, ch: tuple[int, ...], no: int) -> None:
        super().__init__()
        self.nl, self.no = len(ch), no
        self.cv = nn.ModuleList(nn.Sequential(ConvNormAct(c, c, 3), nn.Conv2d(c, no, 1))
                                for c in ch)
        self.one2one_cv = copy.deepcopy(self.cv)

    def _raw(self, heads, x):
        bs = x[0].shape[0]
        return torch.cat([h(xi).view(bs, self.no, -1) for h, xi in zip(heads, x,
                                                                        strict=True)], 2)

    def forward(self, x: list[torch.Tensor]):
        if self.shape != x[0].shape:
            self.shape = x[0].shape
        raw = {"one2many": self._raw(self.cv, x), "one2one": self._raw(self.one2one_cv, x)}
        if self.training:
            return raw
        return raw["one2many"].sigmoid(), raw


class RoutedDual(nn.Module):
    """Ultralytics' routing (``f``, ``i``, ``save``) over layers ending in :class:`DualHead`."""

    def __init__(self) -> None:
        super().__init__()
        self.model, self.save = _route([
            (-1, ConvNormAct(3, 8, 3, 2)),
            (-1, ConvNormAct(8, 16, 3, 2)),
            ([0, 1], DualHead((8, 16), 6)),
        ])
        self.names = {0: "a"}

    def forward(self, x):
        if x.shape[-1] % 8:  # checks on the input's size: torch.fx cannot trace the root
            raise ValueError("the input size must be a multiple of 8")
        return run_routed(self.model, self.save, x)


class Returned(RoutedDual):
    """The same, returning a new tuple around the head's output: no part's output is the
    root's."""

    def forward(self, x):
        return (super().forward(x),)


def test_outputs_go_into_the_part_a_routed_root_returns():
    model = randomize_bn(RoutedDual()).eval()
    x = torch.randn(1, 3, 16, 16)
    plain = reparam.fold(model, x)
    assert isinstance(plain, RoutedDual)

    def pick(out):  # what fuse() would leave: the predictions and the one-to-many raw output
        return out[0], out[1]["one2many"]

    folded = reparam.fold(model, x, outputs=pick)
    assert isinstance(folded, RoutedDual) and folded.names == {0: "a"}
    assert [m.i for m in folded.model] == [0, 1, 2]
    # the one-to-one branch is gone: its params, less the BN each conv took in (2c -> a bias c)
    branch = model.model[2].one2one_cv
    bn_channels = sum(m.num_features for m in branch.modules() if isinstance(m, nn.BatchNorm2d))
    assert _params(folded) == _params(plain) - (_params(branch) - bn_channels)
    assert _bns(folded) == 0
    for size in (16, 24):
        xs = torch.randn(1, 3, size, size)
        want = pick(run64(model, xs))
        got = folded(xs)
        assert max(rel_err(g, w) for g, w in zip(got, want, strict=True)) < 1e-5


def test_outputs_wrap_a_root_that_builds_its_output():
    model = randomize_bn(Returned()).eval()
    x = torch.randn(1, 3, 16, 16)
    folded = reparam.fold(model, x, outputs=lambda out: out[0][0])
    assert isinstance(folded, Selected)
    assert any("wrapped" in note for note in folded.reparam_report.notes)
    assert rel_err(folded(x), run64(model, x)[0][0]) < 1e-5
    assert _bns(folded) == 0


def test_outputs_errors_say_what_to_pass():
    model = Heads(2, 3, 1).eval()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(reparam.ReparamError, match="outputs must be a function"):
        reparam.fold(model, x, outputs=0)
    with pytest.raises(reparam.ReparamError, match="outputs= raised IndexError"):
        reparam.fold(model, x, outputs=lambda out: out[5])
    ep = torch.export.export(model, (x,))
    with pytest.raises(reparam.ReparamError, match="ExportedProgram"):
        reparam.fold(ep, outputs=lambda out: out[0])


# --- Keep: a selection by paths, which pickles; the command line's --outputs ----------------------


def test_keep_walks_indices_and_keys():
    out = (torch.zeros(1), {"one2many": torch.ones(2), 3: torch.ones(3)}, [torch.ones(4)])
    assert reparam.Keep("0")(out) is out[0]
    assert reparam.Keep("1.one2many")(out) is out[1]["one2many"]
    assert reparam.Keep("1.3", "-1.0")(out) == (out[1][3], out[2][0])
    with pytest.raises(KeyError, match="not an index"):
        reparam.Keep("x")(out)
    with pytest.raises(reparam.ReparamError, match="one or more paths"):
        reparam.Keep()


def test_a_wrapped_model_with_keep_saves_and_loads(tmp_path):
    model = randomize_bn(Returned()).eval()
    x = torch.randn(1, 3, 16, 16)
    folded = reparam.fold(model, x, outputs=reparam.Keep("0.1.one2one"))
    assert isinstance(folded, Selected)
    reparam.save(folded, tmp_path / "lean.pt", (x,))
    loaded = torch.load(tmp_path / "lean.pt", weights_only=False)
    assert rel_err(loaded(x), run64(model, x)[0][1]["one2one"]) < 1e-5


TWO_HEADS = '''
from torch import nn


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.aux = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.bn(self.conv(x))
        return {"main": y.relu(), "aux": self.aux(y)}


def build():
    return TwoHeads().eval()
'''


def test_the_command_line_keeps_the_outputs_it_names(tmp_path, monkeypatch, capsys):
    from reparam.cli import main

    (tmp_path / "two_heads.py").write_text(TWO_HEADS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["fold", "two_heads:build", "--input-shape", "1,3,8,8", "--outputs", "main",
                 "-o", "lean.pt"]) == 0
    out = capsys.readouterr().out
    assert "params    432 -> 112" in out, out
    assert "aux" not in out, "a dropped op is not a leftover"
    folded = torch.load(tmp_path / "lean.pt", weights_only=False)
    torch.manual_seed(0)  # the command line builds with --seed 0
    import two_heads

    model = two_heads.build()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)["main"]) < 1e-5
    assert main(["explain", "two_heads:build", "--input-shape", "1,3,8,8",
                 "--outputs", "nope"]) != 0
    assert "outputs= raised KeyError" in capsys.readouterr().err
