"""What a rule sees while it folds one node: its operands' values, constants, shapes, laws."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, fx

from . import kernel as K
from .nodes import dtype_of, shape_of
from .pattern import Op
from .values import OPAQUE, Const, Lin, NoFold, Source, Value, View, merge_rules, source_shape

Layout = tuple[int, bool]  # (spatial dims, channels_last)


def is_identity(k: K.Kernel) -> bool:
    return k.is_diagonal and not k.has_bias and bool(torch.all(k.weight == 1))


def is_uniform(k: K.Kernel) -> bool:
    """A per-channel map with one scale and one shift for all channels: ``a * x + b``."""
    return (k.is_diagonal and bool(torch.all(k.weight == k.weight.reshape(-1)[0]))
            and bool(torch.all(k.bias == k.bias.reshape(-1)[0])))


def relay(k: K.Kernel, channels: int, layout: Layout, device=None) -> K.Kernel:
    """A per-channel affine map ``k`` on ``channels`` channels in another ``layout`` (the
    channel axis moved by a transpose, a flatten, an average)."""
    nd, channels_last = layout
    scale, shift = k.weight.reshape(-1), k.bias.reshape(-1)
    if scale.numel() != channels:  # one value for every channel (x * 2.0)
        scale, shift = scale[:1].expand(channels), shift[:1].expand(channels)
    return K.affine(scale.to(device), shift.to(device), nd, channels_last)


class Context:
    """Operands of one node, resolved against the current values of the graph.

    With ``cut`` set, every operand is read as an opaque source, so a node whose fold through its
    inputs failed can still start a region of its own (its inputs are then materialized).
    """

    def __init__(self, node: fx.Node, op: Op, analysis, cut: bool = False,
                 values: Mapping[fx.Node, Value] | None = None) -> None:
        self.node, self.op = node, op
        self._analysis = analysis
        self._values = analysis.values if values is None else values
        self._barriers = analysis.boundaries
        self._mutated: Mapping[fx.Node, fx.Node] = analysis.mutated
        self._enabled = analysis.enabled
        self._position: Callable[[fx.Node], int] = analysis.ir.position
        self.cut = cut
        self.device = analysis.device
        self.used: list[str] = []

    # --- laws ------------------------------------------------------------------------------
    def require(self, name: str) -> None:
        """Use law ``name``; a rule set without it leaves this node unfolded, saying so."""
        if name not in self._enabled:
            raise NoFold(f"needs the law '{name}', which is not in the rule set")
        if name not in self.used:
            self.used.append(name)

    # --- operands --------------------------------------------------------------------------
    def value(self, arg: Any) -> Lin | Const | Any:
        if not isinstance(arg, fx.Node):
            return Const(arg)
        value = self._values.get(arg, OPAQUE)
        if isinstance(value, Lin) and (self.cut or arg in self._barriers
                                       or value.reshaped is not None):
            return OPAQUE  # a flat value is opaque to every rule but those that ask for it
        return value

    def flat(self, arg: Any) -> Lin | None:
        """``arg``'s value if it is flat (see :class:`~reparam.values.Lin`), else ``None``."""
        if not isinstance(arg, fx.Node) or self.cut or arg in self._barriers:
            return None
        value = self._values.get(arg)
        return value if isinstance(value, Lin) and value.reshaped is not None else None

    def is_const(self, arg: Any) -> bool:
        return isinstance(self.value(arg), Const)

    def const(self, arg: Any) -> Any:
        """The constant behind ``arg`` (a tensor or a number), or ``None``."""
        value = self.value(arg)
        return value.value if isinstance(value, Const) else None

    def static(self, arg: Any) -> Any:
        """A constant, or the value a shape query (``x.size(3)``) had on the example input."""
        value = self.const(arg)
        if value is None and isinstance(arg, fx.Node):
            value = arg.meta.get("reparam_value")
        return value

    def param(self, arg: Any) -> Tensor | None:
        """A parameter as a float64 tensor (a copy: the caller's tensors are never written)."""
        value = arg if isinstance(arg, Tensor) else self.const(arg)
        if value is None:
            return None
        if not isinstance(value, Tensor):
            raise NoFold(f"expected a tensor parameter, found {type(value).__name__}")
        if value.is_complex():
            raise NoFold("complex parameters are not folded (the kernel algebra is real)")
        if not value.is_floating_point():
            raise NoFold(f"a {value.dtype} parameter is not a real-valued weight")
        return value.detach().to(torch.float64)

    def shape(self, arg: Any) -> torch.Size | None:
        return source_shape(arg) if isinstance(arg, View) else shape_of(arg)

    def lin(self, arg: Any, layout: Layout | None = None) -> Lin:
        """``arg`` as a linear value; an opaque node becomes the identity on itself."""
        value = arg if isinstance(arg, View) else self.value(arg)
        if isinstance(value, Lin):
            k = value.kernel
            if layout is not None and (k.nd, k.channels_last) != layout:
                if not is_uniform(k):
                    raise NoFold(f"'{arg}' has another layout than this op expects")
                # the identity (e.g. Dropout), or one scale and one shift for every channel
                # (x * 2.0, a BN of one channel): the same map in any layout, so re-lay it out
                c = self.lin(value.source, layout).kernel.out_channels
                laid = relay(k, c, layout, k.weight.device)
                return Lin(value.source, laid, value.nodes, value.rules, value.biased)
            return value
        if not isinstance(arg, (fx.Node, View)) or isinstance(value, Const):
            raise NoFold(f"operand '{arg}' is a constant, not a tensor computed from the input")
        node = arg.base if isinstance(arg, View) else arg
        writer = self._mutated.get(node)
        if writer is not None and self._position(writer) < self._position(self.node):
            raise NoFold(f"'{node}' is modified in place by '{writer}' before this op reads it, "
                         "so a folded module could not read it where the region starts")
        dtype = dtype_of(node)
        if dtype is not None and not dtype.is_floating_point:
            raise NoFold(f"'{node}' is a {dtype} tensor: only real floating-point tensors fold")
        shape = self.shape(arg)
        if shape is None:
            raise NoFold(f"the shape of '{arg}' is unknown (pass example_inputs to fold)")
        rank = len(shape)
        if layout is None:
            layout = (max(rank - 2, 0), False)
        nd, channels_last = layout
        if rank < 2 or (not channels_last and rank != nd + 2):
            raise NoFold(f"'{arg}' has rank {rank}, not the batched layout this op expects")
        channels = shape[-1] if channels_last else shape[1]
        ident = K.identity(channels, nd, channels_last, device=self.device)
        return Lin(arg, ident, frozenset())

    def position(self, node: fx.Node) -> int:
        """Where ``node`` is in the graph (earlier nodes have smaller positions)."""
        return self._position(node)

    def what(self, node: Any) -> str:
        """What a node computes, in a word (its module's class or its function's name)."""
        node = node.base if isinstance(node, View) else node
        return self._analysis.ir.what(node) if isinstance(node, fx.Node) else repr(node)

    def may_move_through(self, node: fx.Node) -> bool:
        """Whether a per-channel map may be moved past this layout op (the driver stops that
        where nothing after it takes the map in)."""
        return node not in self._analysis.no_view

    def op_of(self, node: Any) -> Op | None:
        """The op a pattern of the rule set reads ``node`` as (the first one), or ``None``."""
        entry = self._analysis.ir.entries.get(node) if isinstance(node, fx.Node) else None
        return entry.op if entry is not None else None

    def is_op(self, node: Any) -> bool:
        """Whether a pattern of the rule set reads ``node`` as an op (a linear one)."""
        node = node.base if isinstance(node, View) else node
        entry = self._analysis.ir.entries.get(node)
        return entry is not None and bool(entry.matches)

    def layout_of(self, arg: Any) -> Layout | None:
        """The layout of a linear operand, or the default one for an opaque node's rank."""
        value = self.value(arg)
        if isinstance(value, Lin):
            return (value.kernel.nd, value.kernel.channels_last)
        shape = shape_of(arg)
        if shape is None or len(shape) < 2:
            return None
        return (len(shape) - 2, False)

    def channel_vector(self, const: Any, layout: Layout) -> Tensor | None:
        """A constant that broadcasts as one value per channel (or a scalar), as a float64 vector.

        Returns ``None`` when it varies along any other axis of this node's output.
        """
        if isinstance(const, bool) or not isinstance(const, (int, float, Tensor)):
            return None
        t = torch.as_tensor(const).detach()
        if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
            return None
        t = t.to(torch.float64)
        if t.numel() == 1:
            return t.reshape(1)
        out = shape_of(self.node)
        if out is None or t.dim() > len(out):
            return None
        nd, channels_last = layout
        axis = len(out) - 1 if channels_last or len(out) == 2 else 1
        padded = (1,) * (len(out) - t.dim()) + tuple(t.shape)
        if any(size != 1 for i, size in enumerate(padded) if i != axis):
            return None
        return t.reshape(-1)

    # --- result ----------------------------------------------------------------------------
    def result(self, kernel: K.Kernel, *inputs: Lin, rule: str, biased: bool = False,
               through: bool = False, reshaped: fx.Node | None = None) -> Lin:
        """The node's value: ``kernel`` of the inputs' common source, covering their ops and this
        node. ``biased``: this op adds a bias. ``through``: this op moves elements (a layout
        op a per-channel map commutes with): the value's source becomes the view of the source
        through this op (see :class:`~reparam.values.View`). ``reshaped``: the value is flat,
        ``kernel(source)`` reshaped as that node reshapes."""
        source: Source = inputs[0].source
        if any(i.source != source for i in inputs):
            raise NoFold("branches read different inputs")
        base = source.base if isinstance(source, View) else source
        out_dtype, in_dtype = dtype_of(self.node), dtype_of(base)
        if out_dtype is not None and in_dtype is not None and out_dtype != in_dtype:
            raise NoFold(f"the op turns {in_dtype} into {out_dtype} (type promotion by a "
                         "constant): one module could not reproduce that")
        if through:
            chain = source.chain if isinstance(source, View) else ()
            source = View(base, (*chain, self.node))
        nodes = frozenset().union(*(i.nodes for i in inputs)) | {self.node}
        rules = merge_rules(*(i.rules for i in inputs), [rule], self.used)
        return Lin(source, kernel, nodes, rules, biased or any(i.biased for i in inputs),
                   reshaped)
