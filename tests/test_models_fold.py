"""Every model of the zoo folds to its paper's deploy form with its family's rule set alone."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_equivalent, assert_exact64, ops, randomize_bn, rel_err, run64

import reparam
import reparam.models as M

# model -> (rule set, params after fold, convs after fold)
EXPECTED = {
    "repvgg_a0": ("REPVGG", 8_309_384, 22),
    "repvgg_a1": ("REPVGG", 12_789_864, 22),
    "repvgg_a2": ("REPVGG", 25_499_944, 22),
    "repvgg_b0": ("REPVGG", 14_339_048, 28),
    "repvgg_b1": ("REPVGG", 51_829_480, 28),
    "repvgg_b1g2": ("REPVGG", 41_360_104, 28),
    "repvgg_b1g4": ("REPVGG", 36_125_416, 28),
    "repvgg_b2": ("REPVGG", 80_315_112, 28),
    "repvgg_b2g2": ("REPVGG", 63_956_712, 28),
    "repvgg_b2g4": ("REPVGG", 55_777_512, 28),
    "repvgg_b3": ("REPVGG", 110_960_872, 28),
    "repvgg_b3g2": ("REPVGG", 87_404_776, 28),
    "repvgg_b3g4": ("REPVGG", 75_626_728, 28),
    "mobileone_s0": ("REPVGG", 2_078_504, 43),
    "mobileone_s1": ("REPVGG", 4_764_840, 43),
    "mobileone_s2": ("REPVGG", 7_808_168, 43),
    "mobileone_s3": ("REPVGG", 10_078_312, 43),
    "mobileone_s4": ("REPVGG", 14_838_352, 43 + 24),
    "resnet18": ("REPVGG", 11_684_712, 20),
    "acnet_resnet18": ("ACNET", 11_684_712, 20),
    "dbb_resnet18": ("DBB", 11_684_712, 20),
}
SLOW = {"repvgg_b2", "repvgg_b3", "repvgg_b3g2", "repvgg_b3g4", "repvgg_b1", "repvgg_b2g2"}


def cases():
    for name in EXPECTED:
        marks = [pytest.mark.slow] if name in SLOW else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", cases())
def test_model_folds_to_its_deploy_form(name):
    rules_name, params, convs = EXPECTED[name]
    torch.manual_seed(0)
    model = randomize_bn(getattr(M, name)())
    x = torch.randn(2, 3, 33, 33)  # odd size: borders and stride-2 rounding matter
    for rules in (getattr(reparam.rules, rules_name), reparam.rules.ALL):
        folded = reparam.fold(model, (x,), rules=rules)
        counts = ops(folded)
        assert counts.get("conv") == convs, counts
        assert "batch_norm" not in counts and "avg_pool" not in counts and "pad" not in counts
        if name.startswith(("repvgg", "mobileone_s0")):  # no add left in the body
            assert "add" not in counts, counts
        assert sum(p.numel() for p in folded.parameters()) == params
        if rules is not reparam.rules.ALL and name != "mobileone_s4":
            assert folded.reparam_report.regions  # the family's own rule set did the work
    want = run64(model, x)
    with torch.no_grad():
        unfolded, got = rel_err(model(x), want), rel_err(folded(x), want)
    # float32 rounding only: as accurate as the unfolded float32 model (random statistics make
    # some of these networks ill-conditioned), and within 1e-4 where the model allows
    assert got < max(1e-4, 4 * unfolded), (got, unfolded)
    if name not in SLOW:
        assert_exact64(model, x, rules=getattr(reparam.rules, rules_name))


def test_a_rule_set_that_lacks_a_law_says_so():
    model = randomize_bn(M.dbb_resnet18(num_classes=10))
    folded = reparam.fold(model, torch.randn(1, 3, 32, 32), rules=reparam.rules.REPVGG)
    report = folded.reparam_report
    assert not report.complete
    assert any("not in the rule set" in left.reason for left in report.leftovers)
    assert_equivalent(model, folded, torch.randn(1, 3, 32, 32), tol=1e-4)


def test_se_gate_is_left_with_its_reason():
    model = randomize_bn(M.RepVGGBlock(8, 8, use_se=True))
    x = torch.randn(2, 8, 9, 9)
    report = reparam.explain(model, x)
    assert report.max_error < 1e-5
    assert len(report.regions) >= 1
    counts = ops(reparam.fold(model, x))
    assert counts.get("batch_norm", 0) == 0 and counts.get("conv") == 3  # block + SE's two
