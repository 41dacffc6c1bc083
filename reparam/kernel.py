"""The kernel algebra: pure functions on affine maps ``y = W (*) x + b``.

A :class:`Kernel` is a convolution (``nd`` = 1, 2, 3 spatial dims), a transposed convolution or,
with ``nd == 0``, a linear layer. Every law returns a new kernel and never writes into its inputs.
Callers pass float64 tensors; materialization casts back to the model's dtype at the very end.

A law whose exactness condition fails raises :class:`NotExact` with the reason in words; the
graph layer turns that into "left unfolded, because ...".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class NotExact(Exception):
    """A law does not hold exactly for these kernels; ``str(self)`` says why."""


@dataclass(frozen=True, eq=False)
class Kernel:
    """An affine map with its geometry.

    ``weight`` is ``(out, in/groups, *k)`` for a conv, ``(in, out/groups, *k)`` for a transposed
    conv and ``(out, in/groups)`` for a linear map (``nd == 0``). ``channels_last`` marks a linear
    map acting on the last axis of a tensor of rank > 2 (tokens); otherwise channels are axis 1.
    """

    weight: Tensor
    bias: Tensor
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    channels_last: bool = False
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def nd(self) -> int:
        return self.weight.dim() - 2

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def out_channels(self) -> int:
        if self.transposed:
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        if self.transposed:
            return self.weight.shape[0]
        return self.weight.shape[1] * self.groups

    @property
    def is_pointwise(self) -> bool:
        """1x1 taps with stride 1 (padding allowed): acts on each position alone."""
        return not self.transposed and all(k == 1 for k in self.kernel_size) and all(
            s == 1 for s in self.stride
        )

    @property
    def is_diagonal(self) -> bool:
        """A per-channel affine map: pointwise, depthwise, no padding."""
        return (
            self.is_pointwise
            and self.groups == self.out_channels == self.in_channels
            and not any(self.padding)
        )

    @property
    def has_bias(self) -> bool:
        return bool(torch.any(self.bias != 0))

    @property
    def reads_padding(self) -> bool:
        return any(p > 0 for p in self.padding)

    def geometry(self) -> str:
        """A short human-readable summary, e.g. ``conv3x3(4->8,s2,g1)``."""
        if self.nd == 0:
            return f"linear({self.in_channels}->{self.out_channels})"
        k = "x".join(map(str, self.kernel_size))
        name = "convT" if self.transposed else "conv"
        extra = "" if all(s == 1 for s in self.stride) else ",s" + "x".join(map(str, self.stride))
        return f"{name}{k}({self.in_channels}->{self.out_channels}{extra},g{self.groups})"

    def macs(self, positions: int) -> int:
        """Multiply-adds for one sample: ``positions`` is the output size of one channel (the
        input size for a transposed conv, which scatters every input position into its taps)."""
        taps = math.prod(self.kernel_size)
        if self.transposed:
            return self.in_channels * (self.out_channels // self.groups) * taps * positions
        return self.out_channels * (self.in_channels // self.groups) * taps * positions


# ---------------------------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------------------------


def affine(scale: Tensor, shift: Tensor, nd: int, channels_last: bool = False) -> Kernel:
    """Per-channel ``y = scale * x + shift`` as a depthwise 1x1 kernel (exact by construction)."""
    channels = scale.numel()
    weight = scale.reshape(channels, 1, *([1] * nd)).clone()
    ones = (1,) * nd
    return Kernel(weight, shift.reshape(channels).clone(), ones, (0,) * nd, ones, channels,
                  channels_last=channels_last)


def identity(channels: int, nd: int, channels_last: bool = False, dtype=torch.float64,
             device=None) -> Kernel:
    """The identity map on ``channels`` channels (a Dirac kernel once regrouped or padded)."""
    ones = torch.ones(channels, dtype=dtype, device=device)
    return affine(ones, torch.zeros_like(ones), nd, channels_last)


def bn_scale_shift(mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor]:
    """Eval-mode batch norm as ``scale * x + shift``: ``scale = g / sqrt(v + eps)``."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta
    return scale, shift


def avg_pool(channels: int, kernel_size: Sequence[int], stride: Sequence[int],
             padding: Sequence[int], dtype=torch.float64, device=None) -> Kernel:
    """Average pooling as a depthwise conv of weight ``1 / prod(k)``.

    Exact when the pool counts padded zeros in its divisor (``count_include_pad``) or has no
    padding, and has no ``ceil_mode`` overhang; the caller checks those.
    """
    k = tuple(kernel_size)
    weight = torch.full((channels, 1, *k), 1.0 / math.prod(k), dtype=dtype, device=device)
    bias = torch.zeros(channels, dtype=dtype, device=device)
    return Kernel(weight, bias, tuple(stride), tuple(padding), (1,) * len(k), channels)


# ---------------------------------------------------------------------------------------------
# Unary laws
# ---------------------------------------------------------------------------------------------


def _per_channel(value: Tensor | float, channels: int, like: Tensor) -> Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.expand(channels) if t.numel() == 1 else t.reshape(channels)


def scale_out(k: Kernel, scale: Tensor | float, shift: Tensor | float = 0.0) -> Kernel:
    """``s * k(x) + t`` (conv then BN, a scale layer): scale the output channels. Always exact."""
    c = k.out_channels
    s = _per_channel(scale, c, k.weight)
    t = _per_channel(shift, c, k.weight)
    if k.transposed:
        g = k.groups
        w = k.weight.reshape(g, k.in_channels // g, c // g, *k.kernel_size)
        view = (g, 1, c // g) + (1,) * k.nd
        w = (w * s.reshape(view)).reshape(k.weight.shape)
    else:
        w = k.weight * s.reshape(c, *([1] * (k.weight.dim() - 1)))
    return replace(k, weight=w, bias=k.bias * s + t)


def fuse_bn(k: Kernel, mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None,
            eps: float) -> Kernel:
    """conv then BN: ``W * g / sqrt(v + eps)``, ``(b - m) * g / sqrt(v + eps) + beta``. Exact."""
    return scale_out(k, *bn_scale_shift(mean, var, gamma, beta, eps))


def scale_in(scale: Tensor, shift: Tensor, k: Kernel) -> Kernel:
    """``k(s * x + t)`` (BN then conv): scale the input channels, push ``t`` into the bias.

    Exact when ``k`` reads no zero padding (padding 0 or a non-zero padding mode, which commutes
    with a per-channel affine map) or ``t == 0``.
    """
    if bool(torch.any(shift != 0)):
        if k.transposed:
            raise NotExact("a shift before a transposed conv reaches its cropped borders unevenly")
        if k.reads_padding and k.padding_mode == "zeros":
            raise NotExact(
                "a per-channel shift (e.g. a BN) before a conv with zero padding: the conv would "
                "read shifted values where it reads zeros, so border pixels would differ"
            )
    c_in = k.in_channels
    if k.transposed:
        w = k.weight * scale.reshape(c_in, *([1] * (k.weight.dim() - 1)))
        return replace(k, weight=w)
    g, per = k.groups, c_in // k.groups
    s = scale.reshape(g, 1, per, *([1] * k.nd))
    out = k.out_channels
    w = k.weight.reshape(g, out // g, per, *k.kernel_size)
    taps_sum = _sum_taps(w, k.nd)  # (g, out/g, per)
    bias = k.bias + torch.einsum("gop,gp->go", taps_sum, shift.reshape(g, per)).reshape(out)
    return replace(k, weight=(w * s).reshape(k.weight.shape), bias=bias)


def _sum_taps(w: Tensor, nd: int) -> Tensor:
    """Sum a grouped weight ``(g, out/g, in/g, *k)`` over its ``nd`` tap axes."""
    return w.sum(dim=tuple(range(3, 3 + nd))) if nd else w


def regroup(k: Kernel, groups: int) -> Kernel:
    """The same map at a coarser grouping (``groups`` divides ``k.groups``): block-diagonal.

    Always exact; costs multiply-adds when ``groups < k.groups``.
    """
    if groups == k.groups:
        return k
    if k.groups % groups or k.transposed:
        raise NotExact(f"cannot regroup groups={k.groups} to groups={groups}")
    ratio = k.groups // groups
    out, per_in = k.out_channels, k.in_channels // k.groups
    per_out = out // k.groups
    w = torch.zeros(groups, ratio, per_out, ratio, per_in, *k.kernel_size,
                    dtype=k.weight.dtype, device=k.weight.device)
    # old group q = g * ratio + r lands on the block (r, r) of new group g
    w.diagonal(dim1=1, dim2=3).copy_(
        k.weight.reshape(groups, ratio, per_out, per_in, *k.kernel_size).movedim(1, -1))
    w = w.reshape(out, ratio * per_in, *k.kernel_size)
    return replace(k, weight=w, groups=groups)


def pad_kernel(k: Kernel, size: Sequence[int], offset: Sequence[int]) -> Kernel:
    """Zero-pad the taps of ``k`` into a ``size`` kernel at tap ``offset`` (per axis).

    The padding of ``k`` is the caller's to adjust; the added taps are zero, so they never change
    what the kernel computes at any position, whatever the padding mode.
    """
    if tuple(size) == k.kernel_size:
        return k
    w = torch.zeros(*k.weight.shape[:2], *size, dtype=k.weight.dtype, device=k.weight.device)
    index = (slice(None), slice(None)) + tuple(
        slice(o, o + s) for o, s in zip(offset, k.kernel_size, strict=True)
    )
    w[index] = k.weight
    return replace(k, weight=w)


# ---------------------------------------------------------------------------------------------
# Branch laws: sum and concat
# ---------------------------------------------------------------------------------------------


def _same_layout(kernels: Sequence[Kernel]) -> None:
    first = kernels[0]
    for k in kernels[1:]:
        if k.nd != first.nd or k.channels_last != first.channels_last:
            raise NotExact("branches have different layouts (spatial dims or channel axis)")
        if k.in_channels != first.in_channels:
            raise NotExact("branches read different numbers of input channels")
        if k.transposed != first.transposed:
            raise NotExact("a transposed conv and a conv are summed")
        if k.stride != first.stride:
            raise NotExact(f"branches have different strides {first.stride} and {k.stride}")


@dataclass(frozen=True)
class _Common:
    """The shared geometry of aligned branches and each branch's tap offset in it."""

    size: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    mode: str
    offsets: tuple[tuple[int, ...], ...]

    def place(self, k: Kernel, offset: tuple[int, ...]) -> Kernel:
        placed = pad_kernel(k, self.size, offset)
        return replace(placed, padding=self.padding, dilation=self.dilation,
                       padding_mode=self.mode)


def _common_geometry(kernels: Sequence[Kernel]) -> _Common:
    """One size, padding and dilation for all kernels, and each kernel's tap offset in it.

    Branch ``i`` reads input offsets ``-p_i + j * d`` (``j < k_i``). They share one kernel when
    the dilations agree (a 1-tap axis takes any), every offset lies on that grid, and the summed
    kernel's output count equals the branches' (``max p - max e == min (p_i - e_i)``, ``e_i``
    the last offset). Padding modes must agree on every branch that reads padding.
    """
    nd = kernels[0].nd
    if kernels[0].transposed:
        ref = kernels[0]
        for k in kernels[1:]:
            if (k.kernel_size, k.padding, k.dilation, k.output_padding, k.stride) != (
                ref.kernel_size, ref.padding, ref.dilation, ref.output_padding, ref.stride
            ):
                raise NotExact("transposed convs are summed only with identical geometry")
        zero = (0,) * nd
        return _Common(ref.kernel_size, ref.padding, ref.dilation, ref.padding_mode,
                       tuple(zero for _ in kernels))
    modes = {k.padding_mode for k in kernels if k.reads_padding}
    if len(modes) > 1:
        raise NotExact(
            f"padding modes {sorted(modes)} disagree at the border between branches"
        )
    mode = modes.pop() if modes else "zeros"
    padding, dilation, sizes, offsets = [], [], [], [[] for _ in kernels]
    for axis in range(nd):
        ks = [k.kernel_size[axis] for k in kernels]
        ds = {k.dilation[axis] for k in kernels if k.kernel_size[axis] > 1}
        if len(ds) > 1:
            raise NotExact(f"branches have different dilations {sorted(ds)} on axis {axis}")
        d = ds.pop() if ds else 1
        ps = [k.padding[axis] for k in kernels]
        big_p = max(ps)
        if any((big_p - p) % d for p in ps):
            raise NotExact(f"branch taps do not share one dilation-{d} grid on axis {axis}")
        ends = [-p + (kk - 1) * d for p, kk in zip(ps, ks, strict=True)]
        end = max(ends)
        if big_p - end != min(p - e for p, e in zip(ps, ends, strict=True)):
            raise NotExact(
                f"branches are not aligned on axis {axis} (padding - dilation*(k-1)/2 differs), "
                "so their outputs would not line up"
            )
        padding.append(big_p)
        dilation.append(d)
        sizes.append((end + big_p) // d + 1)
        for i, p in enumerate(ps):
            offsets[i].append((big_p - p) // d)
    return _Common(tuple(sizes), tuple(padding), tuple(dilation), mode,
                   tuple(tuple(o) for o in offsets))


def add(kernels: Sequence[Kernel]) -> Kernel:
    """Sum of branches on one input: ``sum W_i`` and ``sum b_i`` after aligning the taps.

    Exact when the branches share stride and alignment, their tap grids coincide, and their
    padding modes agree wherever they read padding. Groups become the gcd of the branches'.
    """
    _same_layout(kernels)
    out_c = {k.out_channels for k in kernels}
    if len(out_c) > 1:
        raise NotExact(f"branches have different output channels {sorted(out_c)}")
    common = _common_geometry(kernels)
    groups = math.gcd(*[k.groups for k in kernels])
    # start from a branch that already has the full size and grouping (no zero padding copy),
    # then add every other branch into its own taps
    order = sorted(range(len(kernels)), key=lambda i: (
        kernels[i].kernel_size != common.size or kernels[i].groups != groups))
    first = regroup(common.place(kernels[order[0]], common.offsets[order[0]]), groups)
    weight, bias = first.weight.clone(), first.bias.clone()
    for i in order[1:]:
        k = regroup(kernels[i], groups)
        index = (slice(None), slice(None)) + tuple(
            slice(o, o + s) for o, s in zip(common.offsets[i], k.kernel_size, strict=True))
        weight[index] += k.weight
        bias += k.bias
    return replace(first, weight=weight, bias=bias)


def concat(kernels: Sequence[Kernel]) -> Kernel:
    """Concatenation on channels: stack the aligned kernels and biases (made dense).

    Exact under the same conditions as :func:`add`.
    """
    _same_layout(kernels)
    if kernels[0].transposed:
        raise NotExact("concatenating transposed convs is not supported")
    common = _common_geometry(kernels)
    placed = [common.place(k, off) for k, off in zip(kernels, common.offsets, strict=True)]
    if len({k.groups for k in placed}) == 1 and placed[0].groups == 1:
        dense = placed
    else:
        dense = [regroup(k, 1) for k in placed]
    weight = torch.cat([k.weight for k in dense])
    bias = torch.cat([k.bias for k in dense])
    return replace(dense[0], weight=weight, bias=bias, groups=1)


# ---------------------------------------------------------------------------------------------
# Sequential composition
# ---------------------------------------------------------------------------------------------


def compose(a: Kernel, b: Kernel) -> Kernel:
    """``b(a(x))`` as one kernel.

    Exact when ``b`` has no padding (any ``a``: the combined conv pads like ``a``), or when ``a`` is
    pointwise and ``b``'s padding reads what ``a`` would produce there: any non-zero padding mode,
    or zero padding with ``a``'s bias zero. Otherwise a biased ``a`` would be read as zeros at the
    border; DBB fills that padding with ``a``'s bias (an explicit pad before the BN) instead.
    """
    if a.nd != b.nd or a.channels_last != b.channels_last:
        raise NotExact("the two maps act on different layouts")
    if a.out_channels != b.in_channels:
        raise NotExact("channel counts do not chain")
    if b.is_diagonal and not b.transposed:
        return scale_out(a, b.weight.reshape(-1), b.bias)
    if a.is_diagonal:
        return scale_in(a.weight.reshape(-1), a.bias, b)
    if a.transposed or b.transposed:
        raise NotExact("a transposed conv composes only with per-channel affine maps")
    if b.reads_padding:
        if not a.is_pointwise:
            raise NotExact(
                f"{b.geometry()} pads the output of {a.geometry()} with zeros; one conv on the "
                "input would read real pixels there (exact only when the first conv is unpadded "
                "1x1 or the second is unpadded)"
            )
        if b.padding_mode == "zeros":
            if a.has_bias:
                raise NotExact(
                    f"{a.geometry()} has a bias and {b.geometry()} pads it with zeros: border "
                    "pixels would differ (fill the padding with the bias, as DBB does, to fold)"
                )
            if a.reads_padding and a.padding_mode != "zeros":
                raise NotExact("padding modes of the two convs disagree")
            padding = tuple(pa + pb for pa, pb in zip(a.padding, b.padding, strict=True))
        else:
            if a.reads_padding:
                raise NotExact("padding modes of the two convs disagree")
            padding = b.padding
        mode = b.padding_mode
        inner = replace(b, padding=(0,) * b.nd)
        merged = _compose_unpadded(replace(a, padding=(0,) * a.nd), inner)
        return replace(merged, padding=padding, padding_mode=mode)
    return _compose_unpadded(a, b)


def _composed_geometry(a: Kernel, b: Kernel) -> tuple[list[int], list[int], list[int], list[int]]:
    """Dilation, size and the tap steps of ``b`` and ``a`` in the kernel of ``b(a(x))``."""
    dil, size, b_step, a_step = [], [], [], []
    for axis in range(a.nd):
        ka, kb = a.kernel_size[axis], b.kernel_size[axis]
        span_b = b.dilation[axis] * a.stride[axis] if kb > 1 else 0
        span_a = a.dilation[axis] if ka > 1 else 0
        g = math.gcd(span_b, span_a) or 1
        dil.append(g)
        size.append(((kb - 1) * span_b + (ka - 1) * span_a) // g + 1)
        b_step.append(span_b // g)
        a_step.append(span_a // g)
    return dil, size, b_step, a_step


def composed_numel(a: Kernel, b: Kernel) -> int:
    """How many weights ``compose(a, b)`` would have (proportional to its multiply-adds per
    output position), computed from the geometry alone, before allocating anything."""
    _, size, _, _ = _composed_geometry(a, b)
    return b.out_channels * (a.in_channels // math.gcd(a.groups, b.groups)) * math.prod(size)


def _compose_unpadded(a: Kernel, b: Kernel) -> Kernel:
    """``b(a(x))`` where ``b`` has no padding: taps at ``j * d_b * s_a + i * d_a``.

    The result has ``g = gcd(a.groups, b.groups)`` groups. Within one of them, the side with the
    finer grouping keeps its blocks (a depthwise conv stays depthwise in the product) and only the
    other side is made block-diagonal at ``g``: the products never run over the zeros of a dense
    form of both (a depthwise 7x7 before a dense 1x1 costs ``out * in * 49``, not ``* mid``).
    """
    nd = a.nd
    g = math.gcd(a.groups, b.groups)
    dil, size, b_step, a_step = _composed_geometry(a, b)
    out, mid, inp = b.out_channels, b.in_channels, a.in_channels
    if a.groups // g >= b.groups // g:  # a keeps its r blocks per group, b is made dense at g
        r = a.groups // g
        wa = a.weight.reshape(g, r, mid // a.groups, inp // a.groups, *a.kernel_size)
        wb = regroup(b, g).weight.reshape(g, out // g, r, mid // a.groups, *b.kernel_size)
        spec = "gorm,grmi...->gori..."
    else:  # b keeps its s blocks per group, a is made dense at g
        r = b.groups // g
        wa = regroup(a, g).weight.reshape(g, r, mid // b.groups, inp // g, *a.kernel_size)
        wb = b.weight.reshape(g, r, out // b.groups, mid // b.groups, *b.kernel_size)
        spec = "grom,grmi...->groi..."
    parts = None
    for tap in itertools.product(*[range(k) for k in b.kernel_size]):
        term = torch.einsum(spec, wb[(...,) + tap], wa)  # (g, o|r, r|o, i, *ka)
        if parts is None:
            parts = torch.zeros(*term.shape[:4], *size, dtype=wa.dtype, device=wa.device)
        index = (slice(None),) * 4 + tuple(
            slice(t * bs, t * bs + (ka - 1) * as_ + 1, as_ or 1)
            for t, bs, as_, ka in zip(tap, b_step, a_step, a.kernel_size, strict=True)
        )
        parts[index] += term
    w = parts.reshape(out, inp // g, *size)
    taps_b = _sum_taps(b.weight.reshape(b.groups, out // b.groups, mid // b.groups,
                                        *b.kernel_size), nd)
    bias = b.bias + torch.einsum("gom,gm->go", taps_b,
                                 a.bias.reshape(b.groups, -1)).reshape(out)
    stride = tuple(sa * sb for sa, sb in zip(a.stride, b.stride, strict=True))
    return Kernel(w, bias, stride, a.padding, tuple(dil), g, a.padding_mode, a.channels_last)


# ---------------------------------------------------------------------------------------------
# Reference evaluation (tests, checks)
# ---------------------------------------------------------------------------------------------

_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
         3: torch.nn.functional.conv3d}
_CONV_T = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
           3: torch.nn.functional.conv_transpose3d}


def apply(k: Kernel, x: Tensor) -> Tensor:
    """Run ``k`` on ``x`` with torch's own ops (the reference every law is tested against)."""
    w, b = k.weight.to(x.dtype), k.bias.to(x.dtype)
    if k.nd == 0:
        if k.groups != 1:
            w = regroup(k, 1).weight.to(x.dtype)
        if k.channels_last or x.dim() == 2:
            return torch.nn.functional.linear(x, w, b)
        return torch.nn.functional.linear(x.movedim(1, -1), w, b).movedim(-1, 1)
    if k.transposed:
        return _CONV_T[k.nd](x, w, b, k.stride, k.padding, k.output_padding, k.groups,
                             k.dilation)
    if k.padding_mode != "zeros" and k.reads_padding:
        pad = [p for p in reversed(k.padding) for _ in range(2)]
        x = torch.nn.functional.pad(x, pad, mode=k.padding_mode)
        return _CONV[k.nd](x, w, b, k.stride, 0, k.dilation, k.groups)
    return _CONV[k.nd](x, w, b, k.stride, k.padding, k.dilation, k.groups)
