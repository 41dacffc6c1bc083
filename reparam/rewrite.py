"""The one driver: give every node a value, decide where linear regions end, materialize them.

Walk the graph in topological order; each node is *opaque*, a *constant*, or *linear in one
source node* (:class:`~reparam.values.Lin`), as the rules say. A linear node must be materialized
(it is a *barrier*) when something other than a linear fold reads it: a non-linear op, the output,
an in-place op, or two regions that would each duplicate a non-trivial computation. Two branches
that meet only if one starts where the other passes through make that node a barrier too. A region
whose folded conv would cost more multiply-adds than the ops it replaces is split where the cost
arises (the cost policy). Barriers and kept ops only grow, so re-walking until nothing changes
terminates; a re-walk recomputes only nodes whose inputs changed. Then each barrier becomes one new
module reading its source, and the replaced nodes are removed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from .commute import push_affine
from .context import Context, _is_identity
from .materialize import to_module
from .observe import Observation
from .ops import (
    Op,
    describe,
    dtype_of,
    fetch,
    shape_of,
    tensor_of,
    why_kept,
)
from .report import Leftover, Region, Report
from .rules.tokens import SHAPE_KINDS, output_shape
from .values import OPAQUE, Const, Lin, NoFold, Rule, Value
from .verify import NotExtractable, region_module

_MISSING = object()


@dataclass
class Plan:
    values: dict[fx.Node, Value]
    barriers: set[fx.Node]
    reasons: dict[fx.Node, str] = field(default_factory=dict)
    hints: set[fx.Node] = field(default_factory=set)  # boundaries that would let a merge happen


def _per_sample(shape: Sequence[int] | None) -> int:
    return 0 if not shape else math.prod(shape[1:]) if len(shape) > 1 else 1


class Folder:
    """Folds one traced :class:`torch.fx.GraphModule` in place (the caller passes a copy)."""

    def __init__(self, gm: fx.GraphModule, rules: Sequence[Rule], max_cost: float = 1.0,
                 obs: Observation | None = None, keep: dict[str, str] | None = None) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.modules = dict(gm.named_modules())
        self.max_cost = max_cost
        self.enabled = {r.name for r in rules}
        self.by_kind: dict[str, list[Rule]] = {}
        for r in rules:
            for kind in r.kinds:
                self.by_kind.setdefault(kind, []).append(r)
        self.ops: dict[fx.Node, Op | None] = {
            n: describe(n, self.modules) for n in self.graph.nodes
        }
        self.obs = obs if obs is not None else Observation()
        self.mutated = self.obs.first_writer  # node -> the first op that writes it later
        for n in self.graph.nodes:
            n.meta["_reparam_what"] = _what(n, self.modules)
            n.meta["_reparam_linear"] = self.ops[n] is not None
        param = next(iter(gm.parameters()), None)
        self.device = param.device if param is not None else None
        keep = keep or {}
        # nodes kept as ops: by the cost policy, the dtype's range, or verification (``keep``)
        self.forced: dict[fx.Node, str] = {n: keep[n.name] for n in self.graph.nodes
                                           if n.name in keep}
        self.captured: dict[str, tuple] = {}  # region output -> (its ops, module, source)
        self.cost_reasons: dict[fx.Node, str] = {}  # where a dear region was split
        self._consts: dict[fx.Node, Value] = {}
        # node -> (identity of its inputs' values and barrier flags, its value, its reason):
        # a re-walk recomputes only nodes whose inputs changed
        self._memo: dict[fx.Node, tuple] = {}
        # a node's version changes whenever its value is recomputed (or it is forced opaque), so
        # a memo entry is valid while its inputs' versions and barrier flags are unchanged
        self._version: dict[fx.Node, int] = {}
        self._tick = 0

    # --- values ------------------------------------------------------------------------------
    def _const(self, node: fx.Node, values: dict[fx.Node, Value]) -> Value:
        """The value of a node that depends on constants only (``self.alpha.view(1, -1, 1, 1)``),
        as the observed run computed it, or computed here from constants the run could not know
        as such (a tensor's rank, ``x.dim()``); opaque if it drew random numbers, wrote a tensor
        or read state that forward writes."""
        if node in self.obs.random or node in self.obs.writers:
            return OPAQUE
        found = self.obs.consts.get(node, _MISSING)
        if found is not _MISSING:
            return Const(found)

        def read(a):
            return values[a].value if isinstance(a, fx.Node) else a

        args = fx.node.map_arg(node.args, read)
        kwargs = fx.node.map_arg(node.kwargs, read)
        try:
            with torch.no_grad():
                if node.op == "call_function":
                    return Const(node.target(*args, **kwargs))
                obj, *rest = args
                return Const(getattr(obj, node.target)(*rest, **kwargs))
        except Exception:  # noqa: BLE001 - anything that fails stays opaque
            return OPAQUE

    def _fold_node(self, node: fx.Node, op: Op, values: dict[fx.Node, Value],
                   barriers: set[fx.Node], reasons: dict[fx.Node, str],
                   hints: set[fx.Node]) -> Value:
        rules = self.by_kind.get(op.kind, [])
        merging = any(
            isinstance(values.get(a), Lin) and a not in barriers and values[a].nodes
            for a in node.all_input_nodes
        )
        first_reason: str | None = None
        for cut in (False, True) if merging else (False,):
            last_reason = None
            for r in rules:
                ctx = Context(node, op, values, barriers, self.mutated, self.enabled, cut=cut,
                              device=self.device)
                try:
                    result = r.fold(ctx, op)
                except NoFold as e:
                    last_reason = str(e)
                    if not cut and e.barrier is not None and e.barrier not in barriers:
                        hints.add(e.barrier)
                    continue
                if result is not None:
                    if cut:
                        reasons[node] = first_reason or ""
                    return result
            if first_reason is None:
                first_reason = last_reason
                if first_reason is None and merging and op.kind not in SHAPE_KINDS:
                    first_reason = f"no rule in the rule set folds '{op.kind}'"
        if first_reason is not None:
            reasons[node] = first_reason
        return OPAQUE

    def interpret(self, barriers: set[fx.Node]) -> Plan:
        """One walk over the graph: the value of every node, given the current barriers.

        A kernel is kept only while a node still to be walked may read it: once every user of an
        inner node has been walked, its kernel is *spent* (its tensors move to the meta device,
        keeping the geometry the plan reads). A later walk that needs it again recomputes it from
        its inputs, which gives the same value since they are unchanged. Only the barriers' kernels
        (the regions' results) stay, so the walk holds the frontier, not every intermediate kernel.
        """
        values: dict[fx.Node, Value] = {}
        hints: set[fx.Node] = set()
        reasons: dict[fx.Node, str] = {}
        waiting = {n: len(n.users) for n in self.graph.nodes}
        for node in self.graph.nodes:
            revived = self._visit(node, values, barriers, reasons, hints)
            if node in barriers:
                self._settle(node, values)
            for i in node.all_input_nodes:
                waiting[i] -= 1
            for i in {*node.all_input_nodes, *revived}:
                if waiting[i] <= 0 and i not in barriers:
                    self._spend(i, values)
        return Plan(values, barriers, reasons, hints)

    def _visit(self, node: fx.Node, values: dict[fx.Node, Value], barriers: set[fx.Node],
               reasons: dict[fx.Node, str], hints: set[fx.Node]) -> list[fx.Node]:
        """Compute ``values[node]``; returns the spent inputs it had to recompute."""
        if node.op == "placeholder" or node.op == "output":
            values[node] = OPAQUE
        elif node.op == "get_attr":
            if node in self.obs.state:
                values[node] = OPAQUE
                reasons[node] = "forward writes this tensor, so it is state, not a constant"
                return []
            if node not in self._consts:  # a moved BN's scale keeps its float64 value
                exact = node.meta.get("reparam_exact")
                self._consts[node] = Const(exact if exact is not None
                                           else fetch(self.gm, str(node.target)))
            values[node] = self._consts[node]
        elif node in self.obs.random:
            values[node] = OPAQUE
            reasons[node] = (f"{_what(node, self.modules)} draws random numbers "
                             f"({self.obs.random[node]}), so it is kept as it is")
        elif node in self.forced:
            values[node] = OPAQUE
            reasons[node] = self.forced[node]
            if self._memo.get(node, (None,))[0] != "forced":
                self._memo[node] = ("forced",)
                self._bump(node)
        elif _is_rank_query(node):
            values[node] = Const(len(shape_of(node.args[0])))
        else:
            inputs = node.all_input_nodes
            if node.op != "call_module" and all(isinstance(values.get(i), Const) for i in inputs):
                if node not in self._consts:
                    self._consts[node] = self._const(node, values)
                values[node] = self._consts[node]
                return []
            op = self.ops[node]
            if op is None:
                values[node] = OPAQUE
                why = why_kept(node, self.modules)
                if why is not None:
                    reasons[node] = why
                return []
            key = tuple((self._version.get(i, 0), i in barriers) for i in inputs)
            memo = self._memo.get(node)
            if memo is not None and memo[0] == key:
                values[node] = memo[1]
                if memo[2] is not None:
                    reasons[node] = memo[2]
                hints |= memo[3] - barriers
                # a region's result keeps its kernel: a node that became a barrier gets it back
                return self._revive([node], values, barriers) if node in barriers else []
            revived = self._revive(inputs, values, barriers)
            found: set[fx.Node] = set()
            values[node] = self._fold_node(node, op, values, barriers, reasons, found)
            self._memo[node] = (key, values[node], reasons.get(node), found)
            self._bump(node)
            hints |= found
            return revived
        return []

    def _settle(self, node: fx.Node, values: dict[fx.Node, Value]) -> None:
        """Cast a region's result to the dtype its module will have: nothing reads a barrier's
        kernel but materialization (which casts it the same way) and the cost policy (which
        reads its geometry), so this rounds once, as materializing would, and halves what the
        plan holds."""
        value = values.get(node)
        if not isinstance(value, Lin) or _spent(value):
            return
        dtype = dtype_of(node) or torch.float32
        dtype = dtype if dtype.is_floating_point else torch.float32
        k = value.kernel
        if k.weight.dtype == dtype:
            return
        cast = replace(k, weight=k.weight.to(dtype), bias=k.bias.to(dtype))
        self._replace(node, values, Lin(value.source, cast, value.nodes, value.rules))

    def _spend(self, node: fx.Node, values: dict[fx.Node, Value]) -> None:
        """Let the kernel of a node nobody will read in this walk go (see :meth:`interpret`)."""
        value = values.get(node)
        if isinstance(value, Lin) and not _spent(value):
            self._replace(node, values, _release(value))

    def _replace(self, node: fx.Node, values: dict[fx.Node, Value], new: Value) -> None:
        """Give ``node`` the same value in another form (cast, released, recomputed), in this
        walk and in the memo where the memo held the old form."""
        old = values.get(node)
        values[node] = new
        memo = self._memo.get(node)
        if memo is not None and memo[1] is old:
            self._memo[node] = (memo[0], new, *memo[2:])

    def _revive(self, inputs: Sequence[fx.Node], values: dict[fx.Node, Value],
                barriers: set[fx.Node]) -> list[fx.Node]:
        """Recompute the spent kernels among ``inputs`` (and theirs, as far as needed), in graph
        order. Their inputs are unchanged (their memo keys matched), so the values are the same
        and their versions stay."""
        todo: list[fx.Node] = []
        stack = [i for i in inputs if isinstance(values.get(i), Lin) and _spent(values[i])]
        while stack:
            n = stack.pop()
            if n in todo:
                continue
            todo.append(n)
            stack += [i for i in n.all_input_nodes
                      if isinstance(values.get(i), Lin) and _spent(values[i])]
        todo.sort(key=_order)
        for n in todo:
            self._replace(n, values, self._fold_node(n, self.ops[n], values, barriers, {}, set()))
        return todo

    def _bump(self, node: fx.Node) -> None:
        self._tick += 1
        self._version[node] = self._tick

    # --- where regions end ---------------------------------------------------------------------
    def _escaping(self, plan: Plan) -> set[fx.Node]:
        new = set()
        for node, value in plan.values.items():
            if not isinstance(value, Lin) or node in plan.barriers:
                continue
            if node in self.mutated:
                new.add(node)
                continue
            for user in node.users:
                uv = plan.values.get(user)
                if _is_rank_query(user):
                    continue  # reads the layout only, which the folded node keeps
                if not (isinstance(uv, Lin) and node in uv.nodes):
                    new.add(node)
                    break
        if new:  # judge duplication only on a walk whose barriers include every escape
            return new
        count = Counter(n for b in plan.barriers if isinstance(plan.values[b], Lin)
                        for n in plan.values[b].nodes)
        for node, times in count.items():
            value = plan.values[node]
            if times > 1 and node not in plan.barriers and not value.kernel.is_diagonal:
                new.add(node)
        return new

    def op_cost(self, node: fx.Node) -> int:
        """Multiply-adds of one original op, per sample."""
        op = self.ops.get(node)
        if op is None:
            return 0
        out = shape_of(node)
        if op.kind in ("conv", "linear"):
            w = self._tensor(op.attrs["weight"])
            if w is None:
                return 0
            if op.kind == "linear":
                return _per_sample(out) * w.shape[1]
            taps = math.prod(w.shape[2:])
            if op.attrs["transposed"]:
                return _per_sample(shape_of(op.inputs[0])) * w.shape[1] * taps
            return _per_sample(out) * w.shape[1] * taps
        if op.kind in ("identity", "pad", "cat", *SHAPE_KINDS):
            return 0
        if op.kind == "avg_pool":
            return _per_sample(out) * math.prod(op.attrs["kernel_size"])
        return _per_sample(out)

    def kernel_cost(self, node: fx.Node, value: Lin) -> int:
        """Multiply-adds of the folded kernel, per sample."""
        k = value.kernel
        if k.transposed:  # a transposed conv scatters from every input position
            return k.macs(_per_sample(shape_of(value.source)) // max(k.in_channels, 1))
        positions = _per_sample(shape_of(node)) // max(k.out_channels, 1)
        if k.nd == 0:  # nn.Linear has no groups: it costs the dense product
            return k.in_channels * k.out_channels * positions
        return k.macs(positions)

    def _too_dear(self, plan: Plan) -> tuple[set[fx.Node], dict[fx.Node, str]]:
        """Regions whose folded kernel costs more than their ops, and where to split each.

        Split where the cost arises: at the last conv composed onto a non-trivial map (that map
        becomes a region of its own), else at the last sum or concat of linear branches (kept as
        an op), else at the region's end. Returns the new barriers and the nodes kept as ops.
        """
        cuts: set[fx.Node] = set()
        forced: dict[fx.Node, str] = {}
        for b in plan.barriers:
            value = plan.values[b]
            if not isinstance(value, Lin) or self._trivial(value) or _is_identity(value.kernel):
                continue
            before = sum(self.op_cost(n) for n in value.nodes)
            after = self.kernel_cost(b, value)
            nodes = sorted(value.nodes, key=_order, reverse=True)
            if after <= before * self.max_cost:
                trunk = self._dear_trunk(plan, b, value, nodes)
                if trunk is not None:
                    cuts.add(trunk[0])
                    self.cost_reasons[trunk[1]] = trunk[2]
                continue
            why = (f"folding {len(value.nodes)} ops into {value.kernel.geometry()} would cost "
                   f"{after:,} multiply-adds, more than the {before:,} they cost now (cost policy "
                   f"max_cost={self.max_cost})")
            split = self._composition_point(plan, nodes) or self._branch_point(plan, nodes)
            if split is not None and split[1] is not None:
                cuts.add(split[1])
                self.cost_reasons[split[0]] = why
            else:
                forced[split[0] if split is not None else b] = why
        return cuts, forced

    def _wrong_shape(self, plan: Plan) -> dict[fx.Node, str]:
        """Barriers whose folded module would not reproduce the traced shape (a region that
        ends inside a shape-only sandwich): kept as ops."""
        out = {}
        for b in plan.barriers:
            value = plan.values[b]
            if not isinstance(value, Lin) or self._trivial(value):
                continue
            source, want = shape_of(value.source), shape_of(b)
            if source is None or want is None:
                continue
            if output_shape(value.kernel, source) != tuple(want):
                out[b] = "a shape-only op inside this region is not undone here"
        return out

    def _out_of_range(self, plan: Plan) -> dict[fx.Node, str]:
        """Regions whose folded kernel, cast to the model's dtype (by :meth:`_settle`), is not
        finite: a float16 or bfloat16 model whose BN scales overflow once multiplied in."""
        out = {}
        for b in plan.barriers:
            value = plan.values[b]
            if not isinstance(value, Lin) or self._trivial(value) or _spent(value):
                continue
            k = value.kernel
            if not (bool(torch.isfinite(k.weight).all()) and bool(torch.isfinite(k.bias).all())):
                out[b] = (f"the folded weights do not fit in {k.weight.dtype} (they overflow "
                          "once the BN scale is multiplied in), so this region is kept unfolded")
        return out

    def _trivial(self, value: Lin) -> bool:
        """Fewer than two real ops: nothing to merge (identity ops vanish on their own)."""
        return sum(1 for n in value.nodes if self.ops[n].kind != "identity") < 2

    def _dear_trunk(self, plan: Plan, b: fx.Node, value: Lin, nodes: list[fx.Node]):
        """A point ``x`` inside the region that everything after it depends on alone (``x``
        dominates the rest, so nothing downstream needs both parts in one kernel to merge), where
        folding through costs more than keeping ``x`` apart: ``(x, first node after, reason)``."""
        region = value.nodes
        ordered = sorted(region, key=_order)
        together = self.kernel_cost(b, value)
        for x in reversed(ordered):  # latest first
            xv = plan.values.get(x)
            if x is b or not (isinstance(xv, Lin) and xv.nodes and x not in plan.barriers
                              and not xv.kernel.is_diagonal):
                continue
            after = [m for m in ordered if _order(m) > _order(x)]
            dominated = {x}
            for m in after:
                inside = [i for i in m.all_input_nodes if i in region or i is value.source]
                if inside and all(i in dominated for i in inside):
                    dominated.add(m)
            if b not in dominated:
                continue
            apart = self.kernel_cost(x, xv) + sum(self.op_cost(m) for m in dominated
                                                  if m is not x)
            if together > apart * self.max_cost:
                first = min((m for m in dominated if m is not x), key=_order)
                return x, first, (f"folding through '{x.name}' into {value.kernel.geometry()} "
                                  f"would cost {together:,} multiply-adds, more than the "
                                  f"{apart:,} of the two parts apart (cost policy)")
        return None

    def _composition_point(self, plan: Plan, nodes: list[fx.Node]):
        for n in nodes:
            op = self.ops.get(n)
            if op is None or op.kind not in ("conv", "linear", "avg_pool"):
                continue
            x = op.inputs[0]
            xv = plan.values.get(x)
            if (isinstance(xv, Lin) and xv.nodes and x not in plan.barriers
                    and not xv.kernel.is_diagonal):
                return n, x
        return None

    def _branch_point(self, plan: Plan, nodes: list[fx.Node]):
        for n in nodes:
            op = self.ops.get(n)
            if op is not None and op.kind in ("add", "sub", "cat") and sum(
                isinstance(plan.values.get(a), Lin) for a in n.all_input_nodes
            ) >= 2:
                return n, None
        return None

    def plan(self) -> Plan:
        """Re-walk until the barriers are stable. Reasons come from the first walk, where every
        region is as large as it can be (later walks read barriers as opaque sources)."""
        barriers: set[fx.Node] = set()
        first: dict[fx.Node, str] | None = None
        for _ in range(10_000):
            plan = self.interpret(barriers)
            first = plan.reasons if first is None else first
            if plan.hints:  # make meeting points boundaries first, then judge escapes
                barriers |= plan.hints
                continue
            new = self._escaping(plan)
            if new:
                barriers |= new
                continue
            cuts, forced = self._too_dear(plan)
            forced.update(self._wrong_shape(plan))
            forced.update(self._out_of_range(plan))
            if not cuts and not forced:
                plan.reasons = {**self._alone(plan), **first, **self.cost_reasons,
                                **self.forced}
                return plan
            barriers |= cuts
            self.forced.update(forced)
            barriers -= set(forced)
        raise RuntimeError("reparam: the fold did not reach a fixpoint")  # pragma: no cover

    def _alone(self, plan: Plan) -> dict[fx.Node, str]:
        """Why a BN or a constant scale or shift stays as an op of its own: a region of one op,
        with nothing linear on either side that it could be folded into."""
        out = {}
        for b in plan.barriers:
            value = plan.values[b]
            if not isinstance(value, Lin) or not self._trivial(value):
                continue
            real = [n for n in value.nodes if self.ops[n].kind != "identity"]
            if len(real) != 1 or self.ops[real[0]].kind not in _ABSORBABLE:
                continue
            node = real[0]
            x = value.source
            xv = plan.values.get(x)
            if isinstance(xv, Lin) and xv.nodes:
                others = [u.name for u in x.users if u not in value.nodes]
                before = (f"its input '{x.name}' ({_what(x, self.modules)}) is also read by "
                          f"{_names(others)}, so it cannot take this op in")
            else:
                before = f"its input '{x.name}' comes from {_what(x, self.modules)}, not linear"
            users = [u for u in b.users if not _is_rank_query(u)]
            after = ", ".join(f"'{u.name}' ({_what(u, self.modules)})" for u in users)
            out[node] = (f"nothing linear to fold it into: {before}; its output goes to "
                         f"{after or 'nothing'}, which no rule in the rule set folds it into")
        return out

    # --- rewriting -----------------------------------------------------------------------------
    def materialize(self, plan: Plan, capture: bool = False) -> Report:
        """Replace each region by one new module, releasing its float64 kernel as it goes. With
        ``capture``, each region's original ops are kept apart as a module of its source (for
        verification to check the region alone)."""
        self._memo.clear()  # the plan is final: no walk reads the memo's kernels again
        report = Report()
        removed: set[fx.Node] = set()
        pending: list[tuple[str, str, nn.Module]] = []
        done: dict[fx.Node, fx.Node] = {}  # barrier -> the node that now computes it
        for b in [n for n in self.graph.nodes if n in plan.barriers]:
            value = plan.values[b]
            if not isinstance(value, Lin):
                continue
            if _spent(value):  # pragma: no cover - interpret keeps every barrier's kernel
                raise RuntimeError(f"reparam: the kernel of '{b}' was released too early")
            source = done.get(value.source, value.source)
            if _is_identity(value.kernel) and value.source is not b:
                if (b in self.mutated or value.source in self.mutated
                        or any(n.op == "call_method" for n in value.nodes)):
                    continue  # clone() and contiguous() make a new tensor or layout: they stay
                b.replace_all_uses_with(source)
                done[b] = source
                removed |= value.nodes
                continue
            if self._trivial(value):
                continue
            main = max(value.nodes, key=lambda n: (self.op_cost(n), -_order(n)))
            base = self._module_name(main) or b.name
            module = to_module(value.kernel, value.kernel.weight.dtype,  # cast by _settle
                               bias=self._has_bias_source(value.nodes))
            fmt = self._memory_format(main)
            if fmt is not None and module.weight.dim() == 4 + (fmt is torch.channels_last_3d):
                module.to(memory_format=fmt)
            temp = f"_reparam_tmp_{len(pending)}"
            if capture:
                try:
                    ops = region_module(self.gm, value.source, value.nodes, b, self._is_const)
                    self.captured[b.name] = (ops, module, value.source)
                except NotExtractable:
                    pass
            self.gm.add_submodule(temp, module)
            # where the region starts: its ops read the source there, before any later write
            start = min(value.nodes, key=_order)
            with self.graph.inserting_before(start):
                new = self.graph.call_module(temp, (source,))
            new.meta = dict(b.meta)
            b.replace_all_uses_with(new)
            done[b] = new
            removed |= value.nodes
            pending.append((temp, base, module))
            replaced = tuple(n.name for n in sorted(value.nodes, key=_order))
            report.regions.append(Region(
                temp, replaced, value.rules, value.kernel.geometry(),
                self._params(value.nodes), sum(p.numel() for p in module.parameters()),
                sum(self.op_cost(n) for n in value.nodes), self.kernel_cost(b, value),
                output=b.name, source=value.source.name))
            plan.values[b] = _release(value)  # its float64 kernel now lives on in the module
        for node in [n for n in self.graph.nodes if _is_rank_query(n)]:
            x = node.args[0]
            if x in removed:  # the folded region keeps the rank: ask its source
                source = next(plan.values[b].source for b in plan.barriers
                              if isinstance(plan.values[b], Lin) and x in plan.values[b].nodes)
                node.replace_input_with(x, done.get(source, source))
        self._erase(removed)
        for node in self.graph.nodes:
            if node.op in ("placeholder", "output") and isinstance(node.type, str):
                node.type = None  # a string annotation (PEP 563) would not script
        self.gm.delete_all_unused_submodules()
        names = self._rename(pending)
        report.regions = [replace(r, name=names[r.name][0], node=names[r.name][1])
                          for r in report.regions]
        seen = set()
        for node, reason in sorted(plan.reasons.items(), key=lambda item: _order(item[0])):
            if node.name in seen:
                continue
            seen.add(node.name)
            op = self.ops.get(node)
            report.leftovers.append(Leftover(node.name, op.kind if op else node.op, reason))
        self.gm.recompile()
        return report

    def _tensor(self, arg) -> torch.Tensor | None:
        """A parameter as a tensor: itself, a ``get_attr``'s tensor, or a constant computed from
        parameters (a kernel generated in forward: costed by its real shape)."""
        t = tensor_of(self.gm, arg)
        if t is None and isinstance(arg, fx.Node):
            value = self._consts.get(arg)
            t = value.value if isinstance(value, Const) else self.obs.consts.get(arg)
        return t if isinstance(t, torch.Tensor) else None

    def _is_const(self, node: fx.Node) -> bool:
        return isinstance(self._consts.get(node), Const)

    def _memory_format(self, node: fx.Node) -> torch.memory_format | None:
        """The channels-last format of a conv's weight (kept by the module that replaces it)."""
        op = self.ops.get(node)
        if op is None or op.kind != "conv":
            return None
        w = op.attrs["weight"]
        w = tensor_of(self.gm, w)
        if w is None or w.is_contiguous():
            return None
        for fmt in (torch.channels_last, torch.channels_last_3d):
            if w.dim() == 4 + (fmt is torch.channels_last_3d) and w.is_contiguous(
                    memory_format=fmt):
                return fmt
        return None

    def _has_bias_source(self, nodes: set[fx.Node]) -> bool:
        """Whether any op of a region adds a bias (a BN, a biased conv, a constant shift)."""
        for n in nodes:
            op = self.ops.get(n)
            if op is None:
                continue
            if op.kind == "batch_norm" or op.kind in ("add", "sub") and any(
                not isinstance(a, fx.Node) or isinstance(self._consts.get(a), Const)
                or a.op == "get_attr" for a in op.inputs
            ):
                return True
            if op.kind in ("conv", "linear") and op.attrs.get("bias") is not None:
                return True
        return False

    def _params(self, nodes: set[fx.Node]) -> int:
        seen: dict[int, int] = {}
        for n in nodes:
            op = self.ops.get(n)
            if op is None:
                continue
            for key in ("weight", "bias", "mean", "var"):
                t = op.attrs.get(key)
                t = tensor_of(self.gm, t)
                if isinstance(t, torch.Tensor) and key in ("weight", "bias"):
                    seen[id(t)] = t.numel()
                elif isinstance(t, torch.Tensor) and op.kind == "batch_norm":
                    seen[id(t)] = 0  # buffers, not parameters
        return sum(seen.values())

    def _module_name(self, node: fx.Node) -> str | None:
        if node.op == "call_module":
            return str(node.target)
        op = self.ops.get(node)
        weight = op.attrs.get("weight") if op else None
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            return str(weight.target).rsplit(".", 1)[0]
        return None

    def _erase(self, removed: set[fx.Node]) -> None:
        for node in reversed(list(self.graph.nodes)):
            if node.users or node.op in ("placeholder", "output"):
                continue
            if (node in removed or node.op == "get_attr" or _is_rank_query(node)
                    or isinstance(self._consts.get(node), Const)):
                self.graph.erase_node(node)

    def _rename(self, pending: list[tuple[str, str, nn.Module]]) -> dict[str, tuple[str, str]]:
        """Give each new module the name of the main branch it came from, where that is free.

        Returns ``temp -> (module name, node name)``.
        """
        names = {}
        taken = {name for name, _ in self.gm.named_modules()}
        nodes = {n.target: n for n in self.graph.nodes if n.op == "call_module"}
        for temp, base, module in pending:
            name, i = base, 1
            while name in taken or _has_attr(self.gm, name):
                name = f"{base}_{i}"
                i += 1
            taken.add(name)
            self.gm.delete_submodule(temp)
            self.gm.add_submodule(name, module)
            old = nodes[temp]
            with self.graph.inserting_before(old):
                new = self.graph.call_module(name, old.args)
            new.meta = old.meta
            old.replace_all_uses_with(new)
            self.graph.erase_node(old)
            names[temp] = (name, new.name)
        return names


def _what(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """What a node computes, in a word: the module's class or the function's name."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return type(module).__name__ if module is not None else str(node.target)
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


_ABSORBABLE = ("batch_norm", "mul", "div", "add", "sub", "neg")  # ops a neighbour could take in


def _names(nodes: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in nodes[:3]) + (f" and {len(nodes) - 3} more"
                                                     if len(nodes) > 3 else "")


def _spent(value: Lin) -> bool:
    return value.kernel.weight.is_meta


def _release(value: Lin) -> Lin:
    """The same value with its kernel's tensors on the meta device: geometry only, no memory."""
    k = value.kernel
    meta = replace(k, weight=k.weight.to("meta"), bias=k.bias.to("meta"))
    return Lin(value.source, meta, value.nodes, value.rules)


def _is_rank_query(node: fx.Node) -> bool:
    """``x.dim()`` or ``x.ndim``: fixed by the traced layout, safe to read as a constant."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or shape_of(x) is None:
        return False
    if node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1:
        return True
    return (node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[1] == "ndim")


def _order(node: fx.Node) -> int:
    return node.meta.setdefault("_reparam_order", id(node))


def _has_attr(gm: nn.Module, path: str) -> bool:
    try:
        fetch(gm, path)
    except AttributeError:
        return False
    return True


def drop_identities(gm: fx.GraphModule, obs: Observation) -> None:
    """Remove ``nn.Identity``, eval-mode dropout and ``F.dropout(training=False)`` calls: each
    returns its input tensor itself, so its users may read the input directly."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        op = describe(node, modules)
        if op is None or op.kind != "identity" or node.op == "call_method":
            continue  # clone() copies and contiguous() may: those stay
        if (not isinstance(op.inputs[0], fx.Node) or node.kwargs.get("inplace")
                or node in obs.random or node in obs.writers):
            continue
        node.replace_all_uses_with(op.inputs[0])
        gm.graph.erase_node(node)


def fold_graph(gm: fx.GraphModule, rules: Sequence[Rule], max_cost: float = 1.0,
               obs: Observation | None = None, keep: dict[str, str] | None = None,
               captured: dict | None = None) -> Report:
    """Fold ``gm`` in place (after the observed run ``obs`` of it) and return the report.

    ``keep`` maps node names to keep unfolded to the reason; with ``captured`` (a dict), each
    region's original ops are stored in it for :mod:`reparam.verify`."""
    obs = obs if obs is not None else Observation()
    drop_identities(gm, obs)
    moved = push_affine(gm, {r.name for r in rules}, obs.first_writer)
    for i, node in enumerate(gm.graph.nodes):
        node.meta["_reparam_order"] = i
    folder = Folder(gm, rules, max_cost, obs, keep)
    plan = folder.plan()
    report = folder.materialize(plan, capture=captured is not None)
    if captured is not None:
        captured.update(folder.captured)
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in moved:  # a moved BN's scale and shift, now folded into a linear layer
        if name not in read:
            delattr(gm, name)
    for node in gm.graph.nodes:
        node.meta.pop("_reparam_order", None)
        node.meta.pop("_reparam_what", None)
        node.meta.pop("_reparam_linear", None)
    return report
