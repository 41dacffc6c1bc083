"""Shape-only ops around per-token linear maps: LeViT's ``LinearNorm``.

timm's LeViT applies a BatchNorm1d to the output of a linear layer on tokens by flattening the
leading axes first and restoring them afterwards::

    y = linear(x)                      # (B, N, C)
    z = bn1d(y.flatten(0, 1))          # (B * N, C): one BN channel per linear output channel
    out = z.reshape_as(y)              # (B, N, C)

A reshape that keeps the size of the last axis keeps every element's last index (the flat index
modulo ``C``), so it commutes with any map that acts on the last axis alone: a linear layer on
tokens and a per-channel affine map (BN, a scale). The whole sandwich is therefore the linear
layer with the BN folded in. The rule below gives the flatten (and everything up to the reshape
that undoes it) the value of the linear map with the layout of its own rank; the value at the
closing reshape is the folded linear layer on the original input, in the original shape.

A value in the middle of such a sandwich is *open*: the folded module applied to the region's
source would not produce the tensor's traced shape. The rule only opens a sandwich that visibly
closes (a chain of single-user per-channel ops ending at a reshape back to the linear's output
shape); :func:`output_shape` lets the driver refuse to materialize a region anywhere its folded
module would not reproduce the traced shape.

It matches :data:`reparam.rules.ops.FLATTEN` (``x.flatten(start, end)``, ``torch.flatten``,
``nn.Flatten``) and :data:`reparam.rules.ops.RESHAPE` (``x.reshape(*shape)``, ``x.view(*shape)``,
``torch.reshape``, ``x.reshape_as(y)``, ``x.view_as(y)``; ``y`` gives a shape, not data).

Only the traced shapes are used (``node.meta``), never the attrs' values, so a shape computed at
run time (``x.view(b, n, -1)`` from ``x.shape``) is fine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from torch import fx

from ..context import Context
from ..cost import output_shape
from ..pattern import Op
from ..values import Lin, NoFold, rule
from .ops import BATCH_NORM, FLATTEN, IDENTITY, RESHAPE

SHAPE_KINDS = ("flatten", "reshape")
# ops allowed between the flatten and the reshape that undoes it: each folds for sure, so the
# open middle of the sandwich never has to be materialized on its own
_INSIDE_KINDS = tuple(dict.fromkeys(p.kind for p in (*BATCH_NORM, *IDENTITY)))


def _keeps_last_axis(before: Sequence[int] | None, after: Sequence[int] | None) -> bool:
    return (before is not None and after is not None and len(before) >= 2 and len(after) >= 2
            and before[-1] == after[-1] and math.prod(before) == math.prod(after))


def _closes(ctx: Context, node: fx.Node, want: tuple[int, ...]) -> str | None:
    """Follow ``node``'s single users through BNs and identities to a reshape back to ``want``.

    Returns ``None`` when the sandwich closes, else the reason it does not.
    """
    current = node
    for _ in range(64):
        users = list(current.users)
        if len(users) != 1:
            return (f"'{current.name}' (inside a flatten ... reshape of tokens) is used "
                    f"{len(users)} times, so its tensor would be needed in the flattened shape")
        user = users[0]
        op = ctx.op_of(user)
        if op is None or current not in op.inputs:
            return (f"'{user.name}' reads the flattened tokens and is not a per-channel op, so "
                    "the flatten is not undone before a non-linear op")
        if op.kind in SHAPE_KINDS:
            shape = ctx.shape(user)
            if shape is not None and tuple(shape) == want:
                return None
            if not _keeps_last_axis(ctx.shape(current), shape):
                return f"'{user.name}' reshapes the channel axis"
        elif op.kind not in _INSIDE_KINDS:
            return f"'{user.name}' ({op.kind}) is not a BN or an identity"
        elif op.kind == "batch_norm" and op.attrs.get("training"):
            return f"'{user.name}' uses batch statistics"
        current = user
    return "the flatten is not undone within 64 ops"


@rule("token_reshape", FLATTEN, RESHAPE)
def token_reshape(ctx: Context, op: Op) -> Lin | None:
    """linear(x).flatten(0, 1) -> BN1d -> .reshape_as(linear(x)) => linear'(x) (LeViT's
    LinearNorm). A reshape that keeps the last (channel) axis commutes with a linear layer on
    tokens and with per-channel affine maps, so the BN folds into the linear layer. Exact when the
    reshape is undone (same shape as the linear's output) before anything but per-channel ops
    reads the tokens."""
    x = op.inputs[0]
    before, after = ctx.shape(x), ctx.shape(ctx.node)
    if not _keeps_last_axis(before, after):
        return None  # a reshape of the channel axis: not this rule's pattern
    value = ctx.value(x)
    if not isinstance(value, Lin) or value.kernel.nd != 0:
        return None  # only a linear map on tokens (its channel axis is the last one) rides along
    k = value.kernel
    if not value.nodes or k.is_diagonal:
        return None  # nothing to fold the per-channel ops into: leave the shape op alone
    source = ctx.shape(value.source)
    want = output_shape(k, source) if source is not None else None
    if want is None:
        raise NoFold(f"the shape of the linear map's input '{value.source}' is unknown")
    laid_out = replace(k, channels_last=len(after) > 2)
    if tuple(after) != want:  # an open sandwich: allowed only if it visibly closes
        why = _closes(ctx, ctx.node, want)
        if why is not None:
            raise NoFold(why)
    return ctx.result(laid_out, value, rule="token_reshape")


TOKENS = (token_reshape,)

__all__ = ["SHAPE_KINDS", "TOKENS", "output_shape", "token_reshape"]

