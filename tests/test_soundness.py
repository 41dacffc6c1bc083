"""Soundness: ``fold`` never hands back a wrong or broken model (issue: soundness and security).

Each test is a small model that a fold which missed one category would get wrong: a write torch
does in place, behaviour set on the instance, a random op, the caller's tensors, a dtype's range,
op arguments computed at run time, the default verification. The expected behaviour is always:
the folded model computes what the original computes (or the op stays, with its reason), and the
caller's model is untouched (conftest checks that for every fold).
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import n_ops, randomize_bn, rel_err
from torch import nn

import reparam

F64 = torch.float64


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def conv_bn(cin=3, cout=3, k=3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout))


def exact(model: nn.Module, x: torch.Tensor, tol: float = 1e-9, calls: int = 1, **kw):
    """Fold a float64 ``model``; the folded model matches the original on ``calls`` calls."""
    model = randomize_bn(model).double().eval()
    x = x.double()
    folded = reparam.fold(model, (x.clone(),), **kw)
    reference = _copy(model)
    for _ in range(calls):
        with torch.no_grad():
            want, got = reference(x.clone()), folded(x.clone())
        assert rel_err(got, want) < tol, f"{rel_err(got, want):.3g}\n{folded.reparam_report}"
    return folded


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# --- 1. every way a tensor gets written is seen ------------------------------------------------


class OutIntoInput(nn.Module):
    """``torch.mul(x, 2, out=x)`` after the BN read x: folding the BN into the conv would read
    the doubled x."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.bn(x)
        torch.mul(x, 2, out=x)
        return self.conv(y) + x


class OutIntoIntermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        h = self.c1(x)
        z = self.bn(h)
        torch.add(h, 1.0, out=h)
        return self.c2(z) + h


class Written(nn.Module):
    """``h`` written in place (in one of many ways) after the BN read it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c1, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        h = self.c1(x)
        z = self.bn(h)
        if self.how == "data":
            h.data.mul_(2)
        elif self.how == "detach":
            h.detach().add_(1)
        elif self.how == "view":
            h.view(-1).mul_(-1)
        elif self.how == "slice":
            h[:, :1].zero_()
        elif self.how == "aten":
            torch.ops.aten.mul_.Scalar(h, 3.0)
        elif self.how == "copy":
            h.copy_(x)
        elif self.how == "setitem":
            h[:, 0] = 1.0
        return self.c2(z) + h


@pytest.mark.parametrize("model", [OutIntoInput, OutIntoIntermediate])
def test_out_arguments_are_writes(model):
    exact(model(), torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("how", ["data", "detach", "view", "slice", "aten", "copy", "setitem"])
def test_writes_through_any_alias_are_seen(how):
    folded = exact(Written(how), torch.randn(2, 3, 6, 6))
    assert n_ops(folded, "batch_norm") == 0  # c1 + bn still fold: they end before the write


class WritesItsInput(nn.Module):
    """A module kept as a leaf (named in leaf_modules) that writes the tensor it receives."""

    def forward(self, x):
        x.mul_(-2.0)
        return x.sum()


class LeafWriter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, 1)
        self.leaf = WritesItsInput()

    def forward(self, x):
        h = self.c1(x)
        z = self.bn(h)
        s = self.leaf(h)
        return self.c2(z) + h + s


def test_a_leaf_that_writes_its_input_is_seen():
    exact(LeafWriter(), torch.randn(2, 3, 6, 6), leaf_modules=["leaf"])


class BufferWritten(nn.Module):
    """forward scales a buffer in place on every call: the buffer is state, not a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.register_buffer("scale", torch.full((1, 3, 1, 1), 2.0))

    def forward(self, x):
        self.scale.mul_(1.5)
        return self.conv(x) * self.scale


def test_a_buffer_that_forward_writes_is_not_a_constant():
    model = BufferWritten().double()
    before = model.scale.clone()
    folded = exact(model, torch.randn(2, 3, 6, 6), calls=3)
    assert torch.equal(model.scale, before), "fold wrote the caller's buffer"
    assert n_ops(folded, "mul") == 1


class ParamWritten(nn.Module):
    """forward writes one of its own parameters (through .data): folding must use a copy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        self.conv.bias.data.mul_(1.0)
        return self.bn(self.conv(x))


def test_a_parameter_written_in_forward_is_never_the_callers():
    model = randomize_bn(ParamWritten()).double()
    version = model.conv.bias._version
    exact(model, torch.randn(2, 3, 6, 6))
    assert model.conv.bias._version == version


class _NoHooksHere(collections.OrderedDict):
    """A hook dictionary that refuses a new hook: fold must hook its own copies only."""

    def __setitem__(self, key, value):
        raise AssertionError("fold registered a hook on the caller's module")

    def __copy__(self) -> collections.OrderedDict:  # a copy of the module is the fold's own
        return collections.OrderedDict(self)

    def __deepcopy__(self, memo) -> collections.OrderedDict:
        return collections.OrderedDict(self)


class Untraceable(nn.Module):
    """A block torch.fx cannot trace (it branches on a tensor's value), holding torch layers
    that a fold hooks (to record their inputs) and folds one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.act(y) if y.sum() > 0 else -self.act(y)


def test_the_callers_layers_are_never_hooked_and_never_returned():
    """The copies a fold traces and runs share torch's stateless layers with the caller's model;
    a layer the fold hooks, folds into or returns is its own copy first."""
    model = randomize_bn(nn.Sequential(Untraceable(), nn.Conv2d(4, 4, 1), nn.ReLU())).double()
    for m in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks"):
            setattr(m, name, _NoHooksHere())
    folded = exact(model, torch.randn(2, 3, 6, 6))
    theirs = {id(m) for m in model.modules()}
    assert not [m for m in folded.modules() if id(m) in theirs]


# --- 2. what runs is what is folded ------------------------------------------------------------


def test_a_forward_replaced_on_the_instance_is_respected():
    model = randomize_bn(conv_bn()).double()
    conv = model[0]
    conv.forward = lambda x: F.conv2d(x, conv.weight * 2, None, 1, 1)  # accelerate-style
    folded = exact(model, torch.randn(2, 3, 6, 6))
    assert any("instance" in left.reason for left in folded.reparam_report.leftovers)


def test_global_module_hooks_are_refused_clearly():
    model = randomize_bn(conv_bn())
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: out)
    try:
        with pytest.raises(reparam.ReparamError, match="global module hooks"):
            reparam.fold(model, (torch.randn(2, 3, 6, 6),))
    finally:
        handle.remove()


class Autocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn()
        self.inner = AutocastInside()

    def forward(self, x):
        return self.inner(torch.relu(self.stem(x)))


class AutocastInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.conv(x)
        return self.bn(y.float())


def test_autocast_inside_forward_is_respected():
    """torch.fx does not record autocast: the block using it is kept as it runs (its output is
    bfloat16-rounded, as the original's is), and the rest folds."""
    model = randomize_bn(Autocast())
    x = torch.randn(2, 3, 8, 8)
    folded = reparam.fold(model, (x,))
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert rel_err(got, want) < 1e-5
    assert any("autocast" in why for _, why in folded.reparam_report.untraced)


# --- 3. randomness is never baked in ------------------------------------------------------------


class Gumbel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn()
        self.logits = nn.Parameter(torch.randn(1, 3, 1, 1))

    def forward(self, x):
        gate = F.gumbel_softmax(self.logits, tau=1.0, dim=1)  # random, though input-free
        noise = torch.rand_like(self.logits)
        return self.block(x) * gate + noise


def test_random_ops_are_never_constants():
    model = randomize_bn(Gumbel())
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, (x,))
    torch.manual_seed(1)
    a = folded(x)
    torch.manual_seed(1)
    b = model(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(2)
    assert not torch.allclose(folded(x), a), "the folded model drew no new random numbers"
    assert n_ops(folded, "batch_norm") == 0
    assert any("random" in left.reason for left in folded.reparam_report.leftovers)


class BakedNoise(nn.Module):
    """``torch.rand(shape)`` has no tensor argument: torch.fx runs it while tracing and bakes
    one draw into the graph. Verification sees the trace differ from eager mode."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn()

    def forward(self, x):
        return self.block(x) + torch.rand(1, 3, 1, 1)


def test_random_numbers_baked_in_by_tracing_are_caught():
    model = randomize_bn(BakedNoise())
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, (x,))
    torch.manual_seed(3)
    a = folded(x)
    torch.manual_seed(3)
    torch.testing.assert_close(a, model(x), rtol=1e-5, atol=1e-6)
    assert "random" in folded.reparam_report.untraced[0][1]


class NormalizedWeight(nn.Module):
    """F.normalize on a parameter is deterministic: the computed kernel folds (its name contains
    "normal", which must not make it look random)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        w = F.normalize(self.w.flatten(1), dim=1).view_as(self.w)
        return self.bn(F.conv2d(x, w, padding=1))


def test_normalize_is_not_taken_for_a_random_op():
    folded = exact(NormalizedWeight(), torch.randn(2, 3, 6, 6))
    assert n_ops(folded, "batch_norm") == 0


# --- 5. dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_cast_that_would_overflow_keeps_the_region(dtype):
    model = conv_bn()
    bn = model[1]
    with torch.no_grad():
        model[0].weight.fill_(30.0)
        bn.running_var.fill_(1e-12)
        bn.eps = 1e-12
        bn.weight.fill_(1.0)
    model = model.to(dtype).eval()
    x = torch.randn(2, 3, 6, 6, dtype=dtype) * 1e-4
    folded = reparam.fold(model, (x,))
    for p in folded.state_dict().values():
        if p.is_floating_point():
            assert bool(torch.isfinite(p).all()), "a folded weight overflowed"
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert torch.equal(torch.isfinite(want), torch.isfinite(got))


def test_bn_with_zero_variance_and_eps_is_kept():
    model = conv_bn()
    bn = model[1]
    with torch.no_grad():
        bn.running_var[0] = 0.0
    bn.eps = 0.0
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, (x,), verify=False)
    assert n_ops(folded, "batch_norm") == 1
    assert "divides by zero" in " ".join(left.reason for left in folded.reparam_report.leftovers)


def test_complex_tensors_are_refused_clearly_or_fold_correctly():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, dtype=torch.complex64),
                          nn.Conv2d(3, 3, 1, dtype=torch.complex64)).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.complex64)
    folded = reparam.fold(model, (x,))
    torch.testing.assert_close(folded(x), model(x))


# --- 6. op arguments computed at run time ------------------------------------------------------


class RuntimePool(nn.Module):
    """The official RepVGG-D2se / RepVGGplus / MobileOne SE pooling: the kernel size read from
    the input's size at run time."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.block = conv_bn(3, 4)
        self.down, self.up = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)

    def forward(self, x):
        y = self.block(x)
        if self.form == "size3":
            s = F.avg_pool2d(y, kernel_size=y.size(3))
        else:
            _, _, h, w = y.size()
            s = F.avg_pool2d(y, kernel_size=[h, w])
        s = torch.sigmoid(self.up(torch.relu(self.down(s))))
        return y * s


@pytest.mark.parametrize("form", ["size3", "list"])
def test_a_pool_size_computed_at_run_time_never_crashes(form):
    model = randomize_bn(RuntimePool(form))
    x = torch.randn(2, 3, 7, 7)
    folded = reparam.fold(model, (x,))
    assert n_ops(folded, "batch_norm") == 0
    report = reparam.explain(model, x)
    assert report.max_error < 1e-5
    counts = reparam.count_ops(folded)
    assert counts.get("conv") == 3


# --- 7. verification by default ----------------------------------------------------------------


def test_a_wrong_law_is_caught_and_its_region_kept(monkeypatch):
    """pad_small_kernel made wrong by 1e-2: default verification finds the region that uses it
    and keeps it unfolded; the returned model is right."""
    from reparam.models import RepVGGBlock

    model = randomize_bn(nn.Sequential(conv_bn(3, 8), nn.ReLU(), RepVGGBlock(8, 8)))
    x = torch.randn(2, 3, 8, 8)
    original = reparam.kernel.pad_kernel

    def bad_pad_kernel(k, size, offset):
        out = original(k, size, offset)
        return dataclasses.replace(out, weight=out.weight * 1.01)

    monkeypatch.setattr(reparam.kernel, "pad_kernel", bad_pad_kernel)
    folded = reparam.fold(model, (x,))
    report = folded.reparam_report
    assert any("verification" in left.reason for left in report.leftovers), str(report)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5
    assert report.regions  # the stem still folds
    assert report.verified_error is not None and report.verified_error < 1e-4


def test_verification_can_be_switched_off(monkeypatch):
    original = reparam.kernel.scale_out

    def bad_scale_out(k, scale, shift=0.0):
        out = original(k, scale, shift)
        return dataclasses.replace(out, bias=out.bias + 1.0)

    monkeypatch.setattr(reparam.kernel, "scale_out", bad_scale_out)
    model = randomize_bn(conv_bn())
    x = torch.randn(2, 3, 6, 6)
    unverified = reparam.fold(model, (x,), verify=False)
    assert unverified.reparam_report.verified_error is None
    with torch.no_grad():
        assert rel_err(unverified(x), model(x)) > 1e-3  # the wrong law went through
        assert rel_err(reparam.fold(model, (x,))(x), model(x)) < 1e-5


def test_verify_must_be_a_bool():
    with pytest.raises(reparam.ReparamError, match="verify"):
        reparam.fold(conv_bn().eval(), verify="yes")


class IteratesChild(nn.Module):
    """The parent iterates its nn.Sequential (Ultralytics' classifier does), and its own forward
    does not trace: the Sequential must stay iterable."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(conv_bn(), nn.ReLU(), conv_bn())

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: torch.fx cannot trace the root
            return x
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_sequential_its_parent_iterates_stays_iterable():
    model = randomize_bn(IteratesChild())
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, (x,))
    assert isinstance(folded.layers, nn.Sequential) and len(folded.layers) == 3
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 0


# --- 8. "nothing folded" is said clearly -------------------------------------------------------


class NothingTraces(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


def test_a_model_where_nothing_folds_because_nothing_traces_raises():
    with pytest.raises(reparam.TraceError, match="nothing in NothingTraces was folded"):
        reparam.fold(NothingTraces().eval(), (torch.randn(2, 3, 6, 6),))


def test_leaf_modules_naming_a_missing_path_is_an_error():
    model = nn.Sequential(conv_bn(), nn.ReLU()).eval()
    with pytest.raises(reparam.ReparamError, match="not a submodule.*did you mean 0.1"):
        reparam.fold(model, (torch.randn(2, 3, 6, 6),), leaf_modules=["1.1"])


# --- no raw errors -----------------------------------------------------------------------------


def test_an_internal_failure_is_a_reparam_error(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(reparam.rewrite, "fold_graph", broken)
    monkeypatch.setattr(reparam.api, "fold_graph", broken)
    with pytest.raises(reparam.ReparamError, match="bug in reparam"):
        reparam.fold(conv_bn().eval(), (torch.randn(2, 3, 6, 6),))
