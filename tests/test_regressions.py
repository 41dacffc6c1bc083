"""Regression tests for engine bugs found by the fuzzer and the bad-input survey (issue 7).

Each test is the smallest model found that made ``reparam.fold`` hand back a wrong or broken
model, or crash on a valid one. The expected behaviour is always the same: the fold matches the
original in float64 (1e-9 relative) or it refuses with a clear :class:`reparam.ReparamError`;
never a silent wrong output, never a raw torch error. The descriptions (repro, suspected cause,
suggested fix) are in ``/work/survey/ENGINE_ISSUES.md`` under the same names (R1, R2, ...).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn
from torch import nn

import reparam
from reparam.api import fold as fold_unwrapped  # bound before conftest wraps it (see R11)

F64 = torch.float64


@pytest.fixture(autouse=True)
def seeded():
    """Random weights are drawn from torch's global generator: make every test reproducible."""
    torch.manual_seed(0)


def outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def assert_fold_exact(model: nn.Module, x: torch.Tensor, tol: float = 1e-9) -> nn.Module:
    """Fold ``model`` (float64) and compare with the original on clones of ``x``."""
    model = randomize_bn(model).double().eval()
    x = x.double()
    with torch.no_grad():
        want = outputs(model(x.clone()))
    folded = reparam.fold(model, (x.clone(),))
    with torch.no_grad():
        got = outputs(folded(x.clone()))
    for g, w in zip(got, want, strict=True):
        err = ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
        assert err < tol, f"fold returned a wrong model: relative error {err:.3g}\n{folded.code}"
    return folded


# --- R1: an in-place write through an alias is not seen by the fold ---------------------------


class WriteThroughIdentity(nn.Module):
    """``nn.Identity`` returns its input: ``relu_`` on its output rewrites ``a`` as well."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.id = nn.Identity()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        a = self.bn(x)
        self.id(a).relu_()  # a is now relu(bn(x))
        return self.conv(a)


class WriteThroughDropoutBetweenRegionOps(nn.Module):
    """The region ``c1(y) + 1`` spans an in-place write to ``y`` through an eval-mode dropout
    (which returns its input): the folded conv is placed after the write and reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = F.relu(x)
        a = self.c1(y)
        F.dropout(y, 0.5, False).mul_(2)
        return a + 1


class WriteThroughContiguous(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        a = self.c1(x)
        c = self.c2(a)
        a.contiguous().relu_()
        return c * 2, a


class FuzzerAliasAdd(nn.Module):
    """Shrunk from the fuzzer: ``x.add_`` through ``nn.Identity`` then ``y.add_(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.id = nn.Identity()

    def forward(self, x):
        v1 = F.avg_pool2d(x, 1, 1)
        v2 = self.id(x)
        v2.add_(v1)
        v1.add_(v2)
        return v1 * -0.5


class CloneThenWrite(nn.Module):
    """``clone`` (and a 1x1 avg-pool, ``x * 1``) make a new tensor; folding it away as an identity
    makes ``y.relu_()`` write into ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = x.clone()
        y.relu_()
        return self.conv(x) + y


@pytest.mark.parametrize("model", [WriteThroughIdentity, WriteThroughDropoutBetweenRegionOps,
                                   WriteThroughContiguous, FuzzerAliasAdd, CloneThenWrite])
def test_inplace_write_through_an_alias_is_respected(model):
    assert_fold_exact(model(), torch.randn(2, 3, 6, 6))


# --- R2: fold writes into the caller's example input ------------------------------------------


class MutatesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x.relu_()
        return self.conv(x)


def test_fold_does_not_write_into_example_inputs():
    x = torch.randn(2, 3, 6, 6)
    before = x.clone()
    reparam.fold(MutatesInput().eval(), (x,))
    assert torch.equal(x, before), "fold ran the model on the caller's tensor (or a view of it)"


# --- R3: a constant that broadcasts the channel axis crashes the fold -------------------------


class ChannelBroadcast(nn.Module):
    """A 1-channel conv times a (1, 3, 1, 1) parameter: the product has 3 channels."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.p = nn.Parameter(torch.rand(1, 3, 1, 1) + 0.5)

    def forward(self, x):
        y = self.conv(x)
        return y * self.p if self.op == "mul" else y + self.p


@pytest.mark.parametrize("op", ["mul", "add"])
def test_constant_that_broadcasts_channels_folds_or_stays(op):
    assert_fold_exact(ChannelBroadcast(op), torch.randn(2, 1, 6, 6))


# --- R4: a float64 constant in a float32 model gives a folded model that cannot run -----------


class MixedDtype(nn.Module):
    """float32 conv times a float64 buffer: torch promotes the product to float64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.register_buffer("scale", torch.rand(3, 1, 1, dtype=F64) + 0.5)

    def forward(self, x):
        return self.conv(x) * self.scale


def test_mixed_dtype_constant_keeps_the_folded_model_runnable():
    model = MixedDtype().eval()
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, (x,))
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- R5: batch-statistics BN cannot run on the one-sample shape-propagation input ----------------


class BatchStatsAfterLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.fc(x))


class BatchStatsAtOnePixel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, stride=4)
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


class HardCodedBatch(nn.Module):
    """Valid for the example batch of 2 only (as exported detection heads often are)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)).reshape(2, -1)


@pytest.mark.parametrize("model, shape", [(BatchStatsAfterLinear, (4, 4)),
                                          (BatchStatsAtOnePixel, (4, 3, 4, 4)),
                                          (HardCodedBatch, (2, 3, 5, 5))])
def test_model_that_needs_the_whole_example_batch_folds(model, shape):
    assert_fold_exact(model(), torch.randn(*shape))


# --- R6: `t += c` is traced by torch.fx as an out-of-place add ---------------------------------


class AugmentedAssignment(nn.Module):
    """Eager ``b += 1`` writes into ``b`` (and so into ``c``, the same tensor); torch.fx records
    ``add = b + 1`` and drops it, so the traced graph, and the fold, return ``c`` without the +1."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        b = self.conv(self.bn(x))
        c = b
        b += 1.0
        return c


def test_augmented_assignment_is_not_a_silent_wrong_model():
    """Either fold sees the write, or it refuses (ReparamError) naming the trace mismatch."""
    model = randomize_bn(AugmentedAssignment()).double()
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    try:
        folded = reparam.fold(model, (x,))
    except reparam.ReparamError as e:
        assert "trace" in str(e)
        return
    torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-12)


# --- R7: forward hooks and pre-hooks are dropped -------------------------------------------------


def conv_bn() -> nn.Sequential:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)))


def hook_on(where: str) -> nn.Module:
    m = conv_bn()
    if where == "conv":
        m[0].register_forward_hook(lambda mod, args, out: out * 2)
    elif where == "bn_pre":
        m[1].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    else:
        m.register_forward_hook(lambda mod, args, out: out * 2)
    return m


@pytest.mark.parametrize("where", ["conv", "bn_pre", "root"])
def test_forward_hooks_are_not_silently_dropped(where):
    """A hook changes what the module computes: keep the hooked module (and root hooks), or
    refuse with a ReparamError; never fold it away."""
    model = hook_on(where).double()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    try:
        folded = reparam.fold(model, (x,))
    except reparam.ReparamError as e:
        assert "hook" in str(e)
        return
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-12)


# --- R8: a Dropout left in training mode inside an eval model is folded as the identity --------


def test_dropout_in_training_mode_is_refused_or_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Dropout(0.5), nn.BatchNorm2d(4))
    model = randomize_bn(model)
    model[1].train()  # e.g. a submodule's .train() after model.eval()
    x = torch.randn(2, 3, 6, 6)
    try:
        folded = reparam.fold(model, (x,))
    except reparam.ReparamError as e:
        assert "eval()" in str(e)
        return
    assert any(isinstance(m, nn.Dropout) and m.training for m in folded.modules()), (
        "a training-mode dropout was folded as the identity: the folded model never drops")


# --- R9, R10: raw torch / Python errors instead of ReparamError ---------------------------------


def test_torchscript_module_is_a_clear_error():
    scripted = torch.jit.script(conv_bn())
    with pytest.raises(reparam.ReparamError, match="(?i)script"):
        reparam.fold(scripted, (torch.randn(2, 3, 6, 6),))


@pytest.mark.parametrize("kwargs", [{"max_cost": "1"}, {"max_cost": None}, {"rules": None},
                                    {"rules": 3}, {"leaf_modules": 3}])
def test_wrong_option_types_are_clear_errors(kwargs):
    with pytest.raises(reparam.ReparamError):
        reparam.fold(conv_bn(), (torch.randn(2, 3, 6, 6),), **kwargs)


# --- R11: fold initializes the caller's lazy modules ---------------------------------------------


def test_lazy_module_is_not_initialized_by_fold():
    """Uninitialized (lazy) parameters: a clear error, or a fold that leaves the caller's model
    uninitialized. Today shape propagation runs the lazy conv on parameters shared with the
    caller's model and materializes them with random values."""
    model = nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 6, 6)
    try:  # conftest's snapshot cannot clone uninitialized parameters: call fold unwrapped
        fold_unwrapped(model, (x,))
    except reparam.ReparamError as e:
        assert "lazy" in str(e).lower() or "uninitialized" in str(e).lower()
    assert isinstance(model[0].weight, nn.parameter.UninitializedParameter), (
        "fold initialized the caller's lazy parameters")


# --- R12: a folded model does not unpickle -------------------------------------------------------


def test_folded_model_pickles():
    """GraphModule pickling re-traces the code with the tracer class that made the graph;
    reparam's ``_Tracer(leaves)`` has no default for ``leaves``, so ``torch.load`` fails with
    "_Tracer.__init__() missing 1 required positional argument: 'leaves'"."""
    import io

    model = conv_bn()
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, (x,))
    buf = io.BytesIO()
    torch.save(folded, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), folded(x))


# --- R14: check=True runs both models on one input tensor ----------------------------------------


class DoublesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x.mul_(2.0)
        return self.conv(x)


def test_check_passes_on_a_model_that_writes_into_its_input():
    """``_check`` runs the folded and the original model on the same random tensor; a model that
    writes into its input (``x.mul_(2)``) changes it between the two runs: a false CheckError."""
    model = DoublesInput().eval()
    folded = reparam.fold(model, (torch.randn(2, 3, 6, 6),), check=True)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(folded(x.clone()), model(x.clone()), rtol=1e-5, atol=1e-6)


# --- R15: after the R1 fix, nothing that reads the output of an in-place op folds ----------------


def test_conv_bn_after_an_in_place_relu_folds():
    """``ReLU(inplace=True)`` writes into the first BN's output *before* the second conv reads it;
    no write comes between the second conv and its BN, so they fold. Since 6a581d7 the whole alias
    class of a written tensor is refused as a source ("'_2' is modified in place later"), which
    leaves every conv+BN after an in-place ReLU unfolded (torchvision resnet18: 18 of 20 BN)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    folded = assert_fold_exact(model, torch.randn(2, 3, 6, 6))
    assert reparam.count_ops(folded).get("batch_norm", 0) == 0, folded.reparam_report



# --- R16: a fold kept unfolded for a hook or a training dropout reports itself complete ---------


def dropout_in_training() -> nn.Module:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Dropout(0.5),
                                       nn.BatchNorm2d(4)))
    model[1].train()
    return model


@pytest.mark.parametrize("make", [lambda: hook_on("conv"), lambda: hook_on("bn_pre"),
                                  dropout_in_training], ids=["conv_hook", "bn_pre_hook",
                                                             "dropout_training"])
def test_report_says_why_a_conv_bn_pair_stayed(make):
    """The conv+BN pair stays (R7, R8) but the report says "0 linear ops left" and
    ``complete`` is True: the user is not told that, nor why, a BN was left."""
    folded = reparam.fold(make(), (torch.randn(2, 3, 6, 6),))
    report = folded.reparam_report
    assert not report.complete
    assert any(word in left.reason for left in report.leftovers
               for word in ("hook", "training", "dropout", "Dropout")), str(report)


# --- R6b: `t += c` whose result is read again is still a silent wrong model --------------------


class AugmentedAssignmentReadAgain(nn.Module):
    """As R6, but ``b`` (the fx ``add`` node) is read after ``+=``, so the add is not dead and
    the dead-arithmetic fidelity check of c44543e does not fire: eager returns 2 * (conv + 1),
    the fx graph (and the fold) conv + (conv + 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        b = self.conv(self.bn(x))
        c = b
        b += 1.0
        return c + b


def test_augmented_assignment_read_again_is_not_a_silent_wrong_model():
    model = randomize_bn(AugmentedAssignmentReadAgain()).double()
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    try:
        folded = reparam.fold(model, (x,))
    except reparam.ReparamError as e:
        assert "eager" in str(e)
        return
    torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-12)


# --- R6c: `t += c` in a helper that forward calls is not seen ----------------------------------


class AugmentedAssignmentInAHelper(nn.Module):
    """As R6b, but the ``+=`` sits in a method ``forward`` calls (found by the fuzzer, whose
    ``Program.forward`` runs instructions through ``self.step``): 278f37c scans the source of
    ``forward`` only, so the eager check is skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)

    def bump(self, b):
        b += 1.0
        return b

    def forward(self, x):
        b = self.conv(self.bn(x))
        c = b
        b = self.bump(b)
        return c + b


def test_augmented_assignment_in_a_helper_is_not_a_silent_wrong_model():
    model = randomize_bn(AugmentedAssignmentInAHelper()).double()
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    try:
        folded = reparam.fold(model, (x,))
    except reparam.ReparamError as e:
        assert "eager" in str(e)
        return
    torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-12)


class NoisyConv(nn.Module):
    """A conv of ``rand_like(x) * x`` (found by the long fuzz run, 2026-12-01)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 1, 1, 1, dtype=F64))
        self.b = nn.Parameter(torch.randn(1, dtype=F64))

    def forward(self, x):
        return F.conv2d(torch.rand_like(x) * x, self.w, self.b)


def test_check_compares_random_models_under_one_seed():
    """check=True ran the float64 fold and the original with different random numbers, so a
    model that draws them failed its check (CheckError, relative error 0.67)."""
    model = NoisyConv().eval()
    folded = reparam.fold(model, (torch.randn(2, 1, 5, 5, dtype=F64),), check=True)
    assert folded.reparam_report.joins  # the noise times x: where two tensors meet


class CoupledAugmented(nn.Module):
    """``t += 1`` on a name for the input (torch.fx traces it out of place, and the list keeps
    the input), then a conv and a BN with batch statistics: on the first sample alone the trace
    and eager mode agree, on the whole batch they do not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, dtype=F64)
        self.norm = nn.BatchNorm1d(1, track_running_stats=False, dtype=F64)
        self.fc = nn.Linear(1, 1, dtype=F64)

    def forward(self, x):
        kept = [x]
        shifted = kept[0]
        shifted += 1.0  # in place on x; the trace adds out of place and kept[0] stays x
        return shifted, self.fc(self.norm(self.conv(kept[0] * 0.5)).mean(2))


@pytest.mark.parametrize("verify", [True, False])
def test_a_model_that_couples_its_samples_is_checked_on_the_whole_batch(verify):
    """R19: the graph was observed, and the trace checked against eager mode, on the first
    sample of the example batch; here they agree on it, so a wrong model (error 7.7e-3 on the
    batch) came back, verified or not. Now everything runs on the whole batch."""
    torch.manual_seed(0)
    model = CoupledAugmented().eval()
    x = torch.randn(2, 1, 6, dtype=F64)
    with torch.no_grad():
        want = model(x.clone())
    try:
        folded = reparam.fold(model, (x.clone(),), verify=verify)
    except reparam.ReparamError as e:
        assert "eager" in str(e)
        return
    with torch.no_grad():
        got = folded(x.clone())
    assert max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) < 1e-9


class SharedSumThenTokenNorm(nn.Module):
    """FastViT's attention block: ``y = x + dw(x)`` (its positional conv) read by the residual
    and by a BN, then ``flatten -> transpose -> Linear`` on the tokens."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.BatchNorm2d(c)
        self.qkv = nn.Linear(c, c)

    def forward(self, x):
        y = x + self.dw(x)
        b, c, h, w = y.shape
        t = torch.relu(self.qkv(self.norm(y).flatten(2).transpose(1, 2)))
        return y + t.transpose(1, 2).reshape(b, c, h, w)


def test_a_bn_after_a_shared_sum_moves_on_into_the_linear_layer():
    """R20: the region of ``x + dw(x)`` and the BN after it both escaped in one decision and both
    became boundaries, so the BN (a per-channel map of the sum, once that is a boundary) could not
    move through the flatten into ``qkv``: FastViT kept one BN per attention stage."""
    model = randomize_bn(SharedSumThenTokenNorm()).eval()
    x = torch.randn(2, 4, 5, 5)
    folded = reparam.fold(model, x)
    assert reparam.count_ops(folded).get("batch_norm", 0) == 0
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() < 1e-5


def test_a_folded_model_with_a_captured_part_loads_from_a_pickle(tmp_path):
    """R21: ``torch.load`` rebuilds a pickled graph module by tracing its code again; the guard
    of a part captured with torch.export (DBB's BN-and-pad by slice assignment, a YOLO head)
    then ran on proxies and raised, so such a folded model saved as ``.pt`` (yolov8n's too) did
    not load. The guard now records itself as a node when traced, and the loaded model still
    refuses inputs outside the capture."""
    from deployed_blocks import SliceAssignDBB

    model = randomize_bn(nn.Sequential(SliceAssignDBB(4, 4), nn.ReLU())).eval()
    x = torch.randn(1, 4, 8, 8)
    folded = reparam.fold(model, x)
    assert folded.reparam_report.captured, "the block is captured with torch.export"
    reparam.save(folded, tmp_path / "dbb.pt")
    loaded = torch.load(tmp_path / "dbb.pt", weights_only=False)
    with torch.no_grad():
        for size in (8, 11):
            xs = torch.randn(2, 4, size, size)
            assert (loaded(xs) - model(xs)).abs().max() < 1e-5
    with pytest.raises(reparam.GuardError, match="float64"):
        loaded.double()(x.double())


def test_a_captured_head_with_symbolic_sizes_loads_from_a_pickle(tmp_path):
    """R21, second half: a head captured with symbolic sizes calls ``aten.full([1, h * w])``;
    traced again as ``torch.load`` rebuilds it, that size list holds a proxy, which torch's
    argument parser refuses. Folded graph modules now name the tracer that rebuilds them
    (``reparam.capture.Reload``), which records such calls as nodes."""
    from deployed_blocks import RoutedNet

    model = randomize_bn(RoutedNet(nc=3)).eval()
    folded = reparam.fold(model, torch.randn(1, 3, 16, 16))
    reparam.save(folded, tmp_path / "routed.pt")
    loaded = torch.load(tmp_path / "routed.pt", weights_only=False)
    with torch.no_grad():
        for size in (16, 24):
            xs = torch.randn(1, 3, size, size)
            assert (loaded(xs)[0] - model(xs)[0]).abs().max() < 1e-5


class ReadsItsPartsClass(nn.Module):
    """An untraceable root (it branches on the input's size) whose forward tests a part's
    class, as the fuzzer's RepMLP instruction does: a Linear gets flat patches, any other FC
    gets them as 1x1 maps. Its parts do not meet, so they are folded one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.branch = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
        self.other = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        t = x + 1.0 if x.shape[-1] > 1 else x
        flat = t.permute(0, 2, 3, 1).reshape(-1, 2)
        y = self.fc(flat) if isinstance(self.fc, nn.Linear) else self.fc(flat[..., None, None])
        z = self.branch(t)
        return y.reshape(x.shape[0], x.shape[2], x.shape[3], 3), (
            z if isinstance(self.branch, nn.Sequential) else -z), self.other(t)


def test_a_root_that_tests_its_parts_class_gets_them_back_unverified_too():
    """R22: folded part by part with ``verify=False``, a Linear that folded nothing was still
    swapped for a graph module, and the root, which tests ``isinstance(self.fc, nn.Linear)``,
    fed it 1x1 maps: the folded model raised. A part that folds nothing now stays as it was,
    and the root is run with its folded parts even unverified (only running it shows how its
    code uses them): the folded branch, which the root tests too, is put back."""
    model = randomize_bn(ReadsItsPartsClass()).double().eval()
    x = torch.randn(2, 2, 4, 5, dtype=F64)
    folded = fold_unwrapped(model, (x.clone(),), verify=False)
    assert type(folded.fc) is nn.Linear and type(folded.branch) is nn.Sequential
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.other.modules())
    with torch.no_grad():
        for g, w in zip(folded(x.clone()), model(x.clone()), strict=True):
            assert (g - w).abs().max() < 1e-9


class DepthwiseBeforePatches(nn.Module):
    """A BN and a depthwise 1x1 conv (per-channel maps) before RepMLP's patches, a head after:
    the two maps move through the 6-d patch view, where they are a map on 4 spatial axes."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.dw = nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1, groups=2)
        self.fc, self.bn = nn.Linear(2, 1), nn.BatchNorm2d(1)
        self.conv = nn.Sequential(nn.Conv2d(2, 1, 1), nn.BatchNorm2d(1))
        self.head, self.head_bn = nn.Linear(1, 1), nn.BatchNorm1d(1)

    def forward(self, x):
        v = self.dw(self.norm(x))
        patches = v.reshape(-1, 2, 5, 1, 5, 1).permute(0, 2, 4, 1, 3, 5)
        y = self.bn(self.fc(patches.reshape(-1, 2)).reshape(-1, 1, 1, 1))
        y = y.reshape(-1, 5, 5, 1, 1, 1) + self.conv(
            patches.reshape(-1, 2, 1, 1)).reshape(-1, 5, 5, 1, 1, 1)
        y = y.permute(0, 3, 1, 4, 2, 5).reshape(-1, 1, 5, 5)
        return self.head_bn(self.head(y.mean(dim=(2, 3))))


def test_a_depthwise_conv_moved_into_a_patch_view_is_a_channel_affine():
    """R23: the depthwise conv's map, moved through the 6-d patch view, ended its region there
    as a map on 4 spatial axes, and materializing it asked for a Conv4d: "a bug in reparam"
    (found by the long fuzz run on a89de2b; older than this session). A per-channel map of
    any rank is a ChannelAffine."""
    assert_fold_exact(DepthwiseBeforePatches(), torch.randn(2, 2, 5, 5))


class TwoNormsOnTokens(nn.Module):
    """A linear layer on channels-last tokens, moved back to channels-first, two BNs: the BNs
    fold into one per-channel affine, which keeps its input's (channels-last) strides where
    the BNs made a contiguous tensor. ``.view`` and ``rand_like`` read that layout, and so does
    a ``reshape`` in a graph torch.export captured (the slice assignment), which is a view."""

    def __init__(self, reader: str) -> None:
        super().__init__()
        self.lin, self.bn1, self.bn2 = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)
        self.reader = reader

    def forward(self, x):
        if self.reader == "captured":
            x = x.clone()
            x[:, 0] = x[:, 0] * 2  # torch.fx cannot trace it: the model is captured whole
        t = self.bn2(self.bn1(self.lin(x.movedim(1, -1)).movedim(-1, 1)))
        if self.reader == "rand_like":
            return torch.rand_like(t) * t
        return t.view(t.shape[0], -1) if self.reader == "view" else t.reshape(t.shape[0], -1)


@pytest.mark.parametrize("reader", ["view", "rand_like", "captured"])
def test_a_region_keeps_the_memory_layout_its_readers_depend_on(reader):
    """R24: the two BNs' folded affine kept the channels-last strides of its input, so the
    unverified float64 fold raised in ``.view`` ("view size is not compatible"), or drew
    ``rand_like``'s numbers in another order (relative error 0.3 to 1.9; found by the long fuzz
    run on 6ba29f3, older than that session). A region whose module lays its output out
    otherwise than the ops it replaces restores the traced layout."""
    model = randomize_bn(TwoNormsOnTokens(reader)).double().eval()
    x = torch.randn(2, 3, 6, dtype=F64)
    folded = fold_unwrapped(model, (x.clone(),), verify=False)
    assert [r.params_after for r in folded.reparam_report.regions] == [8]
    assert bool(folded.reparam_report.captured) == (reader == "captured")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        got = folded(x.clone())
        torch.manual_seed(0)
        assert (got - model(x.clone())).abs().max() < 1e-12


class ConvThenChannelsLast(nn.Module):
    """A conv and a BN, then a channels-last copy (an identity to the fold), then ``rand_like``:
    the region ends at the copy, laid out channels-last, and the folded conv's output is not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2)

    def forward(self, x):
        t = self.bn(self.conv(x)).contiguous(memory_format=torch.channels_last_3d)
        return torch.rand_like(t) * t


def test_a_conv_region_ending_at_a_channels_last_copy_keeps_that_layout():
    """R25: the R24 fix trusted a conv region to lay its output out as its conv did; ended at a
    channels-last copy, the folded conv gave a contiguous tensor and ``rand_like`` drew its
    numbers in another order (found by the long fuzz run on 888e99a, 200 wrong outputs, one
    program). The conv's layout is now compared with the region end's."""
    model = randomize_bn(ConvThenChannelsLast()).double().eval()
    x = torch.randn(2, 1, 3, 3, 4, dtype=F64)
    folded = fold_unwrapped(model, (x.clone(),), verify=False)
    assert len(folded.reparam_report.regions) == 1
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        got = folded(x.clone())
        torch.manual_seed(0)
        assert (got - model(x.clone())).abs().max() < 1e-12


class _ListHead(nn.Module):
    """Called as RT-DETR's head is, ``head(feats, batch)`` with ``batch=None``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, feats, batch=None):
        return self.bn(self.conv(feats[0] + feats[1]))


class _RoutedToListHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), _ListHead()

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace the root: its parts are folded one by one
            x = x + 1
        return self.head([self.a(x), self.b(x)], None)


def test_a_part_called_with_none_among_its_arguments_folds_on_what_it_received():
    """R26: a part called as ``head(feats, None)`` (RT-DETR's decoder) was not recorded (its
    arguments were not all tensors) and was folded on a guessed input, on which it failed:
    its BN stayed. ``None`` now counts as an optional argument."""
    torch.manual_seed(0)
    model = randomize_bn(_RoutedToListHead()).eval()
    folded = reparam.fold(model, torch.rand(2, 3, 8, 8))
    assert not [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
