"""The patterns the built-in rules match: every form a model may write each op in.

Each constant is a tuple of patterns (see :mod:`reparam.pattern`) that read one op, whatever form
the model wrote it in, into the same :class:`~reparam.pattern.Op`: an ``nn.Conv2d``, an
``F.conv2d`` on ``get_attr`` tensors and an ``aten.conv2d`` call (from torch.export) all read as
``Op("conv", (x,), {weight, bias, stride, padding, dilation, groups, ...})``. A rule names the
tuples it folds (``@rule("conv", CONV, LINEAR)``); a user's rule may name these or its own.

Parameters stay as they were found (tensors, or ``get_attr`` nodes); rules resolve them with
``ctx.param``. Geometry must be static: a size computed at run time (``kernel_size=x.size(3)``)
makes the reader refuse the node, which then stays as it is.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..functional import pad_filled
from ..nodes import pieces_call, shape_of
from ..pattern import Aten, Effect, Function, Method, Module, Op, per_sample

aten = torch.ops.aten


def _tuple(value: Any, nd: int) -> Any:
    """A geometry argument per axis; a ``TypeError`` when it is not a static int (then the node is
    not read as this op)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * nd
    out = tuple(value)
    if len(out) == 1 and nd > 1:
        out = out * nd
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise TypeError(f"geometry {value!r} is not static")
    return out


# --- costs ------------------------------------------------------------------------------------

def _weight_cost(op: Op, node: fx.Node, tensor) -> int:
    """A conv's or linear's multiply-adds per sample, from its weight's real shape (a weight
    computed from parameters in forward counts as what it is)."""
    w = tensor(op.attrs["weight"])
    if w is None:
        return 0
    if op.kind == "linear":
        return per_sample(node) * w.shape[1]
    taps = math.prod(w.shape[2:])
    if op.attrs.get("transposed"):
        return per_sample(op.inputs[0]) * w.shape[1] * taps
    return per_sample(node) * w.shape[1] * taps


def _pool_cost(op: Op, node: fx.Node, tensor) -> int:
    return per_sample(node) * math.prod(op.attrs["kernel_size"])


def _free(op: Op, node: fx.Node, tensor) -> int:
    return 0


# --- conv and linear ----------------------------------------------------------------------------

_CONV_TYPES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_T_TYPES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


def _conv_attrs(weight, bias, stride, padding, dilation, groups, nd, transposed=False,
                output_padding=0, padding_mode="zeros") -> dict:
    return dict(weight=weight, bias=bias, stride=_tuple(stride, nd),
                padding=_tuple(padding, nd), dilation=_tuple(dilation, nd), groups=groups,
                padding_mode=padding_mode, nd=nd, transposed=transposed,
                output_padding=_tuple(output_padding, nd))


def _conv_module(m: nn.Module, node: fx.Node) -> Op | None:
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    nd = next(n for t, n in {**_CONV_TYPES, **_CONV_T_TYPES}.items() if isinstance(m, t))
    if transposed and (len(node.args) > 1 or node.kwargs):
        return None  # an explicit output_size changes the geometry per call
    x = node.args[0] if node.args else node.kwargs.get("input")
    attrs = _conv_attrs(m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, nd,
                        transposed, getattr(m, "output_padding", 0), m.padding_mode)
    return Op("conv", (x,), attrs)


def _conv_fn(nd: int, transposed: bool = False):
    def read(b: dict) -> Op:
        attrs = _conv_attrs(b["weight"], b["bias"], b["stride"], b["padding"], b["dilation"],
                            b["groups"], nd, transposed, b.get("output_padding", 0))
        return Op("conv", (b["input"],), attrs)

    return read


def _aten_convolution(b: dict) -> Op | None:
    nd = len(b["weight"].meta["tensor_meta"].shape) - 2 if isinstance(
        b["weight"], fx.Node) and "tensor_meta" in b["weight"].meta else len(b["stride"])
    attrs = _conv_attrs(b["weight"], b["bias"], b["stride"], b["padding"], b["dilation"],
                        b["groups"], nd, b["transposed"], b["output_padding"])
    return Op("conv", (b["input"],), attrs)


_CONV_SIG = "input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1"
_CONV_T_SIG = ("input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, "
               "dilation=1")

CONV = (
    Module(tuple(_CONV_TYPES) + tuple(_CONV_T_TYPES), kind="conv", read=_conv_module,
           cost=_weight_cost),
    *(Function(f, _CONV_SIG, kind="conv", read=_conv_fn(nd), cost=_weight_cost)
      for f, nd in ((F.conv1d, 1), (F.conv2d, 2), (F.conv3d, 3))),
    *(Function(f, _CONV_T_SIG, kind="conv", read=_conv_fn(nd, True), cost=_weight_cost)
      for f, nd in ((F.conv_transpose1d, 1), (F.conv_transpose2d, 2),
                    (F.conv_transpose3d, 3))),
    *(Aten(f, kind="conv", read=_conv_fn(nd), cost=_weight_cost)
      for f, nd in ((aten.conv1d.default, 1), (aten.conv2d.default, 2),
                    (aten.conv3d.default, 3), (aten.conv1d.padding, 1),
                    (aten.conv2d.padding, 2), (aten.conv3d.padding, 3))),
    *(Aten(f, kind="conv", read=_conv_fn(nd, True), cost=_weight_cost)
      for f, nd in ((aten.conv_transpose1d.default, 1), (aten.conv_transpose2d.input, 2),
                    (aten.conv_transpose3d.input, 3))),
    Aten(aten.convolution.default, kind="conv", read=_aten_convolution, cost=_weight_cost),
)
"""Conv and transposed conv, 1d/2d/3d: ``nn.Conv*d``, ``nn.ConvTranspose*d``, ``F.conv*d``,
``F.conv_transpose*d``, ``aten.conv*d``, ``aten.convolution``."""


def _linear_module(m: nn.Linear, node: fx.Node) -> Op:
    x = node.args[0] if node.args else node.kwargs.get("input")
    return Op("linear", (x,), dict(weight=m.weight, bias=m.bias))


def _linear_fn(b: dict) -> Op:
    return Op("linear", (b["input"],), dict(weight=b["weight"], bias=b["bias"]))


LINEAR = (
    Module(nn.Linear, kind="linear", read=_linear_module, cost=_weight_cost),
    Function(F.linear, "input, weight, bias=None", kind="linear", read=_linear_fn,
             cost=_weight_cost),
    Aten(aten.linear.default, kind="linear", read=_linear_fn, cost=_weight_cost),
)
"""Linear layers: ``nn.Linear``, ``F.linear``, ``aten.linear``."""


# --- batch norm ---------------------------------------------------------------------------------

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _bn_attrs(mean, var, weight, bias, eps, training) -> dict:
    return dict(mean=mean, var=var, weight=weight, bias=bias, eps=eps,
                training=bool(training) or mean is None)


def _bn_module(m: nn.Module, node: fx.Node) -> Op:
    x = node.args[0] if node.args else node.kwargs.get("input")
    return Op("batch_norm", (x,), _bn_attrs(m.running_mean, m.running_var, m.weight, m.bias,
                                            m.eps, m.training))


def _bn_fn(b: dict) -> Op:
    return Op("batch_norm", (b["input"],), _bn_attrs(
        b["running_mean"], b["running_var"], b["weight"], b["bias"], b["eps"], b["training"]))


_BN_LEGIT = aten._native_batch_norm_legit_no_training.default


def _bn_item(b: dict) -> Op | None:
    """``getitem(aten._native_batch_norm_legit_no_training(...), 0)``: the BN's output, as
    torch.export writes an eval-mode BN."""
    bn, index = b["input"], b["index"]
    if index != 0 or not isinstance(bn, fx.Node) or bn.target is not _BN_LEGIT:
        return None
    a = dict(zip(("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
                 bn.args, strict=False))
    a.update(bn.kwargs)
    return Op("batch_norm", (a["input"],), _bn_attrs(
        a["running_mean"], a["running_var"], a.get("weight"), a.get("bias"), a["eps"], False))


BATCH_NORM = (
    Module(_BN_TYPES, kind="batch_norm", read=_bn_module, effect=Effect.AFFINE),
    Function(F.batch_norm, "input, running_mean, running_var, weight=None, bias=None, "
             "training=False, momentum=0.1, eps=1e-05", kind="batch_norm", read=_bn_fn,
             effect=Effect.AFFINE),
    Aten(aten.batch_norm.default, kind="batch_norm", read=_bn_fn, effect=Effect.AFFINE),
    Function(operator.getitem, "input, index", kind="batch_norm", read=_bn_item,
             effect=Effect.AFFINE),
)
"""Batch norm: ``nn.BatchNorm*d``, ``nn.SyncBatchNorm``, ``F.batch_norm`` (timm's norm+act
modules call it), ``aten.batch_norm`` and torch.export's eval-mode BN (an item of
``aten._native_batch_norm_legit_no_training``). A subclass with its own ``forward`` is not read as a
BN."""


# --- average pooling ----------------------------------------------------------------------------

_AVG_TYPES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}


def _pool_attrs(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
                nd) -> dict:
    stride = stride if stride not in (None, [], ()) else kernel_size
    return dict(kernel_size=_tuple(kernel_size, nd), stride=_tuple(stride, nd),
                padding=_tuple(padding, nd), ceil_mode=ceil_mode,
                count_include_pad=count_include_pad, divisor_override=divisor_override, nd=nd)


def _pool_module(m: nn.Module, node: fx.Node) -> Op:
    nd = next(n for t, n in _AVG_TYPES.items() if isinstance(m, t))
    x = node.args[0] if node.args else node.kwargs.get("input")
    return Op("avg_pool", (x,), _pool_attrs(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                            m.count_include_pad,
                                            getattr(m, "divisor_override", None), nd))


def _pool_fn(nd: int):
    def read(b: dict) -> Op:
        return Op("avg_pool", (b["input"],), _pool_attrs(
            b["kernel_size"], b["stride"], b["padding"], b["ceil_mode"],
            b["count_include_pad"], b.get("divisor_override"), nd))

    return read


_POOL_SIG = ("input, kernel_size, stride=None, padding=0, ceil_mode=False, "
             "count_include_pad=True, divisor_override=None")

AVG_POOL = (
    Module(tuple(_AVG_TYPES), kind="avg_pool", read=_pool_module, cost=_pool_cost),
    Function(F.avg_pool1d, "input, kernel_size, stride=None, padding=0, ceil_mode=False, "
             "count_include_pad=True", kind="avg_pool", read=_pool_fn(1), cost=_pool_cost),
    *(Function(f, _POOL_SIG, kind="avg_pool", read=_pool_fn(nd), cost=_pool_cost)
      for f, nd in ((F.avg_pool2d, 2), (F.avg_pool3d, 3))),
    *(Aten(f, kind="avg_pool", read=_pool_fn(nd), cost=_pool_cost)
      for f, nd in ((aten.avg_pool1d.default, 1), (aten.avg_pool2d.default, 2),
                    (aten.avg_pool3d.default, 3))),
)
"""Average pooling: ``nn.AvgPool*d``, ``F.avg_pool*d``, ``aten.avg_pool*d``."""


# --- padding ------------------------------------------------------------------------------------

_PAD_TYPES = {
    nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ZeroPad3d: "constant",
    nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant",
    nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
    nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate",
    nn.ReplicationPad3d: "replicate", nn.CircularPad1d: "circular",
    nn.CircularPad2d: "circular", nn.CircularPad3d: "circular",
}


def _pad_module(m: nn.Module, node: fx.Node) -> Op:
    mode = next(v for t, v in _PAD_TYPES.items() if isinstance(m, t))
    x = node.args[0] if node.args else node.kwargs.get("input")
    return Op("pad", (x,), dict(pad=tuple(m.padding), mode=mode, value=getattr(m, "value", 0.0)))


def _pad_fn(b: dict) -> Op:
    return Op("pad", (b["input"],), dict(pad=b["pad"], mode=b["mode"] or "constant",
                                         value=b["value"] or 0.0))


PAD = (
    Module(tuple(_PAD_TYPES), kind="pad", read=_pad_module, effect=Effect.LAYOUT),
    Function(F.pad, "input, pad, mode='constant', value=None", kind="pad", read=_pad_fn,
             effect=Effect.LAYOUT),
    Aten(aten.pad.default, kind="pad", read=_pad_fn, effect=Effect.LAYOUT),
    Aten(aten.constant_pad_nd.default, kind="pad", effect=Effect.LAYOUT,
         read=lambda b: Op("pad", (b["input"],), dict(pad=b["pad"], mode="constant",
                                                      value=b["value"]))),
)
"""Padding: ``F.pad``, ``nn.ZeroPad*d``, ``nn.ConstantPad*d``, ``nn.ReflectionPad*d``,
``nn.ReplicationPad*d``, ``nn.CircularPad*d``, ``aten.pad``, ``aten.constant_pad_nd``."""

def _crop_item(b: dict) -> Op | None:
    """``x[:, :, a:-b, c:-d]``: whole batch and channel axes, then on each spatial axis a step-1
    slice from a start ``>= 0`` to the end or to a negative stop (a crop by amounts)."""
    index = b["index"]
    if not isinstance(index, tuple) or len(index) < 3 or not all(
            isinstance(s, slice) and s.step in (None, 1) for s in index):
        return None
    if index[0] != slice(None) or index[1] != slice(None):
        return None
    amounts = []
    for s in index[2:]:
        start, stop = s.start or 0, s.stop
        if not isinstance(start, int) or start < 0:
            return None
        if stop is not None and not (isinstance(stop, int) and stop < 0):
            return None
        amounts.append((start, 0 if stop is None else -stop))
    return Op("crop", (b["input"],), {"amounts": tuple(amounts)})


def _piece(b: dict) -> Op | None:
    """``x.chunk(n, dim)[i]`` or ``x.split(size_or_sizes, dim)[i]`` (methods, functions and
    their aten forms): piece ``i`` of ``x`` along ``dim``."""
    call, index = pieces_call(b["input"]), b["index"]
    if call is None or not isinstance(index, int):
        return None
    how, x, sections, dim = call
    return Op("select", (x,), {"how": how, "sections": sections, "dim": dim, "index": index})


PIECE = (
    Function(operator.getitem, "input, index", kind="select", read=_piece,
             effect=Effect.LAYOUT),
)
"""A piece of a tensor: an item of ``chunk`` or ``split`` (C2f's halves, PSConv's swapped
halves)."""

CROP = (
    Function(operator.getitem, "input, index", kind="crop", read=_crop_item,
             effect=Effect.LAYOUT),
)
"""A spatial crop by slicing, ``x[:, :, a:-b, c:-d]`` (ACNet's branches for padding < K//2)."""

FILLED_PAD = (
    Function(pad_filled, "input, pad, fill", kind="filled_pad", effect=Effect.LAYOUT),
)
"""A pad whose border is filled with one value per channel (:func:`reparam.functional.pad_filled`:
DBB's BN-and-pad and ECBSR's bias-filled pad, as a torch.export capture writes them)."""


# --- concat -------------------------------------------------------------------------------------

def _cat_fn(b: dict) -> Op:
    return Op("cat", tuple(b["tensors"]), dict(dim=b["dim"]))


CAT = (
    Function((torch.cat, torch.concat), "tensors, dim=0", kind="cat", read=_cat_fn,
             effect=Effect.JOIN, cost=_free),
    Aten(aten.cat.default, kind="cat", read=_cat_fn, effect=Effect.JOIN, cost=_free),
)
"""Concatenation: ``torch.cat``, ``torch.concat``, ``aten.cat``."""


# --- arithmetic ---------------------------------------------------------------------------------

def _binary(kind: str):
    def read(b: dict) -> Op:
        return Op(kind, (b["input"], b["other"]), {"alpha": b.get("alpha", 1)})

    return read


def _rsub(b: dict) -> Op:
    return Op("sub", (b["other"], b["input"]), {"alpha": b.get("alpha", 1)})


def _div(b: dict) -> Op | None:
    if b.get("rounding_mode") is not None:
        return None  # floor or trunc division: not linear
    return Op("div", (b["input"], b["other"]), {})


_BINARY = "input, other, alpha=1"


def _arith(kind: str, functions, method: str, atens, effect=Effect.JOIN):
    return (
        Function(functions, _BINARY, kind=kind, read=_binary(kind), effect=effect),
        Method(method, _BINARY, kind=kind, read=_binary(kind), effect=effect),
        *(Aten(a, kind=kind, read=_binary(kind), effect=effect) for a in atens),
    )


ADD = _arith("add", (operator.add, torch.add), "add", (aten.add.Tensor, aten.add.Scalar))
"""A sum, ``a + b``, ``torch.add(a, b, alpha=)``, ``a.add(b)``, ``aten.add``: a join of two
branches, or a shift by a constant."""
SUB = (*_arith("sub", (operator.sub, torch.sub), "sub", (aten.sub.Tensor, aten.sub.Scalar)),
       Aten(aten.rsub.Scalar, kind="sub", read=_rsub, effect=Effect.JOIN))
"""A difference, ``a - b``, ``torch.sub``, ``a.sub(b)``, ``aten.sub``, ``aten.rsub``."""
MUL = (
    Function((operator.mul, torch.mul), "input, other", kind="mul", read=_binary("mul"),
             effect=Effect.AFFINE),
    Method("mul", "input, other", kind="mul", read=_binary("mul"), effect=Effect.AFFINE),
    *(Aten(a, kind="mul", read=_binary("mul"), effect=Effect.AFFINE)
      for a in (aten.mul.Tensor, aten.mul.Scalar)),
)
"""A product ``a * b``, ``torch.mul``, ``a.mul(b)``, ``aten.mul``: a scale when one side is a
constant."""
DIV = (
    Function(operator.truediv, "input, other", kind="div", read=_div, effect=Effect.AFFINE),
    Function(torch.div, "input, other, rounding_mode=None", kind="div", read=_div,
             effect=Effect.AFFINE),
    Method("div", "input, other, rounding_mode=None", kind="div", read=_div,
           effect=Effect.AFFINE),
    *(Aten(a, kind="div", read=_div, effect=Effect.AFFINE)
      for a in (aten.div.Tensor, aten.div.Scalar)),
)
"""A quotient ``a / b``, ``torch.div`` (no rounding mode), ``a.div(b)``, ``aten.div``."""


def _neg(b: dict) -> Op:
    return Op("neg", (b["input"],), {})


NEG = (
    Function((operator.neg, torch.neg), "input", kind="neg", read=_neg, effect=Effect.AFFINE),
    Method("neg", "input", kind="neg", read=_neg, effect=Effect.AFFINE),
    Aten(aten.neg.default, kind="neg", read=_neg, effect=Effect.AFFINE),
)
"""A negation ``-a``, ``torch.neg``, ``a.neg()``, ``aten.neg``."""


# --- identities ---------------------------------------------------------------------------------

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _identity_module(m: nn.Module, node: fx.Node) -> Op | None:
    if isinstance(m, _DROPOUTS) and m.training:
        return None  # a dropout in training mode draws random numbers: not the identity
    x = node.args[0] if node.args else node.kwargs.get("input")
    return Op("identity", (x,), {})


def _same(b: dict) -> Op:
    return Op("identity", (b["input"],), {})


def _copy(b: dict) -> Op:
    """``clone()``, ``contiguous()``: the same values in a new tensor, maybe in another memory
    layout (a later ``view`` may need it): the value is the input's, the call stays."""
    return Op("identity", (b["input"],), {"copies": True})


def _dropout_fn(b: dict) -> Op | None:
    return None if b["training"] or b["inplace"] else Op("identity", (b["input"],), {})


IDENTITY = (
    Module((nn.Identity, *_DROPOUTS), kind="identity", read=_identity_module,
           effect=Effect.IDENTITY),
    Function(F.dropout, "input, p=0.5, training=True, inplace=False", kind="identity",
             read=_dropout_fn, effect=Effect.IDENTITY),
    Function(operator.pos, "input", kind="identity", read=_same, effect=Effect.IDENTITY),
    Method(("contiguous", "clone"), "input, *rest", kind="identity", read=_copy,
           effect=Effect.IDENTITY),
    Aten(aten.clone.default, kind="identity", read=_copy, effect=Effect.IDENTITY),
    *(Aten(a, kind="identity", read=_same, effect=Effect.IDENTITY)
      for a in (aten.alias.default, aten.detach.default)),
)
"""Identities: ``nn.Identity``, ``nn.Dropout*`` and ``F.dropout`` in eval mode, ``+x``,
``x.contiguous()``, ``x.clone()``, ``aten.clone``, ``aten.alias``, ``aten.detach``."""


# --- shape-only ops -----------------------------------------------------------------------------

def _flatten_module(m: nn.Flatten, node: fx.Node) -> Op:
    x = node.args[0] if node.args else node.kwargs.get("input")
    return Op("flatten", (x,), dict(start_dim=m.start_dim, end_dim=m.end_dim))


def _flatten_fn(b: dict) -> Op:
    return Op("flatten", (b["input"],), dict(start_dim=b["start_dim"], end_dim=b["end_dim"]))


def unpacked(sizes):
    """``x.reshape((a, b))`` and ``x.permute([0, 2, 1])`` read as ``x.reshape(a, b)`` and
    ``x.permute(0, 2, 1)``: the sizes as one flat tuple (anything else, e.g. one ``x.size()``
    node, as it is)."""
    if isinstance(sizes, (tuple, list)) and len(sizes) == 1 and isinstance(sizes[0],
                                                                            (tuple, list)):
        sizes = sizes[0]
    return tuple(sizes) if isinstance(sizes, (tuple, list)) else sizes


def _reshape(b: dict) -> Op:
    return Op("reshape", (b["input"],), dict(shape=unpacked(b["shape"])))


def _reshape_as(b: dict) -> Op:
    return Op("reshape", (b["input"],), dict(like=b["other"]))


FLATTEN = (
    Module(nn.Flatten, kind="flatten", read=_flatten_module, effect=Effect.LAYOUT),
    Function(torch.flatten, "input, start_dim=0, end_dim=-1", kind="flatten",
             read=_flatten_fn, effect=Effect.LAYOUT),
    Method("flatten", "input, start_dim=0, end_dim=-1", kind="flatten", read=_flatten_fn,
           effect=Effect.LAYOUT),
    Aten(aten.flatten.using_ints, kind="flatten", read=_flatten_fn, effect=Effect.LAYOUT),
)
"""Flatten: ``nn.Flatten``, ``torch.flatten``, ``x.flatten()``, ``aten.flatten``."""
RESHAPE = (
    Function(torch.reshape, "input, shape", kind="reshape", read=_reshape,
             effect=Effect.LAYOUT),
    Method(("reshape", "view"), "input, *shape", kind="reshape", read=_reshape,
           effect=Effect.LAYOUT),
    Method(("reshape_as", "view_as"), "input, other", kind="reshape", read=_reshape_as,
           effect=Effect.LAYOUT),
    *(Aten(a, kind="reshape", read=lambda b: Op("reshape", (b["input"],),
                                                 dict(shape=unpacked(b["size"]))),
           effect=Effect.LAYOUT)
      for a in (aten.view.default, aten._unsafe_view.default)),
    Aten(aten.reshape.default, kind="reshape", effect=Effect.LAYOUT, read=_reshape),
)
"""Reshape: ``torch.reshape``, ``x.reshape(...)``, ``x.view(...)``, ``x.reshape_as(y)``,
``x.view_as(y)``, ``aten.view``, ``aten.reshape``. Rules read the traced shapes, never these
sizes' values, so a size computed at run time (``x.view(b, n, -1)``) is fine."""


def _transpose(b: dict) -> Op:
    return Op("transpose", (b["input"],), dict(dims=(b["dim0"], b["dim1"])))


def _permute(b: dict) -> Op:
    return Op("permute", (b["input"],), dict(dims=unpacked(b["dims"])))


def _movedim(b: dict) -> Op:
    def ints(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,)

    return Op("movedim", (b["input"],), dict(source=ints(b["source"]),
                                             destination=ints(b["destination"])))


TRANSPOSE = (
    Function(torch.movedim, "input, source, destination", kind="movedim", read=_movedim,
             effect=Effect.LAYOUT),
    Method(("movedim", "moveaxis"), "input, source, destination", kind="movedim",
           read=_movedim, effect=Effect.LAYOUT),
    Function(torch.transpose, "input, dim0, dim1", kind="transpose", read=_transpose,
             effect=Effect.LAYOUT),
    Method("transpose", "input, dim0, dim1", kind="transpose", read=_transpose,
           effect=Effect.LAYOUT),
    Aten(aten.transpose.int, kind="transpose", effect=Effect.LAYOUT,
         read=lambda b: Op("transpose", (b["input"],), dict(dims=(b["dim0"], b["dim1"])))),
    Function(torch.permute, "input, dims", kind="permute", read=_permute, effect=Effect.LAYOUT),
    Method("permute", "input, *dims", kind="permute", read=_permute, effect=Effect.LAYOUT),
    Aten(aten.permute.default, kind="permute", effect=Effect.LAYOUT, read=_permute),
)
"""Axis moves: ``torch.movedim``, ``x.movedim(a, b)`` (``x.moveaxis``), ``torch.transpose``,
``x.transpose(a, b)``, ``torch.permute``, ``x.permute(...)``, ``aten.transpose``,
``aten.permute`` (torch.export writes a movedim as a permute)."""


def _mean(b: dict) -> Op | None:
    if b.get("dtype") is not None:
        return None
    dims = b["dim"]
    return Op("mean", (b["input"],), dict(dims=(dims,) if isinstance(dims, int) else
                                          tuple(dims), keepdim=bool(b["keepdim"])))


def _adaptive(nd: int):
    def read(b: dict) -> Op | None:
        size = _tuple(b["output_size"], nd)
        if any(s != 1 for s in size):
            return None  # only a global average: every window's weights then sum to one
        return Op("mean", (b["input"],), dict(dims=tuple(range(2, 2 + nd)), keepdim=True))

    return read


def _adaptive_module(m: nn.Module, node: fx.Node) -> Op | None:
    nd = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}[type(m)]
    x = node.args[0] if node.args else node.kwargs.get("input")
    return _adaptive(nd)({"input": x, "output_size": m.output_size})


MEAN = (
    Function(torch.mean, "input, dim, keepdim=False, dtype=None", kind="mean", read=_mean,
             effect=Effect.LAYOUT, cost=lambda op, node, t: per_sample(op.inputs[0])),
    Method("mean", "input, dim, keepdim=False, dtype=None", kind="mean", read=_mean,
           effect=Effect.LAYOUT, cost=lambda op, node, t: per_sample(op.inputs[0])),
    Aten(aten.mean.dim, kind="mean", effect=Effect.LAYOUT,
         read=lambda b: _mean({"input": b["input"], "dim": b["dim"], "keepdim": b["keepdim"],
                               "dtype": b.get("dtype")}),
         cost=lambda op, node, t: per_sample(op.inputs[0])),
    Module((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), kind="mean",
           read=_adaptive_module, effect=Effect.LAYOUT,
           cost=lambda op, node, t: per_sample(op.inputs[0])),
    *(Function(f, "input, output_size", kind="mean", read=_adaptive(nd), effect=Effect.LAYOUT,
               cost=lambda op, node, t: per_sample(op.inputs[0]))
      for f, nd in ((F.adaptive_avg_pool1d, 1), (F.adaptive_avg_pool2d, 2),
                    (F.adaptive_avg_pool3d, 3))),
)
"""Averages over positions: ``x.mean(dims)``, ``torch.mean``, ``aten.mean.dim`` and global
average pools (``nn.AdaptiveAvgPool*d(1)``, ``F.adaptive_avg_pool*d(x, 1)``)."""


def input_shape(op: Op):
    """The traced shape of an op's first data operand."""
    return shape_of(op.inputs[0]) if op.inputs else None


__all__ = ["ADD", "AVG_POOL", "BATCH_NORM", "CAT", "CONV", "DIV", "FLATTEN", "IDENTITY",
           "LINEAR", "MEAN", "MUL", "NEG", "PAD", "RESHAPE", "SUB", "TRANSPOSE"]
