"""The laws that reach the wider re-parameterization universe, against torch's own ops in float64:
a conv as an FC on a fixed input size (RepMLP), a spatial crop before a conv (ACNet's crop
variant), channel selection and shuffle (split, cat, ShuffleNet, PSConv), mixed dilations
(PSConv) and the Dirac identity kernel (DiracNet, RepVGG)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from test_kernel import MODES, close, rand_input, rand_kernel

from reparam import ReparamError
from reparam import kernel as K
from reparam.kernel import Kernel, NotExact

F64 = torch.float64
TOL = 1e-12
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def cropped(x: torch.Tensor, amounts) -> torch.Tensor:
    """``x[:, :, a:-b, ...]`` per spatial axis, as a model writes it."""
    pairs = [(a, a) if isinstance(a, int) else a for a in amounts]
    return x[(slice(None), slice(None)) + tuple(slice(a, n - b) for (a, b), n in
                                               zip(pairs, x.shape[2:], strict=True))]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def geometry(draw, nd, max_k=4, max_d=2, max_p=2):
    """Kernel size, stride, dilation and padding per axis (odd and even kernels)."""
    mk = max_k if nd < 3 else min(max_k, 3)
    ks = [draw(st.integers(1, mk)) for _ in range(nd)]
    stride = [draw(st.integers(1, 2)) for _ in range(nd)]
    dil = [draw(st.integers(1, max_d)) for _ in range(nd)]
    pad = [draw(st.integers(0, max_p)) for _ in range(nd)]
    return ks, stride, dil, pad


@st.composite
def grouped_channels(draw, max_per=3):
    groups = draw(st.sampled_from([1, 2, 3]))
    return (groups, groups * draw(st.integers(1, max_per)),
            groups * draw(st.integers(1, max_per)))


# ---------------------------------------------------------------------------------------------
# Conv into FC (RepMLP)
# ---------------------------------------------------------------------------------------------


@given(st.data())
def test_as_linear_is_the_conv_on_the_flattened_sample(data):
    """conv(x).reshape(n, -1) == FC(x.reshape(n, -1)) for any padding mode, stride, dilation,
    groups and dims; the FC keeps the conv's groups and repeats the bias per position."""
    nd = data.draw(st.sampled_from([1, 2, 3]))
    groups, cin, cout = data.draw(grouped_channels(max_per=2 if nd == 3 else 3))
    ks, stride, dil, pad = data.draw(geometry(nd))
    mode = data.draw(st.sampled_from(MODES))
    k = rand_kernel(data.draw, cin, cout, ks, stride, pad, dil, groups, mode)
    spatial = [max(d * (kk - 1) + 1 - 2 * p, p + 1, 1) + data.draw(st.integers(0, 2))
               for kk, d, p in zip(ks, dil, pad, strict=True)]
    x = rand_input(data.draw, cin, spatial)
    fc = K.as_linear(k, spatial)
    want = K.apply(k, x)
    assert fc.nd == 0 and fc.groups == groups
    assert fc.weight.shape == (want[0].numel(), cin * math.prod(spatial) // groups)
    close(K.apply(fc, x.reshape(len(x), -1)), want.reshape(len(x), -1), TOL)


@given(st.data())
def test_as_linear_of_a_transposed_conv(data):
    nd = data.draw(st.sampled_from([1, 2]))
    groups, cin, cout = data.draw(grouped_channels())
    ks = [data.draw(st.integers(1, 3)) for _ in range(nd)]
    stride = [data.draw(st.integers(1, 2)) for _ in range(nd)]
    pad = [data.draw(st.integers(0, (kk - 1) // 2)) for kk in ks]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    k = Kernel(torch.randn(cin, cout // groups, *ks, generator=g, dtype=F64),
               torch.randn(cout, generator=g, dtype=F64), tuple(stride), tuple(pad), (1,) * nd,
               groups, transposed=True, output_padding=(0,) * nd)
    spatial = [data.draw(st.integers(1, 4)) for _ in range(nd)]
    x = torch.randn(2, cin, *spatial, generator=g, dtype=F64)
    want = {1: F.conv_transpose1d, 2: F.conv_transpose2d}[nd](
        x, k.weight, k.bias, k.stride, k.padding, 0, groups)
    close(K.apply(K.as_linear(k, spatial), x.reshape(2, -1)), want.reshape(2, -1), TOL)


@given(st.data())
def test_repmlp_grouped_fc_absorbs_grouped_convs(data):
    """RepMLP: a grouped FC, written as a 1x1 conv over C*h*w channels on (n, C*h*w, 1, 1), plus
    "same" conv branches of its groups on (n, C, h, w): one grouped FC, as a 1x1 conv again."""
    nd = data.draw(st.sampled_from([1, 2, 3]))
    groups = data.draw(st.sampled_from([1, 2, 4]))
    c, o = groups * data.draw(st.integers(1, 2)), groups * data.draw(st.integers(1, 2))
    spatial = [data.draw(st.integers(1, 4 if nd < 3 else 3)) for _ in range(nd)]
    flat_in, flat_out = c * math.prod(spatial), o * math.prod(spatial)
    fc = rand_kernel(data.draw, flat_in, flat_out, [1] * nd, [1] * nd, [0] * nd, [1] * nd,
                     groups)
    convs = []
    for _ in range(data.draw(st.integers(1, 3))):
        kk = data.draw(st.sampled_from([1, 3, 5] if nd < 3 else [1, 3]))
        convs.append(rand_kernel(data.draw, c, o, [kk] * nd, [1] * nd, [kk // 2] * nd,
                                 [1] * nd, groups))
    x = rand_input(data.draw, c, spatial)
    n = len(x)
    flat = x.reshape(n, flat_in, *([1] * nd))
    want = CONV[nd](flat, fc.weight, fc.bias, groups=groups).reshape(n, -1)
    for k in convs:
        want = want + CONV[nd](x, k.weight, k.bias, padding=k.padding,
                               groups=groups).reshape(n, -1)
    merged = K.add([K.as_linear(fc, [1] * nd)] + [K.as_linear(k, spatial) for k in convs])
    assert merged.groups == groups
    close(K.apply(merged, x.reshape(n, -1)), want, TOL)
    deploy = K.as_pointwise(merged, nd)
    assert deploy.groups == groups and deploy.kernel_size == (1,) * nd
    close(CONV[nd](flat, deploy.weight, deploy.bias, groups=groups).reshape(n, -1), want, TOL)


def test_as_linear_in_chunks_of_the_basis(monkeypatch):
    """A large FC is built a few basis vectors at a time: the same matrix."""
    g = torch.Generator().manual_seed(0)
    k = Kernel(torch.randn(6, 2, 3, 2, generator=g, dtype=F64), torch.randn(6, dtype=F64),
               (2, 1), (1, 1), (1, 2), 2, "circular")
    x = torch.randn(3, 4, 5, 4, generator=g, dtype=F64)
    monkeypatch.setattr(K, "_BASIS_CHUNK", 7)
    close(K.apply(K.as_linear(k, (5, 4)), x.reshape(3, -1)), K.apply(k, x).reshape(3, -1), TOL)


def test_as_linear_refuses_an_input_too_small():
    k = Kernel(torch.ones(1, 1, 3, 3, dtype=F64), torch.zeros(1, dtype=F64), (1, 1), (0, 0),
               (1, 1))
    with pytest.raises(NotExact, match="no output on an input of size"):
        K.as_linear(k, (2, 5))
    with pytest.raises(NotExact, match="does not run"):
        K.as_linear(Kernel(k.weight, k.bias, (1, 1), (2, 2), (1, 1), 1, "reflect"), (2, 2))


# ---------------------------------------------------------------------------------------------
# Spatial crop (ACNet's crop variant) and negative padding
# ---------------------------------------------------------------------------------------------


@st.composite
def crop_case(draw, symmetric=False):
    """A conv with padding 0 on the axes it crops and crop amounts (a, b) per axis."""
    nd = draw(st.sampled_from([1, 2, 3]))
    groups, cin, cout = draw(grouped_channels(max_per=2))
    ks, stride, dil, pad = draw(geometry(nd, max_d=3))
    amounts = []
    for axis in range(nd):
        a = draw(st.integers(0, 3))
        b = a if symmetric or draw(st.booleans()) else draw(st.integers(0, 3))
        amounts.append((a, b))
        if a or b:
            pad[axis] = 0
    mode = draw(st.sampled_from(MODES))
    k = rand_kernel(draw, cin, cout, ks, stride, pad, dil, groups, mode)
    spatial = [a + b + max(d * (kk - 1) + 1, p + 1, 3) + draw(st.integers(0, 2))
               for (a, b), kk, d, p in zip(amounts, ks, dil, pad, strict=True)]
    return k, amounts, rand_input(draw, cin, spatial)


@given(crop_case())
def test_crop_is_the_conv_on_the_cropped_input(case):
    """conv(x[..., a:-b]) == crop(conv)(x), symmetric or not; and the kernel with its padding made
    non-negative (zero taps) runs in torch as it is and gives the same."""
    k, amounts, x = case
    want = K.apply(k, cropped(x, amounts))  # k's padding is >= 0: torch's own conv
    off_grid = any(abs(a - b) % d for (a, b), d, kk in zip(amounts, k.dilation, k.kernel_size,
                                                          strict=True) if kk > 1)
    if off_grid:
        with pytest.raises(NotExact, match="dilation"):
            K.crop(k, amounts)
        return
    c = K.crop(k, amounts)
    close(K.apply(c, x), want, TOL)
    try:
        runnable = K.nonnegative_padding(c)
    except NotExact:  # a crop off the dilation grid: regrid to dilation 1 first
        runnable = K.nonnegative_padding(K.regrid(c, (1,) * k.nd))
    assert not runnable.crops
    pad = [p for p in runnable.padding]
    if runnable.padding_mode != "zeros" and runnable.reads_padding:
        y = F.pad(x, [p for p in reversed(pad) for _ in range(2)], mode=runnable.padding_mode)
        pad = [0] * k.nd
    else:
        y = x
    got = CONV[k.nd](y, runnable.weight, runnable.bias, runnable.stride, pad, runnable.dilation,
                     runnable.groups)
    close(got, want, TOL)


@given(crop_case(symmetric=True), st.data())
def test_a_crop_after_a_crop_adds_up(case, data):
    k, amounts, x = case
    more = [data.draw(st.integers(0, 1)) if a else 0 for a, _ in amounts]
    assume(all(n - 2 * m > 0 for n, m in zip(cropped(x, amounts).shape[2:], more, strict=True)))
    inner = cropped(cropped(x, more), amounts)
    assume(all(n >= d * (kk - 1) + 1 for n, d, kk in zip(inner.shape[2:], k.dilation,
                                                         k.kernel_size, strict=True)))
    twice = K.crop(K.crop(k, amounts), more)
    close(K.apply(twice, x), K.apply(k, inner), TOL)


@st.composite
def acnet_case(draw):
    """ACNet's block at any padding: a KxK branch (optional) and branches with one tap on some
    axes; where the KxK's padding is below d*(K-1)/2 those axes crop their input instead."""
    nd = draw(st.sampled_from([1, 2, 3]))
    base = draw(st.sampled_from([1, 2]))
    cin, cout = base * draw(st.integers(1, 2)), base * draw(st.integers(1, 2))
    size = [draw(st.sampled_from([3, 5] if nd < 3 else [3])) for _ in range(nd)]
    dil = [draw(st.integers(1, 2)) for _ in range(nd)]
    pad = [draw(st.integers(0, d * (kk - 1) // 2 + 1)) for kk, d in zip(size, dil, strict=True)]
    stride = [draw(st.integers(1, 2)) for _ in range(nd)]
    mode = draw(st.sampled_from(MODES))
    branches = []  # (kernel, crop amounts)
    if draw(st.booleans()):
        branches.append((rand_kernel(draw, cin, cout, size, stride, pad, dil, base, mode),
                         [0] * nd))
    for _ in range(draw(st.integers(1, 3))):
        ones = [draw(st.booleans()) for _ in range(nd)]
        ks, p, crops, d = [], [], [], []
        for axis in range(nd):
            shift = pad[axis] - dil[axis] * (size[axis] - 1) // 2
            one = ones[axis]
            ks.append(1 if one else size[axis])
            p.append(max(shift, 0) if one else pad[axis])
            crops.append(max(-shift, 0) if one else 0)
            d.append(draw(st.integers(1, 3)) if one else dil[axis])  # any dilation on one tap
        g = draw(st.sampled_from([base, 2 * base] if cin % (2 * base) == 0 == cout % (2 * base)
                                 else [base]))
        branches.append((rand_kernel(draw, cin, cout, ks, stride, p, d, g, mode), crops))
    spatial = [max(d * (kk - 1) + 1, 2 * p + 1, 4) + draw(st.integers(0, 2))
               for kk, d, p in zip(size, dil, pad, strict=True)]
    return branches, rand_input(draw, cin, spatial)


@given(acnet_case())
def test_acnet_cropped_branches_sum_into_one_conv(case):
    """sum of KxK(x) and 1xK / Kx1 / 1x1 branches on x[..., a:-a] == one conv on x: the cropped
    branches meet the KxK's (larger) padding through the usual alignment."""
    branches, x = case
    want = sum(K.apply(k, cropped(x, crops)) for k, crops in branches)
    merged = K.add([K.crop(k, crops) for k, crops in branches])
    close(K.apply(merged, x), want, TOL)
    runnable = K.nonnegative_padding(K.regrid(merged, (1,) * merged.nd))
    assert not runnable.crops
    close(K.apply(runnable, x), want, TOL)
    stacked = K.concat([K.crop(k, crops) for k, crops in branches])
    close(K.apply(stacked, x), torch.cat([K.apply(k, cropped(x, c)) for k, c in branches], 1),
          TOL)


def test_acnet_crop_block_folds_to_the_kxk_geometry():
    """ACNet, k=3, padding 0: the 1x3 reads x[:, :, 1:-1], the 3x1 reads x[:, :, :, 1:-1]; the
    sum is one 3x3 with padding 0 (nothing negative left to materialize)."""
    g = torch.Generator().manual_seed(0)
    square = Kernel(torch.randn(4, 2, 3, 3, generator=g, dtype=F64),
                    torch.randn(4, generator=g, dtype=F64), (1, 1), (0, 0), (1, 1))
    hor = Kernel(torch.randn(4, 2, 1, 3, generator=g, dtype=F64),
                 torch.randn(4, generator=g, dtype=F64), (1, 1), (0, 0), (1, 1))
    ver = Kernel(torch.randn(4, 2, 3, 1, generator=g, dtype=F64),
                 torch.randn(4, generator=g, dtype=F64), (1, 1), (0, 0), (1, 1))
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=F64)
    merged = K.add([square, K.crop(hor, [1, 0]), K.crop(ver, [0, 1])])
    assert merged.kernel_size == (3, 3) and merged.padding == (0, 0)
    want = (F.conv2d(x, square.weight, square.bias) + F.conv2d(x[:, :, 1:-1], hor.weight, hor.bias)
            + F.conv2d(x[:, :, :, 1:-1], ver.weight, ver.bias))
    close(F.conv2d(x, merged.weight, merged.bias), want, TOL)
    # k=5, padding 1: the cropped branches meet the 5x5's larger padding at their centre taps
    big = Kernel(torch.randn(4, 2, 5, 5, generator=g, dtype=F64), square.bias, (1, 1), (1, 1),
                 (1, 1))
    hor5 = Kernel(torch.randn(4, 2, 1, 5, generator=g, dtype=F64), hor.bias, (1, 1), (0, 1),
                  (1, 1))
    point = Kernel(torch.randn(4, 2, 1, 1, generator=g, dtype=F64), hor.bias, (1, 1), (0, 0),
                   (1, 1))
    merged = K.add([big, K.crop(hor5, [1, 0]), K.crop(point, [1, 1])])
    assert merged.kernel_size == (5, 5) and merged.padding == (1, 1)
    want = (F.conv2d(x, big.weight, big.bias, padding=1)
            + F.conv2d(x[:, :, 1:-1], hor5.weight, hor5.bias, padding=(0, 1))
            + F.conv2d(x[:, :, 1:-1, 1:-1], point.weight, point.bias))
    close(F.conv2d(x, merged.weight, merged.bias, padding=1), want, TOL)


def test_crop_refusals_say_why():
    g = torch.Generator().manual_seed(0)
    padded = Kernel(torch.randn(2, 2, 3, 3, generator=g, dtype=F64), torch.zeros(2, dtype=F64),
                    (1, 1), (1, 1), (1, 1))
    with pytest.raises(NotExact, match="pads axis 0 of its cropped input"):
        K.crop(padded, [1, 0])
    dilated = Kernel(padded.weight, padded.bias, (1, 1), (0, 0), (2, 2))
    with pytest.raises(NotExact, match="off its dilation-2 grid"):
        K.crop(dilated, [(1, 0), 0])
    with pytest.raises(NotExact, match="regrid it to dilation 1"):
        K.nonnegative_padding(K.crop(dilated, [1, 0]))
    with pytest.raises(ReparamError, match="one amount per spatial axis"):
        K.crop(padded, [1])
    with pytest.raises(NotExact, match="only a conv"):
        K.crop(Kernel(torch.ones(2, 2, dtype=F64), torch.zeros(2, dtype=F64)), [])


def test_nonnegative_padding_on_a_one_tap_axis_adds_two_taps():
    """A 1x3 cropping 2 rows: a 3x3 with dilation (2, 1) and padding 0, not a 5x3."""
    g = torch.Generator().manual_seed(1)
    k = Kernel(torch.randn(3, 2, 1, 3, generator=g, dtype=F64), torch.randn(3, dtype=F64),
               (1, 1), (0, 1), (1, 1))
    c = K.nonnegative_padding(K.crop(k, [2, 0]))
    assert c.kernel_size == (3, 3) and c.dilation == (2, 1) and c.padding == (0, 1)
    x = torch.randn(2, 2, 7, 5, generator=g, dtype=F64)
    close(F.conv2d(x, c.weight, c.bias, padding=c.padding, dilation=c.dilation),
          F.conv2d(x[:, :, 2:-2], k.weight, k.bias, padding=(0, 1)), TOL)


@given(st.data())
def test_compose_with_a_cropped_second_conv(data):
    """b(a(x)[..., c:-c]): b's crop moves into a's padding (less by c * a's stride)."""
    nd = data.draw(st.sampled_from([1, 2, 3]))
    groups, cin, mid = data.draw(grouped_channels(max_per=2))
    ks, stride, dil, pad = data.draw(geometry(nd, max_k=3))
    a = rand_kernel(data.draw, cin, mid, ks, stride, pad, dil, groups,
                    data.draw(st.sampled_from(MODES)))
    kb = [data.draw(st.integers(1, 3)) for _ in range(nd)]
    b = rand_kernel(data.draw, mid, data.draw(st.integers(1, 3)), kb, [1] * nd, [0] * nd,
                    [data.draw(st.integers(1, 2)) for _ in range(nd)], 1)
    crops = [data.draw(st.integers(0, 2)) for _ in range(nd)]
    x = rand_input(data.draw, cin, [max(d * (kk - 1) + 1, p + 1, 3) + data.draw(st.integers(0, 6))
                                    for kk, d, p in zip(ks, dil, pad, strict=True)])
    inner = cropped(K.apply(a, x), crops)
    assume(all(n >= d * (kk - 1) + 1 for n, d, kk in zip(inner.shape[2:], b.dilation, kb,
                                                         strict=True)))
    close(K.apply(K.compose(a, K.crop(b, crops)), x), K.apply(b, inner), TOL)


@given(st.data())
def test_compose_a_cropped_pointwise_conv_then_a_conv_padding_other_axes(data):
    """crop(1x1)(x) then a conv padding only the uncropped axes, in any mode: one conv that
    crops like the first and pads like the second."""
    nd = data.draw(st.sampled_from([1, 2, 3]))
    cin, mid = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    mode = data.draw(st.sampled_from(MODES))
    a = rand_kernel(data.draw, cin, mid, [1] * nd, [1] * nd, [0] * nd, [1] * nd, 1,
                    bias=mode != "zeros")
    crops = [data.draw(st.integers(0, 2)) for _ in range(nd)]
    ks, stride, dil, pad = data.draw(geometry(nd, max_k=3))
    pad = [0 if c else p for c, p in zip(crops, pad, strict=True)]
    b = rand_kernel(data.draw, mid, data.draw(st.integers(1, 3)), ks, stride, pad, dil, 1, mode)
    x = rand_input(data.draw, cin, [2 * c + max(d * (kk - 1) + 1, p + 1, 3)
                                    for c, kk, d, p in zip(crops, ks, dil, pad, strict=True)])
    close(K.apply(K.compose(K.crop(a, crops), b), x), K.apply(b, cropped(K.apply(a, x), crops)),
          TOL)


def test_compose_refuses_a_pad_of_a_cropped_axis():
    """A crop then a zero-padded 3x3: the padding would read pixels the crop removed."""
    g = torch.Generator().manual_seed(0)
    crop = K.crop(K.identity(2, 2), [1, 0])
    k = Kernel(torch.randn(2, 2, 3, 3, generator=g, dtype=F64), torch.zeros(2, dtype=F64),
               (1, 1), (1, 1), (1, 1))
    with pytest.raises(NotExact, match="pads an axis that"):
        K.compose(crop, k)
    x = torch.randn(1, 2, 5, 5, generator=g, dtype=F64)
    unpadded_on_rows = Kernel(k.weight, k.bias, (1, 1), (0, 1), (1, 1))
    close(K.apply(K.compose(crop, unpadded_on_rows), x),
          F.conv2d(x[:, :, 1:-1], k.weight, padding=(0, 1)), TOL)


# ---------------------------------------------------------------------------------------------
# Channel selection and permutation
# ---------------------------------------------------------------------------------------------


def rand_indices(draw, channels: int, count: int | None = None) -> list[int]:
    """A permutation, a chunk, or any selection with repeats, of ``channels``."""
    kind = draw(st.sampled_from(["permutation", "chunk", "any"]))
    if kind == "permutation" and count in (None, channels):
        return draw(st.permutations(range(channels)))
    n = count or draw(st.integers(1, 2 * channels))
    if kind == "chunk" and n <= channels:
        start = draw(st.integers(0, channels - n))
        return list(range(start, start + n))
    return draw(st.lists(st.integers(0, channels - 1), min_size=n, max_size=n))


@st.composite
def some_conv(draw, nds=(0, 1, 2, 3)):
    """A conv (or linear map) of random geometry and groups, and an input size it runs on."""
    nd = draw(st.sampled_from(nds))
    groups, cin, cout = draw(grouped_channels())
    ks, stride, dil, pad = draw(geometry(nd, max_k=3))
    k = rand_kernel(draw, cin, cout, ks, stride, pad, dil, groups, draw(st.sampled_from(MODES)))
    return k, [max(d * (kk - 1) + 1, p + 1, 3) for kk, d, p in zip(ks, dil, pad, strict=True)]


@given(st.data())
def test_select_is_the_index_map(data):
    nd = data.draw(st.sampled_from([0, 1, 2, 3]))
    c = data.draw(st.integers(1, 6))
    idx = rand_indices(data.draw, c)
    x = rand_input(data.draw, c, [3] * nd)
    s = K.select(idx, c, nd)
    close(K.apply(s, x), x[:, idx], TOL)
    assert K.selection_indices(s) == list(idx)


@given(st.data())
def test_shuffle_indices_read_reshape_transpose_reshape(data):
    nd = data.draw(st.sampled_from([1, 2, 3]))
    groups = data.draw(st.integers(1, 4))
    c = groups * data.draw(st.integers(1, 3))
    x = rand_input(data.draw, c, [2] * nd)
    n, rest = len(x), x.shape[2:]
    shuffled = x.reshape(n, groups, c // groups, *rest).transpose(1, 2).reshape(n, c, *rest)
    idx = K.shuffle_indices(groups, c)
    assert sorted(idx) == list(range(c))
    close(K.apply(K.select(idx, c, nd), x), shuffled, TOL)


@given(st.data())
def test_take_out_is_the_conv_then_the_selection(data):
    k, spatial = data.draw(some_conv())
    idx = rand_indices(data.draw, k.out_channels)
    x = rand_input(data.draw, k.in_channels, spatial)
    out = K.take_out(k, idx)
    close(K.apply(out, x), K.apply(k, x)[:, idx], TOL)
    assert k.groups % out.groups == 0


@given(st.data())
def test_take_in_is_the_selection_then_the_conv(data):
    k, spatial = data.draw(some_conv())
    c = data.draw(st.integers(1, 6))
    idx = rand_indices(data.draw, c, k.in_channels)
    x = rand_input(data.draw, c, spatial)
    out = K.take_in(idx, c, k)
    assert out.in_channels == c
    close(K.apply(out, x), K.apply(k, x[:, idx]), TOL)


@given(st.data())
def test_a_permutation_within_groups_keeps_the_groups(data):
    """A shuffle inside each group (or a whole-group reorder of both sides) costs nothing."""
    nd = data.draw(st.sampled_from([1, 2]))
    groups = data.draw(st.sampled_from([2, 3]))
    per = data.draw(st.integers(1, 3))
    c = groups * per
    k = rand_kernel(data.draw, c, c, [3] * nd, [1] * nd, [1] * nd, [1] * nd, groups)
    perm = [j * per + i for j in range(groups) for i in data.draw(st.permutations(range(per)))]
    x = rand_input(data.draw, c, [4] * nd)
    inside = K.compose(K.select(perm, c, nd), k)
    assert inside.groups == groups and inside.weight.shape == k.weight.shape
    close(K.apply(inside, x), K.apply(k, x[:, perm]), TOL)
    after = K.compose(k, K.select(perm, c, nd))
    assert after.groups == groups and after.weight.shape == k.weight.shape
    close(K.apply(after, x), K.apply(k, x)[:, perm], TOL)


@given(st.data())
def test_compose_with_a_selection_on_either_side(data):
    """cat of reordered chunks (or a channel shuffle) before or after a conv: one conv, no larger
    than the conv once it is dense; exact whatever the padding."""
    k, spatial = data.draw(some_conv(nds=(0, 1, 2)))
    c, nd, ks = data.draw(st.integers(1, 5)), k.nd, k.kernel_size
    before = K.select(rand_indices(data.draw, c, k.in_channels), c, nd)
    after = K.select(rand_indices(data.draw, k.out_channels), k.out_channels, nd)
    x = rand_input(data.draw, c, spatial)
    one = K.compose(K.compose(before, k), after)
    close(K.apply(one, x), K.apply(after, K.apply(k, K.apply(before, x))), TOL)
    assert one.weight.shape[2:] == k.weight.shape[2:]
    assert one.weight.numel() <= after.out_channels * c * math.prod(ks)


def test_selection_helpers_refuse_bad_indices():
    with pytest.raises(ReparamError, match=r"\[0, 4\)"):
        K.select([0, 4], 4, 2)
    with pytest.raises(ReparamError, match="shuffle"):
        K.shuffle_indices(3, 4)
    k = Kernel(torch.ones(2, 3, dtype=F64), torch.zeros(2, dtype=F64))
    with pytest.raises(ReparamError, match="reads 3 channels, not 2"):
        K.take_in([0, 1], 4, k)
    assert K.selection_indices(K.scale_out(K.select([1, 0], 2, 0), 2.0)) is None
    halves = Kernel(torch.tensor([[0.5, 0.5], [2.0, -1.0]], dtype=F64), torch.zeros(2, dtype=F64))
    assert K.selection_indices(halves) is None


def test_selection_of_a_transposed_conv():
    g = torch.Generator().manual_seed(0)
    k = Kernel(torch.randn(3, 4, 3, generator=g, dtype=F64), torch.randn(4, dtype=F64), (2,),
               (1,), (1,), transposed=True, output_padding=(1,))
    x = torch.randn(2, 5, 4, generator=g, dtype=F64)
    y = K.apply(k, x[:, [4, 0, 0]])
    close(K.apply(K.take_in([4, 0, 0], 5, k), x), y, TOL)
    close(K.apply(K.take_out(k, [3, 1]), x[:, [4, 0, 0]]), y[:, [3, 1]], TOL)


# ---------------------------------------------------------------------------------------------
# Mixed dilations (PSConv)
# ---------------------------------------------------------------------------------------------


@given(st.data())
def test_regrid_is_the_same_conv(data):
    nd = data.draw(st.sampled_from([1, 2, 3]))
    groups, cin, cout = data.draw(grouped_channels(max_per=2))
    ks, stride, _, pad = data.draw(geometry(nd, max_k=3))
    dil = [data.draw(st.sampled_from([1, 2, 3, 4, 6])) for _ in range(nd)]
    finer = [data.draw(st.sampled_from(divisors(d))) for d in dil]
    k = rand_kernel(data.draw, cin, cout, ks, stride, pad, dil, groups,
                    data.draw(st.sampled_from(MODES)))
    x = rand_input(data.draw, cin, [max(d * (kk - 1) + 1, p + 1, 3) + data.draw(st.integers(0, 2))
                                    for kk, d, p in zip(ks, dil, pad, strict=True)])
    r = K.regrid(k, finer)
    assert r.dilation == tuple(finer)
    assert r.kernel_size == tuple(1 if kk == 1 else (kk - 1) * d // f + 1
                                  for kk, d, f in zip(ks, dil, finer, strict=True))
    close(K.apply(r, x), K.apply(k, x), TOL)


def test_regrid_of_a_transposed_conv():
    g = torch.Generator().manual_seed(0)
    k = Kernel(torch.randn(2, 3, 3, 2, generator=g, dtype=F64), torch.randn(3, dtype=F64),
               (2, 1), (1, 0), (2, 3), transposed=True, output_padding=(1, 0))
    x = torch.randn(2, 2, 4, 3, generator=g, dtype=F64)
    close(K.apply(K.regrid(k, (1, 1)), x), K.apply(k, x), TOL)


@st.composite
def mixed_dilations(draw):
    """PSConv-like: 2-4 branches of odd kernels with their own dilations, all "same" (plus a
    shared shift of the padding), so that their centres align."""
    nd = draw(st.sampled_from([1, 2, 3]))
    base = draw(st.sampled_from([1, 2]))
    cin, cout = base * 2, base * 2 * draw(st.integers(1, 2))
    stride = [draw(st.integers(1, 2)) for _ in range(nd)]
    shift = [draw(st.integers(0, 1)) for _ in range(nd)]
    mode = draw(st.sampled_from(MODES))
    kernels = []
    for _ in range(draw(st.integers(2, 4))):
        ks = [draw(st.sampled_from([1, 3] if nd == 3 else [1, 3, 5])) for _ in range(nd)]
        dil = [draw(st.integers(1, 4 if nd < 3 else 2)) for _ in range(nd)]
        pad = [d * (kk - 1) // 2 + s for kk, d, s in zip(ks, dil, shift, strict=True)]
        g = draw(st.sampled_from([base, 2 * base]))
        kernels.append(rand_kernel(draw, cin, cout, ks, stride, pad, dil, g, mode))
    reach = [max(k.padding[axis] for k in kernels) for axis in range(nd)]
    return kernels, rand_input(draw, cin, [2 * r + 2 + draw(st.integers(0, 2)) for r in reach])


@given(mixed_dilations())
def test_mixed_dilation_branches_sum_on_the_common_grid(case):
    """sum of dilated branches == one conv at the gcd of their dilations; add alone refuses."""
    kernels, x = case
    want = sum(K.apply(k, x) for k in kernels)
    mixed = any(len({k.dilation[axis] for k in kernels if k.kernel_size[axis] > 1}) > 1
                for axis in range(kernels[0].nd))
    if mixed:
        with pytest.raises(NotExact, match="dilation"):
            K.add(kernels)
    common = K.on_common_grid(kernels)
    merged = K.add(common)
    assert merged.dilation == tuple(
        math.gcd(*[k.dilation[axis] for k in kernels if k.kernel_size[axis] > 1]) or 1
        for axis in range(kernels[0].nd))
    close(K.apply(merged, x), want, TOL)
    close(K.apply(K.concat(common), x), torch.cat([K.apply(k, x) for k in kernels], 1), TOL)


def test_regrid_refuses_a_grid_that_misses_taps():
    k = Kernel(torch.ones(1, 1, 3, dtype=F64), torch.zeros(1, dtype=F64), (1,), (3,), (3,))
    with pytest.raises(NotExact, match="only if 2 divides 3"):
        K.regrid(k, (2,))


# ---------------------------------------------------------------------------------------------
# The Dirac kernel (DiracNet, RepVGG's identity)
# ---------------------------------------------------------------------------------------------


@given(st.data())
def test_dirac_is_torch_dirac_init(data):
    nd = data.draw(st.sampled_from([1, 2, 3]))
    groups = data.draw(st.integers(1, 3))
    cout, cin = groups * data.draw(st.integers(1, 3)), groups * data.draw(st.integers(1, 3))
    ks = [data.draw(st.sampled_from([1, 3, 5] if nd < 3 else [1, 3])) for _ in range(nd)]
    d = K.dirac(cout, cin, ks, groups, nd)
    want = torch.nn.init.dirac_(torch.empty(cout, cin // groups, *ks, dtype=F64), groups)
    assert torch.equal(d.weight, want) and d.groups == groups


@given(st.data())
def test_dirac_is_the_identity_and_the_identity_path_builds_it(data):
    """dirac(C, C, K, g) is the identity, and identity + regroup + pad_kernel gives the same
    kernel; DiracNet's alpha * I + beta * W is one conv: alpha * x + beta * conv(x)."""
    nd = data.draw(st.sampled_from([1, 2, 3]))
    groups = data.draw(st.sampled_from([1, 2, 3]))
    c = groups * data.draw(st.integers(1, 3))
    if data.draw(st.booleans()):
        groups = c  # depthwise
    kk = data.draw(st.sampled_from([1, 3, 5] if nd < 3 else [1, 3]))
    x = rand_input(data.draw, c, [data.draw(st.integers(1, 4)) for _ in range(nd)])
    d = K.dirac(c, c, kk, groups, nd)
    close(K.apply(d, x), x, TOL)
    path = K.pad_kernel(K.regroup(K.identity(c, nd), groups), (kk,) * nd, (kk // 2,) * nd)
    assert torch.equal(path.weight, d.weight)
    w = rand_kernel(data.draw, c, c, [kk] * nd, [1] * nd, [kk // 2] * nd, [1] * nd, groups)
    assert torch.equal(K.add([w, K.identity(c, nd)]).weight, K.add([w, d]).weight)
    alpha, beta = 0.7, -1.3
    dirac_net = K.add([K.scale_out(d, alpha), K.scale_out(w, beta)])
    close(K.apply(dirac_net, x), alpha * x + beta * K.apply(w, x), TOL)


def test_dirac_refuses_an_even_kernel():
    with pytest.raises(NotExact, match="no centre tap"):
        K.dirac(4, 4, 2, 1, 2)


def test_new_laws_never_write_their_inputs():
    g = torch.Generator().manual_seed(0)
    k = Kernel(torch.randn(4, 2, 3, 3, generator=g, dtype=F64), torch.randn(4, dtype=F64),
               (1, 1), (0, 1), (2, 1), 2)
    w, b = k.weight.clone(), k.bias.clone()
    K.as_linear(k, (5, 4))
    K.crop(k, [(2, 0), 0])
    K.nonnegative_padding(K.crop(k, [2, 0]))
    K.regrid(k, (1, 1))
    K.on_common_grid([k, k])
    K.take_out(k, [3, 0, 0])
    K.take_in([1, 1, 0, 2], 3, k)
    K.compose(K.select([1, 0, 3, 2], 4, 2), k)
    assert torch.equal(k.weight, w) and torch.equal(k.bias, b)
