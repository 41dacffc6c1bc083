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

from .errors import ReparamError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class NotExact(Exception):
    """A law does not hold exactly for these kernels; ``str(self)`` says why."""


@dataclass(frozen=True, eq=False)
class Kernel:
    """An affine map with its geometry.

    ``weight`` is ``(out, in/groups, *k)`` for a conv, ``(in, out/groups, *k)`` for a transposed
    conv and ``(out, in/groups)`` for a linear map (``nd == 0``). ``channels_last`` marks a linear
    map acting on the last axis of a tensor of rank > 2 (tokens); otherwise channels are axis 1.

    A conv's ``padding`` may be negative on an axis, as an intermediate form: padding ``-a``
    crops ``a`` positions off both ends of the input on that axis before the conv runs (see
    :func:`crop`). torch cannot run that; :func:`nonnegative_padding` gives the same map with
    padding >= 0 before a kernel is materialized.
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
        """Reads padded values somewhere (a negative padding crops and reads none)."""
        return any(p > 0 for p in self.padding)

    @property
    def crops(self) -> bool:
        """Has a negative padding on some axis, which torch cannot run as it is."""
        return any(p < 0 for p in self.padding)

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


def dirac(out_channels: int, in_channels: int, kernel_size: int | Sequence[int],
          groups: int = 1, nd: int = 2, dtype=torch.float64, device=None) -> Kernel:
    """The Dirac kernel ``W[i, i mod (C/g), centre] = 1`` at kernel size ``K`` and ``groups``,
    stride 1 and "same" padding ``(K - 1) / 2``: the identity when ``out == in``. Otherwise it is
    ``torch.nn.init.dirac_``'s pattern (in each group, output ``j`` reads input ``j`` for
    ``j < min(out, in) / g``).

    Exact (an identity, the output the size of the input) for odd ``K`` on every axis.
    """
    size = (kernel_size,) * nd if isinstance(kernel_size, int) else tuple(kernel_size)
    if any(kk % 2 == 0 for kk in size):
        raise NotExact(f"a {'x'.join(map(str, size))} kernel has no centre tap for an identity")
    if out_channels % groups or in_channels % groups:
        raise ReparamError(f"groups={groups} must divide {out_channels} and {in_channels}")
    per_out, per_in = out_channels // groups, in_channels // groups
    w = torch.zeros(groups, per_out, per_in, *size, dtype=dtype, device=device)
    n = min(per_out, per_in)
    w[(slice(None), torch.arange(n), torch.arange(n)) + tuple(kk // 2 for kk in size)] = 1
    ones = (1,) * len(size)
    return Kernel(w.reshape(out_channels, per_in, *size),
                  torch.zeros(out_channels, dtype=dtype, device=device), ones,
                  tuple(kk // 2 for kk in size), ones, groups)


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
    indices = selection_indices(a)
    if indices is not None:  # a channel selection or permutation: re-index b's input columns
        return take_in(indices, a.in_channels, b)
    indices = selection_indices(b)
    if indices is not None:
        return take_out(a, indices)
    if a.transposed or b.transposed:
        raise NotExact("a transposed conv composes only with per-channel affine maps")
    if b.crops:  # b crops a's output: a itself gives the cropped output with less padding
        a = replace(a, padding=tuple(pa + min(pb, 0) * s for pa, pb, s in
                                     zip(a.padding, b.padding, a.stride, strict=True)))
        b = replace(b, padding=tuple(max(pb, 0) for pb in b.padding))
    if b.reads_padding:
        if not a.is_pointwise:
            raise NotExact(
                f"{b.geometry()} pads the output of {a.geometry()} with zeros; one conv on the "
                "input would read real pixels there (exact only when the first conv is unpadded "
                "1x1 or the second is unpadded)"
            )
        if any(pa < 0 < pb for pa, pb in zip(a.padding, b.padding, strict=True)):
            raise NotExact(
                f"{b.geometry()} pads an axis that {a.geometry()} crops; one conv on the input "
                "would read real pixels where the second conv reads padding"
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
            padding = tuple(pa + pb for pa, pb in zip(a.padding, b.padding, strict=True))
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
# Spatial crop and mixed dilations: the taps move, the map stays
# ---------------------------------------------------------------------------------------------


def _pair(amount: int | Sequence[int]) -> tuple[int, int]:
    before, after = (amount, amount) if isinstance(amount, int) else tuple(amount)
    if before < 0 or after < 0:
        raise ReparamError(f"a crop takes amounts >= 0, not {amount}")
    return before, after


def _zero_taps(k: Kernel, before: Sequence[int], after: Sequence[int]) -> Tensor:
    """``k``'s weight with ``before[i]`` and ``after[i]`` zero taps added on spatial axis ``i``."""
    pad = [n for b, a in zip(reversed(before), reversed(after), strict=True) for n in (b, a)]
    return torch.nn.functional.pad(k.weight, pad)


def crop(k: Kernel, amounts: Sequence[int | Sequence[int]]) -> Kernel:
    """``k(x[..., a:-b])``, the conv reading a cropped input, as a kernel on the whole ``x``.

    ``amounts`` gives per spatial axis ``a`` (as much off both ends) or ``(a, b)``. A symmetric
    crop lowers the padding by ``a`` (a negative padding, see :class:`Kernel`); an asymmetric one
    crops ``min(a, b)`` and adds ``|a - b| / d`` zero taps on the side cropped more (a one-tap
    axis takes dilation ``|a - b|``). Exact when the conv does not pad a cropped axis (padding
    ``<= 0`` there: padding would read zeros where the whole input has pixels) and ``|a - b|`` is
    a multiple of the dilation. The result reads only pixels that the crop keeps.
    """
    if k.nd == 0 or k.transposed:
        raise NotExact(f"a spatial crop does not reach into {k.geometry()}: only a conv reads it")
    if len(amounts) != k.nd:
        raise ReparamError(f"crop takes one amount per spatial axis ({k.nd}), got {amounts}")
    padding, dilation = list(k.padding), list(k.dilation)
    before, after = [0] * k.nd, [0] * k.nd
    for axis, amount in enumerate(amounts):
        start, end = _pair(amount)
        if start == end == 0:
            continue
        p, d, size = k.padding[axis], k.dilation[axis], k.kernel_size[axis]
        if p > 0:
            raise NotExact(
                f"{k.geometry()} pads axis {axis} of its cropped input ({p} on each side): it "
                f"would read {k.padding_mode} padding where the uncropped input has pixels"
            )
        start, end = start - p, end - p  # a crop before a crop adds up
        extra = abs(start - end)
        if extra and size == 1:
            d = dilation[axis] = extra
        if extra % d:
            raise NotExact(
                f"the crop ({start}, {end}) on axis {axis} shifts the taps of {k.geometry()} "
                f"by {extra}, off its dilation-{d} grid (regrid to a finer dilation first)"
            )
        (before if start > end else after)[axis] = extra // d
        padding[axis] = -min(start, end)
    return replace(k, weight=_zero_taps(k, before, after), padding=tuple(padding),
                   dilation=tuple(dilation))


def nonnegative_padding(k: Kernel) -> Kernel:
    """The same map with padding ``>= 0``, the form torch runs: a negative padding ``-a`` on an
    axis becomes padding 0 and ``a / d`` zero taps on both sides of that axis (a one-tap axis
    takes dilation ``a``: two zero taps).

    Exact when ``a`` is a multiple of the dilation ``d``; otherwise :func:`regrid` to a dilation
    dividing ``a`` first (dearer). The added taps are zero and read only kept pixels.
    """
    if not k.crops:
        return k
    dilation, sides = list(k.dilation), [0] * k.nd
    for axis, p in enumerate(k.padding):
        if p >= 0:
            continue
        if k.kernel_size[axis] == 1:
            dilation[axis] = -p
        if p % dilation[axis]:
            raise NotExact(
                f"{k.geometry()} crops {-p} on axis {axis}, not a multiple of its dilation "
                f"{dilation[axis]}: regrid it to dilation {math.gcd(-p, dilation[axis])} first"
            )
        sides[axis] = -p // dilation[axis]
    return replace(k, weight=_zero_taps(k, sides, sides),
                   padding=tuple(max(p, 0) for p in k.padding), dilation=tuple(dilation))


def regrid(k: Kernel, dilation: Sequence[int]) -> Kernel:
    """``k``'s taps re-laid on the finer grid of dilation ``d'`` (dividing ``k``'s ``d`` per axis):
    size ``(K - 1) * d / d' + 1``, zeros between the taps, the same padding.

    Always exact (a one-tap axis takes any ``d'``); the kernel grows about ``(d / d')`` times per
    axis, and its multiply-adds with it.
    """
    dilation = tuple(dilation)
    if len(dilation) != k.nd:
        raise ReparamError(f"regrid takes one dilation per spatial axis ({k.nd}), got {dilation}")
    steps = []
    for axis, (d, new) in enumerate(zip(k.dilation, dilation, strict=True)):
        if k.kernel_size[axis] > 1 and (new < 1 or d % new):
            raise NotExact(
                f"{k.geometry()} has dilation {d} on axis {axis}: its taps lie on the grid of "
                f"dilation {new} only if {new} divides {d}"
            )
        steps.append(d // new if k.kernel_size[axis] > 1 else 1)
    if all(s == 1 for s in steps):
        return replace(k, dilation=dilation)
    size = [(kk - 1) * s + 1 for kk, s in zip(k.kernel_size, steps, strict=True)]
    w = torch.zeros(*k.weight.shape[:2], *size, dtype=k.weight.dtype, device=k.weight.device)
    w[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in steps)] = k.weight
    return replace(k, weight=w, dilation=dilation)


def on_common_grid(kernels: Sequence[Kernel]) -> list[Kernel]:
    """Every kernel regridded to the gcd of the branches' dilations per axis (only kernels with
    more than one tap on an axis count), so :func:`add` and :func:`concat` can meet them.

    Always exact; the regridded kernels are dearer (see :func:`regrid`).
    """
    nd = kernels[0].nd
    if any(k.nd != nd for k in kernels):
        raise NotExact("branches have different spatial dims")
    common = tuple(
        math.gcd(*[k.dilation[axis] for k in kernels if k.kernel_size[axis] > 1]) or 1
        for axis in range(nd))
    return [regrid(k, common) for k in kernels]


# ---------------------------------------------------------------------------------------------
# Channel selection and permutation: 0/1 pointwise index maps
# ---------------------------------------------------------------------------------------------


def _indices(indices: Sequence[int] | Tensor, channels: int, device=None) -> Tensor:
    idx = torch.as_tensor(indices, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() == 0 or bool(torch.any((idx < 0) | (idx >= channels))):
        raise ReparamError(f"channel indices must lie in [0, {channels}); got {list(indices)}")
    return idx


def shuffle_indices(groups: int, channels: int) -> list[int]:
    """The permutation of a channel shuffle ``x.reshape(n, g, c/g, ...).transpose(1, 2)
    .reshape(n, c, ...)``: output channel ``i`` is input channel ``(i % g) * (c / g) + i // g``.
    """
    if groups < 1 or channels % groups:
        raise ReparamError(f"a channel shuffle of {channels} channels in {groups} groups")
    return torch.arange(channels).reshape(groups, channels // groups).T.reshape(-1).tolist()


def select(indices: Sequence[int] | Tensor, in_channels: int, nd: int,
           channels_last: bool = False, dtype=torch.float64, device=None) -> Kernel:
    """Channel selection ``y[:, i] = x[:, indices[i]]`` (chunk, split, a cat that reorders, a
    shuffle, a repeat) as a dense 0/1 pointwise kernel with no bias. Exact always.

    Composed into a neighbouring conv (:func:`compose`, which takes :func:`take_in` or
    :func:`take_out`) it only re-indexes that conv's weight: a permutation costs nothing there
    when the neighbour is dense, or grouped with groups the permutation keeps.
    """
    idx = _indices(indices, in_channels, device)
    w = torch.zeros(idx.numel(), in_channels, *([1] * nd), dtype=dtype, device=device)
    w[(torch.arange(idx.numel(), device=device), idx) + (0,) * nd] = 1
    ones = (1,) * nd
    return Kernel(w, torch.zeros(idx.numel(), dtype=dtype, device=device), ones, (0,) * nd,
                  ones, 1, channels_last=channels_last)


def selection_indices(k: Kernel) -> list[int] | None:
    """The indices if ``k`` is a channel selection (a pointwise unpadded 0/1 map, one 1 per
    output channel, no bias), else ``None``."""
    if not k.is_pointwise or any(k.padding) or k.transposed or k.has_bias:
        return None
    w = regroup(k, 1).weight.reshape(k.out_channels, k.in_channels)
    if bool(torch.any((w != 0) & (w != 1))) or bool(torch.any(w.sum(1) != 1)):
        return None
    return w.argmax(1).tolist()


def _finest_groups(groups: int, idx: Tensor, channels: int) -> int:
    """The most groups ``g'`` (dividing ``groups``) such that index ``m`` of ``idx`` and channel
    ``idx[m]`` (of ``channels``) lie in the same block of ``g'``: the grouping an index map keeps.
    """
    n = idx.numel()
    for g in sorted((g for g in range(1, groups + 1) if groups % g == 0), reverse=True):
        if n % g == 0 and channels % g == 0 and bool(torch.all(
                torch.arange(n, device=idx.device) // (n // g) == idx // (channels // g))):
            return g
    return 1


def take_out(k: Kernel, indices: Sequence[int] | Tensor) -> Kernel:
    """``k(x)[:, indices]``: the rows of the weight and bias taken. Exact always.

    The groups become the most that the selection keeps (the finest grouping in which output
    ``i`` and ``indices[i]`` lie in the same block; dense if none), via :func:`regroup`.
    """
    idx = _indices(indices, k.out_channels, k.weight.device)
    if k.transposed:
        if k.groups != 1:
            raise NotExact("selecting output channels of a grouped transposed conv")
        return replace(k, weight=k.weight[:, idx], bias=k.bias[idx])
    r = regroup(k, _finest_groups(k.groups, idx, k.out_channels))
    return replace(r, weight=r.weight[idx], bias=r.bias[idx])


def take_in(indices: Sequence[int] | Tensor, in_channels: int, k: Kernel) -> Kernel:
    """``k(x[:, indices])`` for an ``x`` of ``in_channels``: the weight's input columns
    scattered to channels ``indices`` (added where an index repeats), zeros elsewhere.

    Exact always. The groups become the most the selection keeps, as in :func:`take_out`.
    """
    dev = k.weight.device
    idx = _indices(indices, in_channels, dev)
    if idx.numel() != k.in_channels:
        raise ReparamError(f"{k.geometry()} reads {k.in_channels} channels, not {idx.numel()}")
    if k.transposed:
        if k.groups != 1:
            raise NotExact("selecting input channels of a grouped transposed conv")
        w = torch.zeros(in_channels, *k.weight.shape[1:], dtype=k.weight.dtype, device=dev)
        return replace(k, weight=w.index_add_(0, idx, k.weight))
    g = _finest_groups(k.groups, idx, in_channels)
    r = regroup(k, g)
    out, per_in = k.out_channels, in_channels // g
    w = r.weight.reshape(g, out // g, idx.numel() // g, *k.kernel_size)
    local = (idx % per_in).reshape(g, 1, -1, *([1] * k.nd)).expand_as(w)
    new = torch.zeros(g, out // g, per_in, *k.kernel_size, dtype=w.dtype, device=dev)
    return replace(r, weight=new.scatter_add_(2, local, w).reshape(out, per_in, *k.kernel_size))


# ---------------------------------------------------------------------------------------------
# A conv on a fixed input size as a linear layer (RepMLP)
# ---------------------------------------------------------------------------------------------


def _output_size(k: Kernel, spatial: Sequence[int]) -> list[int]:
    if k.transposed:
        return [(n - 1) * s - 2 * p + d * (kk - 1) + op + 1 for n, s, p, d, kk, op in zip(
            spatial, k.stride, k.padding, k.dilation, k.kernel_size, k.output_padding,
            strict=True)]
    return [(n + 2 * p - d * (kk - 1) - 1) // s + 1 for n, s, p, d, kk in zip(
        spatial, k.stride, k.padding, k.dilation, k.kernel_size, strict=True)]


_BASIS_CHUNK = 4096  # basis vectors per conv call: bounds the scratch memory beside the FC


def as_linear(k: Kernel, spatial: Sequence[int]) -> Kernel:
    """``k`` on an input of size ``spatial`` as the linear map of the flattened sample
    (``x.reshape(n, -1)``, channel-major): an ``nd == 0`` kernel ``(O*h'*w', C*h*w / g)``.

    Its column ``j`` is ``k`` (bias 0) applied to the ``j``-th basis vector, computed per group
    by batched convs; the groups stay (channel-major flattening keeps the blocks) and the bias
    repeats per output position. Exact always at that input size: the padding, of any mode,
    becomes part of the index map.
    """
    spatial = tuple(spatial)
    if k.nd == 0 or len(spatial) != k.nd:
        raise ReparamError(f"as_linear takes a conv and its {k.nd} input sizes, got {spatial}")
    cropped = [n + 2 * min(p, 0) for n, p in zip(spatial, k.padding, strict=True)]
    out_size = _output_size(replace(k, padding=tuple(max(p, 0) for p in k.padding)), cropped)
    if min(out_size) < 1:
        raise NotExact(f"{k.geometry()} gives no output on an input of size {spatial}")
    g, dtype, dev = k.groups, k.weight.dtype, k.weight.device
    per_in, per_out = k.in_channels // g, k.out_channels // g
    n = per_in * math.prod(spatial)
    weight = torch.empty(g, per_out * math.prod(out_size), n, dtype=dtype, device=dev)
    rows = k.weight.shape[0] // g  # one group's slice of dim 0, for a conv and a transposed conv
    zero = torch.zeros(per_out, dtype=dtype, device=dev)
    for j in range(g):
        part = replace(k, weight=k.weight[j * rows:(j + 1) * rows], bias=zero, groups=1)
        for first in range(0, n, _BASIS_CHUNK):
            m = min(_BASIS_CHUNK, n - first)
            basis = torch.zeros(m, n, dtype=dtype, device=dev)
            basis[torch.arange(m, device=dev), torch.arange(first, first + m, device=dev)] = 1
            try:
                y = apply(part, basis.reshape(m, per_in, *spatial))
            except RuntimeError as e:  # e.g. reflect padding wider than the input
                raise NotExact(
                    f"{k.geometry()} does not run on an input of size {spatial}: {e}") from e
            weight[j, :, first:first + m] = y.reshape(m, -1).T
    bias = k.bias.repeat_interleave(math.prod(out_size))
    return Kernel(weight.reshape(-1, n), bias, groups=g)


def as_pointwise(k: Kernel, nd: int) -> Kernel:
    """A linear map (``nd == 0``) as the 1x1 conv over ``nd`` spatial dims that computes it on
    each position (RepMLP's FC, a grouped 1x1 conv on ``(n, C*h*w, 1, 1)``). Exact always."""
    if k.nd != 0:
        raise ReparamError(f"as_pointwise takes a linear map, not {k.geometry()}")
    ones = (1,) * nd
    return Kernel(k.weight.reshape(*k.weight.shape, *ones), k.bias, ones, (0,) * nd, ones,
                  k.groups)


# ---------------------------------------------------------------------------------------------
# Reference evaluation (tests, checks)
# ---------------------------------------------------------------------------------------------

_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
         3: torch.nn.functional.conv3d}
_CONV_T = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
           3: torch.nn.functional.conv_transpose3d}


def apply(k: Kernel, x: Tensor) -> Tensor:
    """Run ``k`` on ``x`` with torch's own ops (the reference every law is tested against).

    A negative padding ``-a`` crops ``a`` positions off both ends of that axis of ``x`` first.
    """
    if k.crops and not k.transposed:
        x = x[(slice(None), slice(None)) + tuple(
            slice(-p, n + p) if p < 0 else slice(None)
            for p, n in zip(k.padding, x.shape[2:], strict=True))]
        k = replace(k, padding=tuple(max(p, 0) for p in k.padding))
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
