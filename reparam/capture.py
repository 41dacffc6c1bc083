"""The second capture path: torch.export, for a module torch.fx cannot trace symbolically.

torch.fx runs ``forward`` on proxies, so slice assignment, Python arithmetic on sizes, iteration
over chunks and ``x.get_device()`` stop it. torch.export (non-strict) runs ``forward`` on fake
copies of the inputs the module really receives and records what ran as aten ops;
``run_decompositions({})`` makes them functional (a slice assignment becomes ``slice_scatter``,
``+=`` an ``add``) and decomposes nothing else, so convs, BNs and pads stay whole.

What a capture is valid for is stated in its graph: the first node checks the inputs against what
the export specialized (each size fixed, or symbolic within its range; the dtype; the device, which
``get_device()`` branches on), and raises :class:`~reparam.errors.GuardError` where the graph would
not compute what the module computes. The capture is run once on the real inputs and compared with
the module's own output before it is used.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import math
import operator
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import GuardError, TraceError
from .functional import pad_filled
from .observe import CallerTensorWritten
from .progress import tick
from .trace import clone_inputs, light_copy

aten = torch.ops.aten
_DEBUG = False
_KEPT_META = ("nn_module_stack", "stack_trace")
_DERIVED = re.compile(r"[0-9a-z_\s*+\-()]+")  # sizes derived by arithmetic on symbols only


# --- the guard ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    """What one captured input must be: dtype, device type, and per axis a size (fixed) or a
    ``(symbol, low, high)`` range (symbolic: one symbol names one size wherever it appears)."""

    dtype: str
    device: str
    sizes: tuple[int | tuple[str, int, float], ...]


@torch.fx.node.has_side_effect
def check_inputs(specs: tuple, guards: tuple[str, ...], names: tuple[str, ...], args: tuple,
                 *tensors: torch.Tensor) -> None:
    """Raise :class:`GuardError` unless the inputs are what the capture is valid for: each
    tensor as ``specs`` says (see :class:`InputSpec`), and each of torch.export's ``guards`` on
    the arguments (Python expressions such as ``L['x'].size()[2] % 2 == 0``) true.

    Called on proxies (a folded model traced with torch.fx: by ``torch.load``, which rebuilds a
    pickled graph module that way, or by the caller), it records itself as a node instead, so
    that the traced model keeps its guard."""
    proxy = next((t for t in (*args, *tensors) if isinstance(t, fx.Proxy)), None)
    if proxy is not None:
        return proxy.tracer.create_proxy("call_function", check_inputs,
                                         (specs, guards, names, args, *tensors), {})
    symbols: dict[str, int] = {}
    derived: list[tuple[str, int, int, str]] = []
    for i, (spec, t) in enumerate(zip(specs, tensors, strict=True)):
        dtype, device, sizes = spec
        where = f"input {i}"
        if not isinstance(t, torch.Tensor):
            raise GuardError(f"{where} is a {type(t).__name__}, the capture took a tensor")
        if str(t.dtype) != dtype or t.device.type != device:
            raise GuardError(
                f"{where} is {str(t.dtype).removeprefix('torch.')} on {t.device.type}; this part "
                f"was captured with torch.export for {dtype.removeprefix('torch.')} on {device} "
                "(its code branches on them): fold the model again as you deploy it (after "
                ".to(device, dtype))")
        if t.dim() != len(sizes):
            raise GuardError(f"{where} has {t.dim()} dimensions, the capture took {len(sizes)}")
        for axis, (got, want) in enumerate(zip(t.shape, sizes, strict=True)):
            if isinstance(want, int):
                ok, what = got == want, f"{want}"
            elif want[0] == "=":
                derived.append((where, axis, got, want[1]))
                continue
            else:
                name, low, high = want
                seen = symbols.setdefault(name, got)
                ok = seen == got and low <= got <= high
                what = f"in [{low}, {high}]" + (f" and equal to {seen}" if seen != got else "")
            if not ok:
                raise GuardError(
                    f"{where} has size {got} on axis {axis}; this part was captured with "
                    f"torch.export for a size {what} there (its code depends on it): fold the "
                    "model again with example_inputs of the size you deploy")
    for where, axis, got, expr in derived:  # sizes that are a function of the others
        try:
            want = eval(expr, {"__builtins__": {}}, dict(symbols))  # noqa: S307 - _DERIVED
        except NameError:
            want = None
        if want != got:
            raise GuardError(
                f"{where} has size {got} on axis {axis}; this part was captured with "
                f"torch.export for a size {expr} there ({want} for the other inputs' sizes): "
                "run it on inputs whose sizes keep that relation")
    if guards:
        scope = {"L": dict(zip(names, args, strict=False)), **_guard_namespace()}
        for code in guards:
            if not eval(_compiled(code), scope):  # noqa: S307 - torch.export's own guard code
                raise GuardError(
                    f"the inputs fail the guard {code!r} that torch.export recorded when it "
                    "captured this part (its code depends on it): fold the model again with "
                    "example_inputs of the size you deploy")


@functools.cache
def _compiled(code: str):
    return compile(code, "<torch.export guard>", "eval")


class Reload(fx.Tracer):
    """The tracer ``torch.load`` rebuilds a pickled folded graph module with: torch.fx traces
    the module's generated code again, and an aten overload called with a size list that holds
    a proxy (symbolic sizes, as in ``aten.full([1, h * w])``) would fail in torch's argument
    parser. Here every aten call on proxies is recorded as the node it was."""

    def trace(self, root, concrete_args=None):
        call = torch._ops.OpOverload.__call__
        tracer = self

        def record(op, /, *args, **kwargs):
            if any(isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs))):
                return tracer.create_proxy("call_function", op, args, kwargs)
            return call(op, *args, **kwargs)

        torch._ops.OpOverload.__call__ = record
        try:
            return super().trace(root, concrete_args)
        finally:
            torch._ops.OpOverload.__call__ = call


def mark_reload(graph: fx.Graph) -> None:
    """Name :class:`Reload` as the tracer that rebuilds ``graph`` from its code, where it holds
    a captured part (aten ops); a plain folded graph keeps torch's own, so its pickle does not
    name reparam."""
    if any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
           for n in graph.nodes):
        graph._tracer_cls = Reload


@functools.cache
def _guard_namespace() -> dict:
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    return {**SYMPY_INTERP, "math": math, "inf": float("inf")}


# --- capture ------------------------------------------------------------------------------------

def capture(module: nn.Module, args: tuple, name: str | None = None):
    """Capture ``module`` on ``args`` (tensors, or lists / tuples / dicts of tensors) with
    torch.export: a :class:`reparam.trace.Traced` whose graph computes the module's forward,
    guarded as the module docstring says, with symbolic sizes where export allows them (else
    the sizes of ``args``). Raises :class:`TraceError` when it cannot be captured."""
    _check_args(module, args)
    tick("capturing")
    start = time.perf_counter()
    errors = []
    for dynamic in (True, False):
        try:
            ep = _export(light_copy(module), args, dynamic)
            traced = from_program(module, ep, dynamic, name or type(module).__name__)
            _check_faithful(module, traced.root, traced.graph, args)
        except CallerTensorWritten:
            raise
        except TraceError as e:
            errors.append(str(e))
            if _DEBUG:
                raise
            continue
        except Exception as e:  # noqa: BLE001 - export fails in many ways on user code
            if _DEBUG:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            first = first.split(" (unhinted")[0][:240]  # sympy's repeat of the expression
            errors.append(f"{type(e).__name__}: {first}" if first else type(e).__name__)
            continue
        traced.how = (f"captured with torch.export ({'symbolic' if dynamic else 'fixed'} "
                      f"sizes, {time.perf_counter() - start:.1f} s)")
        return traced
    raise TraceError(f"torch.export cannot capture {type(module).__name__} ({errors[-1]})")


def from_program(module: nn.Module, ep: torch.export.ExportedProgram, dynamic: bool,
                 name: str):
    """The graph of an exported program as reparam folds it: plain placeholders named after
    ``module.forward``'s arguments, the guard (:func:`check_inputs`), each eval-mode BN one
    ``F.batch_norm`` node, pad-and-border writes one :func:`~reparam.functional.pad_filled`."""
    from .trace import Traced

    root, graph = _graph(module, ep, dynamic)
    _whole_batch_norms(graph)
    _fill_borders(graph)
    graph.eliminate_dead_code()
    for node in graph.nodes:  # the fake values go: the observed run records real ones
        node.meta = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
    return Traced(root, graph, name, [], "an ExportedProgram")


def _check_args(module: nn.Module, args: tuple) -> None:
    leaves, spec = pytree.tree_flatten(args)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TraceError(f"{type(module).__name__} takes arguments other than tensors (or lists "
                         "of tensors), which a capture would fix to their example values")
    for node in _spec_nodes(spec):
        if node.type not in (tuple, list, dict, None):
            raise TraceError(f"{type(module).__name__} takes a {node.type.__name__}, which a "
                             "capture does not rebuild")


def _spec_nodes(spec: pytree.TreeSpec):
    yield spec
    for child in spec.children():
        yield from _spec_nodes(child)


def _export(module: nn.Module, args: tuple, dynamic: bool) -> torch.export.ExportedProgram:
    """Export (non-strict), made functional where it writes tensors; with ``dynamic`` every size
    is left to export (``Dim.AUTO``), and a batch of one is traced as two so that it is not fixed
    to one."""
    example, shapes = args, None
    if dynamic:
        auto = torch.export.Dim.AUTO
        shapes = pytree.tree_map(lambda t: {d: auto for d in range(t.dim())}, args)
        leaves = pytree.tree_leaves(args)
        if all(t.dim() > 1 and len(t) == 1 for t in leaves):
            example = pytree.tree_map(lambda t: torch.cat([t, t]), args)
    with _quiet():
        ep = torch.export.export(module, tuple(example), dynamic_shapes=shapes, strict=False)
        if any(_writes(n) for n in ep.graph.nodes):  # functional form: writes become scatters
            ep = ep.run_decompositions({})
    sig = ep.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        raise TraceError(f"{type(module).__name__}'s forward writes its buffers or inputs")
    return ep


@contextlib.contextmanager
def _quiet():
    """Export's own voice off: on a failure it prints the graph so far, logs warnings and
    warns; reparam says what failed in its report instead."""
    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes",
                                              "torch.export", "torch._export", "torch._dynamo")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _writes(node: fx.Node) -> bool:
    """An op that writes one of its arguments (``copy_``, ``add_``, ``index_put_``...)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and any(
        a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _specs(placeholders: list[fx.Node], ep, dynamic: bool) -> tuple:
    """The :class:`InputSpec` of each input, from the export's fake inputs and ranges."""
    specs = []
    for node in placeholders:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise TraceError("an input of the capture is not a tensor")
        sizes: list[int | tuple[str, int, float]] = []
        for size in val.shape:
            if isinstance(size, int):
                sizes.append(size)
                continue
            expr = size.node.expr
            if expr.is_number:
                sizes.append(int(expr))
                continue
            if dynamic and not expr.is_Symbol and _DERIVED.fullmatch(str(expr)):
                sizes.append(("=", str(expr)))  # 4*s90: one feature map 4x another's size
                continue
            if not dynamic or not expr.is_Symbol:
                raise TraceError(f"a size of the capture is derived ({expr}): sizes are fixed")
            rng = ep.range_constraints.get(expr)
            low = int(rng.lower) if rng is not None and rng.lower.is_finite else 0
            low = low if low > 2 else 0  # as torch.export checks: 0 and 1 are not excluded
            high = float(rng.upper) if rng is not None and rng.upper.is_finite else float("inf")
            sizes.append((str(expr), low, high))
        specs.append((str(val.dtype), val.device.type, tuple(sizes)))
    return tuple(specs)


def _graph(module: nn.Module, ep, dynamic: bool) -> tuple[fx.GraphModule, fx.Graph]:
    """A plain graph over the exported module: one placeholder per argument of ``forward``
    (lists taken apart with ``getitem``), the guard, the body, the output rebuilt as forward
    returns it. Parameters and buffers are ``get_attr`` nodes of their own names."""
    gm = ep.module(check_guards=False)
    old = [n for n in gm.graph.nodes if n.op == "placeholder"]
    in_spec, out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
    specs = _specs(old, ep, dynamic)
    graph = fx.Graph()
    names = _arg_names(module, in_spec.child(0).num_children)
    tops = [graph.placeholder(n) for n in names]
    args_spec = in_spec.child(0)
    env: dict[fx.Node, Any] = {}
    for node, path in zip(old, _paths(args_spec), strict=True):
        value = tops[path[0]]
        for key in path[1:]:
            value = graph.call_function(operator.getitem, (value, key))
        env[node] = value
    guards = tuple(ep._guards_code) if dynamic else ()
    graph.call_function(check_inputs, (specs, guards, tuple(names), tuple(tops),
                                       *(env[n] for n in old)))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            flat = [env[a] if isinstance(a, fx.Node) else a for a in node.args[0]]
            out = pytree.tree_unflatten(flat, out_spec)
            for sub in _spec_nodes(out_spec):
                if sub.type not in (tuple, list, dict, None):
                    raise TraceError(f"{type(module).__name__} returns a {sub.type.__name__}, "
                                     "which a capture does not rebuild")
            graph.output(out)
            break
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            continue  # checked by the guard (inputs) or true by construction (constants)
        env[node] = graph.node_copy(node, lambda n: env[n])
    return gm, graph


def _arg_names(module: nn.Module, n: int) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = names[:n] + [f"arg{i}" for i in range(len(names), n)]
    return names


def _paths(spec: pytree.TreeSpec, prefix: tuple = ()) -> list[tuple]:
    """The index path of every leaf of ``spec`` (positional arguments, then list items...)."""
    if spec.num_children == 0 and spec.type is None:
        return [prefix]
    keys = spec.context if spec.type is dict else range(spec.num_children)
    out = []
    for key, child in zip(keys, spec.children(), strict=True):
        out += _paths(child, (*prefix, key))
    return out


def _check_faithful(module: nn.Module, root: nn.Module, graph: fx.Graph, args: tuple) -> None:
    """The capture must compute what the module computes on ``args`` (exactly: same ops)."""
    from .verify import relative_error

    with torch.no_grad():
        want = light_copy(module)(*clone_inputs(args))
        got = fx.Interpreter(root, graph=graph).run(*clone_inputs(args))
    dtype = next((t.dtype for t in pytree.tree_leaves(args)), torch.float32)
    if relative_error(got, want) > (1e-9 if dtype == torch.float64 else 1e-5):
        raise TraceError("the captured graph does not compute what forward computes")


# --- functional idioms the capture writes -----------------------------------------------------

def _whole_batch_norms(graph: fx.Graph) -> None:
    """An eval-mode BN arrives as ``aten._native_batch_norm_legit_no_training`` (three
    outputs) and ``getitem(., 0)``; it becomes the ``F.batch_norm`` call ``nn.BatchNorm2d`` makes,
    one node reading its input once."""
    legit = aten._native_batch_norm_legit_no_training.default
    for node in list(graph.nodes):
        if node.target is not legit or not node.users:
            continue
        items = list(node.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in items):
            continue
        names = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")
        a = dict(zip(names, node.args, strict=False))
        a.update(node.kwargs)
        with graph.inserting_before(node):
            bn = graph.call_function(F.batch_norm, (a["input"], a["running_mean"],
                                                   a["running_var"], a.get("weight"),
                                                   a.get("bias"), False, a["momentum"], a["eps"]))
        bn.meta = dict(items[0].meta)
        for item in items:
            item.replace_all_uses_with(bn)
            graph.erase_node(item)
        graph.erase_node(node)


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.unsqueeze.default, aten.expand.default, aten.alias.default, aten.detach.default}
_END = 1 << 62  # ``x[..., -p:]`` ends at INT64_MAX


def _fill_borders(graph: fx.Graph) -> None:
    """``out = F.pad(y, p); out[:, :, :p, :] = c; out[:, :, -p:, :] = c; ...`` (DBB's BN-and-pad,
    ECBSR's bias-filled pad: every padded border set to one per-channel value ``c``) arrives as a
    pad and a chain of ``slice_scatter``; it becomes one :func:`reparam.functional.pad_filled`
    node, which computes the same values and which a rule can fold."""
    for pad in list(graph.nodes):
        if pad.op != "call_function" or pad.target not in (aten.pad.default,
                                                           aten.constant_pad_nd.default):
            continue
        amounts, value = _pad_args(pad)
        if amounts is None or value not in (None, 0, 0.0):
            continue
        ndim = _ndim(pad)
        if ndim is None or len(amounts) // 2 > ndim - 2:
            continue
        want = {}
        for i in range(len(amounts) // 2):
            axis = ndim - 1 - i
            if amounts[2 * i]:
                want[(axis, 0, amounts[2 * i])] = True
            if amounts[2 * i + 1]:
                want[(axis, -amounts[2 * i + 1], _END)] = True
        found = _fills(pad, set(want), ndim)
        if found is None:
            continue
        last, fill = found
        with graph.inserting_after(last):
            new = graph.call_function(pad_filled, (pad.args[0], list(amounts), fill))
        new.meta = dict(last.meta)
        last.replace_all_uses_with(new)


def _pad_args(pad: fx.Node) -> tuple[list[int] | None, Any]:
    args = list(pad.args) + [None] * 4
    amounts, mode, value = args[1], args[2], args[3]
    if pad.target is aten.constant_pad_nd.default:
        mode, value = "constant", args[2]
    mode = pad.kwargs.get("mode", mode)
    value = pad.kwargs.get("value", value)
    if mode not in (None, "constant") or not isinstance(amounts, (list, tuple)):
        return None, None
    if not all(isinstance(a, int) and a >= 0 for a in amounts) or len(amounts) % 2:
        return None, None
    return list(amounts), value


def _ndim(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    return None


def _fills(pad: fx.Node, want: set, ndim: int) -> tuple[fx.Node, fx.Node] | None:
    """Follow the chain of border writes from ``pad``; ``(last write, the per-channel value)``
    when the chain writes exactly the borders in ``want``, each once, all with one value."""
    cur, fill, done = pad, None, set()
    while want - done:
        scatters = [u for u in cur.users if u.target is aten.slice_scatter.default
                    and u.args[0] is cur]
        if len(scatters) != 1:
            return None
        found = _region_write(scatters[0], cur)
        if found is None:
            return None
        slices, copy = found
        region = [(d % ndim, a, b) for d, a, b in slices if not (a == 0 and b == _END)]
        if len(region) != 1 or region[0] not in want or region[0] in done:
            return None
        channel = _channel_vector(copy.args[1], ndim)
        if channel is None or (fill is not None and channel is not fill):
            return None
        fill = channel
        done.add(region[0])
        cur = scatters[0]
    return cur, fill


def _region_write(scatter: fx.Node, base: fx.Node) -> tuple[list, fx.Node] | None:
    """``base[s1][s2]... = value`` as the functional graph writes it: a ``slice_scatter`` into
    ``base`` of a ``slice_scatter`` into its slice ... of a ``copy``; the slices and the copy."""
    if scatter.target is not aten.slice_scatter.default or scatter.args[0] is not base:
        return None
    args = list(scatter.args) + [0, None, None, 1][len(scatter.args) - 2:]
    inner, dim, start, end, step = args[1:6]
    if step != 1 or not all(isinstance(v, int) for v in (dim, start)):
        return None
    here = (dim, start, _end(end))
    if not isinstance(inner, fx.Node):
        return None
    if inner.target is aten.copy.default:
        return [here], inner
    view = inner.args[0] if inner.target is aten.slice_scatter.default else None
    if not isinstance(view, fx.Node) or view.target is not aten.slice.Tensor or (
            view.args[0] is not base or list(view.args[1:4]) != [dim, start, end]):
        return None
    found = _region_write(inner, view)
    return None if found is None else ([here, *found[0]], found[1])


def _end(end: Any) -> Any:
    return _END if end is None or (isinstance(end, int) and end >= _END) else end


def _channel_vector(value: Any, ndim: int) -> fx.Node | None:
    """The node of a per-channel vector ``c`` (``C`` values) that ``value`` broadcasts over the
    channel axis (axis 1) through views and expands only; ``None`` otherwise."""
    node, shaped = value, None
    while isinstance(node, fx.Node) and node.target in _VIEWS:
        if shaped is None and node.target is not aten.expand.default:
            shaped = node  # the tensor the expands broadcast
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return None
    base, shaped = node.meta.get("val"), (shaped or node).meta.get("val")
    if not isinstance(base, torch.Tensor) or not isinstance(shaped, torch.Tensor):
        return None
    dims = list(shaped.shape)
    dims = [1] * (ndim - len(dims)) + dims
    channels = dims[1] if len(dims) == ndim else None
    if channels is None or any(d != 1 for i, d in enumerate(dims) if i != 1):
        return None
    if base.numel() != channels:
        return None
    return node


__all__ = ["InputSpec", "capture", "check_inputs", "pad_filled"]
