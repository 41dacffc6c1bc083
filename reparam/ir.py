"""One normalized IR of a traced graph, built once: every node read once by the rule set.

For each fx node, an :class:`Entry` holds its position, the op a pattern read it as (if any) and
the rules to try, why it stays opaque when it looks like an op (a hook, a random draw, state),
its multiply-adds and the parameters it reads. Nodes that depend on no input are constants, with
their values (from the observed run, or computed here from other constants such as a tensor's
rank). Nothing here depends on where regions end: that is the analysis's business.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .nodes import fetch, is_rank_query, shape_of, tensor_of, what
from .observe import Observation
from .pattern import Effect, Match, Op, Recognizer
from .values import Const, Rule

_MISSING = object()


@dataclass(eq=False)
class Entry:
    """What one node is, for the fold."""

    node: fx.Node
    index: int
    matches: list[Match] = field(default_factory=list)
    why: str | None = None  # why it stays as it is although a pattern names it
    macs: int = 0  # multiply-adds of one sample, as the original op
    params: tuple[torch.Tensor, ...] = ()  # the parameters it reads (directly or computed)
    # it reads a kernel computed from parameters (in forward, or by a parametrization): even
    # alone it is worth making a plain module, which its sources then leave
    computed: bool = False

    @property
    def op(self) -> Op | None:
        return self.matches[0].op if self.matches else None

    @property
    def effect(self) -> Effect | None:
        return self.matches[0].op.effect if self.matches else None

    @property
    def kind(self) -> str:
        return self.matches[0].op.kind if self.matches else self.node.op


class IR:
    """The entries of a graph (in graph order), its constants, and what the observed run saw."""

    def __init__(self, root: nn.Module, graph: fx.Graph, recognizer: Recognizer,
                 obs: Observation | None = None) -> None:
        self.root, self.graph, self.recognizer = root, graph, recognizer
        self.obs = obs if obs is not None else Observation()
        self.modules = dict(root.named_modules())
        self.entries: dict[fx.Node, Entry] = {}
        self.consts: dict[fx.Node, Const] = {}
        self._sources: dict[fx.Node, tuple[torch.Tensor, ...]] = {}
        for node in list(graph.nodes):
            entry = self._entry(node, len(self.entries))
            if self._returns_input(entry):
                continue
            self.entries[node] = entry

    # --- building ------------------------------------------------------------------------------
    def _entry(self, node: fx.Node, index: int) -> Entry:
        entry = Entry(node, index)
        obs = self.obs
        if node.op == "get_attr":
            if node in obs.state:
                entry.why = "forward writes this tensor, so it is state, not a constant"
            else:
                exact = node.meta.get("reparam_exact")
                self.consts[node] = Const(exact if exact is not None
                                          else fetch(self.root, str(node.target)))
            return entry
        if node.op in ("placeholder", "output"):
            return entry
        if node in obs.random:
            entry.why = (f"{what(node, self.modules)} draws random numbers "
                         f"({obs.random[node]}), so it is kept as it is")
            return entry
        if is_rank_query(node):
            self.consts[node] = Const(len(shape_of(node.args[0])))
            return entry
        inputs = node.all_input_nodes
        if node.op != "call_module" and all(i in self.consts for i in inputs):
            value = self._constant(node)
            if value is not _MISSING:
                self.consts[node] = Const(value)
                return entry
        if "reparam_value" in node.meta:  # Python arithmetic on sizes, not a tensor op
            return entry
        entry.matches, entry.why = self.recognizer.matches(node, self.modules)
        if entry.matches:
            entry.why = None
            op = entry.op
            pattern = entry.matches[0].pattern
            try:
                entry.macs = int(pattern.cost(op, node, self.tensor))
            except (TypeError, ValueError, AttributeError, KeyError):
                entry.macs = 0
            entry.params = self._params_of(node)
            entry.computed = op.effect is Effect.MAP and self._computed(node, op)
        return entry

    def _computed(self, node: fx.Node, op: Op) -> bool:
        if node.op == "call_module":
            from torch.nn.utils import parametrize

            module = self.modules.get(str(node.target))
            return module is not None and parametrize.is_parametrized(module)
        return any(isinstance(v, fx.Node) and v in self.consts and v.op != "get_attr"
                   and isinstance(self.consts[v].value, torch.Tensor)
                   for v in op.attrs.values())

    def _returns_input(self, entry: Entry) -> bool:
        """Drop a call that returns its input itself (``nn.Identity``, an eval-mode dropout,
        ``F.dropout(training=False)``): its users read the input directly. ``clone()`` and
        ``contiguous()`` make a new tensor or layout: they stay."""
        node = entry.node
        if (entry.effect is not Effect.IDENTITY or node.op not in ("call_module", "call_function")
                or node in self.obs.writers or node.kwargs.get("inplace")
                or entry.op.attrs.get("copies")):
            return False
        x = entry.op.inputs[0]
        if not isinstance(x, fx.Node):
            return False
        node.replace_all_uses_with(x)
        self.graph.erase_node(node)
        return True

    def _constant(self, node: fx.Node) -> Any:
        """The value of a node of constants only, as the observed run computed it, or computed
        here from constants the run could not know as such (a tensor's rank); ``_MISSING`` if it
        wrote a tensor or fails."""
        if node in self.obs.writers:
            return _MISSING
        found = self.obs.consts.get(node, _MISSING)
        if found is not _MISSING:
            return found

        def read(a):
            return self.consts[a].value if isinstance(a, fx.Node) else a

        args = fx.node.map_arg(node.args, read)
        kwargs = fx.node.map_arg(node.kwargs, read)
        try:
            with torch.no_grad():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                obj, *rest = args
                return getattr(obj, node.target)(*rest, **kwargs)
        except Exception:  # noqa: BLE001 - anything that fails stays opaque
            return _MISSING

    def _params_of(self, node: fx.Node) -> tuple[torch.Tensor, ...]:
        if node.op == "call_module":
            module = self.modules.get(str(node.target))
            return tuple(module.parameters()) if module is not None else ()
        found: dict[int, torch.Tensor] = {}
        for i in node.all_input_nodes:
            for t in self.sources(i):
                found[id(t)] = t
        return tuple(found.values())

    def sources(self, node: fx.Node) -> tuple[torch.Tensor, ...]:
        """The parameters a constant node is computed from (itself, for a parameter)."""
        if node in self._sources:
            return self._sources[node]
        out: tuple[torch.Tensor, ...] = ()
        if node in self.consts:
            if node.op == "get_attr":
                value = self.consts[node].value
                out = (value,) if isinstance(value, nn.Parameter) else ()
            else:
                seen: dict[int, torch.Tensor] = {}
                for i in node.all_input_nodes:
                    for t in self.sources(i):
                        seen[id(t)] = t
                out = tuple(seen.values())
        self._sources[node] = out
        return out

    # --- reading -------------------------------------------------------------------------------
    def tensor(self, arg: Any) -> torch.Tensor | None:
        """A parameter as a tensor: itself, a ``get_attr``'s tensor, or a constant computed from
        parameters (a kernel generated in forward: costed by its real shape)."""
        t = tensor_of(self.root, arg)
        if t is None and isinstance(arg, fx.Node):
            value = self.consts.get(arg)
            t = value.value if value is not None else None
        return t if isinstance(t, torch.Tensor) else None

    def position(self, node: fx.Node) -> int:
        entry = self.entries.get(node)
        return entry.index if entry is not None else -1

    def what(self, node: fx.Node) -> str:
        return what(node, self.modules)

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        """Inputs computed from the model's input (not constants)."""
        return [i for i in node.all_input_nodes if i not in self.consts]

    def ordered(self, nodes: Iterable[fx.Node]) -> list[fx.Node]:
        return sorted(nodes, key=self.position)

    def op_counts(self) -> dict[str, int]:
        """How many ops of each kind the graph computes from its inputs (identities and constant
        arithmetic not counted), as :func:`reparam.count_ops` counts a graph."""
        counts: dict[str, int] = {}
        data: set[fx.Node] = set()
        for node, entry in self.entries.items():
            if node.op == "placeholder" or any(i in data for i in node.all_input_nodes):
                data.add(node)
                if entry.matches and entry.effect is not Effect.IDENTITY:
                    counts[entry.kind] = counts.get(entry.kind, 0) + 1
        return counts


def rules_of(entry: Entry) -> Sequence[tuple[Op, tuple[Rule, ...]]]:
    """The (op, rules) readings of a node, in the order to try them."""
    return [(m.op, m.rules) for m in entry.matches]
