"""Materialization: each region becomes one standard module reading its source.

For each region's end (a boundary whose value is a linear map of two or more ops), a new
``nn.Conv*d``, ``nn.ConvTranspose*d`` or ``nn.Linear`` is built from the folded kernel and called
where the region starts (its ops read the source there, before any later write), reading the
source (a :class:`~reparam.values.View` is made anew on its base: the layout ops a per-channel map
moved through). The region's end is replaced by it; shape queries of removed nodes read a node
of the same shape; what no longer reaches the output is removed (dead code), keeping every op
that writes a tensor or draws random numbers. A region's output keeps the memory layout the
traced ops gave it (a ``view`` or a ``rand_like`` after it depends on that).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn

from .analysis import Analysis, spent
from .context import is_identity
from .cost import kernel_cost, ops_cost, output_shape
from .ir import IR
from .kernel import Kernel, nonnegative_padding, regroup
from .nodes import dtype_of, is_rank_query, is_shape_query, shape_of, stride_of
from .observe import TensorMeta
from .pattern import Effect
from .policies import trivial
from .progress import tick
from .report import Region
from .values import Lin, View, source_node, source_shape

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def to_module(k: Kernel, dtype: torch.dtype, device: torch.device | None = None,
              bias: bool = False) -> nn.Module:
    """``nn.Linear``, ``nn.ConvNd`` or ``nn.ConvTransposeNd`` computing ``k``, in ``dtype``.

    The module has a bias when ``bias`` is set (the region had one, e.g. from a BN, so a trained
    model's deploy form keeps its shape) or the folded bias is not all zero. A kernel that crops
    (negative padding) gets zero taps instead, as torch runs only padding >= 0.
    """
    k = nonnegative_padding(k)
    device = device if device is not None else k.weight.device
    has_bias = bias or k.has_bias
    if k.nd == 0:
        weight = regroup(k, 1).weight
        module = nn.Linear(k.in_channels, k.out_channels, bias=has_bias, device="meta")
    elif k.transposed:
        weight = k.weight
        module = _CONV_T[k.nd](k.in_channels, k.out_channels, k.kernel_size, k.stride,
                               k.padding, k.output_padding, k.groups, has_bias, k.dilation,
                               device="meta")
    else:
        weight = k.weight
        module = _CONV[k.nd](k.in_channels, k.out_channels, k.kernel_size, k.stride, k.padding,
                             k.dilation, k.groups, has_bias, k.padding_mode, device="meta")
    # the kernel's own tensors, cast once: no random init, no copy beyond the cast
    module.weight = nn.Parameter(weight.detach().to(device=device, dtype=dtype))
    module.bias = nn.Parameter(k.bias.detach().to(device=device, dtype=dtype)) if has_bias \
        else None
    return module.eval()


class ChannelAffine(nn.Module):
    """``x * weight + bias`` with one value per channel (axis 1; the last axis for tokens): what
    a region of per-channel ops alone (two BNs, a BN and a scale, ``x * 2 - 0.5``) folds into,
    rather than a depthwise 1x1 conv."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, channels_last: bool = False
                 ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[-1 if self.channels_last or x.dim() == 1 else 1] = -1
        return torch.addcmul(self.bias.view(shape), x, self.weight.view(shape))


def to_affine(k: Kernel, dtype: torch.dtype) -> ChannelAffine:
    """The :class:`ChannelAffine` of a per-channel kernel (``k.is_diagonal``)."""
    weight = k.weight.detach().reshape(-1).to(dtype)
    return ChannelAffine(weight, k.bias.detach().to(dtype), k.channels_last).eval()


def produced_stride(module: nn.Module, shape: torch.Size, stride: tuple[int, ...],
                    dtype: torch.dtype) -> tuple[int, ...] | None:
    """The strides of ``module``'s output on an input of ``shape`` and ``stride``, run on the
    meta device (no data, no arithmetic); None where that does not run. Exact for elementwise
    ops and ``linear`` (their meta kernels are eager's); not for convs, whose memory format eager
    picks by backend."""
    state = {name: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
             for name, t in (*module.named_parameters(), *module.named_buffers())}
    try:
        x = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        with torch.no_grad():
            y = torch.func.functional_call(module, state, (x,))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    return tuple(y.stride()) if isinstance(y, torch.Tensor) else None


def same_layout(shape: torch.Size, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Equal strides on every axis longer than 1 (an axis of size 1 has no layout)."""
    return all(n <= 1 or x == y for n, x, y in zip(shape, a, b, strict=True))


def dense_order(shape: torch.Size, stride: tuple[int, ...]) -> list[int] | None:
    """The axes from outermost to innermost in memory, if ``stride`` lays ``shape`` out densely
    (no gaps, no overlaps); None otherwise."""
    order = sorted(range(len(shape)), key=lambda i: (-stride[i] if shape[i] > 1 else 0, i))
    step = 1
    for i in reversed(order):
        if shape[i] > 1:
            if stride[i] != step:
                return None
            step *= shape[i]
    return order


@dataclass
class Made:
    """One region as materialized: its module, the node that calls it, and its report."""

    module: nn.Module
    node: fx.Node
    name: str  # the module's path (after naming)
    region: Region


class Materializer:
    """Rewrites the graph of ``ir`` after the analysis: one module per region."""

    def __init__(self, ir: IR, analysis: Analysis, capture: bool = False) -> None:
        self.ir, self.a = ir, analysis
        self.graph = ir.graph
        self.capture = capture
        self.captured: dict[str, tuple] = {}  # region output -> (its ops, module, source)
        self.views: dict[tuple, fx.Node] = {}  # (base, the chain so far) -> its op made anew
        self.clone_of: dict[fx.Node, fx.Node] = {}  # a view's op made anew -> the original
        self.dead: set[fx.Node] = set()  # ops erased because nothing returns what they compute

    def run(self) -> list[Made]:
        ir, a, graph = self.ir, self.a, self.graph
        removed: set[fx.Node] = set()
        made: list[Made] = []
        done: dict[fx.Node, fx.Node] = {}  # region end -> the node that now computes it
        replaced_by: dict[fx.Node, fx.Node] = {}  # a removed node -> a node of its shape
        ends = [n for n in graph.nodes if n in a.boundaries]
        for i, b in enumerate(ends):
            tick("regions", i, len(ends))
            value = a.values.get(b)
            if not isinstance(value, Lin):
                continue
            if spent(value):  # pragma: no cover - the analysis keeps every boundary's kernel
                raise RuntimeError(f"reparam: the kernel of '{b}' was released too early")
            if is_identity(value.kernel) and value.source is not b and not isinstance(
                    value.source, View):
                if (b in a.mutated or value.source in a.mutated
                        or any(ir.entries[n].op.attrs.get("copies") for n in value.nodes
                               if ir.entries[n].op is not None)):
                    continue  # clone() and contiguous() make a new tensor or layout: they stay
                source = done.get(value.source, value.source)
                b.replace_all_uses_with(source)
                done[b] = source
                removed |= value.nodes
                continue
            if trivial(ir, value):
                continue
            item = self._region(b, value, done, replaced_by)
            if item is None:
                continue
            made.append(item)
            removed |= value.nodes
            a.values[b] = _released(value)  # its kernel now lives on in the module
        self._repoint_shape_queries(removed, replaced_by)
        self._erase(removed)
        made = [item for item in made if item.node not in self.dead]  # nothing returns them
        for node in graph.nodes:
            if node.op in ("placeholder", "output") and isinstance(node.type, str):
                node.type = None  # a string annotation (PEP 563) would not script
        return made

    # --- one region ----------------------------------------------------------------------------
    def _region(self, b: fx.Node, value: Lin, done: dict, replaced_by: dict) -> Made | None:
        ir, graph = self.ir, self.graph
        nodes = ir.ordered(value.nodes)
        view = value.source if isinstance(value.source, View) else None
        if view is not None:
            writer = ir.obs.first_writer.get(view.base)
            if writer is not None and ir.position(writer) < ir.position(b):
                return None  # the view is made before the region ends: its base must hold
        merged = value.nodes - set(view.chain) if view is not None else value.nodes
        main = max(merged or value.nodes, key=lambda n: (ir.entries[n].macs, -ir.position(n)))
        k = value.kernel
        if k.is_diagonal and not k.transposed and k.nd and (k.nd > 3 or all(  # no Conv4d
                ir.entries[n].effect is not Effect.MAP for n in value.nodes)):
            module = to_affine(value.kernel, value.kernel.weight.dtype)
        else:
            module = to_module(value.kernel, value.kernel.weight.dtype,  # cast by the analysis
                               bias=value.biased)
        fmt = self._memory_format(main)
        if fmt is not None and module.weight.dim() == 4 + (fmt is torch.channels_last_3d):
            module.to(memory_format=fmt)
        base = done.get(source_node(value.source), source_node(value.source))
        if self.capture:
            self._capture(b, value, module)
        if view is None:
            source = base
            where = graph.inserting_before(nodes[0])  # its ops read the source there
        else:  # the view's ops, made anew as early as their inputs allow
            source = self._remake(view, base, value, replaced_by)
            where = graph.inserting_after(source)
        with where:
            new = graph.call_module(_TEMP, (source,))  # named once every region is known
        new.meta = dict(b.meta)
        out = new
        if value.reshaped is not None:  # a flat value: the module's output, reshaped
            made = output_shape(value.kernel, source_shape(value.source))
            new.meta["tensor_meta"] = TensorMeta(torch.Size(made), dtype_of(b))
            out = self._reshape(value.reshaped, new, b)
        else:
            out = self._keep_layout(new, module, source, b, main)
        b.replace_all_uses_with(out)
        done[b] = out
        for n in value.nodes:
            if n not in replaced_by and shape_of(n) == source_shape(value.source):
                replaced_by[n] = source
            elif n not in replaced_by and shape_of(n) == shape_of(b):
                replaced_by[n] = out
        for n in value.nodes:  # a rank query needs a node of the same rank only
            rank_of = shape_of(n)
            if n not in replaced_by and rank_of is not None:
                replaced_by.setdefault(("rank", n), source if len(rank_of) == len(
                    source_shape(value.source) or ()) else out)
        region = Region(
            _TEMP, tuple(n.name for n in nodes), value.rules,
            f"x*w+b({module.weight.numel()})" if isinstance(module, ChannelAffine)
            else value.kernel.geometry(),
            sum(t.numel() for t in _params(ir, value.nodes)),
            sum(p.numel() for p in module.parameters()),
            ops_cost(ir, value.nodes), kernel_cost(b, value),
            output=b.name, source=source_node(value.source).name)
        return Made(module, new, self._base_name(main), region)

    def _remake(self, view: View, base: fx.Node, value: Lin, replaced_by: dict) -> fx.Node:
        """The view's layout ops made anew on ``base``: each reads the one made before it. Two
        regions of views that share a beginning share its ops (NextViT's ``k`` and ``v`` read
        one pooled view)."""
        prev = base
        for i, op_node in enumerate(view.chain):
            key = (base, view.chain[:i + 1])
            made = self.views.get(key)
            if made is None:
                data = self.ir.entries[op_node].op.inputs[0]

                def arg(a, data=data, prev=prev):
                    return prev if a is data else replaced_by.get(a, a)

                inputs = [arg(a) for a in op_node.all_input_nodes]
                with self.graph.inserting_after(self._latest(inputs)):
                    made = self.graph.node_copy(op_node, arg)
                made.meta = dict(op_node.meta)
                self.views[key] = made
                self.clone_of[made] = op_node
            replaced_by.setdefault(op_node, made)
            prev = made
        for n in value.nodes:  # the per-channel ops before the view keep the base's shape
            if n not in replaced_by and shape_of(n) == shape_of(base):
                replaced_by[n] = base
        return prev

    def _reshape(self, reshape: fx.Node, data: fx.Node, b: fx.Node) -> fx.Node:
        """The op of ``reshape`` made anew on ``data``, just before the region's end ``b`` (its
        sizes, constants or shape queries, are all computed by then)."""
        old = self.ir.entries[reshape].op.inputs[0]
        with self.graph.inserting_before(b):
            made = self.graph.node_copy(reshape, lambda a: data if a is old else a)
        made.meta = dict(b.meta)
        return made

    def _keep_layout(self, new: fx.Node, module: nn.Module, source: fx.Node, b: fx.Node,
                     main: fx.Node) -> fx.Node:
        """``new``, laid out in memory as the region's end was. The module may lay its output out
        otherwise (a per-channel affine keeps its input's strides where a BN made a contiguous
        tensor), and what reads it may depend on that: a ``view`` (torch.export writes every
        ``reshape`` that needed no copy as one), or a random op drawing ``rand_like`` in memory
        order. Where the layouts differ, a ``permute``, ``contiguous``, ``permute`` restores
        the traced one. A conv lays its output out as the conv it replaces did (same input,
        weight in the same memory format), and the meta device does not tell that choice."""
        shape, want, given = shape_of(b), stride_of(b), stride_of(source)
        if None in (shape, want, given, shape_of(source)):
            return new
        if isinstance(module, nn.modules.conv._ConvNd):  # as the region's main conv did (R25:
            # not the region's end, after a `.contiguous(memory_format=...)` taken as identity)
            got = stride_of(main) if shape_of(main) == shape else None
        else:
            got = produced_stride(module, shape_of(source), given, dtype_of(source))
        order = dense_order(shape, want)
        if got is None or len(got) != len(shape) or same_layout(shape, got, want) or (
                order is None):
            return new
        new.meta["tensor_meta"] = TensorMeta(shape, dtype_of(b), got)
        graph, inverse = self.graph, sorted(range(len(order)), key=order.__getitem__)
        with graph.inserting_after(new):
            if order == sorted(order):
                out = graph.call_method("contiguous", (new,))
            else:
                moved = graph.call_method("permute", (new, *order))
                with graph.inserting_after(moved):
                    dense = graph.call_method("contiguous", (moved,))
                with graph.inserting_after(dense):
                    out = graph.call_method("permute", (dense, *inverse))
                moved.meta = {"tensor_meta": TensorMeta(torch.Size(shape[i] for i in order),
                                                        dtype_of(b))}
                dense.meta = dict(moved.meta)
        out.meta = dict(b.meta)
        return out

    def _latest(self, nodes: list[fx.Node]) -> fx.Node:
        """The one of ``nodes`` that comes last in the graph (a view's op goes right after)."""
        wanted = set(nodes)
        last = None
        for node in self.graph.nodes:
            if node in wanted:
                last = node
        return last

    def _capture(self, b: fx.Node, value: Lin, module: nn.Module) -> None:
        from .verify import NotExtractable, region_module

        if isinstance(value.source, View):
            return  # the view's ops are checked as part of the whole model
        try:
            ops = region_module(self.ir.root, value.source, value.nodes, b,
                                lambda n: n in self.ir.consts)
        except NotExtractable:
            return
        self.captured[b.name] = (ops, module, value.source)

    # --- the graph around ----------------------------------------------------------------------
    def _repoint_shape_queries(self, removed: set[fx.Node], replaced_by: dict) -> None:
        """A shape query of a removed node reads a node of the same shape (a rank query: of the
        same rank) instead."""
        for node in list(self.graph.nodes):
            rank = is_rank_query(node)
            if not (rank or is_shape_query(node)):
                continue
            x = node.args[0] if node.args else None
            if x not in removed:
                continue
            other = replaced_by.get(x, replaced_by.get(("rank", x)) if rank else None)
            if other is not None:
                node.replace_input_with(x, other)

    def _erase(self, removed: set[fx.Node]) -> None:
        """Remove the replaced ops and whatever else no longer reaches the output, keeping every
        node that writes a tensor, draws random numbers or has effects of its own."""
        obs, consts = self.ir.obs, self.ir.consts
        for node in reversed(list(self.graph.nodes)):
            if node.users or node.op in ("placeholder", "output"):
                continue
            if node in obs.writers or node in obs.random:
                continue
            if node in removed or node in consts or node.op == "get_attr" or not _impure(node):
                self.graph.erase_node(node)
                if node not in removed:
                    self.dead.add(node)

    def _memory_format(self, node: fx.Node) -> torch.memory_format | None:
        """The channels-last format of a conv's weight (kept by the module that replaces it)."""
        params = [t for t in self.ir.entries[node].params if t.dim() in (4, 5)]
        w = max(params, key=lambda t: t.numel()) if params else None
        if w is None or w.is_contiguous():
            return None
        for fmt in (torch.channels_last, torch.channels_last_3d):
            if w.dim() == 4 + (fmt is torch.channels_last_3d) and w.is_contiguous(
                    memory_format=fmt):
                return fmt
        return None

    def _base_name(self, node: fx.Node) -> str:
        """The name of the branch a region came from: its main op's module, or its weight's."""
        if node.op == "call_module":
            return str(node.target)
        op = self.ir.entries[node].op
        weight = op.attrs.get("weight") if op is not None else None
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            return str(weight.target).rsplit(".", 1)[0]
        return node.name


_TEMP = "_reparam_region"


def _params(ir: IR, nodes: Iterable[fx.Node]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for n in nodes:
        for t in ir.entries[n].params:
            seen[id(t)] = t
    return list(seen.values())


def _released(value: Lin) -> Lin:
    from .analysis import release

    return release(value)


def _impure(node: fx.Node) -> bool:
    """Ops with effects besides their value (``torch._assert`` on data, a profiler mark, an
    in-place method the run did not see write). A module call or a function nothing reads is
    dead: an auxiliary head computed but not returned."""
    from torch.fx.node import _side_effectful_functions

    if node.op == "call_function":
        return node.target in _side_effectful_functions
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return False


def name_modules(root: nn.Module, graph: fx.Graph, made: list[Made]) -> list[Region]:
    """Give each new module the name of the branch it came from, where that is free (no module or
    attribute the folded graph still uses has that path or one above or below it), and set it on
    ``root``; returns the regions with their names."""
    used = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")
            and n.target != _TEMP}
    taken = set(used) | {p.rsplit(".", i)[0] for p in used for i in range(1, p.count(".") + 1)}
    regions = []
    for item in made:
        base = item.name or item.node.name
        name, i = base, 1
        while name in taken or any(t.startswith(name + ".") for t in taken) or any(
                name.startswith(t + ".") for t in used):
            name = f"{base}_{i}"
            i += 1
        taken.add(name)
        taken |= {name.rsplit(".", j)[0] for j in range(1, name.count(".") + 1)}
        _set_module(root, name, item.module)
        with graph.inserting_before(item.node):
            new = graph.call_module(name, item.node.args)
        new.meta = item.node.meta
        item.node.replace_all_uses_with(new)
        graph.erase_node(item.node)
        item.node, item.name = new, name
        regions.append(_named(item.region, name, new.name))
    return regions


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    holder = root
    for part in parents:
        child = getattr(holder, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            holder.add_module(part, child)
        holder = child
    if last in holder._modules:
        holder._modules[last] = module
    else:
        if hasattr(holder, last):
            delattr(holder, last)
        holder.add_module(last, module)


def _named(region: Region, name: str, node: str) -> Region:
    from dataclasses import replace

    return replace(region, name=name, node=node)

