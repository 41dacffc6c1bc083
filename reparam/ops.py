"""Reading fx nodes: one normalized :class:`Op` per linear op, whatever form it was written in.

A conv arrives as ``call_module`` (an ``nn.Conv2d``) or as ``call_function`` (``F.conv2d(x,
self.w)`` on ``get_attr`` tensors); a BN as a module or as ``F.batch_norm`` inside a third-party
norm+activation module; a sum as ``operator.add``, ``torch.add`` or ``x.add(y)``. :func:`describe`
maps all of them to the same :class:`Op`, so rules never look at how the model was written.
Parameters stay as they were found (tensors, or nodes that name constants); rules resolve them.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn


@dataclass(frozen=True)
class Op:
    """A linear op, normalized. ``inputs`` are the data operands (nodes or constants)."""

    kind: str
    inputs: tuple[Any, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    param_owner: str | None = None  # module path the op's parameters come from (for names)


def _tuple(value: Any, nd: int) -> Any:
    """A geometry argument (stride, padding, kernel size...) per axis; a ``TypeError`` when it is
    not a static int (a size computed at run time: the op is then not read as linear)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * nd
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise TypeError(f"geometry {value!r} is not static")
    return out


# --- modules ---------------------------------------------------------------------------------

_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_T_MODULES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# a subclass that overrides forward computes something else (e.g. BN + activation): opaque
_BN_FORWARDS = {nn.BatchNorm1d.forward, nn.BatchNorm2d.forward, nn.BatchNorm3d.forward,
                nn.SyncBatchNorm.forward}
_AVG_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout)
_PAD_MODULES = {
    nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ZeroPad3d: "constant",
    nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant",
    nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
    nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate",
    nn.ReplicationPad3d: "replicate", nn.CircularPad1d: "circular",
    nn.CircularPad2d: "circular", nn.CircularPad3d: "circular",
}


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _forward_replaced(m: nn.Module) -> bool:
    """``m.forward`` set on the instance (accelerate-style hooks): it computes something else."""
    return "forward" in vars(m)


def why_kept(node: fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    """Why a module reparam would otherwise fold is kept as it is (``None`` if it is not)."""
    if node.op != "call_module":
        return None
    m = modules.get(str(node.target))
    if m is None:
        return None
    if _has_hooks(m):
        return f"{type(m).__name__} has a forward hook, which may change what it computes"
    if _forward_replaced(m):
        return (f"{type(m).__name__}'s forward is replaced on the instance, so it may compute "
                "something else than its class says")
    if isinstance(m, _IDENTITY_MODULES) and m.training and not isinstance(m, nn.Identity):
        return f"{type(m).__name__} is in training mode (call model.eval() to fold through it)"
    return None


def _module_op(node: fx.Node, m: nn.Module) -> Op | None:
    if _has_hooks(m) or _forward_replaced(m):
        return None  # a hook may change what the module computes: keep it as it is
    x = node.args[0] if node.args else node.kwargs.get("input")
    owner = str(node.target)
    kind = type(m)
    if kind in _CONV_MODULES or kind in _CONV_T_MODULES:
        transposed = kind in _CONV_T_MODULES
        nd = _CONV_T_MODULES[kind] if transposed else _CONV_MODULES[kind]
        attrs = dict(weight=m.weight, bias=m.bias, stride=m.stride, padding=m.padding,
                     dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode, nd=nd,
                     transposed=transposed, output_padding=getattr(m, "output_padding", ()))
        if transposed and (len(node.args) > 1 or node.kwargs):
            return None  # an explicit output_size changes the geometry per call
        return Op("conv", (x,), attrs, owner)
    if kind is nn.Linear:
        return Op("linear", (x,), dict(weight=m.weight, bias=m.bias), owner)
    if isinstance(m, _BN_MODULES) and type(m).forward in _BN_FORWARDS:
        attrs = dict(mean=m.running_mean, var=m.running_var, weight=m.weight, bias=m.bias,
                     eps=m.eps, training=m.training or m.running_mean is None)
        return Op("batch_norm", (x,), attrs, owner)
    if kind in _AVG_MODULES:
        nd = _AVG_MODULES[kind]
        stride = m.stride if m.stride is not None else m.kernel_size
        attrs = dict(kernel_size=_tuple(m.kernel_size, nd), stride=_tuple(stride, nd),
                     padding=_tuple(m.padding, nd), ceil_mode=m.ceil_mode,
                     count_include_pad=m.count_include_pad,
                     divisor_override=getattr(m, "divisor_override", None), nd=nd)
        return Op("avg_pool", (x,), attrs, owner)
    if isinstance(m, _IDENTITY_MODULES):
        return None if m.training and not isinstance(m, nn.Identity) else Op(
            "identity", (x,), {}, owner)
    if kind is nn.Flatten:
        return Op("flatten", (x,), dict(start_dim=m.start_dim, end_dim=m.end_dim), owner)
    if kind in _PAD_MODULES:
        value = getattr(m, "value", 0.0)
        return Op("pad", (x,), dict(pad=tuple(m.padding), mode=_PAD_MODULES[kind], value=value))
    return None


# --- functions and methods -------------------------------------------------------------------

def _bind(signature: tuple[tuple[str, Any], ...], args: tuple, kwargs: Mapping) -> dict:
    """Bind call arguments to a ``((name, default), ...)`` signature."""
    bound = {name: default for name, default in signature}
    for (name, _), value in zip(signature, args, strict=False):
        bound[name] = value
    bound.update({k: v for k, v in kwargs.items() if k in bound})
    return bound


_REQUIRED = inspect.Parameter.empty
_CONV_SIG = (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None), ("stride", 1),
             ("padding", 0), ("dilation", 1), ("groups", 1))
_CONV_T_SIG = (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None), ("stride", 1),
               ("padding", 0), ("output_padding", 0), ("groups", 1), ("dilation", 1))
_AVG_SIG = (("input", _REQUIRED), ("kernel_size", _REQUIRED), ("stride", None), ("padding", 0),
            ("ceil_mode", False), ("count_include_pad", True), ("divisor_override", None))


def _conv_fn(nd: int, transposed: bool) -> Callable[[dict], Op]:
    def read(b: dict) -> Op:
        attrs = dict(weight=b["weight"], bias=b["bias"], stride=_tuple(b["stride"], nd),
                     padding=_tuple(b["padding"], nd), dilation=_tuple(b["dilation"], nd),
                     groups=b["groups"], padding_mode="zeros", nd=nd, transposed=transposed,
                     output_padding=_tuple(b.get("output_padding", 0), nd))
        return Op("conv", (b["input"],), attrs)

    return read


def _avg_fn(nd: int) -> Callable[[dict], Op]:
    def read(b: dict) -> Op:
        stride = b["stride"] if b["stride"] not in (None, [], ()) else b["kernel_size"]
        attrs = dict(kernel_size=_tuple(b["kernel_size"], nd), stride=_tuple(stride, nd),
                     padding=_tuple(b["padding"], nd), ceil_mode=b["ceil_mode"],
                     count_include_pad=b["count_include_pad"],
                     divisor_override=b["divisor_override"], nd=nd)
        return Op("avg_pool", (b["input"],), attrs)

    return read


def _batch_norm_fn(b: dict) -> Op:
    attrs = dict(mean=b["running_mean"], var=b["running_var"], weight=b["weight"],
                 bias=b["bias"], eps=b["eps"],
                 training=bool(b["training"]) or b["running_mean"] is None)
    return Op("batch_norm", (b["input"],), attrs)


def _binary(kind: str) -> Callable[[dict], Op]:
    def read(b: dict) -> Op:
        attrs = {"alpha": b.get("alpha", 1)}
        return Op(kind, (b["input"], b["other"]), attrs)

    return read


def _pad_fn(b: dict) -> Op:
    return Op("pad", (b["input"],), dict(pad=b["pad"], mode=b["mode"] or "constant",
                                         value=b["value"] or 0.0))


def _cat_fn(b: dict) -> Op:
    return Op("cat", tuple(b["tensors"]), dict(dim=b["dim"]))


_BINARY_SIG = (("input", _REQUIRED), ("other", _REQUIRED), ("alpha", 1))
_FUNCTIONS: dict[Any, tuple[tuple, Callable[[dict], Op]]] = {
    F.conv1d: (_CONV_SIG, _conv_fn(1, False)),
    F.conv2d: (_CONV_SIG, _conv_fn(2, False)),
    F.conv3d: (_CONV_SIG, _conv_fn(3, False)),
    F.conv_transpose1d: (_CONV_T_SIG, _conv_fn(1, True)),
    F.conv_transpose2d: (_CONV_T_SIG, _conv_fn(2, True)),
    F.conv_transpose3d: (_CONV_T_SIG, _conv_fn(3, True)),
    F.linear: ((("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None)),
               lambda b: Op("linear", (b["input"],), dict(weight=b["weight"], bias=b["bias"]))),
    F.batch_norm: ((("input", _REQUIRED), ("running_mean", _REQUIRED),
                    ("running_var", _REQUIRED), ("weight", None), ("bias", None),
                    ("training", False), ("momentum", 0.1), ("eps", 1e-5)), _batch_norm_fn),
    F.avg_pool1d: (_AVG_SIG, _avg_fn(1)),
    F.avg_pool2d: (_AVG_SIG, _avg_fn(2)),
    F.avg_pool3d: (_AVG_SIG, _avg_fn(3)),
    F.pad: ((("input", _REQUIRED), ("pad", _REQUIRED), ("mode", "constant"), ("value", None)),
            _pad_fn),
    torch.cat: ((("tensors", _REQUIRED), ("dim", 0)), _cat_fn),
    torch.concat: ((("tensors", _REQUIRED), ("dim", 0)), _cat_fn),
    operator.add: (_BINARY_SIG, _binary("add")),
    torch.add: (_BINARY_SIG, _binary("add")),
    operator.sub: (_BINARY_SIG, _binary("sub")),
    torch.sub: (_BINARY_SIG, _binary("sub")),
    operator.mul: (_BINARY_SIG, _binary("mul")),
    torch.mul: (_BINARY_SIG, _binary("mul")),
    operator.truediv: (_BINARY_SIG, _binary("div")),
    torch.div: ((("input", _REQUIRED), ("other", _REQUIRED), ("rounding_mode", None)),
                lambda b: Op("div", (b["input"], b["other"]), {})
                if b["rounding_mode"] is None else None),
    operator.neg: ((("input", _REQUIRED),), lambda b: Op("neg", (b["input"],))),
    torch.neg: ((("input", _REQUIRED),), lambda b: Op("neg", (b["input"],))),
    operator.pos: ((("input", _REQUIRED),), lambda b: Op("identity", (b["input"],))),
    F.dropout: ((("input", _REQUIRED), ("p", 0.5), ("training", True), ("inplace", False)),
                lambda b: None if b["training"] or b["inplace"]
                else Op("identity", (b["input"],))),
}
def _flatten_fn(b: dict) -> Op:
    return Op("flatten", (b["input"],), dict(start_dim=b["start_dim"], end_dim=b["end_dim"]))


_FLATTEN_SIG = (("input", _REQUIRED), ("start_dim", 0), ("end_dim", -1))
_FUNCTIONS[torch.flatten] = (_FLATTEN_SIG, _flatten_fn)
_FUNCTIONS[torch.reshape] = ((("input", _REQUIRED), ("shape", _REQUIRED)),
                             lambda b: Op("reshape", (b["input"],), dict(shape=b["shape"])))

_METHODS: dict[str, tuple[tuple, Callable[[dict], Op | None]]] = {
    "add": (_BINARY_SIG, _binary("add")),
    "sub": (_BINARY_SIG, _binary("sub")),
    "mul": (_BINARY_SIG, _binary("mul")),
    "div": ((("input", _REQUIRED), ("other", _REQUIRED), ("rounding_mode", None)),
            lambda b: Op("div", (b["input"], b["other"])) if b["rounding_mode"] is None
            else None),
    "neg": ((("input", _REQUIRED),), lambda b: Op("neg", (b["input"],))),
    "contiguous": ((("input", _REQUIRED),), lambda b: Op("identity", (b["input"],))),
    "clone": ((("input", _REQUIRED),), lambda b: Op("identity", (b["input"],))),
    "flatten": (_FLATTEN_SIG, _flatten_fn),
    "reshape_as": ((("input", _REQUIRED), ("other", _REQUIRED)),
                   lambda b: Op("reshape", (b["input"],), dict(like=b["other"]))),
    "view_as": ((("input", _REQUIRED), ("other", _REQUIRED)),
                lambda b: Op("reshape", (b["input"],), dict(like=b["other"]))),
}
# x.reshape(a, b, c) / x.view(a, b, c): the shape is given as varargs
_VARARG_SHAPE = ("reshape", "view")


def describe(node: fx.Node, modules: Mapping[str, nn.Module]) -> Op | None:
    """The linear op ``node`` performs, or ``None`` when it is not one reparam knows (or its
    arguments cannot be read: a pooling size computed at run time, ``kernel_size=x.size(3)``)."""
    try:
        return _describe(node, modules)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        return None


def _describe(node: fx.Node, modules: Mapping[str, nn.Module]) -> Op | None:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return None if module is None else _module_op(node, module)
    if node.op == "call_function":
        entry = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        if node.target in _VARARG_SHAPE and node.args:
            return Op("reshape", (node.args[0],), dict(shape=tuple(node.args[1:])))
        entry = _METHODS.get(str(node.target))
    else:
        return None
    if entry is None:
        return None
    signature, read = entry
    bound = _bind(signature, node.args, node.kwargs)
    if any(v is _REQUIRED for v in bound.values()):
        return None
    return read(bound)


def mutated_input(node: fx.Node, modules: Mapping[str, nn.Module]) -> fx.Node | None:
    """The node whose tensor ``node`` modifies in place (``x.relu_()``, ``ReLU(inplace=True)``)."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.endswith("__"):
            return first
    elif node.op == "call_function":
        if node.kwargs.get("inplace") is True:
            return first
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__") or name.startswith("__i"):
            return first
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return first
    elif node.op == "call_module":
        module = modules.get(str(node.target))
        if module is not None and getattr(module, "inplace", False) is True:
            return first
    return None


_VIEW_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "expand", "expand_as",
                 "squeeze", "unsqueeze", "narrow", "select", "t", "as_strided", "view_as",
                 "reshape_as", "contiguous", "detach", "unflatten", "movedim", "split", "chunk",
                 "unbind", "diagonal", "real", "imag", "__getitem__", "type_as", "to", "float",
                 "double", "half", "bfloat16", "data"}
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.permute,
                   torch.transpose, torch.squeeze, torch.unsqueeze, torch.narrow, torch.select,
                   torch.split, torch.chunk, torch.unbind, torch.movedim, torch.t, torch.detach}


def may_alias(node: fx.Node, modules: Mapping[str, nn.Module]) -> fx.Node | None:
    """The input whose storage ``node``'s output may share (views, identities, in-place ops)."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if mutated_input(node, modules) is not None:
        return first
    op = describe(node, modules)
    if op is not None:
        return first if op.kind in ("identity", "flatten", "reshape") else None
    if node.op == "call_method" and str(node.target) in _VIEW_METHODS:
        return first
    if node.op == "call_function" and node.target in _VIEW_FUNCTIONS:
        return first
    return None


def shape_of(node: Any) -> torch.Size | None:
    """The traced output shape of ``node`` (from shape propagation), if known."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.shape
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def dtype_of(node: Any) -> torch.dtype | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


def fetch(gm: nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target`` of ``gm`` (a ``get_attr`` node's target)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def tensor_of(gm: nn.Module, arg: Any) -> torch.Tensor | None:
    """An op attribute as a tensor: itself, or what its ``get_attr`` node reads; else ``None``."""
    if isinstance(arg, torch.Tensor):
        return arg
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = fetch(gm, str(arg.target))
        return value if isinstance(value, torch.Tensor) else None
    return None
