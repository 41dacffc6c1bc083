"""The wider re-parameterization family in ``reparam.models``: DO-Conv, DiracNet, RepMLP and
RepMLPNet, PSConv, ExpandNets, ACNet's crop variant, RepVGG-D2se and RepVGGplus-L2pse.

These tests do not use the folder. Each system: a forward at a small size, the training-time
parameter count (the papers' and authors' figures), the deploy-form count computed here from
the geometry, and a float64 check that the block computes what its paper says (its deploy form,
built here by hand, gives the same output). Big networks are counted on the meta device.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn
from test_models import one_thread  # noqa: F401 - the same one-thread fixture
from torch import fx, nn

from reparam import models as M

F64 = torch.float64


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(build, *args, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build(*args, **kwargs)


def randomize(module: nn.Module) -> nn.Module:
    """Random BN statistics and affine parameters; the float64 model in eval mode."""
    return randomize_bn(module).double()


def fuse(conv_bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``Sequential(conv, bn)``'s kernel and bias with the BN folded (float64)."""
    conv, bn = conv_bn.conv, conv_bn.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    return conv.weight * scale.reshape(shape), bn.bias - bn.running_mean * scale


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def probe(chain: nn.Module, in_ch: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The KxK kernel and bias of a linear chain that maps a KxK unpadded input to one pixel:
    its responses to the identity basis of ``in_ch * K * K`` values, minus its response to 0."""
    basis = torch.eye(in_ch * k * k, dtype=F64).reshape(-1, in_ch, k, k)
    zero = chain(torch.zeros(1, in_ch, k, k, dtype=F64))
    resp = chain(basis) - zero  # (in_ch*K*K, out, 1, 1)
    kernel = resp.reshape(in_ch, k, k, -1).permute(3, 0, 1, 2)
    return kernel, zero.flatten()


def pooled_by_input_size(module: nn.Module) -> bool:
    """Whether the traced graph calls ``avg_pool2d`` with a kernel read from ``x.size()``."""
    for node in fx.symbolic_trace(module).graph.nodes:
        if node.op == "call_function" and node.target is F.avg_pool2d:
            size = node.kwargs.get("kernel_size", node.args[1] if len(node.args) > 1 else None)
            if isinstance(size, fx.Node) and size.target in ("size", getattr):
                return True
    return False


# --- DO-Conv -----------------------------------------------------------------------------------


def test_doconv_is_the_plain_conv_at_initialization() -> None:
    conv = M.DOConv2d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 7, 7, dtype=F64)
    kernel = conv.W[..., :9].reshape(5, 3, 3, 3)
    close(conv(x), F.conv2d(x, kernel, conv.bias, padding=1))


def test_doconv_kernel_composition_equals_feature_composition() -> None:
    """``conv(x, D o W)`` = ``W`` applied to ``D``-transformed patches (the paper's two forms)."""
    torch.manual_seed(0)
    conv = M.DOConv2d(3, 5, 3, D_mul=12, stride=2, padding=1).double()
    with torch.no_grad():
        conv.D.normal_()
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    patches = F.unfold(x, 3, padding=1, stride=2).reshape(2, 3, 9, -1)  # N, C, taps, L
    mid = torch.einsum("cms,ncml->ncsl", conv.D, patches)
    want = torch.einsum("ocs,ncsl->nol", conv.W, mid) + conv.bias[:, None]
    close(conv(x), want.reshape(2, 5, 5, 5))


def test_dodconv_each_output_reads_its_input_channel() -> None:
    torch.manual_seed(1)
    conv = M.DODConv2d(4, 3, padding=1, multiplier=2).double()
    with torch.no_grad():
        conv.D.normal_()
    kernel = torch.stack([conv.D[o // 2] @ conv.W[o, 0] for o in range(8)]).reshape(8, 1, 3, 3)
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    close(conv(x), F.conv2d(x, kernel, conv.bias, padding=1, groups=4))


@pytest.mark.parametrize(("args", "kw", "train", "deploy"), [
    ((16, 16, 3), {}, 16 * 16 * 9 + 16 * 9 * 9 + 16, 16 * 16 * 9 + 16),
    ((16, 32, 3), {"D_mul": 12}, 32 * 16 * 12 + 16 * 9 * 12 + 32, 32 * 16 * 9 + 32),
    ((8, 8, 3), {"groups": 8}, 8 * 9 + 8 * 9 * 9 + 8, 8 * 9 + 8),
    ((16, 32, 1), {}, 32 * 16 + 32, 32 * 16 + 32),
])
def test_doconv_params(args, kw, train, deploy) -> None:
    """Training: ``W`` + ``D`` + bias (the authors' code also stores the fixed identity as a
    non-trainable parameter); deploy: one conv of the same geometry with a bias."""
    conv = M.DOConv2d(*args, **kw)
    assert n_params(conv) == train
    in_ch, out_ch, k = args
    assert conv.composed_weight().shape == (out_ch, in_ch // kw.get("groups", 1), k, k)
    assert conv.composed_weight().numel() + out_ch == deploy
    x = torch.randn(1, in_ch, 5, 5)
    assert conv(x).shape == (1, out_ch, 5 - k + 1, 5 - k + 1)


def test_doconv_rejects_a_small_depth_multiplier() -> None:
    with pytest.raises(ValueError, match="D_mul"):
        M.DOConv2d(4, 4, 3, D_mul=8)


# --- DiracNet ----------------------------------------------------------------------------------


def test_dirac_conv_is_alpha_identity_plus_beta_normalized_conv() -> None:
    torch.manual_seed(0)
    conv = M.DiracConv2d(4, 6, 3).double()
    with torch.no_grad():
        conv.alpha.normal_()
        conv.beta.normal_()
    x = torch.randn(2, 4, 7, 7, dtype=F64)
    w_hat = conv.weight / conv.weight.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    want = conv.beta.reshape(1, -1, 1, 1) * F.conv2d(x, w_hat, padding=1)
    want = want + conv.bias.reshape(1, -1, 1, 1)
    want[:, :4] += conv.alpha[:4].reshape(1, -1, 1, 1) * x  # the delta maps channel i to i
    close(conv(x), want)
    assert n_params(conv) == 6 * 4 * 9 + 3 * 6


def test_residual_conv_is_conv_plus_input() -> None:
    conv = M.ResidualConv2d(5, 3).double()
    x = torch.randn(2, 5, 6, 6, dtype=F64)
    close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1) + x)
    assert n_params(conv) == 5 * 5 * 9 + 5


def dirac_deploy_params(net: M.DiracNet) -> int:
    """Every conv (the stem's and each Dirac conv) with a bias and its BN folded in; the fc."""
    convs = [net.stem.conv] + [m.conv for m in net.modules() if isinstance(m, M.DiracBlock)]
    return sum(c.weight.numel() + c.weight.shape[0] for c in convs) + n_params(net.fc)


@pytest.mark.parametrize(("build", "train", "deploy"), [
    (M.diracnet18, 11_523_368, 11_511_784),
    (M.diracnet34, 21_638_952, 21_616_232),
])
def test_diracnet_imagenet_params(build, train, deploy) -> None:
    """The authors' v2 functional DiracNet-18/34 and their folded modules (measured)."""
    net = on_meta(build)
    assert n_params(net) == train
    assert dirac_deploy_params(net) == deploy


def test_diracnet_cifar_params_and_forward() -> None:
    assert n_params(on_meta(M.diracnet_cifar, 28, 10)) == 36_450_090  # the paper's 36.5M
    torch.manual_seed(0)
    net = M.diracnet_cifar(16, 1).eval()
    assert n_params(net) == 173_402
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n"):
        M.diracnet_cifar(20)


def test_diracnet18_forward_pools_by_input_size() -> None:
    torch.manual_seed(0)
    net = M.diracnet18(num_classes=7).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert pooled_by_input_size(net)


# --- RepMLP and RepMLPNet ----------------------------------------------------------------------


def test_repmlp_unit_acts_per_patch() -> None:
    """Global perceptron added per patch, then FC + local conv on each patch alone (zero
    padding at the patch border), merged back: checked patch by patch."""
    torch.manual_seed(0)
    unit = randomize(M.RepMLPUnit(4, 6, 8, 12, 4, 6, (1, 3), fc1_fc2_reduction=2))
    x0 = torch.randn(2, 4, 8, 12, dtype=F64)
    v = unit.fc1_fc2(unit.avg(x0).reshape(2, -1)).reshape(2, 4, 2, 2)
    x = x0 + v.repeat_interleave(4, 2).repeat_interleave(6, 3)
    want = torch.empty(2, 6, 8, 12, dtype=F64)
    for i in range(2):
        for j in range(2):
            p = x[:, :, 4 * i:4 * i + 4, 6 * j:6 * j + 6]
            fc = unit.fc3(p.reshape(2, -1, 1, 1)).reshape(2, -1)
            y = unit.fc3_bn(fc).reshape(2, 6, 4, 6)
            y = y + unit.local.conv1(p) + unit.local.conv3(p)
            want[:, :, 4 * i:4 * i + 4, 6 * j:6 * j + 6] = y
    close(unit(x0), want)


def fc_of_local(block: M.RepMLPBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """Locality injection: the FC (grouped by share-set) equal to the block's local convs and
    ``fc3_bn``, from their response to the identity basis of each h x w tile."""
    s, h, w = block.S, block.h, block.w
    bn = block.fc3_bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = block.fc3.weight.reshape(s, h * w, h * w) * scale.reshape(s, 1, 1)
    bias = (bn.bias - bn.running_mean * scale).repeat_interleave(h * w)
    basis = torch.eye(h * w, dtype=F64).reshape(h * w, 1, h, w).repeat(1, s, 1, 1)
    for branch in block.local.values():
        kernel, b = fuse(branch)
        k = kernel.shape[-1]
        resp = F.conv2d(basis, kernel, padding=k // 2, groups=s)  # (in pos, s, out pos)
        weight = weight + resp.reshape(h * w, s, h * w).permute(1, 2, 0)
        bias = bias + b.repeat_interleave(h * w)
    return weight.reshape(s * h * w, h * w, 1, 1), bias


def test_repmlp_block_acts_per_patch() -> None:
    """One share-set group (C = S): FC + depthwise local convs on each patch, times the gate."""
    torch.manual_seed(0)
    block = randomize(M.RepMLPBlock(4, 4, 6, (1, 3), 2, 4))
    x = torch.randn(2, 4, 8, 12, dtype=F64)
    want = torch.empty_like(x)
    for i in range(2):
        for j in range(2):
            p = x[:, :, 4 * i:4 * i + 4, 6 * j:6 * j + 6]
            y = block.fc3_bn(block.fc3(p.reshape(2, -1, 1, 1)).reshape(2, 4, 4, 6))
            want[:, :, 4 * i:4 * i + 4, 6 * j:6 * j + 6] = y + block.local.conv1(p) + \
                block.local.conv3(p)
    close(block(x), want * block.gp(x))


@pytest.mark.parametrize(("channels", "sharesets"), [(8, 8), (16, 4)])
def test_repmlp_block_locality_injection_is_exact(channels: int, sharesets: int) -> None:
    """The block equals its deploy form (one grouped FC with a bias, times the gate), with
    the convs folded into the FC: they read only their own tile."""
    torch.manual_seed(0)
    block = randomize(M.RepMLPBlock(channels, 4, 4, (1, 3), 4, sharesets))
    x = torch.randn(2, channels, 8, 12, dtype=F64)
    weight, bias = fc_of_local(block)
    patches = M._repmlp.partition(x, channels, 4, 4)
    y = F.conv2d(patches.reshape(-1, sharesets * 16, 1, 1), weight, bias, groups=sharesets)
    y = M._repmlp.merge(y.reshape(-1, 2, 3, sharesets, 4, 4), x.shape) * block.gp(x)
    close(block(x), y)


def test_repmlp_params() -> None:
    unit = M.RepMLPUnit(8, 8, 14, 14, 7, 7, (1, 3, 5), 1, 4)
    assert n_params(unit) == 41_936  # the authors' RepMLP with the same arguments
    fc3 = unit.fc3.weight.numel() + 8 * 49
    assert fc3 + n_params(unit.fc1_fc2) == 40_920  # after the authors' switch_to_deploy
    block = M.RepMLPBlock(16, 4, 4, (1, 3), 4, 4)
    assert n_params(block) == 1_236
    assert n_params(block) - n_params(block.local) - n_params(block.fc3_bn) + 4 * 16 == 1_236


def repmlp_injected_params(net: M.RepMLPNet) -> int:
    """After the authors' locality injection: each block's local convs and ``fc3_bn`` leave, its
    ``fc3`` gains a bias of ``S*h*w``; every other BN stays."""
    total = n_params(net)
    for b in net.modules():
        if isinstance(b, M.RepMLPBlock):
            total += b.S * b.h * b.w - n_params(b.local) - n_params(b.fc3_bn)
    return total


@pytest.mark.parametrize(("build", "train", "injected"), [
    (M.repmlpnet_t224, 38_293_608, 38_331_720),
    (M.repmlpnet_t256, 58_687_848, 58_739_400),
    (M.repmlpnet_b224, 68_242_712, 68_332_664),
    (M.repmlpnet_b256, 96_447_512, 96_568_184),
    (M.repmlpnet_d256, 86_887_648, 86_985_280),
    (M.repmlpnet_l256, 117_641_560, 117_820_600),
])
def test_repmlpnet_params(build, train, injected) -> None:
    net = on_meta(build)
    assert n_params(net) == train
    assert repmlp_injected_params(net) == injected


@pytest.mark.parametrize("size", [32, 64])
def test_repmlpnet_light_forward(size: int) -> None:
    """A light configuration; the patch grid is read from the input at run time."""
    torch.manual_seed(0)
    net = M.RepMLPNet((8, 16, 32, 64), (8, 4, 2, 1), (8, 4, 2, 1), (1, 1, 1, 1), (1, 2, 4, 8),
                      num_classes=10).eval()
    assert n_params(net) == 65_144
    assert repmlp_injected_params(net) == 65_024
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = net(x)
        assert y.shape == (2, 10)
        torch.testing.assert_close(fx.symbolic_trace(net)(x), y, rtol=0, atol=0)


def test_repmlp_rejects_patches_that_do_not_tile() -> None:
    with pytest.raises(ValueError, match="multiple"):
        M.RepMLPUnit(4, 4, 10, 10, 4, 4)
    with pytest.raises(ValueError, match="odd"):
        M.RepMLPBlock(4, 4, 4, (2,))


# --- PSConv ------------------------------------------------------------------------------------


def dense(weight: torch.Tensor, groups: int, in_ch: int) -> torch.Tensor:
    """A grouped kernel as the block-diagonal dense one."""
    out, per = weight.shape[0], in_ch // groups
    full = weight.new_zeros(out, in_ch, *weight.shape[2:])
    rows = out // groups
    for g in range(groups):
        full[g * rows:(g + 1) * rows, g * per:(g + 1) * per] = weight[g * rows:(g + 1) * rows]
    return full


def on_grid(kernel: torch.Tensor, dilation: int, size: int) -> torch.Tensor:
    """A kernel's taps at ``dilation`` re-laid, centred, on a ``size`` x ``size`` grid."""
    k = kernel.shape[-1]
    out = kernel.new_zeros(*kernel.shape[:2], size, size)
    start = size // 2 - dilation * (k // 2)
    taps = slice(start, start + dilation * (k - 1) + 1, dilation)
    out[..., taps, taps] = kernel
    return out


@pytest.mark.parametrize(("stride", "dilation", "groups"), [(1, 1, 1), (2, 2, 1), (1, 1, 2)])
def test_psconv_equals_its_one_conv_deploy_form(stride: int, dilation: int, groups: int) -> None:
    """The three branches, the half swap and the mask, checked against the dense conv of
    kernel ``2d(K-1)+1`` built here; that deploy form is dearer than the branches."""
    torch.manual_seed(0)
    c = 16
    ps = M.PSConv2d(c, c, 3, stride, dilation, 4, groups).double()
    size = 4 * dilation + 1
    parts = groups * 4
    per = c // groups  # the shifted conv's input q is channel src[q]: halves swapped per group
    src = [g * per + (q + per // 2) % per for g in range(groups) for q in range(per)]
    shifted = torch.zeros(c, c, 3, 3, dtype=F64)
    shifted[:, src] = dense(ps.shifted.weight, parts, c)
    kernel = (on_grid(dense(ps.dense.weight, groups, c), 1, size)
              + on_grid(dense(ps.grouped.weight, parts, c), dilation, size)
              + on_grid(shifted, 2 * dilation, size))
    x = torch.randn(2, c, 11, 11, dtype=F64)
    close(ps(x), F.conv2d(x, kernel, stride=stride, padding=size // 2))
    plain = c * (c // groups) * 9
    ones = torch.ones(c, c, 3, 3, dtype=F64)
    grouped = dense(ones[:, :c // parts], parts, c)
    reads = (dense(ps.dense.weight, groups, c) != 0).double() + grouped + grouped[:, src]
    inside = dense(ones[:, :c // groups], groups, c)
    close(reads, inside)  # each (out, in) pair of a group is read at exactly one dilation
    assert n_params(ps) == plain * (1 + 2 / 4)
    assert kernel.numel() // groups > plain * 1.5  # the one-conv form is dearer


def test_psconv_mask_holds_through_training_and_copies() -> None:
    ps = M.PSConv2d(8, 8, 3, parts=4)
    masked = ps.dense.weight == 0
    ps(torch.randn(1, 8, 5, 5)).sum().backward()
    assert masked.sum() == 8 * 8 * 9 // 2
    grad = ps.dense.parametrizations.weight.original.grad
    assert (grad[masked] == 0).all()
    assert (copy.deepcopy(ps).dense.weight[masked] == 0).all()
    with pytest.raises(ValueError, match="even"):
        M.PSConv2d(6, 6, parts=3)


# --- ExpandNets --------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "k"), [
    (lambda: M.ExpandCL(3, 5, 3, rate=2), 3),
    (lambda: M.ExpandCL(3, 5, 5, rate=2, stride=2), 5),
    (lambda: M.ExpandCK(3, 5, 5, rate=2), 5),
    (lambda: M.ExpandCK(3, 5, 7, rate=2, stride=2), 7),
    (lambda: M.ExpandCK(3, 5, 9, rate=2, wide_in=3), 9),
])
def test_expansion_folds_to_the_compact_conv(make, k: int) -> None:
    """With all the padding on the first conv, the chain (biases included) is exactly the
    compact KxK conv probed from its unpadded, stride-1 copy."""
    torch.manual_seed(0)
    chain = make().double()
    spatial = [c for c in chain if c.kernel_size[0] > 1]
    assert chain[0].padding == (k // 2, k // 2)
    assert all(c.padding == (0, 0) for c in list(chain)[1:])
    assert all(c.stride == (1, 1) for c in spatial[:-1])
    bare = copy.deepcopy(chain)
    bare[0].padding = (0, 0)
    [c for c in bare if c.kernel_size[0] > 1][-1].stride = (1, 1)
    with torch.no_grad():
        kernel, bias = probe(bare, 3, k)
        x = torch.randn(2, 3, 11, 11, dtype=F64)
        close(chain(x), F.conv2d(x, kernel, bias, spatial[-1].stride, k // 2))


def test_padding_every_conv_of_a_chain_is_not_exact() -> None:
    """Two 3x3 convs each padded by 1 differ from their 5x5 fold at the border."""
    torch.manual_seed(0)
    a, b = nn.Conv2d(2, 3, 3, bias=False).double(), nn.Conv2d(3, 2, 3, bias=False).double()
    kernel, _ = probe(nn.Sequential(a, b), 2, 5)
    x = torch.randn(1, 2, 8, 8, dtype=F64)
    every = F.conv2d(F.conv2d(x, a.weight, padding=1), b.weight, padding=1)
    folded = F.conv2d(x, kernel, padding=2)
    close(every[..., 2:-2, 2:-2], folded[..., 2:-2, 2:-2])
    assert (every - folded).abs().max() > 1e-3


@pytest.mark.parametrize(("k", "expand", "train"), [
    (7, None, 66_186), (7, "cl", 547_102), (7, "ck", 186_982), (3, None, 15_050),
    (3, "cl", 109_086),
])
def test_smallnet_params(k: int, expand: str | None, train: int) -> None:
    """The authors' SmallNets and ExpandNets; each contracts to the compact SmallNet."""
    torch.manual_seed(0)
    net = M.smallnet(k, expand).eval()
    assert n_params(net) == train
    chains = [m.conv for m in (net.stage1, net.stage2, net.stage3)]
    compact = sum(o * i * k * k + o for i, o in [(3, 8), (8, 16), (16, 32)])
    compact += n_params(net) - sum(map(n_params, chains))  # BN and the linears stay
    assert compact == (66_186 if k == 7 else 15_050)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --- ACNet with a crop -------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "padding", "stride", "dims"), [
    (3, 0, 1, 2), (3, 0, 2, 2), (5, 1, 1, 2), (5, 0, 2, 2), (5, 2, 1, 2), (3, 0, 1, 3),
])
def test_acblock_equals_one_square_conv(k: int, padding: int, stride: int, dims: int) -> None:
    """Every asymmetric branch (cropped when padding < K//2) re-laid at the centre of the KxK
    kernel gives the block's output: the deploy form is one KxK conv with that padding."""
    torch.manual_seed(0)
    block = randomize(M.ACBlock(3, 4, k, stride, padding=padding, dims=dims))
    assert block.crop == max(0, k // 2 - padding)
    kernel, bias = fuse(block.square)
    for name in block.axis_names:
        kk, b = fuse(getattr(block, name))
        pads = []
        for size in reversed(kk.shape[2:]):
            pads += [(k - size) // 2] * 2
        kernel, bias = kernel + F.pad(kk, pads), bias + b
    x = torch.randn(2, 3, *([9, 11, 10][:dims]), dtype=F64)
    conv = F.conv2d if dims == 2 else F.conv3d
    close(block(x), conv(x, kernel, bias, stride, padding))
    assert kernel.numel() + 4 == 4 * 3 * k**dims + 4
    assert n_params(block) == 4 * 3 * (k**dims + dims * k) + 2 * 4 * (dims + 1)


# --- RepVGG-D2se and RepVGGplus-L2pse ----------------------------------------------------------


def repvgg_deploy_params(net: nn.Module) -> int:
    """Each block its 3x3 conv with a bias plus its SE gate; the auxiliary heads leave; the
    rest (the classifier) stays."""
    heads = [m for name, m in net.named_children() if name.endswith("_aux")]
    blocks = [m for m in net.modules() if isinstance(m, M.RepVGGBlock)]
    folded = {id(p) for m in blocks + heads for p in m.parameters()}
    total = sum(p.numel() for p in net.parameters() if id(p) not in folded)
    for b in blocks:
        total += b.square.conv.weight.numel() + b.square.conv.out_channels
        total += 0 if b.se is None else n_params(b.se)
    return total


def test_repvgg_d2se_params() -> None:
    net = on_meta(M.repvgg_d2se)
    assert n_params(net) == 133_334_836
    assert repvgg_deploy_params(net) == 120_387_572  # the authors' converter
    blocks = [m for m in net.modules() if isinstance(m, M.RepVGGSEBlock)]
    assert len(blocks) == 48 and not any(b.post_se for b in blocks)
    assert blocks[-1].se.down.out_channels == 2560 // 16


def test_repvggplus_l2pse_params() -> None:
    net = on_meta(M.repvggplus_l2pse)
    assert n_params(net) == 146_062_864
    heads = (net.stage1_aux, net.stage2_aux, net.stage3_first_aux)
    assert sum(map(n_params, heads)) == 5_963_640
    assert repvgg_deploy_params(net) == 127_151_960  # the authors' converter
    blocks = [m for m in net.modules() if isinstance(m, M.RepVGGSEBlock)]
    assert len(blocks) == 48 and all(b.post_se for b in blocks)
    assert len(net.stage3_first) == len(net.stage3_second) == 12


def test_repvgg_se_pools_by_the_input_width() -> None:
    """``avg_pool2d(x, kernel_size=x.size(3))``: a square map's mean; a taller map's top
    square (as the authors' code)."""
    torch.manual_seed(0)
    se = M.RepVGGSqueezeExcite(8, 2).double()
    assert pooled_by_input_size(se)
    x = torch.randn(2, 8, 6, 4, dtype=F64)
    mean = x[:, :, :4, :].mean((2, 3), keepdim=True)
    close(se(x), x * torch.sigmoid(se.up(se.act(se.down(mean)))))
    with pytest.raises(ValueError, match="hidden"):
        M.RepVGGSEBlock(8, 8)


def test_repvgg_se_block_orders() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 7, 7, dtype=F64)
    for post in (False, True):
        block = randomize(M.RepVGGSEBlock(16, 16, reduction=4, post_se=post))
        s = block.square(x) + block.point(x) + block.identity(x)
        close(block(x), block.se(torch.relu(s)) if post else torch.relu(block.se(s)))
        assert pooled_by_input_size(block)


def test_repvgg_d2se_like_forward() -> None:
    torch.manual_seed(0)
    net = M.RepVGG((1, 2, 2, 2, 1), (32, 32, 64, 128, 256), num_classes=10,
                   make_block=lambda i, o, s, g: M.RepVGGSEBlock(i, o, s, g)).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_repvggplus_heads_in_training_only() -> None:
    """Training mode: the main and the three auxiliary logits (the authors' keys); eval mode:
    the main logits alone, and the heads are not in the traced graph."""
    torch.manual_seed(0)
    net = M.RepVGGplus((2, 2, 4, 1), (16, 16, 32, 64, 128), 10)
    x = torch.randn(2, 3, 64, 64)
    out = net.train()(x)
    assert list(out) == ["main", "stage1_aux", "stage2_aux", "stage3_first_aux"]
    assert all(v.shape == (2, 10) for v in out.values())
    net.eval()
    with torch.no_grad():
        main = net(x)
        assert isinstance(main, torch.Tensor) and main.shape == (2, 10)
        graph = fx.symbolic_trace(net)
        torch.testing.assert_close(graph(x), main, rtol=0, atol=0)
    assert not any("_aux" in str(node.target) for node in graph.graph.nodes)


# --- names -------------------------------------------------------------------------------------


def test_public_names() -> None:
    for name in ("DOConv2d", "DODConv2d", "DiracConv2d", "ResidualConv2d", "DiracNet",
                 "diracnet18", "diracnet34", "diracnet_cifar", "RepMLPUnit", "RepMLPBlock",
                 "RepMLPNet", "repmlpnet_t224", "repmlpnet_l256", "PSConv2d", "ExpandCL",
                 "ExpandCK", "smallnet", "repvgg_d2se", "repvggplus_l2pse", "RepVGGplus",
                 "RepVGGSEBlock", "RepVGGSqueezeExcite"):
        assert name in M.__all__ and hasattr(M, name), name
