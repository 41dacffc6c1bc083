"""The driver: one traced graph, folded. Capture -> IR -> analysis and policies -> modules.

1. Every node is read once into the IR (:mod:`reparam.ir`), by the patterns of the rule set;
   calls that return their input itself are dropped.
2. The analysis (:mod:`reparam.analysis`) gives every node a value; the boundary policies
   (:mod:`reparam.policies`), in their declared order, say where regions must end or which ops
   stay, and the analysis settles again from the nodes that changed, until no policy decides
   anything.
3. Each region becomes one module (:mod:`reparam.materialize`); dead code goes; the graph module
   is made once, holding only what the folded graph uses (so parameters folded away leave it).
4. The report: each region; each linear op left, with the reason; each join of different tensors
   apart from the leftovers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import fx, nn

from .analysis import Analysis
from .capture import mark_reload
from .ir import IR
from .materialize import ChannelAffine, Materializer, name_modules
from .nodes import is_rank_query, is_shape_query, shape_of, stride_of
from .observe import Observation
from .pattern import Effect, Recognizer
from .policies import POLICIES, State, trivial
from .report import Leftover, Report
from .values import Lin, Rule, source_node


def fold_graph(root: nn.Module, graph: fx.Graph, rules: Sequence[Rule], max_cost: float = 1.0,
               obs: Observation | None = None, keep: dict[str, str] | None = None,
               captured: dict | None = None, recognizer: Recognizer | None = None,
               class_name: str = "GraphModule") -> tuple[fx.GraphModule, Report]:
    """Fold the traced ``graph`` over ``root`` (after the observed run ``obs`` of it); returns the
    folded graph module and the report.

    ``keep`` maps node names to keep unfolded to the reason; with ``captured`` (a dict), each
    region's original ops are stored in it for :mod:`reparam.verify`."""
    obs = obs if obs is not None else Observation()
    recognizer = recognizer if recognizer is not None else Recognizer(rules)
    report = _rewrite(root, graph, rules, max_cost, obs, keep or {}, captured, recognizer)
    # the IR and the analysis are gone by now: the module is made without them beside it
    graph = compact(graph)
    drop_unused(root, graph)  # the folded-away modules go before the code is generated
    mark_reload(graph)  # how torch.load rebuilds a captured graph from its code
    gm = fx.GraphModule(root, graph, class_name)  # holds only what the graph uses
    return gm, report


def _rewrite(root: nn.Module, graph: fx.Graph, rules: Sequence[Rule], max_cost: float,
             obs: Observation, keep: dict[str, str], captured: dict | None,
             recognizer: Recognizer) -> Report:
    """Steps 1 to 4 of the module docstring on ``graph`` (rewritten in place, its new modules
    put in ``root``); returns the report."""
    ir = IR(root, graph, recognizer, obs)  # reads every node once; drops the identities
    ops_before = ir.op_counts()
    kept = {n: keep[n.name] for n in graph.nodes if n.name in keep}
    param = next(iter(root.parameters()), None)
    analysis = Analysis(ir, rules, kept, device=param.device if param is not None else None)
    analysis.run()
    notes = plan(analysis, ir, max_cost)
    reasons = {**_alone(analysis, ir), **_across_permute(analysis, ir),
               **(analysis.first or {}), **notes, **analysis.kept}
    joins = analysis.first_joins - set(notes) - set(analysis.kept)
    materializer = Materializer(ir, analysis, capture=captured is not None)
    made = materializer.run()
    if captured is not None:
        captured.update(materializer.captured)
    report = Report(regions=name_modules(root, graph, made), ops_before=ops_before)
    report.ops_after = _ops_after(ir, graph, made, materializer.clone_of)
    # an op nothing returns went with the dead code: not a leftover
    for node in ir.ordered(n for n in reasons if n not in materializer.dead):
        entry = ir.entries.get(node)
        item = Leftover(node.name, entry.kind if entry is not None else node.op, reasons[node])
        (report.joins if node in joins else report.leftovers).append(item)
    return report


def compact(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` holding only its live nodes (same names, meta and output). torch.fx's
    namespace keeps every node a graph ever had, erased ones too, with their meta: a folded graph
    keeps a fifth of its traced nodes, so the copy lets the rest go."""
    return copy.deepcopy(graph)


def drop_unused(root: nn.Module, graph: fx.Graph) -> None:
    """Remove from ``root`` (the traced copy, whose modules the graph calls) every submodule on
    no path that ``graph`` reads: the modules folded away, whose objects would otherwise stay
    alive until the fold returns. A module the graph reads (a leaf it calls) keeps all of its
    own submodules; a module shared by two paths stays wherever one is read."""
    needed = {""}
    whole: set[str] = set()
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            parts = str(node.target).split(".")
            needed.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            whole.add(str(node.target))
    keep: set[tuple[int, str]] = set()
    pairs: list[tuple[nn.Module, str]] = []
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:  # only paths the graph reads are entered: a finite walk
        path, module = stack.pop()
        if path in whole:
            continue
        for name, child in module._modules.items():
            sub = f"{path}.{name}" if path else name
            pairs.append((module, name))
            if sub in needed:
                keep.add((id(module), name))
                if child is not None:
                    stack.append((sub, child))
    for module, name in pairs:
        if (id(module), name) not in keep and name in module._modules:
            del module._modules[name]


def _ops_after(ir: IR, graph: fx.Graph, made, clone_of: dict[fx.Node, fx.Node]
               ) -> dict[str, int]:
    """The op counts of the folded graph, from what the IR read (each node read once): kept
    nodes as they were read, a view's ops as their originals, each region's module by its kind."""
    kinds = {item.node: "linear" if isinstance(item.module, nn.Linear) else
             "scale_shift" if isinstance(item.module, ChannelAffine) else "conv"
             for item in made}
    counts: dict[str, int] = {}
    data: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "placeholder" and not any(i in data for i in node.all_input_nodes):
            continue
        data.add(node)
        entry = ir.entries.get(clone_of.get(node, node))
        kind = kinds.get(node)
        if kind is None and entry is not None and entry.matches and (
                entry.effect is not Effect.IDENTITY):
            kind = entry.kind
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def plan(analysis: Analysis, ir: IR, max_cost: float) -> dict[fx.Node, str]:
    """Apply the policies to a fixpoint; returns the reasons of the splits they made."""
    state = State(analysis, ir, max_cost)
    notes: dict[fx.Node, str] = {}
    for _ in range(10_000):
        decision = next((d for d in (policy(state) for policy in POLICIES) if d), None)
        if decision is None:
            return notes
        notes.update(decision.notes)
        if decision.keep:
            analysis.keep(decision.keep)
        if decision.still:
            analysis.stop_views(decision.still)
        if decision.bound:
            analysis.bound(decision.bound)
    raise RuntimeError("reparam: the fold did not reach a fixpoint")  # pragma: no cover


def _alone(analysis: Analysis, ir: IR) -> dict[fx.Node, str]:
    """Why a per-channel op (a BN, a constant scale or shift) stays as an op of its own: a region
    of one op, with nothing linear on either side that it could be folded into."""
    out = {}
    for b in analysis.boundaries:
        value = analysis.values.get(b)
        if not isinstance(value, Lin) or not trivial(ir, value):
            continue
        real = [n for n in value.nodes if ir.entries[n].effect is not Effect.IDENTITY]
        if len(real) != 1 or ir.entries[real[0]].effect is not Effect.AFFINE:
            continue
        node = real[0]
        x = source_node(value.source)
        xv = analysis.values.get(x)
        if isinstance(xv, Lin) and xv.nodes:
            others = [u.name for u in x.users if u not in value.nodes and not is_shape_query(u)]
            before = (f"its input '{x.name}' ({ir.what(x)}) is also read by {_names(others)}, "
                      "so it cannot take this op in") if others else (
                f"its input '{x.name}' ({ir.what(x)}) ends another region")
        else:
            before = f"its input '{x.name}' comes from {ir.what(x)}, not linear"
        users = [u for u in b.users if not is_rank_query(u) and not is_shape_query(u)]
        after = ", ".join(f"'{u.name}' ({ir.what(u)})" for u in users)
        out[node] = (f"nothing linear to fold it into: {before}; its output goes to "
                     f"{after or 'nothing'}, which no rule in the rule set folds it into")
    return out


def _across_permute(analysis: Analysis, ir: IR) -> dict[fx.Node, str]:
    """Why a linear layer on tokens stays apart from the conv before it: it reads the conv's
    output with the channels moved last (``x.movedim(1, -1)``, a permute; told by the observed
    strides, a permuted view of the conv's output), which no rule folds across. Listed where the
    merged conv would be no dearer than the two ops (a depthwise conv before a dense layer
    would be)."""
    out = {}
    for b in analysis.boundaries:
        value = analysis.values.get(b)
        if not isinstance(value, Lin) or value.kernel.nd != 0 or not value.kernel.channels_last:
            continue
        maps = [n for n in value.nodes if ir.entries[n].effect is Effect.MAP]
        if len(maps) != 1 or not isinstance(value.source, fx.Node):
            continue
        x = node = value.source
        while node in ir.entries and ir.entries[node].effect is Effect.LAYOUT and isinstance(
                ir.entries[node].op.inputs[0], fx.Node):
            node = ir.entries[node].op.inputs[0]
        conv = analysis.values.get(node)
        if node is x or not isinstance(conv, Lin) or not conv.nodes or conv.kernel.nd == 0:
            continue
        shape, stride, seen = shape_of(node), stride_of(node), stride_of(x)
        if shape is None or stride is None or seen is None or len(seen) != len(shape) or (
                tuple(shape_of(x)) != (shape[0], *shape[2:], shape[1])) or (
                tuple(seen) != (stride[0], *stride[2:], stride[1])):
            continue
        k, lin = conv.kernel, value.kernel
        taps = k.weight[0, 0].numel()
        if lin.out_channels * k.in_channels * taps > (
                k.weight.numel() + lin.weight.numel()):
            continue
        out[maps[0]] = (f"a linear layer on the output of '{node.name}' ({ir.what(node)}) with "
                        f"its channels moved last ('{x.name}'): the two would merge into one "
                        "conv, but no rule folds a conv into a linear layer across a permute")
    return out


def _names(nodes: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in nodes[:3]) + (f" and {len(nodes) - 3} more"
                                                     if len(nodes) > 3 else "")


__all__ = ["fold_graph", "plan"]
