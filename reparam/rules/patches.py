"""Conv into FC: RepMLP's local perceptron folded into its fully-connected layer.

RepMLP cuts a feature map into patches by reshape and permute; a fully-connected layer (a 1x1
conv over the flattened patch on ``(n, C*h*w, 1, 1)``, or a linear layer on ``(n, C*h*w)``) and
conv branches on the same patches, read as ``(n, C, h, w)``, add their outputs once both are
reshaped to one patch grid::

    patches = grid.permute(0, 2, 4, 1, 3, 5)                    # (N, H/h, W/w, C, h, w)
    y = fc(patches.reshape(-1, C*h*w, 1, 1))                     # the FC
    y = bn1d(y.reshape(-1, O*h*w)).reshape(-1, H/h, W/w, O, h, w)
    z = bn(conv(patches.reshape(-1, C, h, w))).reshape(-1, H/h, W/w, O, h, w)
    out = y + z

A reshape keeps the row-major order of the elements, so every branch is a linear map of one
flat vector per patch: the ``C*h*w`` values that both reshapes of ``patches`` read in the same
order. A conv on a fixed ``h x w`` input is such a map (:func:`reparam.kernel.as_linear`, the
conv applied to the identity basis, its padding part of the matrix); a per-channel map on
``(n, c, *rest)`` is the diagonal map that repeats each channel's scale over its ``prod(rest)``
positions; two flat values reshaped alike add. A reshape of a linear value gets the *flat*
value (:class:`~reparam.values.Lin` with ``reshaped`` set); a region of one is the FC module
followed by the last reshape, made anew. Only the rules below read flat values; to every other
rule they are opaque tensors.

Exactness rests on sizes fixed in the code, not on the example input: the conv's tiles, the
FC's input and every per-channel op's input have constant sizes after the first (so each sample
of them is one patch at any batch size and map size), and the branches that add are reshaped by
the same sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import fx

from .. import kernel as K
from ..context import Context
from ..kernel import Kernel
from ..pattern import Op
from ..values import Lin, NoFold, View, rule
from .common import bn_statistics, branch_sum
from .ops import ADD, BATCH_NORM, FLATTEN, RESHAPE, SUB

#: the largest FC a conv becomes (weights; 128 MiB in float64)
_FC_BUDGET = 1 << 24


def _sizes(ctx: Context, node: fx.Node) -> tuple | None:
    """The sizes a reshape asks for (ints or shape queries), or ``None`` for another op (a
    flatten, ``reshape_as``)."""
    op = ctx.op_of(node)
    if op is None or op.kind != "reshape" or "shape" not in op.attrs:
        return None
    sizes = op.attrs["shape"]
    if not isinstance(sizes, tuple) or not all(
            isinstance(s, (int, fx.Node)) and not isinstance(s, bool) for s in sizes):
        return None
    return sizes


def _fixed_sample(ctx: Context, node: fx.Node) -> bool:
    """A reshape whose sizes after the first are constants: each sample of its output is the
    same block of elements at any batch and map size."""
    sizes = _sizes(ctx, node)
    return sizes is not None and len(sizes) >= 2 and all(
        isinstance(s, int) and s >= 0 for s in sizes[1:])


def _flat_shaped(shape: Sequence[int] | None) -> bool:
    """``(n, D)`` or ``(n, D, 1, ..., 1)``: a tensor an FC (a linear layer or a 1x1 conv) reads."""
    return shape is not None and len(shape) >= 2 and all(s == 1 for s in shape[2:])


def _as_flat(k: Kernel, spatial: Sequence[int], rank: int) -> Kernel:
    """``k`` on an input of size ``spatial`` as the map of the flattened sample, laid out for a
    flat tensor of ``rank`` (a linear layer for rank 2, else a 1x1 conv)."""
    fc = K.as_linear(k, spatial) if k.nd else k
    return fc if rank == 2 else K.as_pointwise(fc, rank - 2)


@rule("flat_reshape", RESHAPE, FLATTEN)
def flat_reshape(ctx: Context, op: Op) -> Lin | None:
    """A reshape or flatten of a flat value => the same flat value, reshaped by this op. Always
    exact: reshapes compose, and each keeps the row-major order of the elements."""
    value = ctx.flat(op.inputs[0])
    if value is None:
        return None
    if op.kind == "reshape" and _sizes(ctx, ctx.node) is None:
        raise NoFold("a reshape_as/view_as is made anew only from sizes, not from a tensor")
    return ctx.result(value.kernel, value, rule="flat_reshape", reshaped=ctx.node)


@rule("flat_bn", BATCH_NORM)
def flat_bn(ctx: Context, op: Op) -> Lin | None:
    """BN on a flat value of shape ``(n, c, *rest)`` => the diagonal map that repeats each
    channel's scale and shift over its ``prod(rest)`` positions, folded into the FC. Exact when
    the reshape before the BN fixes the sizes of a sample (``c * prod(rest)`` values, the FC's
    output), so every element keeps its channel at any batch size."""
    value = ctx.flat(op.inputs[0])
    if value is None:
        return None
    shape = ctx.shape(op.inputs[0])
    if shape is None or len(shape) < 2 or math.prod(shape[1:]) != value.kernel.out_channels:
        raise NoFold("a sample of the BN's input is not one sample of the FC's output")
    if not _fixed_sample(ctx, value.reshaped):
        raise NoFold(f"'{value.reshaped.name}' does not fix the sizes of a sample, so the BN's "
                     "channels could fall on other elements at another input size")
    mean, var, gamma, beta, eps = bn_statistics(ctx, op)
    positions = math.prod(shape[2:])
    spread = [t.repeat_interleave(positions) if t is not None else None
              for t in (mean, var, gamma, beta)]
    return ctx.result(K.fuse_bn(value.kernel, *spread, eps), value, rule="flat_bn",
                      biased=True, reshaped=value.reshaped)


@rule("flat_sum", ADD, SUB)
def flat_sum(ctx: Context, op: Op) -> Lin | None:
    """A(x) + B(x) (or A(x) - B(x)), both flat => the FC of A + B. Exact when both read one flat
    input and are reshaped by the same sizes (the same constants and shape queries), so the
    elements that add are the same ones at any input size."""
    a, b = (ctx.flat(x) for x in op.inputs)
    if a is None or b is None:
        return None
    if a.source != b.source:
        raise NoFold("the flat branches read different tensors")
    ra, rb = a.reshaped, b.reshaped
    if ctx.shape(ra) != ctx.shape(rb) or _sizes(ctx, ra) != _sizes(ctx, rb) or _sizes(
            ctx, ra) is None:
        raise NoFold(f"'{ra.name}' and '{rb.name}' reshape the branches by different sizes")
    return ctx.result(branch_sum(ctx, op, a.kernel, b.kernel), a, b, rule="flat_sum",
                      reshaped=ra)


def _flat_source(ctx: Context, tiles: fx.Node, before: int) -> fx.Node | None:
    """The reshape of the tensor ``tiles`` reshapes that holds each of its samples as one flat
    vector (``(n, C*h*w, 1, 1)`` beside ``(n, C, h, w)``; the first one, so that every branch
    finds the same), made before position ``before``; ``None`` where ``tiles`` is not a reshape
    with constant sizes after the first."""
    op = ctx.op_of(tiles)
    if op is None or op.kind != "reshape" or not _fixed_sample(ctx, tiles):
        return None
    patches, shape = op.inputs[0], ctx.shape(tiles)
    if not isinstance(patches, fx.Node) or shape is None:
        return None
    for user in sorted(patches.users, key=ctx.position):
        other = ctx.op_of(user)
        flat = ctx.shape(user)
        if (other is not None and other.kind == "reshape" and other.inputs[0] is patches
                and _fixed_sample(ctx, user) and _flat_shaped(flat) and flat[0] == shape[0]
                and math.prod(flat[1:]) == math.prod(shape[1:])
                and (user is tiles or ctx.position(user) < before)):
            return user
    return None


@rule("conv_into_fc", RESHAPE, FLATTEN)
def conv_into_fc(ctx: Context, op: Op) -> Lin | None:
    """FC(x) or conv(tiles) reshaped => flat values: the FC as it is, and a conv on fixed
    ``h x w`` tiles as the FC on the flat reshape of the same patches (RepMLP's local
    perceptron). Exact when the tiles and the flat input are both reshapes of one tensor with
    constant sizes after the first, so a sample of each is the same patch in the same order."""
    value = ctx.value(op.inputs[0])
    if not isinstance(value, Lin) or not value.nodes or isinstance(value.source, View):
        return None
    if op.kind == "reshape" and _sizes(ctx, ctx.node) is None:
        return None
    k, source = value.kernel, value.source
    shape = ctx.shape(source)
    if k.channels_last or k.is_diagonal or shape is None or len(shape) != k.nd + 2:
        return None
    flat = _flat_source(ctx, source, min(ctx.position(n) for n in value.nodes))
    if flat is None:  # an FC on a tensor of any size: the map is the same on every position
        if _flat_shaped(shape) and (k.nd == 0 or (k.is_pointwise and not any(k.padding))):
            return ctx.result(k, value, rule="conv_into_fc", reshaped=ctx.node)
        return None
    numel = math.prod(shape[1:]) // k.groups * math.prod(ctx.shape(op.inputs[0])[1:])
    if numel > _FC_BUDGET:
        raise NoFold(f"the conv as an FC would hold {numel:,} weights (more than {_FC_BUDGET:,})")
    fc = _as_flat(k, shape[2:], len(ctx.shape(flat)))
    moved = Lin(flat, fc, value.nodes, value.rules, value.biased)
    return ctx.result(fc, moved, rule="conv_into_fc", reshaped=ctx.node)


PATCHES_FIRST = (flat_reshape, flat_bn, flat_sum)
"""The rules that read flat values: ahead of every other rule (to which a flat value is an
opaque tensor, which they would take as a source)."""
PATCHES = (conv_into_fc,)
"""The rule that makes flat values: after every other rule on reshapes (LeViT's tokens, a
per-channel map moved past a reshape)."""

__all__ = ["PATCHES", "PATCHES_FIRST", "conv_into_fc", "flat_bn", "flat_reshape", "flat_sum"]
