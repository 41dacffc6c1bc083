"""timm's re-parameterizable families, folded by ``reparam.fold`` alone.

One model of each of the 14 families (and a second form where the family has one: grouped RepVGG,
LeViT's conv variant), built with ``pretrained=False``, BN statistics randomized, ``eval()``:

* the folded float32 output is within 1e-4 (relative: max abs diff / max abs of the reference) of
  a float64 run of the original;
* the folded graph has no more conv, BN and add nodes than timm's own converter
  (``timm.utils.model.reparameterize_model``) leaves, each kind on its own; the one exception is
  named in ``EXTRA_CONV`` (nextvit turns AvgPool1d+BN1d pairs into one conv each, so its conv+BN
  total still drops);
* where timm leaves plain conv+BN pairs unfused (fastvit, ghostnetv3, lcnetv2, nextvit,
  repghostnet), reparam leaves strictly fewer BN;
* every op reparam leaves carries a reason.

Ops are counted by ``scripts/timm_all.py`` (the long run over all 106 models, see docs/timm.md):
``reparam.count_ops`` on a torch.fx trace, with parts that do not trace counted child by child, on
both sides. timm's converter only ever runs on a copy of the model under test.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import randomize_bn, rel_err, run64

import reparam

timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _load_script():
    spec = importlib.util.spec_from_file_location("timm_all", ROOT / "scripts" / "timm_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TA = _load_script()

# model -> input side (the smallest the model accepts at a sensible depth; LeViT is fixed at 224)
CASES = [
    pytest.param("repvgg_a0", 64, id="repvgg_a0"),
    pytest.param("repvgg_b1g4", 64, id="repvgg_b1g4", marks=pytest.mark.slow),
    pytest.param("mobileone_s0", 64, id="mobileone_s0"),
    pytest.param("repghostnet_050", 64, id="repghostnet_050"),
    pytest.param("repvit_m0_9", 64, id="repvit_m0_9"),
    pytest.param("fastvit_t8", 64, id="fastvit_t8"),
    pytest.param("lcnetv2_small", 64, id="lcnetv2_small"),
    pytest.param("ghostnetv3_050", 64, id="ghostnetv3_050"),
    pytest.param("levit_128s", 224, id="levit_128s"),
    pytest.param("levit_conv_128s", 224, id="levit_conv_128s"),
    pytest.param("efficientvit_m0", 64, id="efficientvit_m0"),
    pytest.param("efficientvim_m1", 64, id="efficientvim_m1"),
    pytest.param("iformer_t", 64, id="iformer_t"),
    pytest.param("nextvit_small", 64, id="nextvit_small", marks=pytest.mark.slow),
    pytest.param("shvit_s1", 64, id="shvit_s1"),
    pytest.param("tiny_vit_5m_224", 64, id="tiny_vit_5m_224"),
]

# BN that reparam leaves today, and why (every other model: none)
BN_LEFT = {
    # norm1 (BN2d -> reshape -> transpose -> q/k/v Linear on tokens) would need the reshape moved
    # onto the BN's input; the final norm sits before a global average pool and the head.
    "nextvit_small": 5,
}
# convs reparam makes where timm keeps other ops: nextvit's three `e_mhsa.sr` AvgPool1d + BN1d
# pairs each become one strided depthwise Conv1d (two ops -> one, same multiply-adds)
EXTRA_CONV = {"nextvit_small": 3}
# timm's converter leaves these plain conv+BN pairs: reparam must leave fewer BN
TIMM_LEAVES_BN = ("fastvit", "ghostnetv3", "lcnetv2", "nextvit", "repghostnet")


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, pretrained=False), seed=0)


def _inputs(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _check_untraced(name: str, folded) -> None:
    report = folded.reparam_report
    if name.startswith(("efficientvit_m", "tiny_vit")):
        # data-dependent control flow: the window-attention blocks become leaves, and what is
        # inside them is folded child by child
        assert report.untraced, "expected the window-attention blocks to be reported untraced"
        inside = [r for r in report.regions
                  if any(r.name.startswith(p + ".") for p, _ in report.untraced)]
        assert inside, "nothing was folded inside the untraced blocks"
    else:
        assert not report.untraced, report.untraced


@pytest.mark.parametrize("name,size", CASES)
def test_fold_matches_fp64_and_timm(name, size):
    model = _model(name)
    x = _inputs(size)
    want = run64(model, x)

    folded = reparam.fold(model, x)  # reparam alone: timm's converter never touches `model`
    with torch.no_grad():
        got = folded(x)
    err = rel_err(got, want)
    assert err < TOL, f"{name}: relative error {err:.3g} against float64"

    report = folded.reparam_report
    assert all(left.reason for left in report.leftovers), "a leftover without a reason"
    _check_untraced(name, folded)

    ours = TA.ops3(TA.deep_ops(folded))
    theirs = TA.ops3(TA.deep_ops(reparameterize_model(copy.deepcopy(model))))
    msg = f"{name}: reparam conv/BN/add {ours}, timm {theirs}"
    assert ours["batch_norm"] <= BN_LEFT.get(name, 0), msg
    assert ours["batch_norm"] <= theirs["batch_norm"], msg
    assert ours["add"] <= theirs["add"], msg
    assert ours["conv"] <= theirs["conv"] + EXTRA_CONV.get(name, 0), msg
    assert ours["conv"] + ours["batch_norm"] <= theirs["conv"] + theirs["batch_norm"], msg
    if TA.family_of(name) in TIMM_LEAVES_BN:
        assert ours["batch_norm"] < theirs["batch_norm"], msg


def test_levit_fold_twice_after_an_eager_forward():
    """LeViT caches its attention biases per device. A grad-enabled eager forward stores a
    non-leaf tensor there (deepcopy then fails) and a trace of the model itself would store a
    Proxy. fold must trace a copy, leave the cache as it was, and fold the same model again."""
    model = _model("levit_128s")
    x = _inputs(224)[:1]
    want = run64(model, x)
    model(x)  # grad enabled: the cache now holds a non-leaf tensor under 'cpu'
    caches = [m.attention_bias_cache for m in model.modules()
              if hasattr(m, "attention_bias_cache")]
    assert caches and all(list(c) == ["cpu"] for c in caches)
    before = [dict(c) for c in caches]
    first = reparam.fold(model, x)
    second = reparam.fold(model, x)
    for c, b in zip(caches, before, strict=True):
        assert c.keys() == b.keys() and all(c[k] is b[k] for k in b), "fold wrote into the cache"
    for folded in (first, second):
        folded.graph.lint()
        with torch.no_grad():
            assert rel_err(folded(x), want) < TOL
    assert reparam.count_ops(first) == reparam.count_ops(second)


class _LinearNorm(torch.nn.Module):
    """LeViT's LinearNorm, with variants that must not fold."""

    def __init__(self, variant: str = "levit") -> None:
        super().__init__()
        self.variant = variant
        self.linear = torch.nn.Linear(6, 8)
        self.bn = torch.nn.BatchNorm1d(8 if variant != "merge_channels" else 8 * 5)

    def forward(self, x):
        y = self.linear(x)
        if self.variant == "merge_channels":  # BN over (token, channel) pairs: not per channel
            return self.bn(y.flatten(1)).reshape_as(y)
        z = self.bn(y.flatten(0, 1))
        if self.variant == "escapes":  # the flattened BN output is also returned
            return z.reshape_as(y), z
        if self.variant == "nonlinear":  # a non-linear op before the shape is restored
            z = torch.relu(z)
        return z.reshape_as(y)


@pytest.mark.parametrize("variant,folds", [("levit", True), ("escapes", False),
                                           ("nonlinear", False), ("merge_channels", False)])
def test_linear_flatten_bn_reshape(variant, folds):
    model = randomize_bn(_LinearNorm(variant))
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(0))
    folded = reparam.fold(model, x, check=True)
    ops = reparam.count_ops(folded)
    assert (ops.get("batch_norm", 0) == 0) is folds, (ops, folded.reparam_report)
    want = run64(model, x)
    with torch.no_grad():
        got = folded(x)
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,), strict=True):
        assert g.shape == w.shape and rel_err(g, w) < 1e-5
