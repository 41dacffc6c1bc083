"""Moving a BN forward to the linear layer it can fold into.

An eval-mode BN is a per-channel affine map ``y = s * x + t``. It commutes with every op that
moves or averages elements without mixing channels: a transpose, permute, flatten or reshape
that keeps the channel axis whole, and an average over positions whose weights sum to one
(adaptive average pooling, an unpadded average pool, ``mean`` over non-channel axes). So::

    bn(x).flatten(2).transpose(1, 2) -> Linear
        ==  (x.flatten(2).transpose(1, 2) * s + t) -> Linear

exactly, and the right-hand side folds into the Linear (FastViT's attention ``norm``, NextViT's
token ``norm`` after its average pool, a final ``norm -> global pool -> head``). The pass below
rewrites the graph that way before folding, only where the chain ends at linear layers on the
channel axis, so that the moved map is sure to fold; the scale and shift keep their float64
values for the fold (``node.meta["reparam_exact"]``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

import torch
from torch import fx, nn

from .kernel import bn_scale_shift
from .ops import Op, describe, dtype_of, shape_of, tensor_of

_LAYOUT_METHODS = {"transpose", "permute", "flatten", "reshape", "view", "contiguous"}
_LAYOUT_FUNCTIONS = {torch.transpose, torch.permute, torch.flatten, torch.reshape}
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ADAPTIVE_FUNCTIONS = {torch.nn.functional.adaptive_avg_pool1d,
                       torch.nn.functional.adaptive_avg_pool2d,
                       torch.nn.functional.adaptive_avg_pool3d}
NEEDED_RULES = ("scale_shift", "conv", "bn_conv")  # what folds the moved map into the Linear


def is_shape_query(node: fx.Node) -> bool:
    """``x.shape``, ``x.size(...)``, ``x.dim()``, ``x.ndim``: read the layout, not the data."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "ndimension")
    return (node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[1] in ("shape", "ndim"))


def _data_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_shape_query(u)]


def _axis_after(node: fx.Node, x: fx.Node, axis: int, modules: Mapping[str, nn.Module]
                ) -> int | None:
    """Where the channel axis ``axis`` of ``x`` is in ``node``'s output, if ``node`` commutes
    with a per-channel affine map on that axis; else ``None``."""
    before, after = shape_of(x), shape_of(node)
    if before is None or after is None or not node.args or node.args[0] is not x:
        return None
    if any(isinstance(a, fx.Node) and a is x for a in (*node.args[1:], *node.kwargs.values())):
        return None
    rank = len(before)
    name = (str(node.target) if node.op == "call_method"
            else getattr(node.target, "__name__", "") if node.op == "call_function" else "")
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if isinstance(m, nn.Flatten):
            whole = m.start_dim % rank >= 1
            return _reshaped_axis(before, after, axis) if whole else None
        if isinstance(m, _ADAPTIVE) and not getattr(m, "_forward_hooks", None):
            return axis if axis == 1 and len(after) == rank else None
    if node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS:
        return axis if axis == 1 and len(after) == rank else None
    op = describe(node, modules)
    if op is not None and op.kind == "avg_pool":  # every window's weights sum to one
        a = op.attrs
        whole = (not any(a["padding"]) and not a["ceil_mode"]
                 and a.get("divisor_override") is None)
        return axis if whole and axis == 1 and len(after) == rank else None
    layout = (node.op == "call_method" and name in _LAYOUT_METHODS) or (
        node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS)
    if layout and name in ("transpose",):
        dims = [node.args[1] if len(node.args) > 1 else node.kwargs.get("dim0"),
                node.args[2] if len(node.args) > 2 else node.kwargs.get("dim1")]
        if not all(isinstance(d, int) for d in dims):
            return None
        d0, d1 = (d % rank for d in dims)
        if 0 in (d0, d1):
            return None  # the batch axis stays first
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if layout and name == "permute":
        dims = node.args[1:] if node.op == "call_method" else node.args[1]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if not all(isinstance(d, int) for d in dims) or len(dims) != rank:
            return None
        order = [d % rank for d in dims]
        return order.index(axis) if order[0] == 0 and sorted(order) == list(range(rank)) else None
    if layout:  # flatten, reshape, view, contiguous: elements keep their row-major order
        return _reshaped_axis(before, after, axis) if _keeps_batch(node, name, rank) else None
    if node.op == "call_method" and name == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
            return None
        dims = {d % rank for d in dims}
        if axis in dims or 0 in dims or node.kwargs.get("dtype") is not None:
            return None
        return axis if keep else axis - sum(1 for d in dims if d < axis)
    return None


def _keeps_batch(node: fx.Node, name: str, rank: int) -> bool:
    """Whether a flatten or reshape leaves the batch axis alone for *any* batch size: shapes are
    traced on one sample, where ``x.reshape(1, c, -1)`` looks as harmless as
    ``x.reshape(b, c, -1)``. A reshape's first size must come from the input at run time or be
    -1 (then the other sizes fix one sample's layout)."""
    if name == "contiguous":
        return True
    if name == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return isinstance(start, int) and start % rank >= 1
    sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if node.op == "call_function":
        sizes = sizes or (node.kwargs.get("shape"),)
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    if not sizes:
        return False
    first = sizes[0]
    return isinstance(first, fx.Node) or first == -1


def _reshaped_axis(before, after, axis: int) -> int | None:
    """The axis of ``after`` that holds ``before``'s axis ``axis`` whole under a row-major
    reshape: the same size with the same number of elements in front of it, counted after the
    batch axis, which must stay first and whole (shapes are traced on one sample, so a reshape
    that merged the batch axis into others would look harmless)."""
    if len(after) < 2 or after[0] != before[0] or axis < 1:
        return None
    front = math.prod(before[1:axis])
    for j in range(1, len(after)):
        if after[j] == before[axis] and math.prod(after[1:j]) == front:
            return j
    return None


def _bn_affine(op: Op, gm: fx.GraphModule) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(s, t)`` of an eval-mode BN in float64, or ``None`` if its statistics are not known."""
    a = op.attrs
    mean, var = tensor_of(gm, a["mean"]), tensor_of(gm, a["var"])
    gamma, beta = tensor_of(gm, a["weight"]), tensor_of(gm, a["bias"])
    if (a.get("training") or mean is None or var is None or not isinstance(a["eps"], (int, float))
            or (gamma is None) != (a["weight"] is None) or (beta is None) != (a["bias"] is None)):
        return None

    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().double()

    return bn_scale_shift(f64(mean), f64(var), f64(gamma), f64(beta), a["eps"])


def push_affine(gm: fx.GraphModule, enabled: set[str], mutated: set[fx.Node]) -> list[str]:
    """Move each eval-mode BN whose output reaches only linear layers on the channel axis,
    through ops it commutes with, to just before them (see the module docstring). Returns the
    names of the buffers it added (the moved scales and shifts).

    BNs are taken last first, so that a BN whose path meets another BN that has already been
    moved (NextViT: ``norm1`` reaches ``k, v`` through a pool and the pool's own ``norm``) composes
    with it there: two per-channel affine maps on the same channels are one."""
    if not all(name in enabled for name in (*NEEDED_RULES, "conv_bn")):
        return []
    modules = dict(gm.named_modules())
    added: list[str] = []
    for bn in reversed(list(gm.graph.nodes)):
        op = describe(bn, modules)
        if op is None or op.kind != "batch_norm" or not isinstance(op.inputs[0], fx.Node):
            continue
        x = op.inputs[0]
        shape = shape_of(x)
        if (shape is None or len(shape) < 2 or shape != shape_of(bn) or bn in mutated
                or x in mutated):  # the moved ops read x later: no in-place write may come between
            continue
        ends = _follow(bn, 1, modules, mutated, 0)
        if not ends:
            continue
        affine = _bn_affine(op, gm)
        if affine is None:
            continue
        added += _rewrite(gm, bn, x, ends, affine)
    if added:
        gm.graph.lint()
    return added


def _follow(node: fx.Node, axis: int, modules: Mapping[str, nn.Module], mutated: set[fx.Node],
            depth: int) -> list[tuple[fx.Node, list[fx.Node]]] | None:
    """Every path from ``node`` (channels on ``axis``) through commuting ops to linear layers on
    the channel axis or to an already moved BN: ``[(last op of a path, its consumers)]``, or
    ``None`` when some path ends anywhere else."""
    users = _data_users(node)
    out = shape_of(node)
    if not users or out is None or depth > 64:
        return None
    ends, consumers = [], []
    for u in users:
        if u in mutated:
            return None
        if axis == len(out) - 1 and (_is_linear_on(u, node, modules) or _moved_scale(u, node)):
            consumers.append(u)
            continue
        nxt = _axis_after(u, node, axis, modules)
        sub = None if nxt is None else _follow(u, nxt, modules, mutated, depth + 1)
        if sub is None:
            return None
        ends += sub
    if consumers and not depth:
        return None  # a linear layer right after the BN: the fold rules take that in place
    if consumers:
        ends.append((node, consumers))
    return ends


def _moved_scale(node: fx.Node, x: fx.Node) -> bool:
    """``node`` is the scale of a BN this pass moved earlier, reading ``x``."""
    return (node.op == "call_function" and node.target is operator.mul and node.args[0] is x
            and node.meta.get("reparam_moved") == "scale")


def _is_linear_on(node: fx.Node, x: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    op = describe(node, modules)
    if op is None or op.kind != "linear" or op.inputs[0] is not x:
        return False
    weight = op.attrs["weight"]
    return isinstance(weight, torch.Tensor) or (isinstance(weight, fx.Node)
                                                and weight.op == "get_attr")


def _rewrite(gm: fx.GraphModule, bn: fx.Node, x: fx.Node,
             ends: list[tuple[fx.Node, list[fx.Node]]],
             affine: tuple[torch.Tensor, torch.Tensor]) -> list[str]:
    """Read ``x`` where ``bn`` was read; apply ``s * . + t`` at the end of every path: a new
    scale and shift before its linear layers, composed into a moved BN's own."""
    graph = gm.graph
    s, t = affine
    for user in list(bn.users):  # the first ops of the paths and shape queries: read x instead
        user.replace_input_with(bn, x)
    graph.erase_node(bn)
    added: list[str] = []
    for end, consumers in ends:
        linear = [u for u in consumers if not _moved_scale(u, end)]
        for scale in (u for u in consumers if _moved_scale(u, end)):
            shift = next(iter(scale.users))  # s2 * (s * z + t) + t2 = (s2 s) z + (s2 t + t2)
            s2, t2 = (_exact(gm, n.args[1]) for n in (scale, shift))
            new_scale, new_shift = s2 * s, s2 * t + t2  # both from the old values
            _set_exact(gm, scale.args[1], new_scale)
            _set_exact(gm, shift.args[1], new_shift)
        if linear:
            added += _insert(gm, bn.name, end, linear, affine)
    return added


def _exact(gm: fx.GraphModule, const: fx.Node) -> torch.Tensor:
    return const.meta["reparam_exact"]


def _set_exact(gm: fx.GraphModule, const: fx.Node, value: torch.Tensor) -> None:
    const.meta["reparam_exact"] = value
    name = str(const.target)
    gm.register_buffer(name, value.to(getattr(gm, name).dtype).clone())  # a new tensor


def _insert(gm: fx.GraphModule, label: str, end: fx.Node, consumers: list[fx.Node],
            affine: tuple[torch.Tensor, torch.Tensor]) -> list[str]:
    """``end * s + t`` as two nodes after ``end``, read by ``consumers`` instead of ``end``."""
    graph = gm.graph
    dtype = dtype_of(end) or torch.float32
    names = []
    for role, value in zip(("scale", "shift"), affine, strict=True):
        name = _free_name(gm, f"{label}_moved_{role}")
        gm.register_buffer(name, value.to(dtype).clone())  # never the float64 value itself
        names.append((name, value))
    prev = end
    for (name, value), fn, role, node_name in zip(
            names, (operator.mul, operator.add), ("scale", "shift"),
            (f"{label}_scaled", f"{label}_moved"), strict=True):
        with graph.inserting_after(prev):
            const = graph.get_attr(name)
        const.meta["reparam_exact"] = value
        with graph.inserting_after(const):  # named after the BN, for the report
            prev = graph.create_node("call_function", fn, (prev, const), name=node_name)
        prev.meta = {k: v for k, v in end.meta.items() if k in ("tensor_meta", "val")}
        prev.meta["reparam_moved"] = role
    for user in consumers:
        user.replace_input_with(end, prev)
    return [name for name, _ in names]


def _free_name(gm: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name
