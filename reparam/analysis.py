"""Value analysis: every node is opaque, a constant, or linear in one source, as the rules say.

Given where regions end (the *boundaries*, which later ops read as opaque sources) and which ops
are kept as they are, :meth:`Analysis.run` evaluates nodes in graph order from a worklist: at
first every node, later only the nodes whose inputs changed (the users of a new boundary, a kept
op). A node's value is recomputed from its inputs' values with the first rule of its op that
folds it; when its inputs carry regions that cannot take it in, it may still start a region of
its own (its inputs then read as sources).

Kernels are float64 while they are built. Once a run is over, every kernel inside a region is
released (its tensors go to the meta device, keeping the geometry): a later evaluation that
needs one recomputes it from its inputs, which gives the same value. A boundary's kernel, the
region's result, stays, cast to the dtype its module will have.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch
from torch import fx

from .context import Context
from .ir import IR, rules_of
from .nodes import dtype_of, is_rank_query, is_shape_query, shape_of
from .pattern import Effect
from .values import OPAQUE, Const, Lin, NoFold, Rule, Value, source_shape


def spent(value: Lin) -> bool:
    return value.kernel.weight.is_meta


def release(value: Lin) -> Lin:
    """The same value with its kernel's tensors on the meta device: geometry only, no memory."""
    k = value.kernel
    meta = replace(k, weight=k.weight.to("meta"), bias=k.bias.to("meta"))
    return replace(value, kernel=meta)


class Analysis:
    """The values of one graph's nodes, to a fixpoint under the current boundaries."""

    def __init__(self, ir: IR, rules: Sequence[Rule], keep: dict[fx.Node, str] | None = None,
                 device: torch.device | None = None) -> None:
        self.ir = ir
        self.enabled = {r.name for r in rules}
        self.device = device
        self.values: dict[fx.Node, Value] = {}
        self.boundaries: set[fx.Node] = set()
        self.kept: dict[fx.Node, str] = dict(keep or {})  # ops kept as they are, with the reason
        self.reasons: dict[fx.Node, str] = {}  # why a node does not fold, as evaluated last
        self.joins: set[fx.Node] = set()  # nodes whose reason is a join of different tensors
        self.hints: set[fx.Node] = set()  # boundaries that would let a merge happen
        self.no_view: set[fx.Node] = set()  # layout ops a per-channel map must not move past
        self.first: dict[fx.Node, str] | None = None  # reasons of the first run
        self.first_joins: set[fx.Node] = set()  # and which of them are joins
        self.mutated = ir.obs.first_writer
        self.evaluations = 0  # nodes evaluated, all runs together
        self.revived: list[fx.Node] = []  # released kernels recomputed when a user needed them
        self._last: dict[fx.Node, int] = {}  # node -> position of its last reader

    # --- the worklist --------------------------------------------------------------------------
    def run(self, seeds: Iterable[fx.Node] | None = None) -> set[fx.Node]:
        """Evaluate ``seeds`` (every node on the first run) and, in graph order, every node whose
        inputs' values changed; returns the nodes whose values changed."""
        position = self.ir.position
        nodes = self.ir.entries if seeds is None else seeds
        heap = [(position(n), n.name, n) for n in nodes]
        heapq.heapify(heap)
        queued = {n for _, _, n in heap}
        changed: set[fx.Node] = set()
        while heap:
            at, _, node = heapq.heappop(heap)
            queued.discard(node)
            old = self.values.get(node)
            revived = len(self.revived)
            new = self._evaluate(node)
            if node in self.boundaries and isinstance(new, Lin):
                new = _cast(node, new)  # a region's result: in its module's dtype from now on
            self.values[node] = new
            if not _same(old, new):
                changed.add(node)
                for user in node.users:
                    if user not in queued:
                        queued.add(user)
                        heapq.heappush(heap, (position(user), user.name, user))
            # nothing before this position is evaluated again in this run: release the kernels
            # whose last reader this was, so the run holds its frontier, not every kernel
            for i in (*node.all_input_nodes, *self.revived[revived:]):
                if self._last_reader(i) <= at:
                    self._release(i)
        if self.first is None:  # every region as large as it can be: the reasons to report
            self.first, self.first_joins = dict(self.reasons), set(self.joins)
        self.release_kernels()
        return changed

    def bound(self, nodes: Iterable[fx.Node]) -> None:
        """Make ``nodes`` boundaries (regions end there) and re-evaluate what reads them. A new
        boundary's own value does not change; only its kernel is recomputed if it was released."""
        new = set(nodes) - self.boundaries
        self.boundaries |= new
        spent_ = {n for n in new if isinstance(self.values.get(n), Lin) and spent(self.values[n])}
        self.run({u for n in new for u in n.users} | spent_)

    def stop_views(self, nodes: Iterable[fx.Node]) -> None:
        """Move no per-channel map past these layout ops (nothing took it in after them)."""
        new = set(nodes) - self.no_view
        self.no_view |= new
        self.run(new)

    def keep(self, kept: dict[fx.Node, str]) -> None:
        """Keep these ops as they are (with the reason) and re-evaluate from them."""
        self.kept.update(kept)
        self.boundaries -= set(kept)
        self.run(set(kept))

    # --- one node ------------------------------------------------------------------------------
    def _evaluate(self, node: fx.Node) -> Value:
        self.evaluations += 1
        self.reasons.pop(node, None)
        self.joins.discard(node)
        ir = self.ir
        entry = ir.entries[node]
        if node in ir.consts:
            return ir.consts[node]
        if node in self.kept:
            self.reasons[node] = self.kept[node]
            return OPAQUE
        if entry.why is not None:
            self.reasons[node] = entry.why
            return OPAQUE
        if not entry.matches:
            return OPAQUE
        self._revive(node.all_input_nodes)
        return self._fold(node, entry)

    def _fold(self, node: fx.Node, entry, values: dict | None = None) -> Value:
        values = self.values if values is None else values
        merging = any(isinstance(values.get(a), Lin) and a not in self.boundaries
                      and values[a].nodes for a in node.all_input_nodes)
        first: NoFold | None = None
        for cut in (False, True) if merging else (False,):
            last: NoFold | None = None
            for op, rules in rules_of(entry):
                for r in rules:
                    ctx = Context(node, op, self, cut, values)
                    try:
                        result = r.fold(ctx, op)
                    except NoFold as e:
                        last = e
                        if not cut and e.barrier is not None and e.barrier not in self.boundaries:
                            self.hints.add(e.barrier)
                        continue
                    if result is not None:
                        if cut and first is not None:
                            self._reason(node, first)
                        return result
            if first is None:
                first = last
                if first is None and merging and entry.effect is not Effect.LAYOUT:
                    first = NoFold(f"no rule in the rule set folds '{entry.kind}'")
        if first is not None:
            self._reason(node, first)
        return OPAQUE

    def _reason(self, node: fx.Node, e: NoFold) -> None:
        self.reasons[node] = str(e)
        if e.join:
            self.joins.add(node)

    # --- kernels -------------------------------------------------------------------------------
    def release_kernels(self) -> None:
        """Release every kernel inside a region and cast every region's result to its dtype. A
        kernel that a user does not take in (the region will end there) is kept: it is about to
        be a region's result."""
        for node in list(self.values):
            self._release(node)

    def _release(self, node: fx.Node) -> None:
        value = self.values.get(node)
        if not isinstance(value, Lin) or spent(value):
            return
        if node in self.boundaries:
            self.values[node] = _cast(node, value)
        elif value.nodes and not self._escapes(node):
            self.values[node] = release(value)

    def _last_reader(self, node: fx.Node) -> int:
        found = self._last.get(node)
        if found is None:
            position = self.ir.position
            found = self._last[node] = max((position(u) for u in node.users), default=-1)
        return found

    def _escapes(self, node: fx.Node) -> bool:
        """Whether a user reads ``node``'s value without taking it in (the region ends here)."""
        if node in self.mutated:
            return True
        value = self.values[node]
        for user in node.users:
            uv = self.values.get(user)
            if not (isinstance(uv, Lin) and node in uv.nodes) and not reads_layout_only(
                    user, node, value):
                return True
        return False

    def _revive(self, inputs: Sequence[fx.Node]) -> None:
        """Recompute the released kernels among ``inputs`` (and theirs, as far as needed), in
        graph order. Their inputs are unchanged, so the values are the same."""
        todo: list[fx.Node] = []
        stack = [i for i in inputs if self._needs(i)]
        seen: set[fx.Node] = set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            todo.append(n)
            stack += [i for i in n.all_input_nodes if self._needs(i)]
        for n in sorted(todo, key=self.ir.position):
            self.values[n] = self._fold(n, self.ir.entries[n])
            self.revived.append(n)

    def _needs(self, node: fx.Node) -> bool:
        value = self.values.get(node)
        return isinstance(value, Lin) and spent(value) and node not in self.boundaries


def reads_layout_only(user: fx.Node, node: fx.Node, value: Lin) -> bool:
    """``user`` reads only the rank (``x.dim()``) or the shape (``x.shape``) of ``node``, which the
    region's source has too: the query can read the source instead."""
    shape, source = shape_of(node), source_shape(value.source)
    if is_rank_query(user):
        return shape is not None and source is not None and len(shape) == len(source)
    return is_shape_query(user) and shape is not None and shape == source


def _cast(node: fx.Node, value: Lin) -> Lin:
    """A region's result in the dtype its module will have: nothing reads a boundary's kernel but
    materialization (which casts it the same way) and the policies (which read its geometry and
    range), so this rounds once, as materializing would, and halves what the plan holds."""
    dtype = dtype_of(node) or torch.float32
    dtype = dtype if dtype.is_floating_point else torch.float32
    k = value.kernel
    if k.weight.dtype == dtype:
        return value
    cast = replace(k, weight=k.weight.to(dtype), bias=k.bias.to(dtype))
    return replace(value, kernel=cast)


def _same(old: Value | None, new: Value) -> bool:
    """Whether a recomputed value is the one its users already read: the same kind of value, and
    for a linear one the same source and ops (then the kernel is the same too)."""
    if old is None or type(old) is not type(new):
        return False
    if isinstance(new, Lin):
        return old.source == new.source and old.nodes == new.nodes
    if isinstance(new, Const):
        return old is new
    return True
