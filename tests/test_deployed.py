"""Folding the code people deploy: blocks in the style of DBB, OREPA, ECBSR, Ultralytics, YOLOv7.

The blocks live in ``tests/deployed_blocks.py`` (our own code, in those projects' manner). Three
kinds of tests:

* each block computes what its docstring claims: a linear block *is* one KxK conv (its kernel is
  read off its response to unit impulses and checked on random input in float64, borders
  included), BN-and-pad by slice assignment equals ``bn(F.pad(x))``, ECB's training branches
  equal its eval-time merged kernel, and none of them traces with ``torch.fx``;
* a hand-made deploy form of each model (probed convs, conv+BN fused by torch) passes
  :func:`check_deploy_form`: the expectations are reachable;
* ``reparam.fold(model.eval(), x)`` must reach that deploy form (``check_deploy_form``: BN and
  conv counts, parameters, output within 1e-4 of a float64 run of the original at two input
  sizes, the interface the parent uses). These are ``xfail(strict=True)`` until the engine
  supports the block (issue 14): each turns into a failure (XPASS) as soon as it folds; then
  delete its ``ISSUE_14`` entry. An error other than a failed check or a ReparamError is not
  excused (it fails the test).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from deployed_blocks import (
    BiasPaddedBranch,
    BorderFilledBN,
    ConvNormAct,
    DeviceIdentityBlock,
    EdgeBlock,
    EdgeSR,
    GeneratedKernelConv,
    ImplicitHead,
    ImplicitNet,
    ImplicitScale,
    ImplicitShift,
    RoutedNet,
    SliceAssignDBB,
    SplitConcat,
)
from helpers import randomize_bn, run64
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import reparam

TOL = 1e-4

# --- what a deploy form is ----------------------------------------------------------------------


def conv_bn_counts(model: nn.Module) -> tuple[int, int]:
    """Conv and BN *module instances*, plus functional conv / batch_norm nodes of any fx graph
    inside (a fold may emit ``F.conv2d`` on ``get_attr`` weights)."""
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for m in model.modules():
        if isinstance(m, fx.GraphModule):
            for node in m.graph.nodes:
                name = getattr(node.target, "__name__", "").split(".")[0]  # aten: conv2d.default
                if node.op == "call_function":
                    convs += name in ("conv1d", "conv2d", "conv3d", "convolution")
                    bns += name in ("batch_norm", "_native_batch_norm_legit_no_training")
    return convs, bns


def tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors(o)]
    return []


def structure(out):
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (list, tuple)):
        return (type(out).__name__, *(structure(o) for o in out))
    return type(out).__name__


def output_error(got, want) -> float:
    """``max |got - want| / max |want|`` per output tensor, the worst of them (float64)."""
    a, b = tensors(got), tensors(want)
    assert structure(got) == structure(want), (structure(got), structure(want))
    return max(((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)
                ).item() for g, w in zip(a, b, strict=True))


@dataclass(frozen=True)
class DeployForm:
    """What folding must leave: conv and BN counts, parameters (None: not fixed), module types
    that must be gone, and attributes of the model's layers that must survive."""

    convs: int
    params: int | None
    bns: int = 0
    gone: tuple[type, ...] = ()
    keep: tuple[str, ...] = ()  # attribute paths on the model, compared with the original's
    layer_attrs: tuple[str, ...] = ()  # attributes of each layer of ``model.model``
    extra_sizes: tuple[int, ...] = ()  # other input sides the deploy form must run at


def check_deploy_form(model: nn.Module, deployed: nn.Module, x: torch.Tensor,
                      form: DeployForm) -> None:
    convs, bns = conv_bn_counts(deployed)
    assert bns == form.bns, f"{bns} BN left, want {form.bns}"
    assert convs == form.convs, f"{convs} convs, want {form.convs}"
    if form.params is not None:
        params = sum(p.numel() for p in deployed.parameters())
        assert params == form.params, f"{params} parameters, want {form.params}"
    left = [type(m).__name__ for m in deployed.modules() if isinstance(m, form.gone)]
    assert not left, f"modules that should have folded away: {left}"
    for path in form.keep:
        want, got = _attr(model, path), _attr(deployed, path)
        assert _same(got, want), f"{path}: {got!r} != {want!r}"
    if form.layer_attrs:
        layers, originals = list(deployed.model), list(model.model)
        assert len(layers) == len(originals)
        for got, want in zip(layers, originals, strict=True):
            for a in form.layer_attrs:
                assert getattr(got, a, None) == getattr(want, a), f"layer {want.i}: {a}"
    for side in (x.shape[-1], *form.extra_sizes):
        xs = x if side == x.shape[-1] else torch.randn(*x.shape[:-2], side, side)
        with torch.no_grad():
            got = deployed(xs)
        err = output_error(got, run64(model, xs))
        assert err < TOL, f"relative error {err:.3g} at {side} px"


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


# --- reading a linear block off as one conv ---------------------------------------------------


def probe_conv(block: nn.Module, cin: int, k: int, groups: int = 1) -> nn.Conv2d:
    """The KxK conv (stride 1, zero padding K // 2, ``groups``) that ``block`` computes, read off
    its float64 responses to zero and to unit impulses, then checked on random input. Fails (an
    AssertionError) when the block is not such a conv: a bias that is not uniform up to the
    border, taps outside K x K, weights across groups, or any other difference."""
    m = copy.deepcopy(block).double().eval()
    p, n = k // 2, 2 * k + 1
    centre = n // 2
    with torch.no_grad():
        zero = m(torch.zeros(1, cin, n, n, dtype=torch.float64))
        bias = zero[0, :, centre, centre]
        assert torch.allclose(zero, bias.view(1, -1, 1, 1).expand_as(zero), atol=1e-12), (
            "the response to zero is not uniform: not a conv with zero padding")
        impulses = torch.zeros(cin, cin, n, n, dtype=torch.float64)
        impulses[range(cin), range(cin), centre, centre] = 1.0
        response = m(impulses) - zero  # (cin, cout, n, n)
        lo = centre + p - k + 1
        window = response[:, :, lo:lo + k, lo:lo + k].flip(-1, -2)  # (cin, cout, k, k)
        dense = window.permute(1, 0, 2, 3).contiguous()  # (cout, cin, k, k)
        cout, per_group = dense.shape[0], cin // groups
        weight = torch.stack([dense[o, (o * groups // cout) * per_group:][:per_group]
                              for o in range(cout)])
        x = torch.randn(2, cin, 9, 11, dtype=torch.float64)
        want = m(x)
        got = F.conv2d(x, weight, bias, padding=p, groups=groups)
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-10 * scale, "not a single KxK conv"
    conv = nn.Conv2d(cin, cout, k, padding=p, groups=groups)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def _linear_part(block: nn.Module) -> nn.Module:
    lin = copy.deepcopy(block)
    lin.act = nn.Identity()
    return lin


class ProbedBlock(nn.Module):
    """A hand-made deploy form: the probed conv, then the block's activation."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x):
        return self.act(self.conv(x))


def hand_deploy(model: nn.Module) -> nn.Module:
    """The deploy form built by hand, block by block (what a per-project converter does): each
    linear block replaced by its probed conv, each :class:`ConvNormAct` fused by torch, implicit
    tensors folded into their 1x1 convs. Attributes of replaced modules (``f``, ``i``...) stay."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SliceAssignDBB):
                cin = child.kxk[0].in_channels
                new = ProbedBlock(probe_conv(_linear_part(child), cin, 3), child.act)
            elif isinstance(child, GeneratedKernelConv):
                lin = _linear_part(child)
                new = ProbedBlock(probe_conv(lin, child.cin, child.k, child.groups), child.act)
            elif isinstance(child, (EdgeBlock, DeviceIdentityBlock)):
                cin = child.conv3x3.in_channels if isinstance(child, EdgeBlock) else child.c
                new = ProbedBlock(probe_conv(_linear_part(child), cin, 3), child.act)
            else:
                continue
            vars(new).update({k: v for k, v in vars(child).items() if not k.startswith("_")})
            setattr(module, name, new)
    for module in model.modules():
        if isinstance(module, ConvNormAct):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
        if isinstance(module, ImplicitHead):
            for conv, shift, scale in zip(module.m, module.ia, module.im, strict=True):
                with torch.no_grad():
                    a, s = shift.implicit.flatten(), scale.implicit.flatten()
                    conv.bias.copy_((conv.bias + conv.weight.flatten(1) @ a) * s)
                    conv.weight.mul_(s.view(-1, 1, 1, 1))
            module.ia = nn.ModuleList(nn.Identity() for _ in module.ia)
            module.im = nn.ModuleList(nn.Identity() for _ in module.im)
    return model.eval()


# --- the models and their deploy forms ---------------------------------------------------------


def _params_conv(cin: int, cout: int, k: int, groups: int = 1) -> int:
    return cout * (cin // groups) * k * k + cout


def _build(name: str) -> tuple[nn.Module, torch.Tensor, DeployForm]:
    torch.manual_seed(0)
    if name == "dbb":  # two DBB blocks: two 3x3 convs
        model = nn.Sequential(SliceAssignDBB(3, 6, act=nn.ReLU()), SliceAssignDBB(6, 4))
        form = DeployForm(2, _params_conv(3, 6, 3) + _params_conv(6, 4, 3),
                          gone=(nn.AvgPool2d, BorderFilledBN), extra_sizes=(9,))
        x = torch.randn(2, 3, 12, 12)
    elif name == "orepa":  # a generated grouped 3x3 kernel + BN: one grouped conv
        model = nn.Sequential(GeneratedKernelConv(4, 8, 3, groups=2, act=nn.ReLU()))
        form = DeployForm(1, _params_conv(4, 8, 3, groups=2), extra_sizes=(11,))
        x = torch.randn(2, 4, 10, 10)
    elif name == "ecbsr":  # three ECB blocks: three 3x3 convs, the PReLUs kept
        model = EdgeSR(colors=1, channels=8, blocks=1, scale=2)
        prelu = 8 + 8
        form = DeployForm(3, _params_conv(1, 8, 3) + _params_conv(8, 8, 3) + _params_conv(8, 4, 3)
                          + prelu, gone=(BiasPaddedBranch,), extra_sizes=(13,))
        x = torch.randn(1, 1, 12, 12)
    elif name == "c2f":  # Ultralytics' Conv and C2f: no BN, the same convs
        model = nn.Sequential(ConvNormAct(3, 8, 3, 2), SplitConcat(8, 8, n=2, shortcut=True))
        convs = 1 + 2 + 2 * 2
        bn_channels = 8 + 8 + 8 + 2 * 2 * 4
        before = sum(p.numel() for p in model.parameters())
        form = DeployForm(convs, before - bn_channels, extra_sizes=(12,))
        x = torch.randn(1, 3, 16, 16)
    elif name == "routed":  # Ultralytics' routed Sequential with a Detect-like head
        model = RoutedNet(nc=3)
        convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        form = DeployForm(convs, None, keep=("save", "stride", "names"),
                          layer_attrs=("f", "i", "type"), extra_sizes=(24,))
        x = torch.randn(1, 3, 16, 16)
    elif name == "implicit":  # YOLOv7's ImplicitA / ImplicitM around the head's 1x1 convs
        model = ImplicitNet(nc=2)
        no_na = 7 * 2
        form = DeployForm(4, _params_conv(3, 8, 3) + _params_conv(8, 16, 3)
                          + _params_conv(8, no_na, 1) + _params_conv(16, no_na, 1),
                          gone=(ImplicitShift, ImplicitScale), extra_sizes=(24,))
        x = torch.randn(1, 3, 16, 16)
    elif name == "get_device":  # get_device() in forward: one conv per block
        model = nn.Sequential(DeviceIdentityBlock(4, act=nn.ReLU()), DeviceIdentityBlock(4))
        form = DeployForm(2, 2 * _params_conv(4, 4, 3), extra_sizes=(9,))
        x = torch.randn(2, 4, 8, 8)
    else:
        raise KeyError(name)
    return randomize_bn(model), x, form


def _xfail(reason: str):
    return pytest.mark.xfail(strict=True, raises=(AssertionError, reparam.ReparamError),
                             reason=f"issue 14: {reason}")


NAMES = ("dbb", "orepa", "ecbsr", "c2f", "routed", "implicit", "get_device")
# why today's engine does not reach the deploy form; delete an entry once the block folds
ISSUE_14: dict[str, str] = {}
FOLD_CASES = [pytest.param(n, id=n, marks=_xfail(ISSUE_14[n]) if n in ISSUE_14 else ())
              for n in NAMES]


@pytest.mark.parametrize("name", FOLD_CASES)
def test_fold_reaches_the_deploy_form(name):
    model, x, form = _build(name)
    folded = reparam.fold(model.eval(), x)
    check_deploy_form(model, folded, x, form)


@pytest.mark.parametrize("name", NAMES)
def test_the_hand_made_deploy_form_passes_the_same_check(name):
    """The expectations are reachable: a per-block deploy form built by hand meets them."""
    model, x, form = _build(name)
    check_deploy_form(model, hand_deploy(model), x, form)


@pytest.mark.parametrize("name", NAMES)
def test_the_check_rejects_the_unfolded_model(name):
    """``check_deploy_form`` can fail: the original model is not its own deploy form."""
    model, x, form = _build(name)
    with pytest.raises(AssertionError):
        check_deploy_form(model, model, x, form)


@pytest.mark.parametrize("name", NAMES)
def test_fx_cannot_trace_the_block(name):
    """Why these blocks exist: plain torch.fx symbolic tracing does not get through any of them."""
    model, _, _ = _build(name)
    with pytest.raises(Exception):  # noqa: B017 - whatever fx raises (TraceError, TypeError...)
        fx.symbolic_trace(model)


# --- each block is what its docstring says --------------------------------------------------------


def test_border_filled_bn_is_bn_of_the_zero_padded_input():
    torch.manual_seed(0)
    layer = randomize_bn(BorderFilledBN(5, 2)).double()
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
        want = layer.bn(F.pad(x, [2, 2, 2, 2]))
        naive = F.pad(layer.bn(x), [2, 2, 2, 2])
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(naive, want)  # zero padding after the BN differs at the border


def test_border_filled_bn_fill_is_the_bn_output_at_zero():
    torch.manual_seed(1)
    layer = randomize_bn(BorderFilledBN(3, 1)).double()
    with torch.no_grad():
        out = layer(torch.zeros(1, 3, 4, 4, dtype=torch.float64))
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))  # uniform, border included


@pytest.mark.parametrize("block", ["dbb", "orepa", "edge", "edge_identity", "get_device"])
def test_linear_block_is_one_conv(block):
    """Each linear block (its activation removed) is exactly one padded KxK conv."""
    torch.manual_seed(2)
    if block == "dbb":
        m, cin, k, g = SliceAssignDBB(3, 5, k=3), 3, 3, 1
    elif block == "orepa":
        m, cin, k, g = GeneratedKernelConv(4, 6, 3, groups=2), 4, 3, 2
    elif block == "edge":
        m, cin, k, g = EdgeBlock(3, 4, act=False), 3, 3, 1
    elif block == "edge_identity":
        m, cin, k, g = EdgeBlock(4, 4, act=False, identity=True), 4, 3, 1
    else:
        m, cin, k, g = DeviceIdentityBlock(4), 4, 3, 1
    conv = probe_conv(randomize_bn(m), cin, k, g)
    assert conv.groups == g and conv.kernel_size == (k, k)


def test_probe_rejects_a_block_that_is_not_one_conv():
    """The probe can fail: DBB's 1x1 -> 3x3 branch with plain zero padding after its BN is not a
    conv of the input with zero padding (the border differs)."""
    torch.manual_seed(3)
    block = SliceAssignDBB(3, 3, k=3)
    block.seq.bn1 = nn.Sequential(block.seq.bn1.bn, nn.ZeroPad2d(1))
    with pytest.raises(AssertionError):
        probe_conv(randomize_bn(block), 3, 3)


def test_edge_block_training_branches_equal_its_eval_kernel():
    """ECB: the branches summed in training mode equal the merged kernel used in eval."""
    torch.manual_seed(4)
    for identity in (False, True):
        block = EdgeBlock(4, 4, identity=identity).double()
        x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
        with torch.no_grad():
            train_out = block.train()(x)
            eval_out = block.eval()(x)
        assert torch.allclose(train_out, eval_out, rtol=0, atol=1e-12)


def test_bias_padded_branch_merges_to_a_padded_conv():
    torch.manual_seed(5)
    for kind in ("conv", "sobel_x", "laplacian"):
        branch = BiasPaddedBranch(kind, 3, 4, mid=6).double()
        x = torch.randn(1, 3, 5, 8, dtype=torch.float64)
        kernel, bias = branch.merged()
        with torch.no_grad():
            assert torch.allclose(branch(x), F.conv2d(x, kernel, bias, padding=1), atol=1e-12)


def test_orepa_kernel_comes_from_its_parameters_only():
    """The generated kernel depends on the parameters and buffers, not on the input: the forward
    is ``bn(conv2d(x, weight_gen()))``."""
    torch.manual_seed(6)
    block = randomize_bn(GeneratedKernelConv(4, 6, 3, groups=2)).double()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = block.bn(F.conv2d(x, block.weight_gen(), padding=1, groups=2))
        assert torch.allclose(block(x), want, atol=1e-12)
    assert block.weight_gen().shape == (6, 2, 3, 3)


def test_split_concat_is_chunk_chain_concat():
    torch.manual_seed(7)
    block = randomize_bn(SplitConcat(4, 8, n=2, shortcut=True))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        a, b = block.cv1(x).split((4, 4), 1)
        c = block.m[0](b)
        d = block.m[1](c)
        want = block.cv2(torch.cat((a, b, c, d), 1))
        assert torch.allclose(block(x), want)


def test_conv_norm_act_shares_one_activation_module():
    """As in Ultralytics: every ConvNormAct holds the same nn.SiLU object."""
    a, b = ConvNormAct(3, 4), ConvNormAct(4, 4)
    assert a.act is b.act


def test_routed_net_routes_by_f_and_keeps_the_outputs_in_save():
    model = randomize_bn(RoutedNet())
    assert model.save == [2, 4, 7]
    assert [m.f for m in model.model][-3:] == [[-1, 2], -1, [7, 4]]
    assert all(m.type == type(m).__name__ and m.np == sum(p.numel() for p in m.parameters())
               for m in model.model)
    for side in (16, 24):
        with torch.no_grad():
            y, raw = model(torch.randn(1, 3, side, side))
        cells = (side // 4) ** 2 + (side // 8) ** 2
        assert y.shape == (1, 4 + 3, cells) and len(raw) == 2
        assert model.model[-1].shape == raw[0].shape  # the grid cache follows the input shape
    with pytest.raises(TypeError):  # a plain call of the Sequential fails: it must be routed
        model.model(torch.randn(1, 3, 16, 16))


def test_implicit_shift_and_scale_fold_into_the_1x1_conv():
    """YOLOv7's ImplicitA -> 1x1 conv -> ImplicitM is one 1x1 conv (bias ``(b + W a) * m``)."""
    torch.manual_seed(8)
    chain = nn.Sequential(ImplicitShift(4, std=0.5), nn.Conv2d(4, 6, 1), ImplicitScale(6, std=0.5))
    conv = probe_conv(chain.double(), 4, 1)
    conv1x1, a, s = chain[1], chain[0].implicit.flatten(), chain[2].implicit.flatten()
    with torch.no_grad():
        assert torch.allclose(conv.bias.double(), (conv1x1.bias + conv1x1.weight.flatten(1) @ a)
                              * s, atol=1e-6)


def test_implicit_head_decodes_by_slice_assignment():
    """The in-place decode equals the out-of-place one (split, scale, concatenate)."""
    torch.manual_seed(9)
    model = randomize_bn(ImplicitNet())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        decoded, raw = model(x)
        head = model.head
        parts = []
        for i, r in enumerate(raw):
            y = r.sigmoid()
            _, _, ny, nx, _ = y.shape
            xy = (y[..., 0:2] * 2.0 - 0.5 + head.grid[i]) * head.stride[i]
            wh = (y[..., 2:4] * 2) ** 2 * head.anchor_grid[i]
            parts.append(torch.cat((xy, wh, y[..., 4:]), -1).view(1, -1, head.no))
    assert torch.allclose(decoded, torch.cat(parts, 1))
    assert raw[0].shape == (1, 2, 8, 8, 7) and raw[1].shape == (1, 2, 4, 4, 7)


def test_device_identity_block_builds_its_kernel_on_the_input_device():
    torch.manual_seed(10)
    block = randomize_bn(DeviceIdentityBlock(3)).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    assert x.get_device() == -1  # CPU
    with torch.no_grad():
        assert torch.allclose(block(x), block.bn(block.conv(x)) + x, atol=1e-12)
