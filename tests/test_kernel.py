"""Every law of the kernel algebra against torch's own ops in float64, over random geometry."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from reparam import kernel as K
from reparam.kernel import Kernel, NotExact

F64 = torch.float64
MODES = ("zeros", "reflect", "replicate", "circular")


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-10) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().max().clamp_min(1e-12)
    err = ((got - want).abs().max() / scale).item()
    assert err < tol, f"relative error {err:.3g}"


def rand_kernel(draw, cin, cout, ks, stride, padding, dilation, groups, mode="zeros",
                bias=True) -> Kernel:
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin // groups, *ks, generator=g, dtype=F64)
    b = torch.randn(cout, generator=g, dtype=F64) if bias else torch.zeros(cout, dtype=F64)
    return Kernel(w, b, tuple(stride), tuple(padding), tuple(dilation), groups, mode)


def rand_input(draw, channels, sizes) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, *sizes, generator=g, dtype=F64)


@st.composite
def conv_case(draw, nd=None, max_k=4):
    """A random conv with random geometry and an input it accepts."""
    nd = draw(st.sampled_from([1, 2, 3])) if nd is None else nd
    groups = draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    mk = max_k if nd < 3 else 3
    ks = [draw(st.integers(1, mk)) for _ in range(nd)]
    stride = [draw(st.integers(1, 2)) for _ in range(nd)]
    dilation = [draw(st.integers(1, 2)) for _ in range(nd)]
    padding = [draw(st.integers(0, 2)) for _ in range(nd)]
    mode = draw(st.sampled_from(MODES))
    k = rand_kernel(draw, cin, cout, ks, stride, padding, dilation, groups, mode)
    sizes = [max(d * (kk - 1) + 1, p + 1, 3) + draw(st.integers(0, 3))
             for kk, d, p in zip(ks, dilation, padding, strict=True)]
    return k, rand_input(draw, cin, sizes)


def bn_stats(draw, c):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return (torch.randn(c, generator=g, dtype=F64), torch.rand(c, generator=g, dtype=F64) + 0.1,
            torch.randn(c, generator=g, dtype=F64), torch.randn(c, generator=g, dtype=F64), 1e-3)


@given(st.data())
def test_fuse_bn_conv(data):
    """conv then BN == one conv, for every geometry and padding mode."""
    k, x = data.draw(conv_case())
    mean, var, gamma, beta, eps = bn_stats(data.draw, k.out_channels)
    want = F.batch_norm(K.apply(k, x), mean, var, gamma, beta, False, 0.0, eps)
    close(K.apply(K.fuse_bn(k, mean, var, gamma, beta, eps), x), want)


@given(st.data())
def test_fuse_bn_transposed_conv(data):
    """transposed conv then BN: the output-channel axis of the weight is dim 1."""
    nd = data.draw(st.sampled_from([1, 2, 3]))
    groups = data.draw(st.sampled_from([1, 2]))
    cin, cout = groups * data.draw(st.integers(1, 3)), groups * data.draw(st.integers(1, 3))
    ks = [data.draw(st.integers(1, 3)) for _ in range(nd)]
    stride = [data.draw(st.integers(1, 3)) for _ in range(nd)]
    padding = [data.draw(st.integers(0, kk - 1)) for kk in ks]
    out_pad = [data.draw(st.integers(0, s - 1)) for s in stride]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    k = Kernel(torch.randn(cin, cout // groups, *ks, generator=g, dtype=F64),
               torch.randn(cout, generator=g, dtype=F64), tuple(stride), tuple(padding),
               (1,) * nd, groups, transposed=True, output_padding=tuple(out_pad))
    x = torch.randn(2, cin, *([4] * nd), generator=g, dtype=F64)
    mean, var, gamma, beta, eps = bn_stats(data.draw, cout)
    want = F.batch_norm(K.apply(k, x), mean, var, gamma, beta, False, 0.0, eps)
    close(K.apply(K.fuse_bn(k, mean, var, gamma, beta, eps), x), want)


@given(st.data())
def test_fuse_bn_linear(data):
    cin, cout = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    k = Kernel(torch.randn(cout, cin, generator=g, dtype=F64), torch.randn(cout, dtype=F64))
    x = torch.randn(5, cin, generator=g, dtype=F64)
    mean, var, gamma, beta, eps = bn_stats(data.draw, cout)
    want = F.batch_norm(K.apply(k, x), mean, var, gamma, beta, False, 0.0, eps)
    close(K.apply(K.fuse_bn(k, mean, var, gamma, beta, eps), x), want)


@given(st.data())
def test_bn_then_conv_exact_iff_no_zero_padding_is_read(data):
    """BN then conv folds exactly unless the conv zero-pads a shifted input; then it refuses,
    and the refusal is right: scaling the input alone would differ at the border."""
    k, x = data.draw(conv_case())
    mean, var, gamma, beta, eps = bn_stats(data.draw, k.in_channels)
    scale, shift = K.bn_scale_shift(mean, var, gamma, beta, eps)
    if data.draw(st.booleans()):
        shift = torch.zeros_like(shift)
    want = K.apply(k, F.batch_norm(x, mean, var, gamma, beta, False, 0.0, eps)
                   if shift.any() else x * scale.reshape(1, -1, *([1] * k.nd)))
    forbidden = bool(shift.any()) and k.reads_padding and k.padding_mode == "zeros"
    if forbidden:
        with pytest.raises(NotExact):
            K.scale_in(scale, shift, k)
    else:
        close(K.apply(K.scale_in(scale, shift, k), x), want)


@given(st.data())
def test_regroup_is_the_same_map(data):
    k, x = data.draw(conv_case())
    target = data.draw(st.sampled_from([g for g in range(1, k.groups + 1) if k.groups % g == 0]))
    out = K.regroup(k, target)
    assert out.groups == target
    close(K.apply(out, x), K.apply(k, x))


@given(st.data())
def test_identity_is_a_grouped_dirac(data):
    """x + conv(x) with a grouped or depthwise conv: the identity takes the conv's groups."""
    nd = data.draw(st.sampled_from([1, 2, 3]))
    groups = data.draw(st.sampled_from([1, 2, 4]))
    c = groups * data.draw(st.integers(1, 3))
    if data.draw(st.booleans()):
        groups = c  # depthwise
    ks = [data.draw(st.sampled_from([1, 3, 5])) for _ in range(nd)]
    d = [data.draw(st.integers(1, 2)) for _ in range(nd)]
    pad = [di * (kk - 1) // 2 for kk, di in zip(ks, d, strict=True)]
    k = rand_kernel(data.draw, c, c, ks, [1] * nd, pad, d, groups,
                    data.draw(st.sampled_from(MODES)))
    x = rand_input(data.draw, c, [max(5, p + 1) for p in pad])
    out = K.add([k, K.identity(c, nd)])
    assert out.groups == groups
    close(K.apply(out, x), K.apply(k, x) + x)


@st.composite
def aligned_branches(draw, same_size=False):
    """2-4 branches with one stride and alignment but their own kernel sizes and groups."""
    nd = draw(st.sampled_from([1, 2, 3]))
    base_groups = draw(st.sampled_from([1, 2]))
    cin = base_groups * 2 * draw(st.integers(1, 2))
    cout = base_groups * 2 * draw(st.integers(1, 2))
    stride = [draw(st.integers(1, 2)) for _ in range(nd)]
    dil = [draw(st.integers(1, 2)) for _ in range(nd)]
    shift = [draw(st.integers(0, 1)) for _ in range(nd)]  # extra padding shared by all branches
    mode = draw(st.sampled_from(MODES))
    sizes = [draw(st.sampled_from([1, 3, 5] if nd < 3 else [1, 3])) for _ in range(nd)]
    kernels = []
    for _ in range(draw(st.integers(2, 4))):
        ks = sizes if same_size else [draw(st.sampled_from([1, s])) for s in sizes]
        pad = [d * (k - 1) // 2 + s for k, d, s in zip(ks, dil, shift, strict=True)]
        g = draw(st.sampled_from([base_groups, base_groups * 2]))
        kernels.append(rand_kernel(draw, cin, cout, ks, stride, pad, dil, g, mode))
    spatial = [max(d * (k - 1) + 1, 2 * (d * (k - 1) // 2 + s) + 1, 4) + draw(st.integers(0, 2))
               for k, d, s in zip(sizes, dil, shift, strict=True)]
    return kernels, rand_input(draw, cin, spatial)


@given(aligned_branches())
def test_sum_of_aligned_branches(case):
    """sum of branches == one conv: small kernels zero-padded, groups met at their gcd."""
    kernels, x = case
    out = K.add(kernels)
    assert out.groups == math.gcd(*[k.groups for k in kernels])
    close(K.apply(out, x), sum(K.apply(k, x) for k in kernels))


@given(aligned_branches())
def test_concat_of_aligned_branches(case):
    kernels, x = case
    close(K.apply(K.concat(kernels), x), torch.cat([K.apply(k, x) for k in kernels], 1))


def test_small_kernel_goes_to_its_tap_offset_not_the_centre():
    """k=4, s=2, p=1 beside a 1x1 (p=0): the 1x1 tap is at (p_big - p_small)/d = 1, not 1.5."""
    g = torch.Generator().manual_seed(0)
    big = Kernel(torch.randn(3, 2, 4, 4, generator=g, dtype=F64), torch.zeros(3, dtype=F64),
                 (2, 2), (1, 1), (1, 1))
    small = Kernel(torch.randn(3, 2, 1, 1, generator=g, dtype=F64), torch.zeros(3, dtype=F64),
                   (2, 2), (0, 0), (1, 1))
    x = torch.randn(1, 2, 8, 8, generator=g, dtype=F64)
    want = K.apply(big, x) + K.apply(small, x)
    merged = K.add([big, small])
    close(K.apply(merged, x), want)
    naive = replace(K.pad_kernel(small, (4, 4), (2, 2)), padding=(1, 1))  # at the "centre"
    centre = K.add([big, naive])
    assert (K.apply(centre, x) - want).abs().max() > 1e-3


@given(st.data())
def test_misaligned_branches_are_refused(data):
    """A 3x3 with padding 0 beside a 3x3 with padding 1 (or modes that disagree): no sum."""
    nd = data.draw(st.sampled_from([1, 2]))
    a = rand_kernel(data.draw, 2, 2, [3] * nd, [1] * nd, [1] * nd, [1] * nd, 1)
    if data.draw(st.booleans()):
        b = rand_kernel(data.draw, 2, 2, [3] * nd, [1] * nd, [0] * nd, [1] * nd, 1)
    else:
        b = rand_kernel(data.draw, 2, 2, [3] * nd, [1] * nd, [1] * nd, [1] * nd, 1, "reflect")
    with pytest.raises(NotExact):
        K.add([a, b])


@given(st.data())
def test_compose_with_unpadded_second_conv(data):
    """A then an unpadded B (1x1 or KxK, any stride, dilation, groups): one conv."""
    a, x = data.draw(conv_case(max_k=3))
    nd = a.nd
    groups = data.draw(st.sampled_from([g for g in (1, 2, 3) if a.out_channels % g == 0]))
    cout = groups * data.draw(st.integers(1, 2))
    ks = [data.draw(st.integers(1, 3)) for _ in range(nd)]
    b = rand_kernel(data.draw, a.out_channels, cout, ks,
                    [data.draw(st.integers(1, 2)) for _ in range(nd)], [0] * nd,
                    [data.draw(st.integers(1, 2)) for _ in range(nd)], groups)
    mid = K.apply(a, x)
    assume(all(m >= d * (k - 1) + 1 for m, k, d in zip(mid.shape[2:], ks, b.dilation,
                                                          strict=True)))
    close(K.apply(K.compose(a, b), x), K.apply(b, mid))


@given(st.data())
def test_compose_pointwise_then_padded_conv(data):
    """1x1 then a padded KxK: exact iff B's padding reads what A gives there (zero bias, or a
    non-zero padding mode); otherwise refused."""
    b, x0 = data.draw(conv_case())
    nd = b.nd
    cin = data.draw(st.integers(1, 4))
    has_bias = data.draw(st.booleans())
    a = rand_kernel(data.draw, cin, b.in_channels, [1] * nd, [1] * nd, [0] * nd, [1] * nd, 1,
                    bias=has_bias)
    x = rand_input(data.draw, cin, x0.shape[2:])
    if b.reads_padding and b.padding_mode == "zeros" and has_bias:
        with pytest.raises(NotExact):
            K.compose(a, b)
        return
    close(K.apply(K.compose(a, b), x), K.apply(b, K.apply(a, x)))


def test_compose_refuses_padded_kxk_then_padded_kxk():
    g = torch.Generator().manual_seed(0)
    a = Kernel(torch.randn(2, 2, 3, 3, generator=g, dtype=F64), torch.zeros(2, dtype=F64),
               (1, 1), (1, 1), (1, 1))
    with pytest.raises(NotExact, match="pads"):
        K.compose(a, a)


@given(st.data())
def test_avg_pool_is_a_depthwise_conv(data):
    nd = data.draw(st.sampled_from([1, 2, 3]))
    c = data.draw(st.integers(1, 4))
    ks = [data.draw(st.integers(1, 3)) for _ in range(nd)]
    stride = [data.draw(st.integers(1, 3)) for _ in range(nd)]
    pad = [data.draw(st.integers(0, k // 2)) for k in ks]
    x = rand_input(data.draw, c, [6] * nd)
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    want = pool(x, ks, stride, pad, count_include_pad=True)
    close(K.apply(K.avg_pool(c, ks, stride, pad), x), want)


@given(st.data())
def test_scale_and_shift_per_channel(data):
    k, x = data.draw(conv_case())
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 100)))
    s = torch.randn(k.out_channels, generator=g, dtype=F64)
    t = torch.randn(k.out_channels, generator=g, dtype=F64)
    view = (1, -1) + (1,) * k.nd
    close(K.apply(K.scale_out(k, s, t), x), K.apply(k, x) * s.view(view) + t.view(view))


def test_kernels_are_never_written_in_place():
    g = torch.Generator().manual_seed(0)
    k = Kernel(torch.randn(4, 2, 3, 3, generator=g, dtype=F64), torch.randn(4, dtype=F64),
               (1, 1), (1, 1), (1, 1), 2)
    w, b = k.weight.clone(), k.bias.clone()
    K.fuse_bn(k, torch.ones(4, dtype=F64), torch.ones(4, dtype=F64), None, None, 0.0)
    K.add([k, K.identity(4, 2)])
    K.regroup(k, 1)
    K.compose(K.identity(4, 2), k)
    assert torch.equal(k.weight, w) and torch.equal(k.bias, b)
