"""Where folding would be wrong: the model stays equivalent, the region stays, the report says why.

Each case is checked in float64 (exact to 1e-10) so that a wrong fold cannot hide in rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equivalent, assert_exact64, n_ops, randomize_bn
from test_fold import Branches, conv_bn
from torch import nn

import reparam


def fold_and_check(block: nn.Module, x: torch.Tensor, **options):
    block = randomize_bn(block)
    folded = reparam.fold(block, (x,), **options)
    assert_equivalent(block, folded, x)
    assert_exact64(block, x, **options)
    return folded, folded.reparam_report


def reasons(report) -> str:
    return " | ".join(left.reason for left in report.leftovers)


def test_reflect_and_zero_padding_branches_stay_apart():
    block = Branches(
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4)),
        conv_bn(4, 4, 3, 1, 1),
    )
    folded, report = fold_and_check(block, torch.randn(2, 4, 7, 7))
    assert n_ops(folded, "conv") == 2 and n_ops(folded, "add") == 1
    assert "padding modes" in reasons(report)


def test_reflect_padding_beside_an_unpadded_1x1_folds():
    """The 1x1 reads no padding, so the modes do not meet: this one is exact and folds."""
    block = Branches(
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4)),
        conv_bn(4, 4, 1),
    )
    folded, report = fold_and_check(block, torch.randn(2, 4, 7, 7))
    assert n_ops(folded, "conv") == 1 and report.complete


def test_biased_1x1_before_zero_padded_3x3_stays():
    block = nn.Sequential(nn.Conv2d(4, 4, 1, bias=True), nn.Conv2d(4, 4, 3, padding=1))
    folded, report = fold_and_check(block, torch.randn(2, 4, 6, 6))
    assert n_ops(folded, "conv") == 2
    assert "bias" in reasons(report)


def test_bias_free_1x1_before_zero_padded_3x3_folds():
    block = nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.Conv2d(6, 4, 3, padding=1))
    folded, report = fold_and_check(block, torch.randn(2, 4, 6, 6))
    assert n_ops(folded, "conv") == 1


def test_bn_before_zero_padded_conv_stays():
    block = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    folded, report = fold_and_check(block, torch.randn(2, 4, 6, 6))
    assert n_ops(folded, "batch_norm") == 1
    assert "border" in reasons(report)


def test_bn_before_reflect_padded_conv_folds():
    block = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    folded, report = fold_and_check(block, torch.randn(2, 4, 6, 6))
    assert n_ops(folded, "batch_norm") == 0 and n_ops(folded, "conv") == 1


def test_relu_inside_a_branch_stays_and_is_named():
    """The ReLU makes the sum a join of two tensors (not one linear map of one input): listed
    apart from the leftovers, naming the ReLU; every linear op that could merge did."""
    block = Branches(nn.Sequential(conv_bn(4, 4, 3, 1, 1), nn.ReLU()), conv_bn(4, 4, 1))
    folded, report = fold_and_check(block, torch.randn(2, 4, 6, 6))
    assert n_ops(folded, "add") == 1 and n_ops(folded, "batch_norm") == 0
    assert [x.node for x in report.joins] == ["add"] and "ReLU" in report.joins[0].reason
    assert report.complete and not report.leftovers


class Shared(nn.Module):
    """One conv+BN module called twice: never mutated, never folded twice into itself."""

    def __init__(self) -> None:
        super().__init__()
        self.cb = conv_bn(4, 4, 3, 1, 1)

    def forward(self, x):
        return self.cb(self.cb(x)) + self.cb(x)


def test_shared_module_is_not_corrupted():
    block = Shared()
    folded, report = fold_and_check(block, torch.randn(2, 4, 6, 6))
    assert n_ops(folded, "batch_norm") == 0


def test_avg_pool_without_count_include_pad_stays():
    block = Branches(
        conv_bn(4, 4, 3, 1, 1),
        nn.Sequential(conv_bn(4, 4, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
    )
    folded, report = fold_and_check(block, torch.randn(2, 4, 6, 6))
    assert n_ops(folded, "avg_pool") == 1
    assert "count_include_pad" in reasons(report)


def test_padded_kxk_then_padded_kxk_stays():
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    folded, report = fold_and_check(block, torch.randn(2, 4, 6, 6))
    assert n_ops(folded, "conv") == 2


def test_mixed_dilations_are_regridded_only_when_the_cost_allows():
    """A dilated 3x3 beside dense 3x3s: one 5x5 on the common grid is exact but dearer, so the
    default fold keeps the branches and says so; max_cost reaches the one conv."""
    block = Branches(conv_bn(4, 4, 3, 1, 1), conv_bn(4, 4, 3, 1, 1, groups=2),
                     nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.BatchNorm2d(4)))
    x = torch.randn(2, 4, 7, 7)
    folded, report = fold_and_check(block, x)
    assert "cost policy" in reasons(report) and n_ops(folded, "conv") > 1
    folded, report = fold_and_check(block, x, max_cost=2.0)
    assert n_ops(folded, "conv") == 1


def test_per_position_scale_is_not_a_channel_scale():
    """x * w with w of shape (W,) broadcasts along the width, not the channels: no fold."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = conv_bn(4, 4, 3, 1, 1)
            self.w = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return self.c(x) * self.w

    folded, report = fold_and_check(M(), torch.randn(2, 4, 6, 6))
    assert "per channel" in reasons(report)


def test_bn_in_training_mode_is_an_error_that_says_eval():
    block = conv_bn(4, 4, 3, 1, 1).train()
    with pytest.raises(reparam.ReparamError, match=r"model\.eval\(\)"):
        reparam.fold(block, (torch.randn(2, 4, 6, 6),))


def test_bn_without_running_stats_stays():
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1),
                          nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(3, 4, 6, 6)
    folded = reparam.fold(block, (x,))
    assert n_ops(folded, "batch_norm") == 1
    torch.testing.assert_close(folded(x), block(x))
    assert "batch statistics" in reasons(folded.reparam_report)


def test_in_place_ops_are_respected():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = conv_bn(4, 4, 3, 1, 1)
            self.b = conv_bn(4, 4, 1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.a(x)
            z = y + self.b(x)
            self.act(y)  # mutates y after z read it
            return z + y

    folded, _ = fold_and_check(M(), torch.randn(2, 4, 6, 6))


def test_not_a_module_is_a_clear_error():
    with pytest.raises(reparam.ReparamError, match="nn.Module"):
        reparam.fold({"weight": torch.zeros(1)})


def test_wrong_rules_type_is_a_clear_error():
    with pytest.raises(reparam.ReparamError, match="rules"):
        reparam.fold(nn.Conv2d(1, 1, 1).eval(), rules="repvgg")


def test_meta_device_model_is_a_clear_error():
    with torch.device("meta"):
        block = conv_bn(4, 4, 3, 1, 1).eval()
    with pytest.raises(reparam.ReparamError, match="meta"):
        reparam.fold(block)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(4, 4, 3, 1, 1)
        self.b = conv_bn(4, 4, 3, 1, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return self.a(x)
        return self.b(x)


def test_untraceable_model_folds_its_parts_and_names_the_rest():
    m = randomize_bn(Untraceable())
    x = torch.randn(2, 4, 6, 6)
    folded = reparam.fold(m, (x,))
    report = folded.reparam_report
    assert report.untraced and report.untraced[0][0] == ""
    assert not report.complete
    assert n_ops(torch.fx.symbolic_trace(folded.a), "batch_norm") == 0
    for sign in (1, -1):
        xs = x.abs() * sign
        torch.testing.assert_close(folded(xs), m(xs), rtol=1e-4, atol=1e-5)


def test_untraceable_submodule_becomes_a_leaf_and_is_folded_inside():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = conv_bn(3, 4, 3, 1, 1)
            self.body = Untraceable()

        def forward(self, x):
            return self.body(F.relu(self.stem(x)))

    m = randomize_bn(Outer())
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(m, (x,))
    assert isinstance(folded, torch.fx.GraphModule)
    assert [p for p, _ in folded.reparam_report.untraced] == ["body"]
    assert n_ops(folded, "batch_norm") == 0
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in folded.modules())
    torch.testing.assert_close(folded(x), m(x), rtol=1e-4, atol=1e-5)


class ScaledBN(nn.BatchNorm2d):
    """A BN subclass whose forward does more (and does not trace: a Python assert)."""

    def forward(self, x):
        assert x.dim() == 4
        return super().forward(x) * 2 + 1


def test_bn_subclass_with_its_own_forward_is_not_taken_for_a_plain_bn():
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), ScaledBN(4))
    folded, report = fold_and_check(block, torch.randn(2, 4, 6, 6))
    assert not report.untraced  # torch.fx stops at the assert; torch.export sees all it does
    assert report.captured and report.captured[0][1].endswith("could not trace 1")
    assert [r.replaced for r in report.regions] == [("conv2d", "batch_norm", "mul", "add")]


class Cached(nn.Module):
    """Keeps a non-leaf tensor in a plain dict after a forward with grad enabled (LeViT does)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = conv_bn(4, 4, 3, 1, 1)
        self.cache: dict = {}

    def forward(self, x):
        self.cache["last"] = self.c[1].weight * 2  # non-leaf: deepcopy refuses it
        return self.c(x)


def test_model_with_a_non_leaf_tensor_cache_still_folds():
    m = randomize_bn(Cached())
    x = torch.randn(2, 4, 6, 6)
    m(x)
    folded = reparam.fold(m, (x,))
    assert n_ops(folded, "batch_norm") == 0
    assert_equivalent(m, folded, x)


@pytest.mark.parametrize("tail", ["bn", "scale"])
def test_lone_affine_op_between_nonlinearities_stays_and_is_named(tail):
    """A BN (or a constant scale) with a ReLU on both sides has nothing to fold into: it stays,
    and the report lists it with the reason, instead of claiming nothing linear was left."""

    class Lone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.gamma = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            y = self.bn(y) if tail == "bn" else y * self.gamma
            return torch.sigmoid(y)

    model = randomize_bn(Lone())
    x = torch.randn(2, 3, 8, 8)
    folded = reparam.fold(model, x)
    assert_equivalent(model, folded, x)
    report = folded.reparam_report
    assert len(report.leftovers) == 1 and not report.complete, str(report)
    why = report.leftovers[0].reason
    assert "nothing linear to fold it into" in why and "relu" in why and "sigmoid" in why, why
