"""The fold rules: one per op kind, each with its exactness condition beside it.

A rule's docstring reads ``before => after`` and then when it is exact; the reference in the docs
is generated from these docstrings. Laws without op kinds (``pad_small_kernel``, ...) are steps
that rules take; a rule set that lacks one leaves the node unfolded and says which law was missing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, fx

from .. import kernel as K
from ..context import Context, Layout
from ..kernel import Kernel, NotExact
from ..pattern import Op
from ..values import Lin, NoFold, View, law, rule
from .ops import (
    ADD,
    AVG_POOL,
    BATCH_NORM,
    CAT,
    CONV,
    CROP,
    DIV,
    FILLED_PAD,
    IDENTITY,
    LINEAR,
    MUL,
    NEG,
    PAD,
    PIECE,
    SUB,
)

# --- laws that rules call on ------------------------------------------------------------------

pad_small_kernel = law("pad_small_kernel", """
    1x1, 1xK or Kx1 branch beside a KxK branch => zero taps around it, placed at tap offset
    (p_big - p_small) / dilation. Exact when that offset is whole and the branches are aligned.
""")
identity_as_dirac = law("identity_as_dirac", """
    x (or BN(x)) beside a conv on x => a Dirac kernel W[i, i % (C/g), centre] = 1, grouped like
    the conv. Exact for stride 1 and equal channels, any groups dividing C.
""")
regroup = law("regroup", """
    branches with groups g1 != g2 => block-diagonal kernels at gcd(g1, g2). Always exact; costs
    multiply-adds, so the cost policy decides.
""")
mixed_dilations = law("mixed_dilations", """
    branches at dilations d1 != d2 (PSConv, dilated branches beside dense ones) => each kernel
    regridded to dilation gcd(d1, d2), zeros between its taps. Always exact; the kernels grow
    about d / gcd times per axis, so the cost policy decides (max_cost reaches it).
""")
bn_conv = law("bn_conv", """
    BN (or any per-channel affine map) then conv => conv with scaled input channels and the shift
    pushed into the bias. Exact when the conv reads no zero padding (padding 0, or a reflect,
    replicate or circular padding mode) or the shift is zero.
""")
sequential_1x1_kxk = law("sequential_1x1_kxk", """
    1x1 conv (stride 1) then KxK conv => one KxK conv (DBB's transform). Exact when the KxK is
    unpadded, or its padding mode is not zeros, or the 1x1 has no bias; with a bias, the padding
    must be filled with it (pad before the BN, as reparam's DBBlock does).
""")
sequential_kxk_1x1 = law("sequential_kxk_1x1", """
    conv then 1x1 conv (padding 0) => one conv: W = W_B @ W_A over channels, b = W_B b_A + b_B,
    stride s_A * s_B. Always exact. Also covers a linear layer after a linear layer.
""")
sequential_kxk_kxk = law("sequential_kxk_kxk", """
    KxK conv then an unpadded conv => one larger conv with taps j * d_B * s_A + i * d_A. Exact
    when the second conv is unpadded; usually dearer than the two, so the cost policy decides.
""")


def _exact(fn, *args):
    try:
        return fn(*args)
    except NotExact as e:
        raise NoFold(str(e)) from None


# --- building kernels from ops ----------------------------------------------------------------

def _conv_padding(padding, kernel_size, dilation) -> tuple[int, ...]:
    if padding == "valid":
        return (0,) * len(kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
        if any(t % 2 for t in totals):
            raise NoFold("padding='same' with an even kernel pads one side more than the other")
        return tuple(t // 2 for t in totals)
    return tuple(padding)


def conv_kernel(ctx: Context, op: Op) -> Kernel:
    """The :class:`Kernel` of a conv/linear op, with its parameters in float64."""
    a = op.attrs
    weight = ctx.param(a["weight"])
    if weight is None:
        raise NoFold("the weight is computed at run time, not a parameter")
    bias = ctx.param(a["bias"]) if a["bias"] is not None else None
    if op.kind == "linear":
        shape = ctx.shape(op.inputs[0])
        channels_last = shape is not None and len(shape) > 2
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
        return Kernel(weight, bias.to(weight.device), channels_last=channels_last)
    nd = a["nd"]
    if weight.dim() != nd + 2:
        raise NoFold("the weight does not match the conv's dimensions")
    stride, dilation = tuple(a["stride"]), tuple(a["dilation"])
    kernel_size = tuple(weight.shape[2:])
    padding = _conv_padding(a["padding"], kernel_size, dilation)
    transposed = a["transposed"]
    out = weight.shape[1] * a["groups"] if transposed else weight.shape[0]
    if bias is None:
        bias = torch.zeros(out, dtype=weight.dtype, device=weight.device)
    return Kernel(weight, bias, stride, padding, dilation, a["groups"], a["padding_mode"],
                  transposed=transposed, output_padding=tuple(a["output_padding"]))


def _rank_layout(ctx: Context, arg) -> Layout | None:
    """Channels-first layout of a tensor by its rank: BN, pools and pads read axis 1."""
    shape = ctx.shape(arg)
    if shape is None:
        raise NoFold(f"the shape of '{arg}' is unknown (pass example_inputs to fold)")
    return (max(len(shape) - 2, 0), False)


# --- op rules ---------------------------------------------------------------------------------

@rule("conv", CONV, LINEAR)
def conv(ctx: Context, op: Op) -> Lin:
    """A(x) -> conv => conv'(x). Starts a linear map at a conv, transposed conv or linear layer,
    and composes it with the map before it through bn_conv or a sequential law, each with its own
    exactness condition."""
    k = conv_kernel(ctx, op)
    biased = op.attrs["bias"] is not None
    x = ctx.lin(op.inputs[0], (k.nd, k.channels_last))
    if x.is_source:
        return ctx.result(k, x, rule="conv", biased=biased)
    a = x.kernel
    if a.is_diagonal:
        ctx.require("bn_conv")
    elif k.is_pointwise and not k.reads_padding:
        ctx.require("sequential_kxk_1x1")
    elif a.is_pointwise:
        ctx.require("sequential_1x1_kxk")
    else:
        ctx.require("sequential_kxk_kxk")
    _refuse_huge_and_dear(a, k)
    return ctx.result(_exact(K.compose, a, k), x, rule="conv", biased=biased)


_HUGE = 1 << 20  # weights (8 MiB in float64)


def _refuse_huge_and_dear(a: Kernel, b: Kernel) -> None:
    """Do not even build a large composed kernel that costs more than its two parts (a large
    depthwise kernel then a dense 1x1 would become a dense large kernel, as in FastViT's ConvFFN):
    the cost policy would almost always refuse it, after building it. (It would pay only if a
    dense branch of the same size were summed with it.)"""
    numel = K.composed_numel(a, b)
    apart = a.weight.numel() * math.prod(b.stride) + b.weight.numel()
    if numel > _HUGE and numel > apart:
        raise NoFold(f"composing {a.geometry()} with {b.geometry()} would give a dense kernel of "
                     f"{numel:,} weights, dearer than the two apart (cost policy)")


@rule("conv_bn", BATCH_NORM)
def conv_bn(ctx: Context, op: Op) -> Lin:
    """A(x) -> BN => A'(x) with W * g / sqrt(v + eps) and (b - m) * g / sqrt(v + eps) + beta.
    Always exact in eval mode. A BN on a tensor no linear op made is a per-channel affine map that
    folds into its neighbours. BN with batch statistics (training mode, or no running statistics)
    is not a fixed map and stays."""
    x = ctx.lin(op.inputs[0], _rank_layout(ctx, op.inputs[0]))
    return ctx.result(K.fuse_bn(x.kernel, *bn_statistics(ctx, op)), x, rule="conv_bn",
                      biased=True)


def bn_statistics(ctx: Context, op: Op) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None,
                                                  float]:
    """An eval-mode BN's ``(mean, var, gamma, beta, eps)`` in float64; raises :class:`NoFold`
    where the BN is not a fixed map (batch statistics) or divides by zero."""
    a = op.attrs
    if a["training"]:
        raise NoFold("BN uses batch statistics (training mode or no running statistics), so it is "
                     "not a fixed linear map")
    mean, var = ctx.param(a["mean"]), ctx.param(a["var"])
    if mean is None or var is None:
        raise NoFold("BN running statistics are not constants")
    gamma = ctx.param(a["weight"]) if a["weight"] is not None else None
    beta = ctx.param(a["bias"]) if a["bias"] is not None else None
    eps = a["eps"]
    eps = float(ctx.const(eps) if not isinstance(eps, (int, float)) else eps)
    if bool(torch.any(var + eps <= 0)):
        raise NoFold("running_var + eps is 0 (or negative) for some channel: the BN divides by "
                     "zero there, so it is kept as it is")
    return mean, var, gamma, beta, eps


@rule("scale_shift", MUL, DIV, ADD, SUB, NEG)
def scale_shift(ctx: Context, op: Op) -> Lin | None:
    """A(x) * c, A(x) / c, A(x) + c, A(x) - c, c - A(x), -A(x) => A'(x), c a scalar or one value
    per channel (layer scale, MobileOne's scale branch weight). Always exact."""
    if op.kind == "neg":
        x = ctx.lin(op.inputs[0])
        return ctx.result(K.scale_out(x.kernel, -1.0), x, rule="scale_shift")
    first, second = op.inputs
    const_first, const_second = ctx.is_const(first), ctx.is_const(second)
    if const_first == const_second:
        if op.kind in ("mul", "div") and not const_first:
            raise NoFold(f"'{first}' {op.kind} '{second}': both operands are computed from the "
                         "input (a gate or attention), so the product is not linear",
                         join=True)  # where two of the network's tensors meet, as a residual
        return None
    tensor = second if const_first else first
    if ctx.shape(tensor) is None or ctx.shape(tensor) != ctx.shape(ctx.node):
        raise NoFold("the constant broadcasts the tensor to another shape")
    layout = ctx.layout_of(tensor)
    if layout is None:
        raise NoFold(f"the shape of '{tensor}' is unknown")
    const = ctx.const(first if const_first else second)
    c = ctx.channel_vector(const, layout)
    if c is None and not isinstance(ctx.value(tensor), Lin) and len(ctx.shape(tensor)) > 2:
        layout = (0, True)  # one value per token channel (the last axis), as a Linear reads it
        c = ctx.channel_vector(const, layout)
    if c is None:
        raise NoFold("the constant is not a scalar or one value per channel")
    x = ctx.lin(tensor, layout)
    c = c.to(x.kernel.weight.device)
    alpha = op.attrs.get("alpha", 1)
    k = x.kernel
    if op.kind == "mul":
        out = K.scale_out(k, c)
    elif op.kind == "div":
        if const_first:
            raise NoFold("c / x is not linear in x")
        out = K.scale_out(k, 1.0 / c)
    elif op.kind == "add":
        out = K.scale_out(k, alpha, c) if const_first else K.scale_out(k, 1.0, alpha * c)
    else:  # sub
        out = K.scale_out(k, -alpha, c) if const_first else K.scale_out(k, 1.0, -alpha * c)
    return ctx.result(out, x, rule="scale_shift", biased=op.kind in ("add", "sub"))


def _source_name(ctx: Context, lin: Lin) -> str:
    node = lin.source.base if isinstance(lin.source, View) else lin.source
    if node.op == "placeholder":
        return f"the input '{node.name}'"
    what = ctx.what(node)
    if ctx.is_op(node):
        return f"'{node.name}' ({what}, where another linear region ends)"
    return f"'{node.name}' ({what}, not linear)"


def _branch_laws(ctx: Context, kernels: list[Kernel]) -> list[Kernel]:
    """Require the laws a sum or concat of these kernels takes; the kernels on one dilation grid
    (regridded where the branches' dilations differ)."""
    convs = [k for k in kernels if not k.is_diagonal]
    if convs and len(convs) < len(kernels):
        ctx.require("identity_as_dirac")
    if len({k.kernel_size for k in convs}) > 1:
        ctx.require("pad_small_kernel")
    if len({k.groups for k in convs}) > 1:
        ctx.require("regroup")
    nd = convs[0].nd if convs else 0
    if any(len({k.dilation[axis] for k in convs if k.kernel_size[axis] > 1}) > 1
           for axis in range(nd)):
        ctx.require("mixed_dilations")
        ctx.require("pad_small_kernel")
        return _exact(K.on_common_grid, kernels)
    return kernels


def _same_source(ctx: Context, lins: list[Lin]) -> None:
    """All branches must read one input. When one branch starts at a node that another passes
    through, that node is the meeting point: the refusal names it, so the driver can make it a
    region boundary and both branches read it. Otherwise the sum or concat joins different
    tensors (a ResNet's residual): a join of the network, not a leftover."""
    first = lins[0]
    for other in lins[1:]:
        if other.source != first.source:
            meet = next((a.source for a, b in ((first, other), (other, first))
                         if isinstance(a.source, fx.Node) and a.source in b.nodes), None)
            raise NoFold(f"branches read different tensors, {_source_name(ctx, first)} and "
                         f"{_source_name(ctx, other)}: the sum is not one linear map of one "
                         "input", barrier=meet, join=meet is None)


@rule("parallel_sum", ADD, SUB)
def parallel_sum(ctx: Context, op: Op) -> Lin | None:
    """A(x) + B(x) (or A(x) - B(x)) => (A + B)(x): kernels summed after aligning their taps.
    Exact when both read the same input with the same stride and alignment (padding -
    dilation * (k - 1) / 2 per axis) and agree on padding mode where they read padding; takes
    pad_small_kernel, identity_as_dirac and regroup when the branches need them."""
    first, second = op.inputs
    if ctx.is_const(first) or ctx.is_const(second):
        return None
    shapes = {ctx.shape(first), ctx.shape(second), ctx.shape(ctx.node)}
    if len(shapes) != 1 or None in shapes:
        raise NoFold("the operands have different (broadcast) or unknown shapes")
    layout = ctx.layout_of(first) if isinstance(ctx.value(first), Lin) else ctx.layout_of(second)
    a, b = ctx.lin(first, layout), ctx.lin(second, layout)
    _same_source(ctx, [a, b])
    return ctx.result(branch_sum(ctx, op, a.kernel, b.kernel), a, b, rule="parallel_sum")


def branch_sum(ctx: Context, op: Op, a: Kernel, b: Kernel) -> Kernel:
    """The kernel of ``a + b``, ``a - b`` or ``torch.add(a, b, alpha=)`` (``op``'s kind and
    alpha) of two branches on one input, taking the laws the branches need; raises
    :class:`NoFold` where the sum is not exact."""
    alpha = op.attrs.get("alpha", 1)
    kb = b if alpha == 1 and op.kind == "add" else K.scale_out(
        b, -alpha if op.kind == "sub" else alpha)
    return _exact(K.add, _branch_laws(ctx, [a, kb]))


@rule("concat_branches", CAT)
def concat_branches(ctx: Context, op: Op) -> Lin | None:
    """cat([A(x), B(x)], channels) => [A; B](x): kernels stacked after aligning their taps.
    Exact under the conditions of parallel_sum; grouped branches are made dense (regroup)."""
    tensors = list(op.inputs)
    if not tensors or any(ctx.is_const(t) for t in tensors):
        return None
    out = ctx.shape(ctx.node)
    if out is None:
        raise NoFold("the output shape is unknown")
    linear = [t for t in tensors if isinstance(ctx.value(t), Lin)]
    layout = ctx.layout_of(linear[0] if linear else tensors[0])
    axis = len(out) - 1 if layout[1] or len(out) == 2 else 1
    if op.attrs["dim"] % len(out) != axis:
        raise NoFold("cat along an axis other than channels")
    lins = [ctx.lin(t, layout) for t in tensors]
    _same_source(ctx, lins)
    kernels = _branch_laws(ctx, [lin.kernel for lin in lins])
    if any(k.groups > 1 for k in kernels):
        ctx.require("regroup")
    return ctx.result(_exact(K.concat, kernels), *lins, rule="concat_branches")


@rule("avg_pool_as_conv", AVG_POOL)
def avg_pool_as_conv(ctx: Context, op: Op) -> Lin:
    """A(x) -> avgpool(K, s, p) => A'(x) with a depthwise 1/K^d kernel composed in. Exact when
    padded zeros count in the divisor (count_include_pad, or padding 0, or divisor_override) and
    ceil_mode adds no partial window (stride 1)."""
    a = op.attrs
    nd = a["nd"]
    if a["ceil_mode"] and any(s != 1 for s in a["stride"]):
        raise NoFold("avg-pool with ceil_mode may add a partial window at the border")
    if any(a["padding"]) and not a["count_include_pad"] and not a["divisor_override"]:
        raise NoFold("avg-pool with count_include_pad=False divides border windows by fewer "
                     "pixels: not a convolution")
    x = ctx.lin(op.inputs[0], (nd, False))
    channels = x.kernel.out_channels
    pool = K.avg_pool(channels, a["kernel_size"], a["stride"], a["padding"],
                      device=x.kernel.weight.device)
    if a["divisor_override"]:
        pool = K.scale_out(pool, math.prod(a["kernel_size"]) / a["divisor_override"])
    if x.is_source:
        return ctx.result(pool, x, rule="avg_pool_as_conv")
    return ctx.result(_exact(K.compose, x.kernel, pool), x, rule="avg_pool_as_conv")


def _pad_per_axis(ctx: Context, pad, nd: int) -> list[int]:
    """A pad's amounts (last axis first, as ``F.pad`` takes them) as one amount per spatial axis;
    the pad must be constant, non-negative, symmetric and on spatial axes only."""
    pad = ctx.const(pad)
    if isinstance(pad, (list, tuple)):
        pad = [ctx.const(p) for p in pad]
    if not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
        raise NoFold("the pad amounts are not constants")
    if len(pad) % 2 or len(pad) // 2 > nd or any(p < 0 for p in pad):
        raise NoFold("the pad does not cover the spatial axes only")
    per_axis = [0] * nd
    for i in range(len(pad) // 2):
        left, right = pad[2 * i], pad[2 * i + 1]
        if left != right:
            raise NoFold("an asymmetric pad cannot become a conv's padding")
        per_axis[nd - 1 - i] = left
    return per_axis


@rule("zero_pad", PAD)
def zero_pad(ctx: Context, op: Op) -> Lin:
    """pad(A(x)) => A'(x) with a larger padding. Exact when A is pointwise and either the pad is
    zeros and A has no bias (its output at the border is 0), or the pad is reflect, replicate or
    circular and A had no padding (those commute with a per-channel map). The pad must be
    symmetric per axis."""
    a = op.attrs
    layout = _rank_layout(ctx, op.inputs[0])
    per_axis = _pad_per_axis(ctx, a["pad"], layout[0])
    mode = {"constant": "zeros"}.get(a["mode"], a["mode"])
    if mode == "zeros" and a["value"] not in (0, 0.0, None):
        raise NoFold("a pad with a non-zero constant is not a conv's zero padding")
    x = _padded_map(ctx, op, layout, "zeros")
    k = x.kernel
    if mode == "zeros":
        if k.has_bias:
            raise NoFold("a biased map is zero-padded: the border would not be zero")
        if k.reads_padding and k.padding_mode != "zeros":
            raise NoFold("padding modes disagree")
        padding = tuple(p + q for p, q in zip(k.padding, per_axis, strict=True))
    else:
        if k.reads_padding:
            raise NoFold("padding modes disagree")
        padding = tuple(per_axis)
    return ctx.result(Kernel(k.weight, k.bias, k.stride, padding, k.dilation, k.groups, mode,
                             k.channels_last), x, rule="zero_pad")


def _padded_map(ctx: Context, op: Op, layout, what: str) -> Lin:
    """The map a pad reads, which must be pointwise: padding a wider kernel's output adds
    border ``what`` that one conv on the input would not produce."""
    x = ctx.lin(op.inputs[0], layout)
    if not x.kernel.is_pointwise:
        raise NoFold(f"padding the output of {x.kernel.geometry()} adds {what} that a single "
                     "conv on the input would not produce")
    return x


def _piece_range(how: str, sections, channels: int, index: int) -> range:
    """The channels of piece ``index`` of a ``chunk`` (``sections`` pieces, the last smaller) or
    a ``split`` (pieces of ``sections`` channels, or a list of sizes)."""
    if how == "chunk":
        if not isinstance(sections, int) or sections < 1:
            raise NoFold("the number of chunks is not a constant")
        size = -(-channels // sections)
        sizes = [min(size, channels - start) for start in range(0, channels, size)]
    elif isinstance(sections, int) and sections > 0:
        sizes = [min(sections, channels - start) for start in range(0, channels, sections)]
    elif isinstance(sections, (list, tuple)) and all(isinstance(n, int) for n in sections):
        sizes = list(sections)
    else:
        raise NoFold("the split sizes are not constants")
    if sum(sizes) != channels or not -len(sizes) <= index < len(sizes):
        raise NoFold("the pieces do not cover the channels")
    index %= len(sizes)
    start = sum(sizes[:index])
    return range(start, start + sizes[index])


@rule("channel_pieces", PIECE)
def channel_pieces(ctx: Context, op: Op) -> Lin:
    """x.chunk(n, 1)[i] (or a split) of a region's input => a 0/1 channel selection
    (:func:`reparam.kernel.select`); pieces concatenated in another order are a permutation (a
    channel shuffle) that the conv after them takes in for free. Always exact. A piece of a
    folded map's output is not taken (the map stays one conv, its pieces taken after it), and a
    narrowing selection composed into a conv costs it the unread channels: the cost policy
    decides."""
    layout = _rank_layout(ctx, op.inputs[0])
    shape = ctx.shape(op.inputs[0])
    a = op.attrs
    dim = ctx.const(a["dim"])
    if not isinstance(dim, int) or len(shape) < 2 or dim % len(shape) != 1:
        raise NoFold("the pieces are taken along an axis other than channels")
    sections = ctx.const(a["sections"])
    if isinstance(sections, (list, tuple)):
        sections = [ctx.const(n) for n in sections]
    picked = _piece_range(a["how"], sections, shape[1], a["index"])
    x = ctx.lin(op.inputs[0], layout)
    cut = K.select(list(picked), shape[1], layout[0])
    if x.is_source:
        return ctx.result(cut, x, rule="channel_pieces")
    if K.selection_indices(x.kernel) is None:  # one conv per piece: as dear, more ops
        raise NoFold("it takes a piece of a folded map's output: the map stays whole and its "
                     "pieces are taken after it")
    return ctx.result(_exact(K.compose, x.kernel, cut), x, rule="channel_pieces")  # of a piece


@rule("spatial_crop", CROP)
def spatial_crop(ctx: Context, op: Op) -> Lin:
    """A(x)[..., a:-b] => A'(x): the crop is the identity with a negative padding (:func:`crop`
    of a 1x1 identity), composed after A and into the conv that reads it. Exact when the crop is
    symmetric, or its asymmetry ``|a - b|`` is a multiple of the dilation of the taps it shifts;
    the conv that reads it must not pad a cropped axis (see :func:`reparam.kernel.compose`)."""
    layout = _rank_layout(ctx, op.inputs[0])
    amounts = op.attrs["amounts"]
    if len(amounts) != layout[0]:
        raise NoFold("the slice does not cover the spatial axes")
    x = ctx.lin(op.inputs[0], layout)
    channels = ctx.shape(op.inputs[0])[1]
    like = x.kernel.weight if not x.is_source else None
    eye = K.identity(channels, layout[0], dtype=torch.float64,
                     device=None if like is None else like.device)
    cut = _exact(K.crop, eye, list(amounts))
    if x.is_source:
        return ctx.result(cut, x, rule="spatial_crop")
    return ctx.result(_exact(K.compose, x.kernel, cut), x, rule="spatial_crop")


@rule("filled_pad", FILLED_PAD)
def filled_pad(ctx: Context, op: Op) -> Lin:
    """pad(A(x)) with every border value set to A's bias => A'(x) with a larger zero padding (a
    conv adds its bias on its padded border too): DBB's BN-and-pad, ECBSR's bias-filled pad.
    Exact when A is pointwise and the fill is A's output at zero, its bias (equal to the rounding
    of the dtype the model computed the fill in: it is the same formula)."""
    layout = _rank_layout(ctx, op.inputs[0])
    per_axis = _pad_per_axis(ctx, op.attrs["pad"], layout[0])
    fill = ctx.const(op.attrs["fill"])
    if not isinstance(fill, torch.Tensor) or not fill.is_floating_point():
        raise NoFold("the border value is not a constant")
    x = _padded_map(ctx, op, layout, "values")
    k = x.kernel
    if k.reads_padding and k.padding_mode != "zeros":
        raise NoFold("padding modes disagree")
    c = fill.reshape(-1).to(k.bias.dtype).to(k.bias.device)
    if c.numel() != k.out_channels:
        raise NoFold("the border value is not one value per channel")
    scale = max(float(k.bias.abs().max()) if k.bias.numel() else 0.0, float(c.abs().max()),
                torch.finfo(fill.dtype).tiny)
    if float((c - k.bias).abs().max()) > 64 * torch.finfo(fill.dtype).eps * scale:
        raise NoFold("the border is filled with values other than the map's output at zero "
                     "(its bias), which no conv padding produces")
    padding = tuple(p + q for p, q in zip(k.padding, per_axis, strict=True))
    return ctx.result(Kernel(k.weight, k.bias, k.stride, padding, k.dilation, k.groups, "zeros",
                             k.channels_last), x, rule="filled_pad")


@rule("identity_ops", IDENTITY)
def identity_ops(ctx: Context, op: Op) -> Lin:
    """Identity, Dropout (eval), contiguous, clone => nothing. Always exact."""
    x = ctx.lin(op.inputs[0], ctx.layout_of(op.inputs[0]))
    return ctx.result(x.kernel, x, rule="identity_ops")


COMMON = (conv, conv_bn, scale_shift, identity_ops, parallel_sum)
