"""Bad inputs and awkward models: each gives a clear ``reparam.ReparamError`` (what is wrong,
what to do) or a correct fold. ``docs/reliability.md`` has the table of what happens with each.

Correct fold means: the folded model in the caller's dtype (and device) matches a float64 run of
the original within a tolerance for that dtype, and float64 folds are exact to 1e-12.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import n_ops, randomize_bn, rel_err, run64
from torch import nn

import reparam
from reparam.models import ACBlock, DBBlock, RepVGGBlock

F64 = torch.float64


@pytest.fixture(autouse=True)
def seeded():
    """Random weights are drawn from torch's global generator: make every test reproducible."""
    torch.manual_seed(0)
# float64 reference vs the folded model in each dtype (measured: fp16 ~5e-4, bf16 ~5e-3)
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}


def conv_bn(cin=3, cout=4, k=3, padding=1, **kw) -> nn.Sequential:
    return randomize_bn(nn.Sequential(nn.Conv2d(cin, cout, k, padding=padding, **kw),
                                      nn.BatchNorm2d(cout)))


def reasons(folded) -> str:
    return " | ".join(left.reason for left in folded.reparam_report.leftovers)


def check_fold(model: nn.Module, *inputs: torch.Tensor, tol: float | None = None) -> nn.Module:
    """Fold in the model's own dtype; compare with the float64 original; also fold in float64."""
    folded = reparam.fold(model, inputs)
    dtype = inputs[0].dtype
    want = run64(model, *inputs)
    with torch.no_grad():
        got = folded(*[x.clone() for x in inputs])
    assert got.dtype == dtype
    err = rel_err(got, want)
    assert err < (tol or TOL[dtype]), f"{dtype}: relative error {err:.3g}"
    m64 = copy.deepcopy(model).double()
    x64 = [x.double() for x in inputs]
    f64 = reparam.fold(m64, tuple(x64))
    with torch.no_grad():
        assert rel_err(f64(*[x.clone() for x in x64]), m64(*x64)) < 1e-12
    return folded


# --- training mode, batch statistics ----------------------------------------------------------


def test_bn_in_training_mode_says_call_eval_and_names_it():
    model = nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(4, 4))
    model[2][1].train()  # one nested BN left in training mode
    with pytest.raises(reparam.ReparamError, match=r"model\.eval\(\)") as e:
        reparam.fold(model, (torch.randn(2, 3, 6, 6),))
    assert "2.1" in str(e.value)  # names the BN


def test_model_in_training_mode_is_an_error():
    with pytest.raises(reparam.ReparamError, match=r"eval\(\)"):
        reparam.fold(conv_bn().train(), (torch.randn(2, 3, 6, 6),))


@pytest.mark.parametrize("affine", [True, False])
def test_bn_without_running_stats_stays_and_says_why(affine):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                          nn.BatchNorm2d(4, affine=affine, track_running_stats=False)).eval()
    x = torch.randn(3, 3, 6, 6)
    folded = reparam.fold(model, (x,))
    assert n_ops(folded, "batch_norm") == 1
    torch.testing.assert_close(folded(x), model(x))
    assert "batch statistics" in reasons(folded)


def test_bn_without_affine_folds():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                                       nn.BatchNorm2d(4, affine=False)))
    folded = check_fold(model, torch.randn(2, 3, 6, 6))
    assert n_ops(folded, "batch_norm") == 0


# --- not a model, wrong option types ------------------------------------------------------------


@pytest.mark.parametrize("thing", [{"weight": torch.zeros(1)}, torch.zeros(3), "resnet18",
                                   lambda x: x, None])
def test_not_a_module_is_a_clear_error(thing):
    with pytest.raises(reparam.ReparamError, match="nn.Module"):
        reparam.fold(thing)


@pytest.mark.parametrize("rules", ["repvgg", ["conv_bn"], [1, 2], reparam.rules.conv_bn])
def test_wrong_rules_are_a_clear_error(rules):
    with pytest.raises(reparam.ReparamError, match="rules"):
        reparam.fold(conv_bn(), (torch.randn(2, 3, 6, 6),), rules=rules)


@pytest.mark.parametrize("max_cost", [0, -1.0, float("nan")])
def test_non_positive_max_cost_is_a_clear_error(max_cost):
    with pytest.raises(reparam.ReparamError, match="max_cost"):
        reparam.fold(conv_bn(), (torch.randn(2, 3, 6, 6),), max_cost=max_cost)


@pytest.mark.parametrize("example", [{"x": torch.randn(2, 3, 6, 6)}, "x", 3,
                                     torch.randn(2, 3, 6, 6).numpy()])
def test_wrong_example_inputs_type_is_a_clear_error(example):
    with pytest.raises(reparam.ReparamError, match="example_inputs"):
        reparam.fold(conv_bn(), example)


@pytest.mark.parametrize("example", [torch.randn(2, 5, 6, 6), torch.randn(3, 6, 6),
                                     torch.ones(2, 3, 6, 6, dtype=torch.long)])
def test_example_inputs_the_model_rejects_are_a_clear_error(example):
    with pytest.raises(reparam.ReparamError, match="example_inputs"):
        reparam.fold(conv_bn(), (example,))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(), conv_bn()

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_two_inputs_without_example_inputs_is_a_clear_error():
    with pytest.raises(reparam.ReparamError, match="example_inputs"):
        reparam.fold(TwoInputs().eval())


def test_two_inputs_as_a_list_fold():
    model = TwoInputs().eval()
    x, y = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, [x, y])
    torch.testing.assert_close(folded(x, y), model(x, y), rtol=1e-5, atol=1e-5)
    assert n_ops(folded, "batch_norm") == 0


def test_example_inputs_may_be_omitted_for_a_conv_model():
    model = conv_bn()
    folded = reparam.fold(model)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_model_without_parameters_folds_to_itself():
    model = nn.Sequential(nn.ReLU(), nn.Identity()).eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(reparam.fold(model, (x,))(x), model(x))


# --- meta, untraceable, devices ---------------------------------------------------------------


def test_meta_device_model_is_a_clear_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(reparam.ReparamError, match="meta"):
        reparam.fold(model)
    with pytest.raises(reparam.ReparamError, match="meta"):
        reparam.fold(model, (torch.randn(2, 3, 6, 6),))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 3), conv_bn(3, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.a(x)
        return self.b(x)


def test_untraceable_model_folds_its_traceable_parts_and_names_the_rest():
    model = Untraceable().eval()
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, (x,))
    report = folded.reparam_report
    assert [path for path, _ in report.untraced] == [""]
    assert "does not trace" in report.untraced[0][1]
    assert len(report.regions) == 2 and not report.complete
    for sign in (1, -1):
        xs = x.abs() * sign
        torch.testing.assert_close(folded(xs), model(xs), rtol=1e-5, atol=1e-5)
    assert "not traced" in str(report)


def test_untraceable_model_without_example_inputs_still_folds_children():
    model = Untraceable().eval()
    folded = reparam.fold(model)
    x = torch.randn(2, 3, 6, 6).abs()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_model_on_gpu_folds_on_gpu():
    block = randomize_bn(RepVGGBlock(8, 8)).cuda()
    x = torch.randn(2, 8, 10, 10, device="cuda")
    folded = reparam.fold(block, (x,))
    assert all(p.device.type == "cuda" for p in folded.parameters())
    with torch.no_grad():
        got = folded(x)
    assert got.device.type == "cuda"
    assert rel_err(got.cpu(), run64(block.cpu(), x.cpu())) < 1e-4


# --- dtypes and memory formats -----------------------------------------------------------------


BLOCKS = {"repvgg": lambda: RepVGGBlock(8, 8), "dbb": lambda: DBBlock(8, 8),
          "acnet": lambda: ACBlock(8, 8)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_fold_keeps_the_dtype(block, dtype):
    model = randomize_bn(BLOCKS[block]()).to(dtype)
    x = torch.randn(2, 8, 10, 10, dtype=dtype)
    folded = check_fold(model, x)
    assert {p.dtype for p in folded.parameters()} == {dtype}
    assert n_ops(folded, "conv") == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_folds_without_example_inputs(dtype):
    model = randomize_bn(RepVGGBlock(4, 4)).to(dtype)
    folded = reparam.fold(model)
    assert {p.dtype for p in folded.parameters()} == {dtype}


@pytest.mark.parametrize("nd", [2, 3])
def test_channels_last_model_folds(nd):
    fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
    model = randomize_bn(RepVGGBlock(8, 8, dims=nd)).to(memory_format=fmt)
    x = torch.randn(2, 8, *([6] * nd)).to(memory_format=fmt)
    folded = check_fold(model, x)
    assert n_ops(folded, "conv") == 1
    (conv,) = [m for m in folded.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]
    assert conv.weight.is_contiguous(memory_format=fmt)  # the caller's format is kept
    assert not conv.weight.is_contiguous() or conv.weight.shape[1] == 1


# --- padding strings and modes, pools, in-place ops ------------------------------------------


class TwoBranches(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


def branch(k, padding, mode="zeros", stride=1, dilation=1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(4, 4, k, stride, padding, dilation, padding_mode=mode,
                                   bias=False), nn.BatchNorm2d(4))


@pytest.mark.parametrize("k", [1, 3, 5, (1, 3), (5, 3)])
def test_padding_same_string_folds(k):
    model = randomize_bn(TwoBranches(branch(k, "same"), branch(1, "same")))
    folded = check_fold(model, torch.randn(2, 4, 7, 8))
    assert n_ops(folded, "conv") == 1


def test_padding_same_with_an_even_kernel_stays_and_says_why():
    """k=4 "same" pads 1 on one side and 2 on the other: no symmetric padding expresses it."""
    model = randomize_bn(TwoBranches(branch(4, "same"), branch(1, "same")))
    folded = check_fold(model, torch.randn(2, 4, 7, 8))
    assert n_ops(folded, "conv") == 2
    assert "even kernel" in reasons(folded)


def test_padding_valid_string_folds():
    model = randomize_bn(TwoBranches(branch(3, "valid"), branch(3, 0)))
    folded = check_fold(model, torch.randn(2, 4, 7, 8))
    assert n_ops(folded, "conv") == 1


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_every_padding_mode_folds_beside_an_unpadded_1x1(mode):
    model = randomize_bn(TwoBranches(branch(3, 1, mode), branch(1, 0)))
    folded = check_fold(model, torch.randn(2, 4, 6, 7))
    assert n_ops(folded, "conv") == 1
    conv = next(m for m in folded.modules() if isinstance(m, nn.Conv2d))
    assert conv.padding_mode == mode


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_bn_before_a_non_zero_padded_conv_folds(mode):
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1,
                                                                    padding_mode=mode)))
    folded = check_fold(model, torch.randn(2, 4, 6, 6))
    assert n_ops(folded, "batch_norm") == 0


@pytest.mark.parametrize("modes", [("reflect", "zeros"), ("replicate", "circular"),
                                   ("circular", "reflect")])
def test_padding_modes_that_disagree_stay(modes):
    model = randomize_bn(TwoBranches(branch(3, 1, modes[0]), branch(3, 1, modes[1])))
    folded = check_fold(model, torch.randn(2, 4, 6, 6))
    assert n_ops(folded, "conv") == 2
    assert "padding modes" in reasons(folded)


def pool_branch(stride, ceil_mode, padding=1, count_include_pad=True) -> nn.Sequential:
    """1x1 (no bias: the pool's zero padding then reads true zeros), avg-pool, BN."""
    return nn.Sequential(nn.Conv2d(4, 4, 1, stride=1, bias=False),
                         nn.AvgPool2d(3, stride, padding, ceil_mode, count_include_pad),
                         nn.BatchNorm2d(4))


def test_avg_pool_with_ceil_mode_at_stride_1_folds():
    model = randomize_bn(TwoBranches(branch(3, 1), pool_branch(1, True)))
    folded = check_fold(model, torch.randn(2, 4, 7, 7))
    assert n_ops(folded, "conv") == 1


@pytest.mark.parametrize("size", [6, 7, 8])
def test_avg_pool_with_ceil_mode_and_stride_stays_and_says_why(size):
    model = randomize_bn(nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4),
                                       nn.AvgPool2d(3, 2, 1, ceil_mode=True)))
    folded = check_fold(model, torch.randn(2, 4, size, size))
    assert n_ops(folded, "avg_pool") == 1
    assert "ceil_mode" in reasons(folded)


def test_avg_pool_without_count_include_pad_stays():
    model = randomize_bn(TwoBranches(branch(3, 1), pool_branch(1, False, 1, False)))
    folded = check_fold(model, torch.randn(2, 4, 6, 6))
    assert "count_include_pad" in reasons(folded)


def test_functional_avg_pool_with_ceil_mode_stays():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = branch(3, 1)

        def forward(self, x):
            return F.avg_pool2d(self.c(x), 2, 2, 0, ceil_mode=True)

    folded = check_fold(randomize_bn(M()), torch.randn(2, 4, 7, 7))
    assert n_ops(folded, "avg_pool") == 1


class InPlace(nn.Module):
    """In-place activations and adds that write into tensors no one else reads."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(4, 4)
        self.block.act = nn.ReLU(inplace=True)
        self.c = branch(3, 1)
        self.d = branch(1, 0)

    def forward(self, x):
        y = self.block(x)
        z = self.c(y)
        z.add_(self.d(y))
        z = F.relu(z, inplace=True)
        z.mul_(0.5)
        return z.relu_()


def test_in_place_ops_are_respected():
    model = randomize_bn(InPlace())
    folded = check_fold(model, torch.randn(2, 4, 6, 6))
    assert n_ops(folded, "batch_norm") == 0


# --- other awkward models ------------------------------------------------------------------------


def test_sync_batch_norm_in_eval_folds():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SyncBatchNorm(4)))
    folded = check_fold(model, torch.randn(2, 3, 6, 6))
    assert n_ops(folded, "batch_norm") == 0


def test_weight_norm_parametrized_conv_stays_correct():
    model = conv_bn()
    model[0] = nn.utils.parametrizations.weight_norm(model[0])
    check_fold(model, torch.randn(2, 3, 6, 6))


def test_frozen_parameters_fold():
    model = conv_bn().requires_grad_(False)
    folded = check_fold(model, torch.randn(2, 3, 6, 6))
    assert n_ops(folded, "conv") == 1


def test_input_that_requires_grad_folds_and_backpropagates():
    model = conv_bn()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    folded = reparam.fold(model, (x,))
    folded(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in folded.parameters())


def test_default_arguments_of_forward_are_kept():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = conv_bn()

        def forward(self, x, scale: float = 2.0):
            return self.a(x) * scale

    model = Scaled().eval()
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, (x,))
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class DictOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 3)
        self.b = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return {"y": y, "nested": (y, [y * 2, x]), "x": x}


def test_dict_and_nested_outputs_keep_their_structure():
    model = randomize_bn(DictOutputs()).double()
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    folded = reparam.fold(model, (x,))
    got, want = folded(x), model(x)
    assert got.keys() == want.keys() and got["x"] is x
    for g, w in [(got["y"], want["y"]), (got["nested"][1][0], want["nested"][1][0])]:
        assert rel_err(g, w) < 1e-12
    assert n_ops(folded, "batch_norm") == 0 and n_ops(folded, "add") == 0


def test_channels_last_output_values_do_not_depend_on_the_format():
    """A channels-last model folds to channels-last weights; values are the same either way."""
    model = randomize_bn(RepVGGBlock(8, 8))
    x = torch.randn(2, 8, 6, 6)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    a = reparam.fold(model, (x,))(x)
    b = reparam.fold(cl, (x.to(memory_format=torch.channels_last),))(
        x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
