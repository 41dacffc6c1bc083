"""Region-boundary policies: where a linear region must end, or which op must stay as it is.

Each policy reads the settled analysis and returns a :class:`Decision` (new boundaries, ops to
keep with the reason) or ``None``. The driver applies the first policy, in :data:`POLICIES`
order, that decides something, lets the analysis settle again, and starts over from the first,
until none decides anything:

1. :func:`meeting_points` - two branches that meet only if one starts where the other passes
   through (a rule's refusal names that node);
2. :func:`escapes` - a linear value read by something that does not take it in (a non-linear op,
   the output, an in-place write);
3. :func:`idle_views` - a per-channel map moved past layout ops that nothing takes in after
   them: it stays where it was (or an average pool takes it in as a conv);
4. :func:`shared_frontiers` - a value read by two regions that would each duplicate the work
   before it: the region ends where they diverge, not at the first shared op;
5. :func:`too_dear` - a region whose folded kernel costs more than its ops (the cost policy),
   split where the cost arises;
6. :func:`wrong_shape` - a region that would end inside a shape-only sandwich;
7. :func:`out_of_range` - a folded kernel that does not fit in the model's dtype.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import fx

from .analysis import Analysis, reads_layout_only, spent
from .context import is_identity
from .cost import kernel_cost, ops_cost, output_shape
from .ir import IR
from .nodes import is_shape_query, shape_of
from .pattern import Effect
from .values import Lin, View, source_shape


@dataclass
class Decision:
    """What a policy decided: regions end at ``bound``; the ops in ``keep`` stay, with the reason;
    no per-channel map moves past the layout ops in ``still``; ``notes`` are reasons to report
    for nodes inside regions that were split."""

    bound: set[fx.Node] = field(default_factory=set)
    keep: dict[fx.Node, str] = field(default_factory=dict)
    still: set[fx.Node] = field(default_factory=set)
    notes: dict[fx.Node, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.bound or self.keep or self.still)


@dataclass
class State:
    """What the policies read: the analysis, the IR, and the cost policy's bound."""

    analysis: Analysis
    ir: IR
    max_cost: float

    def regions(self) -> list[tuple[fx.Node, Lin]]:
        """Every boundary whose value is a linear map: the regions as they stand."""
        values = self.analysis.values
        return [(b, values[b]) for b in self.analysis.boundaries
                if isinstance(values.get(b), Lin)]

    def trivial(self, value: Lin) -> bool:
        return trivial(self.ir, value)


def trivial(ir: IR, value: Lin) -> bool:
    """Nothing to gain from a module: fewer than two ops to merge (identities vanish on their own,
    and the layout ops a per-channel map was moved through are re-made on the source, not merged)
    and no kernel computed from parameters (that one is worth a plain conv even alone); or only
    arithmetic with constants, no parameter (a module would add parameters)."""
    chain = set(value.source.chain) if isinstance(value.source, View) else set()
    real = [n for n in value.nodes
            if ir.entries[n].effect is not Effect.IDENTITY and n not in chain]
    if value.reshaped is not None:  # a flat value's reshapes are made anew, not merged
        real = [n for n in real if ir.entries[n].effect is not Effect.LAYOUT]
    if all(ir.entries[n].effect is not Effect.MAP and not ir.entries[n].params for n in real):
        return True  # arithmetic with constants only (``x * 2 - 0.5``): nothing to take in
    return len(real) < 2 and not any(ir.entries[n].computed for n in real)


Policy = Callable[[State], Decision | None]


def meeting_points(state: State) -> Decision | None:
    """Nodes a rule named as the meeting point of two branches (GhostNet's ``k(p) + bn(p)``: the
    BN branch passes through ``p``, where the other starts)."""
    a = state.analysis
    new = a.hints - a.boundaries
    a.hints.clear()
    return Decision(bound=new) if new else None


def escapes(state: State) -> Decision | None:
    """A linear value that something other than a linear fold reads must be materialized: read
    by a non-linear op, by the output, or written in place later. A shape query does not need
    the value, only its shape, when the region's source has that shape too."""
    a = state.analysis
    new: dict[fx.Node, list[fx.Node]] = {}  # escaping node -> the users that do not take it in
    for node, value in a.values.items():
        if not isinstance(value, Lin) or node in a.boundaries or not value.nodes:
            continue
        if node in a.mutated:
            new[node] = []
            continue
        for user in node.users:
            if reads_layout_only(user, node, value):
                continue  # reads the layout only, which the source has too
            uv = a.values.get(user)
            if not (isinstance(uv, Lin) and node in uv.nodes):
                new.setdefault(node, []).append(user)
    bound = {n for n, users in new.items() if not _may_move_on(state, n, users, new)}
    return Decision(bound=bound) if bound else None


def _may_move_on(state: State, node: fx.Node, users: list[fx.Node],
                 escaping: dict[fx.Node, list[fx.Node]]) -> bool:
    """A per-channel op (a BN) read by layout ops alone, whose input ends a region in the same
    decision: once that boundary is made, the op is a per-channel map of it, which the layout
    ops can move on into the linear op after them (FastViT's ``norm`` of a RepCPE sum, read by
    its residual too, then ``flatten -> transpose -> qkv``). It is decided in the next round.
    ``escaping``: every node that escapes in this decision, with its users."""
    entry = state.ir.entries.get(node)
    return (bool(users) and entry is not None and entry.effect is Effect.AFFINE
            and all(state.ir.entries[u].effect is Effect.LAYOUT for u in users)
            and any(i in escaping for i in node.all_input_nodes))


def idle_views(state: State) -> Decision | None:
    """A per-channel map moved past layout ops where nothing linear takes it in after them (the
    region has no other op to merge with): stop moving it there, so that it stays with the ops
    before (or an average pool takes it in as a conv)."""
    still = set()
    for _, value in state.regions():
        if isinstance(value.source, View) and state.trivial(value):
            still |= set(value.source.chain)
    still -= state.analysis.no_view
    return Decision(still=still) if still else None


def shared_frontiers(state: State) -> Decision | None:
    """Ops inside two regions would be computed twice. A per-channel map is cheap to duplicate
    (a BN read by two convs folds into both); for anything else the regions end where they
    diverge: at a shared op read by an op outside the shared part (``y = bn(conv(x))`` read by
    two non-linear branches keeps the conv+BN one region ending at ``y``)."""
    a = state.analysis
    count = Counter(n for _, value in state.regions() for n in value.nodes)
    shared = {n for n, times in count.items() if times > 1 and n not in a.boundaries}
    costly = {n for n in shared if not _diagonal(a, n)}
    frontier = {n for n in costly
                if any(u not in shared for u in n.users if not is_shape_query(u))}
    return Decision(bound=frontier) if frontier else None


def _diagonal(a: Analysis, node: fx.Node) -> bool:
    value = a.values.get(node)
    return isinstance(value, Lin) and value.kernel.is_diagonal


def too_dear(state: State) -> Decision | None:
    """Regions whose folded kernel costs more multiply-adds than their ops, and where to split
    each: at the last conv composed onto a non-trivial map (that map becomes a region of its own),
    else at the last sum or concat of linear branches (kept as an op), else at the region's end.
    A region no dearer than its ops may still fold through a point that dominates the rest at a
    cost (:func:`_dear_trunk`)."""
    ir = state.ir
    decision = Decision()
    for b, value in state.regions():
        if state.trivial(value) or spent(value) or is_identity(value.kernel):
            continue
        before = ops_cost(ir, value.nodes)
        after = kernel_cost(b, value)
        nodes = sorted(value.nodes, key=ir.position, reverse=True)
        if after <= before * state.max_cost:
            trunk = _dear_trunk(state, b, value)
            if trunk is not None:
                decision.bound.add(trunk[0])
                decision.notes[trunk[1]] = trunk[2]
            continue
        why = (f"folding {len(value.nodes)} ops into {value.kernel.geometry()} would cost "
               f"{after:,} multiply-adds, more than the {before:,} they cost now (cost policy "
               f"max_cost={state.max_cost})")
        split = _composition_point(state, nodes) or _branch_point(state, nodes)
        if split is not None and split[1] is not None:
            decision.bound.add(split[1])
            decision.notes[split[0]] = why
        else:
            decision.keep[split[0] if split is not None else b] = why
    return decision or None


def _dear_trunk(state: State, b: fx.Node, value: Lin):
    """A point ``x`` inside the region that everything after it depends on alone (``x``
    dominates the rest, so nothing downstream needs both parts in one kernel to merge), where
    folding through costs more than keeping ``x`` apart: ``(x, first node after, reason)``."""
    a, ir = state.analysis, state.ir
    region = value.nodes
    ordered = ir.ordered(region)
    together = kernel_cost(b, value)
    for x in reversed(ordered):  # latest first
        xv = a.values.get(x)  # its geometry is all the cost needs
        if x is b or not (isinstance(xv, Lin) and xv.nodes and x not in a.boundaries
                          and not xv.kernel.is_diagonal):
            continue
        after = [m for m in ordered if ir.position(m) > ir.position(x)]
        dominated = {x}
        for m in after:
            inside = [i for i in m.all_input_nodes if i in region or i is _node(value.source)]
            if inside and all(i in dominated for i in inside):
                dominated.add(m)
        if b not in dominated:
            continue
        apart = kernel_cost(x, xv) + ops_cost(ir, (m for m in dominated if m is not x))
        if together > apart * state.max_cost:
            first = min((m for m in dominated if m is not x), key=ir.position)
            return x, first, (f"folding through '{x.name}' into {value.kernel.geometry()} "
                              f"would cost {together:,} multiply-adds, more than the {apart:,} "
                              "of the two parts apart (cost policy)")
    return None


def _node(source) -> fx.Node:
    return source.base if isinstance(source, View) else source


def _composition_point(state: State, nodes: list[fx.Node]):
    """The last op that applies a kernel (a conv, a linear layer, a pool) to a region that is
    not a per-channel map: composing there is what costs."""
    a, ir = state.analysis, state.ir
    for n in nodes:
        entry = ir.entries[n]
        if entry.effect is not Effect.MAP or not entry.op.inputs:
            continue
        x = entry.op.inputs[0]
        xv = a.values.get(x)
        if (isinstance(xv, Lin) and xv.nodes and x not in a.boundaries
                and not xv.kernel.is_diagonal):
            return n, x
    return None


def _branch_point(state: State, nodes: list[fx.Node]):
    """The last sum or concat of two or more linear branches."""
    a, ir = state.analysis, state.ir
    for n in nodes:
        if ir.entries[n].effect is Effect.JOIN and sum(
                isinstance(a.values.get(i), Lin) for i in n.all_input_nodes) >= 2:
            return n, None
    return None


def wrong_shape(state: State) -> Decision | None:
    """Regions whose folded module would not reproduce the traced shape (a region that ends
    inside a shape-only sandwich): their ends are kept as ops."""
    keep = {}
    for b, value in state.regions():
        if state.trivial(value):
            continue
        source, want = source_shape(value.source), shape_of(b)
        if source is None or want is None:
            continue
        made = output_shape(value.kernel, source)
        if value.reshaped is not None:  # the module's output is reshaped as that node reshapes
            if made is not None and shape_of(value.reshaped) == want and math.prod(
                    made) == math.prod(want):
                continue
            made = None
        if made != tuple(want):
            keep[b] = "a shape-only op inside this region is not undone here"
    return Decision(keep=keep) if keep else None


def out_of_range(state: State) -> Decision | None:
    """Regions whose folded kernel, cast to the model's dtype, is not finite: a float16 or
    bfloat16 model whose BN scales overflow once multiplied into the weights."""
    import torch

    keep = {}
    for b, value in state.regions():
        k = value.kernel
        if k.weight.dtype in (torch.float32, torch.float64) or state.trivial(value) or spent(
                value):
            continue  # a float64 kernel cast to float32 or float64 does not overflow
        if not (bool(torch.isfinite(k.weight).all()) and bool(torch.isfinite(k.bias).all())):
            keep[b] = (f"the folded weights do not fit in {k.weight.dtype} (they overflow once "
                       "the BN scale is multiplied in), so this region is kept unfolded")
    return Decision(keep=keep) if keep else None


POLICIES: tuple[Policy, ...] = (meeting_points, escapes, idle_views, shared_frontiers,
                                too_dear, wrong_shape, out_of_range)
"""The boundary policies, in the order the driver applies them."""
