"""Training-time blocks and networks of ``reparam.models``: structure, tracing, shapes, counts.

These tests do not use the folder. Parameter counts of big networks are taken on the meta
device (no memory, no init); deploy counts are computed from the module structure: every block
deploys as its main KxK conv with a bias.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reparam import models
from reparam.models import ACBlock, DBBlock, MobileOneBlock, RepVGGBlock, SqueezeExcite
from reparam.models._layers import batch_norm

REPVGG = [
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_a2",
    "repvgg_b0",
    "repvgg_b1",
    "repvgg_b1g2",
    "repvgg_b1g4",
    "repvgg_b2",
    "repvgg_b2g2",
    "repvgg_b2g4",
    "repvgg_b3",
    "repvgg_b3g2",
    "repvgg_b3g4",
]
MOBILEONE = ["mobileone_s0", "mobileone_s1", "mobileone_s2", "mobileone_s3", "mobileone_s4"]
RESNET = ["resnet18", "acnet_resnet18", "dbb_resnet18"]
BUILDERS = REPVGG + MOBILEONE + RESNET

# RepVGG paper, deploy-time parameters in millions (B2g2 and B3g2 are not in its table).
REPVGG_PAPER_M = {
    "repvgg_a0": 8.30,
    "repvgg_a1": 12.78,
    "repvgg_a2": 25.49,
    "repvgg_b0": 14.33,
    "repvgg_b1": 51.82,
    "repvgg_b1g2": 41.36,
    "repvgg_b1g4": 36.12,
    "repvgg_b2": 80.31,
    "repvgg_b2g4": 55.77,
    "repvgg_b3": 110.96,
    "repvgg_b3g4": 75.62,
}
# MobileOne paper, deploy-time parameters in millions (S4 with its squeeze-and-excite gates).
MOBILEONE_PAPER_M = {
    "mobileone_s0": 2.1,
    "mobileone_s1": 4.8,
    "mobileone_s2": 7.8,
    "mobileone_s3": 10.1,
    "mobileone_s4": 14.8,
}
# ACNet / DBB papers: ResNet-18 (training, deploy) in millions.
RESNET_PAPER_M = {
    "resnet18": (11.7, 11.7),
    "acnet_resnet18": (19.0, 11.7),
    "dbb_resnet18": (26.3, 11.7),
}
REPARAM_BLOCKS = (RepVGGBlock, ACBlock, DBBlock, MobileOneBlock)


@pytest.fixture(autouse=True)
def one_thread():
    """Small CPU tensors: one intra-op thread is much faster (no thread wake-ups per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, **kwargs) -> nn.Module:
    return getattr(models, name)(**kwargs)


def on_meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return build(name)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main_conv(block: nn.Module) -> nn.Module:
    """The KxK conv a block deploys as (its shape is the deployed conv's shape)."""
    return block.convs[0].conv if isinstance(block, MobileOneBlock) else block.square.conv


def deploy_params(model: nn.Module) -> int:
    """Parameters after folding every block: its main conv with a bias; SE gates and everything
    outside the blocks stay as they are."""
    blocks = [m for m in model.modules() if isinstance(m, REPARAM_BLOCKS)]
    folded = {id(p) for b in blocks for p in b.parameters()}
    total = sum(p.numel() for p in model.parameters() if id(p) not in folded)
    for b in blocks:
        c = main_conv(b)
        total += c.weight.numel() + c.out_channels
        if getattr(b, "se", None) is not None:
            total += n_params(b.se)
    return total


def truncate(x: float, decimals: int) -> float:
    return math.floor(x * 10**decimals) / 10**decimals


# --- every builder -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_traces_and_classifies(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, num_classes=10).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 10)
        torch.testing.assert_close(traced(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "acnet_resnet18", "dbb_resnet18"])
@pytest.mark.parametrize("size", [33, 64, 224])
def test_builder_input_sizes(name: str, size: int) -> None:
    model = build(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)


def test_public_names() -> None:
    assert sorted(models.__all__) == sorted(set(models.__all__))
    for name in models.__all__:
        assert hasattr(models, name), name
    for name in BUILDERS:
        assert name in models.__all__


@pytest.mark.parametrize("name", BUILDERS)
def test_no_inplace_no_deploy_switch(name: str) -> None:
    model = on_meta(name)
    for m in model.modules():
        assert not getattr(m, "inplace", False), f"in-place op in {type(m).__name__}"
        assert not hasattr(m, "switch_to_deploy")


# --- parameter counts --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REPVGG_PAPER_M))
def test_repvgg_deploy_params_match_paper(name: str) -> None:
    count = deploy_params(on_meta(name))
    assert truncate(count / 1e6, 2) == pytest.approx(REPVGG_PAPER_M[name])


def test_repvgg_a0_exact_counts() -> None:
    model = on_meta("repvgg_a0")
    assert n_params(model) == 9_108_968
    assert deploy_params(model) == 8_309_384


def test_repvgg_grouped_layers() -> None:
    """g2/g4: the paper's 3rd, 5th, ..., 27th layers (indices 2, 4, ..., 26) are group-wise."""
    blocks = [m for m in on_meta("repvgg_b1g4").modules() if isinstance(m, RepVGGBlock)]
    assert len(blocks) == 28
    grouped = [i for i, b in enumerate(blocks) if b.square.conv.groups == 4]
    assert grouped == list(range(2, 27, 2))
    for b in blocks:
        assert b.point.conv.groups == b.square.conv.groups


@pytest.mark.parametrize("name", sorted(MOBILEONE_PAPER_M))
def test_mobileone_deploy_params_match_paper(name: str) -> None:
    assert round(deploy_params(on_meta(name)) / 1e6, 1) == MOBILEONE_PAPER_M[name]


@pytest.mark.parametrize("name", sorted(RESNET_PAPER_M))
def test_resnet18_params_match_papers(name: str) -> None:
    model = on_meta(name)
    train, deploy = RESNET_PAPER_M[name]
    assert round(n_params(model) / 1e6, 1) == train
    assert round(deploy_params(model) / 1e6, 1) == deploy


def test_plain_resnet18_has_the_standard_count() -> None:
    assert n_params(on_meta("resnet18")) == 11_689_512


# --- blocks ------------------------------------------------------------------------------------


def randomize_bn(module: nn.Module, generator: torch.Generator) -> None:
    """Give every BN random (non-default) statistics and affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator))
            m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=generator))
            m.bias.data.copy_(torch.randn(c, generator=generator))


def bn_then_pad_with_bn_of_zero(bn: nn.Module, y: torch.Tensor, pad: int) -> torch.Tensor:
    """The DBB paper's "BN and pad" layer: BN(y), then fill a border of width ``pad`` with the
    BN's output at 0, written by slice assignment as the paper does."""
    z = bn(y)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    at_zero = bn.bias - bn.running_mean * scale
    dims = y.dim() - 2
    shape = [y.shape[0], y.shape[1]] + [s + 2 * pad for s in y.shape[2:]]
    out = at_zero.view(1, -1, *([1] * dims)).expand(shape).clone()
    inner = (slice(None), slice(None)) + tuple(slice(pad, pad + s) for s in y.shape[2:])
    out[inner] = z
    return out


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("pad", [1, 2])
def test_dbb_pad_then_bn_equals_bn_and_pad(dims: int, pad: int) -> None:
    g = torch.Generator().manual_seed(dims * 10 + pad)
    bn = batch_norm(5, dims=dims).double().eval()
    randomize_bn(bn, g)
    y = torch.randn(2, 5, *([4] * dims), generator=g, dtype=torch.float64)
    expected = bn_then_pad_with_bn_of_zero(bn, y, pad)
    with torch.no_grad():
        got = bn(F.pad(y, [pad] * (2 * dims)))
        torch.testing.assert_close(got, expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_dbblock_branches_follow_the_paper(kernel_size: int, stride: int) -> None:
    """Each DBB branch equals the paper's definition with the "BN and pad" layer (float64)."""
    g = torch.Generator().manual_seed(kernel_size + stride)
    block = DBBlock(4, 6, kernel_size, stride).double().eval()
    randomize_bn(block, g)
    x = torch.randn(2, 4, 9, 9, generator=g, dtype=torch.float64)
    k, p = kernel_size, kernel_size // 2
    with torch.no_grad():
        a = block.avg
        avg = bn_then_pad_with_bn_of_zero(a.bn, a.conv(x), p)
        avg = a.bn_pool(F.avg_pool2d(avg, k, stride))
        s = block.seq
        seq = bn_then_pad_with_bn_of_zero(s.bn, s.conv(x), p)
        seq = s.square.bn(F.conv2d(seq, s.square.conv.weight, stride=stride))
        expected = block.square(x) + block.point(x) + avg + seq
        torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


def test_dbblock_structure() -> None:
    block = DBBlock(8, 16, 3, 2, groups=2)
    assert block.seq.conv.out_channels == 8  # internal channels = input channels (paper)
    assert block.point is not None
    assert DBBlock(8, 8, 3, 1, groups=8).point is None  # depthwise: no 1x1 branch
    assert isinstance(block.avg.pool, nn.AvgPool2d) and block.avg.pool.padding == 0


def test_repvgg_block_branches() -> None:
    assert RepVGGBlock(8, 8).identity is not None
    assert RepVGGBlock(8, 8, stride=2).identity is None
    assert RepVGGBlock(8, 16).identity is None
    b = RepVGGBlock(8, 8, groups=4, use_se=True)
    assert b.square.conv.padding == (1, 1) and b.point.conv.padding == (0, 0)
    assert isinstance(b.se, SqueezeExcite)


def test_acblock_paddings() -> None:
    b = ACBlock(4, 4, 3)
    assert b.hor.conv.kernel_size == (1, 3) and b.hor.conv.padding == (0, 1)
    assert b.ver.conv.kernel_size == (3, 1) and b.ver.conv.padding == (1, 0)
    b = ACBlock(4, 4, 3, padding=2)
    assert b.hor.conv.padding == (1, 2) and b.ver.conv.padding == (2, 1)
    b = ACBlock(4, 4, 5, padding=1)  # padding < K//2: the asymmetric branches read a crop
    assert b.crop == 1 and b.hor.conv.padding == (0, 1) and b.ver.conv.padding == (1, 0)
    with pytest.raises(ValueError, match="padding"):
        ACBlock(4, 4, 3, padding=-1)
    with pytest.raises(ValueError, match="dims"):
        ACBlock(4, 4, 3, dims=1)


def test_mobileone_block_branches() -> None:
    dw = MobileOneBlock(8, 8, 3, 1, groups=8, num_branches=4)
    assert len(dw.convs) == 4 and dw.scale is not None and dw.identity is not None
    pw = MobileOneBlock(8, 16, 1, num_branches=2)
    assert pw.scale is None and pw.identity is None


BLOCK_CASES = [
    (lambda d: RepVGGBlock(4, 4, 3, 1, 2, use_se=True, dims=d), (1, 2, 3)),
    (lambda d: RepVGGBlock(4, 6, 3, 2, dims=d), (1, 2, 3)),
    (lambda d: ACBlock(4, 6, 3, 2, dims=d), (2, 3)),
    (lambda d: ACBlock(4, 4, 5, 1, 2, dims=d), (2, 3)),
    (lambda d: DBBlock(4, 6, 3, 2, dims=d), (1, 2, 3)),
    (lambda d: DBBlock(4, 4, 3, 1, groups=4, dims=d), (1, 2, 3)),
    (lambda d: MobileOneBlock(4, 4, 3, 1, 4, num_branches=3, dims=d), (1, 2, 3)),
    (lambda d: MobileOneBlock(4, 6, 1, 1, 1, num_branches=2, use_se=True, dims=d), (1, 2, 3)),
]


@pytest.mark.parametrize(
    ("make", "dims"), [(make, d) for make, all_dims in BLOCK_CASES for d in all_dims]
)
def test_block_shapes_and_tracing(make, dims: int) -> None:
    torch.manual_seed(0)
    block = make(dims).eval()
    x = torch.randn(2, 4, *([7] * dims))
    ref_conv = main_conv(block)
    stride = ref_conv.stride[0]
    with torch.no_grad():
        y = block(x)
        assert y.shape == (2, ref_conv.out_channels, *([(7 - 1) // stride + 1] * dims))
        torch.testing.assert_close(torch.fx.symbolic_trace(block)(x), y, rtol=0, atol=0)


def test_dbblock_traces_pad_as_a_call() -> None:
    """The pad must reach the graph as ``F.pad`` (not a hidden slice assignment)."""
    graph = torch.fx.symbolic_trace(DBBlock(4, 4)).graph
    pads = [n for n in graph.nodes if n.op == "call_function" and n.target is F.pad]
    assert len(pads) == 2
