"""A per-channel affine map moved past the ops that only move or average elements.

An eval-mode BN is ``y = s * x + t`` on the channel axis. It commutes with every op that moves
or averages elements without mixing channels: a transpose, permute, flatten or reshape that keeps
the channel axis whole (and the batch axis whole, for any batch size), and an average over
positions whose weights sum to one (``mean`` over positions, a global average pool, an unpadded
average pool). So::

    bn(x).flatten(2).transpose(1, 2) -> Linear
        ==  Linear(s * x.flatten(2).transpose(1, 2) + t)

exactly, and the right-hand side is one Linear (FastViT's attention ``norm``, NextViT's token
``norm`` after its average pool, a final ``norm -> global pool -> head``). The rule gives the
layout op the value "the same per-channel map, of the source seen through this op" (a
:class:`~reparam.values.View`); a region of such a value makes the layout ops anew on the source,
and the map folds into whatever linear op comes after. Where nothing takes the map in, the driver
stops moving it there (the map then stays where it was, or an average pool takes it in as a
conv).
"""

from __future__ import annotations

import math

from torch import fx

from .. import kernel as K
from ..context import Context, relay
from ..values import Const, Lin, NoFold, rule
from .ops import AVG_POOL, FLATTEN, MEAN, RESHAPE, TRANSPOSE


def _channel_axis(lin: Lin, rank: int) -> int:
    k = lin.kernel
    return rank - 1 if k.channels_last or rank == 2 else 1


def movedim_order(source, destination, rank: int) -> list[int] | None:
    """The permutation ``x.movedim(source, destination)`` applies (output axis ``i`` is input
    axis ``order[i]``), as torch defines it: the moved axes at their destinations, the others
    in their order; None for sizes that are not plain distinct axes."""
    if not all(isinstance(d, int) and -rank <= d < rank for d in (*source, *destination)):
        return None
    src, dst = [d % rank for d in source], [d % rank for d in destination]
    if len(src) != len(dst) or len(set(src)) != len(src) or len(set(dst)) != len(dst):
        return None
    order: list[int | None] = [None] * rank
    for s, d in zip(src, dst, strict=True):
        order[d] = s
    rest = iter(i for i in range(rank) if i not in src)
    return [o if o is not None else next(rest) for o in order]


def _reshaped_axis(before, after, axis: int) -> int | None:
    """The axis of ``after`` that holds ``before``'s axis ``axis`` whole under a row-major
    reshape: the same number of elements in front of it, counted after the batch axis (which
    must stay first and whole), and the channel axis's size, or its size merged with the
    positions of the axes right after it (a BN's map flattened with its positions,
    ``(n, c, h, w) -> (n, c*h*w)``, repeats each channel's scale ``h*w`` times)."""
    if len(after) < 2 or after[0] != before[0] or axis < 1:
        return None
    front = math.prod(before[1:axis])
    for j in range(1, len(after)):
        if math.prod(after[1:j]) != front:
            continue
        if any(after[j] == math.prod(before[axis:end]) for end in range(axis + 1,
                                                                         len(before) + 1)):
            return j
    return None


def _keeps_batch(ctx: Context, op) -> bool:
    """Whether a flatten or reshape leaves the batch axis alone for *any* batch size: shapes are
    traced on the example batch (often one sample), where ``x.reshape(1, c, -1)`` looks as
    harmless as ``x.reshape(b, c, -1)``. A reshape's first size must come from the input at run
    time or be -1 (then the other sizes fix one sample's layout)."""
    rank = len(ctx.shape(op.inputs[0]))
    if op.kind == "flatten":
        start = op.attrs["start_dim"]
        return isinstance(start, int) and start % rank >= 1
    if "like" in op.attrs:
        return isinstance(op.attrs["like"], fx.Node)
    sizes = op.attrs["shape"]
    if not isinstance(sizes, tuple) or not sizes:
        return False
    first = sizes[0]
    return isinstance(first, fx.Node) or first == -1


def _axis_after(ctx: Context, op, axis: int) -> int | None:
    """Where the channel axis ``axis`` of the op's input is in its output (alone, or merged with
    the positions after it), if the op commutes with a per-channel affine map on that axis; else
    ``None``."""
    before, after = ctx.shape(op.inputs[0]), ctx.shape(ctx.node)
    if before is None or after is None:
        return None
    rank = len(before)
    if op.kind == "transpose":
        dims = op.attrs["dims"]
        if not all(isinstance(d, int) for d in dims):
            return None
        d0, d1 = (d % rank for d in dims)
        if 0 in (d0, d1):
            return None  # the batch axis stays first
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if op.kind == "movedim":
        order = movedim_order(op.attrs["source"], op.attrs["destination"], rank)
        return order.index(axis) if order is not None and order[0] == 0 else None
    if op.kind == "permute":
        dims = op.attrs["dims"]
        if not isinstance(dims, tuple) or not all(isinstance(d, int) for d in dims) or len(
                dims) != rank:
            return None
        order = [d % rank for d in dims]
        return order.index(axis) if order[0] == 0 and sorted(order) == list(range(rank)) else None
    if op.kind in ("flatten", "reshape"):
        return _reshaped_axis(before, after, axis) if _keeps_batch(ctx, op) else None
    if op.kind == "mean":  # an average over positions: its weights sum to one
        dims = {d % rank for d in op.attrs["dims"] if isinstance(d, int)}
        if len(dims) != len(op.attrs["dims"]) or axis in dims or 0 in dims:
            return None
        return axis if op.attrs["keepdim"] else axis - sum(1 for d in dims if d < axis)
    if op.kind == "avg_pool":  # every window's weights sum to one: no padding, no overhang
        a = op.attrs
        whole = (not any(a["padding"]) and not a["ceil_mode"]
                 and a.get("divisor_override") is None)
        return axis if whole and axis == 1 and len(after) == rank else None
    return None


@rule("layout_affine", TRANSPOSE, FLATTEN, RESHAPE, MEAN, AVG_POOL)
def layout_affine(ctx: Context, op) -> Lin | None:
    """s * A(x) + t -> a transpose, permute, flatten, reshape or average => the same per-channel
    map of the moved or averaged source, so it folds into the linear op after (FastViT's and
    NextViT's token norms, norm -> global pool -> head). Exact when the op keeps the channel
    axis whole and the batch axis first for any batch size, and an average's weights sum to one
    (no padding, no ceil_mode overhang)."""
    if not ctx.may_move_through(ctx.node):
        return None
    x = op.inputs[0]
    value = ctx.value(x)
    if op.kind == "avg_pool" and isinstance(x, fx.Node) and not isinstance(value, (Lin, Const)):
        return _pooled_view(ctx, op, x)
    if not isinstance(value, Lin) or not value.nodes or not value.kernel.is_diagonal:
        return None  # only a per-channel map commutes with moving elements
    before, after = ctx.shape(x), ctx.shape(ctx.node)
    if before is None or after is None or len(after) < 2:
        return None
    channel = _channel_axis(value, len(before))
    axis = _axis_after(ctx, op, channel)
    if axis is None:
        raise NoFold(f"'{ctx.node.name}' ({op.kind}) does not keep the channel axis whole, so a "
                     "per-channel map cannot move past it")
    rank = len(after)
    if axis == rank - 1:
        layout = (0, rank > 2)
    elif axis == 1:
        layout = (rank - 2, False)
    else:
        raise NoFold(f"after '{ctx.node.name}' ({op.kind}) the channels lie on axis {axis} of "
                     f"{rank}, where no conv or linear layer reads them")
    ctx.require("bn_conv")  # the moved map folds into what comes after as "BN then conv"
    k = value.kernel
    repeats = after[axis] // before[channel]  # positions merged into the channel axis
    if repeats > 1 and k.out_channels == before[channel]:  # each channel's scale repeated
        k = K.affine(k.weight.reshape(-1).repeat_interleave(repeats),
                     k.bias.reshape(-1).repeat_interleave(repeats), k.nd, k.channels_last)
    kernel = relay(k, after[axis], layout, k.weight.device)
    return ctx.result(kernel, value, rule="layout_affine", through=True)


def _pooled_view(ctx: Context, op, x: fx.Node) -> Lin | None:
    """An unpadded average pool of a tensor no linear op made: the identity of the pooled view,
    so that a per-channel map after the pool can move on into the linear layer after it (RepMLP's
    global perceptron: pool -> BN -> flatten -> FC keeps the pool and folds the BN into the FC).
    Where nothing takes the map in, the driver stops the view and the pool becomes a conv."""
    if _axis_after(ctx, op, 1) is None:
        return None
    source = ctx.lin(x)
    return ctx.result(source.kernel, source, rule="layout_affine", through=True)


LAYOUT = (layout_affine,)

__all__ = ["LAYOUT", "layout_affine"]
