"""Pictures of a block before and after folding, like the papers' figures, as plain SVG.

The fx graph of the block (ops as boxes labelled ``conv3x3 s1 g1``, ``BN``, ``+``; edges as data
flow) is laid out in layers with networkx: each op one layer below its deepest input, long edges
routed through placeholder points, the order inside a layer chosen to cross few edges, and each
box placed as near the middle of its neighbours as the order allows. The SVG is written by hand
(no plotting library); :meth:`Picture.html` wraps it in a small page with the fold's report.
"""

from __future__ import annotations

import copy
import html
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx, nn

from .api import count_ops, fold, recognizer_for
from .errors import ReparamError
from .report import Report, shape_text
from .rules import ALL
from .trace import light_copy, trace
from .values import Rule

# --- which block ------------------------------------------------------------------------------


def _module_path(node: fx.Node) -> str:
    """The module a traced node belongs to: its own for a module call, else the innermost caller."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _node_paths(model: nn.Module) -> dict[str, str]:
    """Each graph node's module path. A graph module keeps the paths its own tracing recorded
    (a re-trace of it would see only its flat forward)."""
    if isinstance(model, fx.GraphModule):
        return {n.name: _module_path(n) for n in model.graph.nodes}
    try:
        gm = trace(lambda: light_copy(model), recognizer=recognizer_for(ALL)).module()
    except ReparamError:
        return {}
    return {n.name: _module_path(n) for n in gm.graph.nodes}


def _under(node_path: str, path: str) -> bool:
    return node_path == path or node_path.startswith(path + ".")


def _graph_block(model: fx.GraphModule, path: str
                 ) -> tuple[fx.GraphModule, fx.GraphModule, tuple, str] | None:
    """The ops of a graph module that its tracing recorded under ``path``, as a graph module of
    their own: ``(module, a copy of the whole, the copy's nodes it reads, the class name
    recorded for path)``, or ``None`` where fewer than two ops are there or they do not form one
    block. (Taken from a copy of the graph: the caller's stays as it is.)"""
    from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule

    gm = fx.GraphModule(model, copy.deepcopy(model.graph))
    nodes: dict[fx.Node, None] = {}  # in graph order
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        where = _module_path(n)
        data = [i for i in n.all_input_nodes if i.op != "get_attr"]
        # a function with no recorded path (a reloaded graph module keeps none) belongs to the
        # block when everything it reads is computed there: the sums of its branches
        if _under(where, path) or not where and data and all(i in nodes for i in data):
            nodes[n] = None
    if len(nodes) < 2:
        return None
    chosen = set(nodes)
    nodes.update(dict.fromkeys(n for n in gm.graph.nodes if n.op == "get_attr" and n.users
                               and all(u in chosen for u in n.users)))  # its own parameters
    nodes = list(nodes)
    kind = next((cls.__name__ for n in nodes for key, (_, cls) in
                 (n.meta.get("nn_module_stack") or {}).items() if key == path), "block")
    try:
        sub, reads, _ = fuse_as_graphmodule(gm, nodes, "block")
    except Exception:  # noqa: BLE001 - not one convex block of the graph
        return None
    sub.train(model.training)
    return sub, gm, reads, kind


def _drawable(model: nn.Module, path: str) -> bool:
    """Whether ``model.<path>`` is a block to draw: a submodule with a forward of its own that
    holds more than one op, or, in a graph module (whose intermediate paths are bare
    ``nn.Module`` holders), the ops its tracing recorded under that path."""
    module = model.get_submodule(path)
    if type(module).forward is not nn.Module.forward:
        return any(True for _ in module.children())
    return isinstance(model, fx.GraphModule) and _graph_block(model, path) is not None


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common: list[str] = []
    for names in zip(*parts, strict=False):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return ".".join(common)


def block_of(model: nn.Module, report: Report) -> str:
    """The path of the block to draw: the smallest submodule holding the first of the largest
    folded regions (``""``, the whole model, only where no submodule holds one).

    A region's ops written as functions at the top level of a flat forward (the adds of a
    traced graph module) carry no module path and do not widen it to the whole model."""
    if not report.regions:
        raise ReparamError(f"nothing folds in {type(model).__name__}, so there is no block to "
                           "draw; pass --block PATH to draw one anyway")
    paths = _node_paths(model)
    ranked = sorted(report.regions, key=lambda r: -len(r.replaced))  # stable: first of largest
    for region in ranked:
        inside = [paths[n] for n in region.replaced if paths.get(n)]
        if not inside:  # names from a submodule folded on its own: its parent
            path = region.name.rsplit(".", 1)[0] if "." in region.name else ""
        else:
            path = _common_path(inside)
        while path and not _drawable(model, path):  # one op alone, or a bare holder: go up
            path = path.rsplit(".", 1)[0] if "." in path else ""
        if path:
            return path
    return ""


class _Reads(fx.Interpreter):
    """Runs a graph module and keeps the values of some of its nodes."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node]) -> None:
        super().__init__(gm)
        self.keep, self.seen = keep, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.keep:
            self.seen[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return out


def _block(model: nn.Module, path: str, inputs: tuple | None
           ) -> tuple[nn.Module, tuple | None, str]:
    """``(the block at path, what it receives from inputs, its class name)``."""
    try:
        block = model.get_submodule(path)
    except AttributeError as e:
        raise ReparamError(f"{type(model).__name__} has no submodule '{path}'") from e
    if (not path or type(block).forward is not nn.Module.forward
            or not isinstance(model, fx.GraphModule)):
        return block, _block_inputs(model, path, inputs), type(block).__name__
    found = _graph_block(model, path)
    if found is None:
        raise ReparamError(f"'{path}' holds no block of ops in this graph module; pass --block "
                           "naming another submodule")
    sub, whole, reads, kind = found
    if inputs is None:
        return sub, None, kind
    run = _Reads(whole, set(reads))
    with torch.no_grad():
        run.run(*inputs)
    return sub, tuple(run.seen[n] for n in reads), kind


def _block_inputs(model: nn.Module, path: str, inputs: tuple | None) -> tuple | None:
    """What the block at ``path`` receives when the model runs on ``inputs`` (first call)."""
    if inputs is None or not path:
        return inputs
    seen: list[tuple] = []

    def record(module, args):
        if not seen and all(isinstance(a, torch.Tensor) for a in args):
            seen.append(tuple(a.detach().clone() for a in args))

    hook = model.get_submodule(path).register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        hook.remove()
    if not seen:
        raise ReparamError(f"the model does not call '{path}' with tensors on the example input")
    return seen[0]


# --- what each node shows ---------------------------------------------------------------------

_SYMBOLS = {"add": "+", "sub": "\u2212", "mul": "\u00d7", "div": "\u00f7", "neg": "\u2212x",
            "cat": "cat"}


def _axes(values: Sequence[int]) -> str:
    values = tuple(values)
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _tensor(gm: fx.GraphModule, value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, fx.Node) and value.op == "get_attr":
        obj = gm
        for part in str(value.target).split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def describe(node: fx.Node, modules: dict[str, nn.Module]):
    """The op the default rule set reads ``node`` as, or ``None``."""
    found, _ = recognizer_for(ALL).matches(node, modules)
    return found[0].op if found else None


def label(node: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module]
          ) -> tuple[str, str, str]:
    """``(label, detail, kind)`` of a node: e.g. ``("conv3x3 s1 g1", "48\u219248", "conv")``."""
    if node.op == "placeholder":
        return node.name, "input", "io"
    if node.op == "output":
        return "output", "", "io"
    op = describe(node, modules)
    if op is None:
        if node.op == "call_module":
            return type(modules[str(node.target)]).__name__, "", "other"
        return getattr(node.target, "__name__", str(node.target)), "", "other"
    a = op.attrs
    if op.kind == "conv":
        w = _tensor(gm, a["weight"])
        if w is None:
            return "conv", "", "conv"
        k = "x".join(map(str, w.shape[2:]))
        g = a["groups"]
        c_in, c_out = (w.shape[0], w.shape[1] * g) if a["transposed"] else (w.shape[1] * g,
                                                                              w.shape[0])
        name = "convT" if a["transposed"] else "conv"
        return f"{name}{k} s{_axes(a['stride'])} g{g}", f"{c_in}\u2192{c_out}", "conv"
    if op.kind == "linear":
        w = _tensor(gm, a["weight"])
        detail = "" if w is None else f"{w.shape[1]}\u2192{w.shape[0]}"
        return "linear", detail, "conv"
    if op.kind == "batch_norm":
        return "BN", "", "bn"
    if op.kind == "avg_pool":
        k = "x".join(map(str, a["kernel_size"]))
        return f"avgpool{k} s{_axes(a['stride'])}", "", "pool"
    if op.kind in _SYMBOLS:
        return _SYMBOLS[op.kind], "", "merge"
    if op.kind == "pad":
        return "pad", "", "pad"
    return op.kind, "", "other"


def _merge_key(op) -> tuple | None:
    """What makes two nested merges one: a sum with a sum, a cat with a cat on the same dim."""
    if op is None:
        return None
    if op.kind == "add" and op.attrs.get("alpha", 1) == 1:
        return ("add",)
    if op.kind == "cat":
        return ("cat", op.attrs.get("dim"))
    return None


def _flatten_merges(graph: nx.DiGraph, inputs: list[str], merge: tuple,
                    users: dict[str, int]) -> list[str]:
    """``inputs`` with each drawn merge of the same key that only this node reads replaced by
    that merge's own inputs (removed from the graph), recursively: a chain of pairwise adds
    becomes one sum of all its terms, in their order."""
    flat: list[str] = []
    for x in inputs:
        if graph.has_node(x) and graph.nodes[x].get("merge") == merge and users.get(x) == 1:
            flat += [p for p in graph.nodes[x]["terms"]]
            graph.remove_node(x)
        else:
            flat.append(x)
    return flat


def op_graph(gm: fx.GraphModule, input_shapes: Sequence[tuple[int, ...]] = ()) -> nx.DiGraph:
    """The data flow of ``gm`` from its inputs to its output, each node with ``label``,
    ``detail``, ``kind`` and ``order``. Parameters, constant arithmetic, identities
    (``nn.Identity``, dropout in eval, ``contiguous``) and what the output does not depend on
    (shape assertions) are left out, as the papers draw blocks; a chain of sums (``a + b + c``)
    is one sum, a cat of a cat on the same axis one cat. The inputs are labelled with
    ``input_shapes`` where given."""
    modules = dict(gm.named_modules())
    shapes = [shape_text(s) for s in input_shapes]
    users = {n.name: len(n.users) for n in gm.graph.nodes}
    graph = nx.DiGraph()
    shown: dict[fx.Node, str] = {}  # node -> the drawn node that stands for its value
    outputs = []
    for i, node in enumerate(gm.graph.nodes):
        inputs = [shown[x] for x in node.all_input_nodes if x in shown]
        if not (node.op in ("placeholder", "output") or inputs):
            continue
        op = describe(node, modules) if node.op not in ("placeholder", "output") else None
        if op is not None and op.kind == "identity" and len(inputs) == 1:
            shown[node] = inputs[0]
            continue
        shown[node] = node.name
        if node.op == "output":
            outputs.append(node.name)
        text, detail, kind = label(node, gm, modules)
        if node.op == "placeholder" and shapes:
            detail = shapes.pop(0)
        merge = _merge_key(op)
        if merge is not None:  # a + b + c: one "+" with all its inputs, not a chain of them
            inputs = _flatten_merges(graph, inputs, merge, users)
        graph.add_node(node.name, label=text, detail=detail, kind=kind, order=i, merge=merge,
                       terms=list(dict.fromkeys(inputs)))
        for x in dict.fromkeys(inputs):
            graph.add_edge(x, node.name)
    keep = set(outputs).union(*(nx.ancestors(graph, n) for n in outputs))
    return graph.subgraph(n for n in graph.nodes if n in keep).copy()  # no dead ends (asserts)


# --- layout -----------------------------------------------------------------------------------

ROW = 62  # vertical distance between layers
HEIGHT = 34  # box height
RADIUS = 13  # circle of a merge (+, x)
GAP = 22  # horizontal gap between boxes
CHAR = 7.0  # approximate advance of a 12px character


def _round(data: dict) -> bool:
    """A merge drawn as a circle (or, with many inputs, a pill) holding its symbol."""
    return not data.get("dummy") and data["kind"] == "merge" and len(data["label"]) <= 2


def _width(graph: nx.DiGraph, n) -> float:
    data = graph.nodes[n]
    if data.get("dummy"):
        return 8.0
    if _round(data):  # a circle; a pill wide enough to keep many arrows apart
        return 2.0 * RADIUS + 14.0 * max(0, graph.in_degree(n) - 3)
    return max(len(data["label"]) * CHAR, len(data["detail"]) * CHAR * 0.85) + 18


@dataclass
class Layout:
    graph: nx.DiGraph  # with placeholder points ("dummy") on long edges
    x: dict
    y: dict
    edges: list[list]  # each original edge as its chain of points, source to target
    width: float
    height: float


def _crossings(layers: list[list], graph: nx.DiGraph) -> int:
    total = 0
    for upper, lower in zip(layers, layers[1:], strict=False):
        at = {n: i for i, n in enumerate(lower)}
        pairs = [(i, at[v]) for i, u in enumerate(upper) for v in graph.successors(u) if v in at]
        total += sum(1 for a, b in pairs for c, d in pairs if a < c and b > d)
    return total


def _sort_by(layer: list, neighbours, index: dict) -> list:
    def key(n):
        near = [index[m] for m in neighbours(n) if m in index]
        return (sum(near) / len(near) if near else index[n], index[n])

    return sorted(layer, key=key)


def _place(order: list, desired: dict, widths: dict) -> dict:
    """x for each node in ``order``: as near ``desired`` as possible (least squares) with boxes
    in that order and at least GAP apart. Pool-adjacent-violators on the shifted targets."""
    offsets, acc = [], 0.0
    for i, n in enumerate(order):
        if i:
            acc += (widths[order[i - 1]] + widths[n]) / 2 + GAP
        offsets.append(acc)
    blocks: list[list] = []  # [sum of targets, count] of runs of boxes pushed together
    for n, off in zip(order, offsets, strict=True):
        blocks.append([desired[n] - off, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    values = [b[0] / b[1] for b in blocks for _ in range(b[1])]
    return {n: v + off for n, v, off in zip(order, values, offsets, strict=True)}


def layout(graph: nx.DiGraph) -> Layout:
    """Layers top to bottom, few crossings, each box centred on its neighbours where it can be."""
    layer: dict = {}
    for n in nx.topological_sort(graph):
        layer[n] = max((layer[p] + 1 for p in graph.predecessors(n)), default=0)
    g = nx.DiGraph()
    g.add_nodes_from(graph.nodes(data=True))
    chains = []
    for u, v in sorted(graph.edges, key=lambda e: (graph.nodes[e[0]]["order"],
                                                   graph.nodes[e[1]]["order"])):
        chain = [u]
        for depth in range(layer[u] + 1, layer[v]):
            dummy = ("dummy", u, v, depth)
            g.add_node(dummy, dummy=True, order=graph.nodes[u]["order"] + 0.5)
            layer[dummy] = depth
            chain.append(dummy)
        chain.append(v)
        nx.add_path(g, chain)
        chains.append(chain)
    layers: list[list] = [[] for _ in range(max(layer.values(), default=0) + 1)]
    for n in sorted(g.nodes, key=lambda n: g.nodes[n]["order"]):
        layers[layer[n]].append(n)
    best, fewest = [list(lyr) for lyr in layers], _crossings(layers, g)
    for sweep in range(8):
        down = sweep % 2 == 0
        span = range(1, len(layers)) if down else range(len(layers) - 2, -1, -1)
        for i in span:
            ref = layers[i - 1] if down else layers[i + 1]
            index = {n: j for j, n in enumerate(ref)}
            index.update({n: j for j, n in enumerate(layers[i]) if n not in index})
            layers[i] = _sort_by(layers[i], g.predecessors if down else g.successors, index)
        count = _crossings(layers, g)
        if count < fewest:
            best, fewest = [list(lyr) for lyr in layers], count
    layers = best
    widths = {n: _width(g, n) for n in g.nodes}
    x: dict = {}
    for row in layers:
        x.update(_place(row, {n: 0.0 for n in row}, widths))
    for sweep in range(7):  # pull each box towards its neighbours, alternating, ending downwards
        down = sweep % 2 == 0
        for row in layers if down else reversed(layers):
            desired = {}
            for n in row:
                near = list(g.predecessors(n) if down else g.successors(n))
                desired[n] = sum(x[m] for m in near) / len(near) if near else x[n]
            x.update(_place(row, desired, widths))
    left = min(x[n] - widths[n] / 2 for n in g.nodes)
    right = max(x[n] + widths[n] / 2 for n in g.nodes)
    x = {n: v - left for n, v in x.items()}
    y = {n: layer[n] * ROW + HEIGHT / 2 for n in g.nodes}
    height = (len(layers) - 1) * ROW + HEIGHT
    return Layout(g, x, y, chains, right - left, height)


# --- SVG ---------------------------------------------------------------------------------------

COLOURS = {  # fill, stroke
    "conv": ("#dbe8f7", "#2f6db5"),
    "bn": ("#fff1c7", "#b8860b"),
    "pool": ("#e0f0d8", "#4f8a2b"),
    "merge": ("#ffffff", "#444444"),
    "io": ("#f3f3f3", "#888888"),
    "pad": ("#ececf6", "#6a6a9a"),
    "other": ("#fbe3d4", "#c05a14"),
}


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _half_height(data: dict) -> float:
    if data.get("dummy"):
        return 0.0
    if _round(data):
        return RADIUS
    return HEIGHT / 2


def _arrivals(lay: Layout) -> dict[int, float]:
    """Where each edge meets its target, as an x offset from the target's centre: the edges into
    one node spread over its top in the order of where they come from, so that the arrows into
    a sum of several branches stay apart."""
    into: dict = {}
    for i, chain in enumerate(lay.edges):
        into.setdefault(chain[-1], []).append(i)
    offsets: dict[int, float] = {}
    for target, edges in into.items():
        if len(edges) < 2:
            continue
        data, width = lay.graph.nodes[target], _width(lay.graph, target)
        half = (width / 2 - RADIUS * 0.25 if _round(data) and width > 2 * RADIUS
                else RADIUS * 0.75 if _round(data) else width * 0.3)
        edges.sort(key=lambda i: lay.x[lay.edges[i][-2]])
        for k, i in enumerate(edges):
            offsets[i] = half * (2 * k / (len(edges) - 1) - 1)
    return offsets


def _panel(lay: Layout, dx: float, dy: float) -> list[str]:
    g, out = lay.graph, []
    offsets = _arrivals(lay)
    for i, chain in enumerate(lay.edges):
        pts = [(lay.x[n] + dx, lay.y[n] + dy) for n in chain]
        pts[0] = (pts[0][0], pts[0][1] + _half_height(g.nodes[chain[0]]))
        shift = offsets.get(i, 0.0)
        drop = _half_height(g.nodes[chain[-1]])
        flat = _width(g, chain[-1]) / 2 - RADIUS  # the straight part of a pill's top
        if _round(g.nodes[chain[-1]]) and abs(shift) > flat:  # on the rounded part
            drop = (RADIUS ** 2 - min(abs(shift) - flat, RADIUS) ** 2) ** 0.5
        pts[-1] = (pts[-1][0] + shift, pts[-1][1] - drop - 2)
        d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            mid = (y1 - y0) / 2
            d += f" C{x0:.1f},{y0 + mid:.1f} {x1:.1f},{y1 - mid:.1f} {x1:.1f},{y1:.1f}"
        out.append(f'<path class="edge" d="{d}" marker-end="url(#arrow)"/>')
    for n, data in g.nodes(data=True):
        if data.get("dummy"):
            continue
        cx, cy = lay.x[n] + dx, lay.y[n] + dy
        fill, stroke = COLOURS[data["kind"]]
        tip = f"<title>{_e(n)}</title>"
        if _round(data):
            w = _width(g, n)
            shape = (f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{RADIUS}" ' if w <= 2 * RADIUS
                     else f'<rect x="{cx - w / 2:.1f}" y="{cy - RADIUS:.1f}" width="{w:.1f}" '
                          f'height="{2 * RADIUS}" rx="{RADIUS}" ')
            out.append(f'<g class="op">{tip}{shape}'
                       f'fill="{fill}" stroke="{stroke}"/>'
                       f'<text x="{cx:.1f}" y="{cy + 5:.1f}" font-size="16">'
                       f'{_e(data["label"])}</text></g>')
            continue
        w = _width(g, n)
        rx = 14 if data["kind"] == "io" else 5
        text_y = cy + (-2 if data["detail"] else 4)
        body = (f'<rect x="{cx - w / 2:.1f}" y="{cy - HEIGHT / 2:.1f}" width="{w:.1f}" '
                f'height="{HEIGHT}" rx="{rx}" fill="{fill}" stroke="{stroke}"/>'
                f'<text x="{cx:.1f}" y="{text_y:.1f}" font-size="12">{_e(data["label"])}</text>')
        if data["detail"]:
            body += (f'<text x="{cx:.1f}" y="{cy + 11:.1f}" font-size="10" fill="#555">'
                     f'{_e(data["detail"])}</text>')
        out.append(f'<g class="op">{tip}{body}</g>')
    return out


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def render(before: nx.DiGraph, after: nx.DiGraph, title: str, heads: tuple[str, str],
           notes: Sequence[str] = ()) -> str:
    """Two op graphs side by side, ``before`` on the left, as a standalone SVG document."""
    lb, la = layout(before), layout(after)
    pad, arrow, top = 24.0, 90.0, 62.0
    head_w = [len(h) * CHAR * 1.2 for h in heads]
    wb, wa = max(lb.width, head_w[0]), max(la.width, head_w[1])
    body_h = max(lb.height, la.height)
    width = pad + wb + arrow + wa + pad
    width = max(width, pad * 2 + len(title) * CHAR * 1.3,
                pad * 2 + max((len(n) for n in notes), default=0) * CHAR * 0.9)
    height = top + body_h + pad + 18 * len(notes) + (8 if notes else 0)
    xb = pad + (wb - lb.width) / 2
    xa = pad + wb + arrow + (wa - la.width) / 2
    yb, ya = top + (body_h - lb.height) / 2, top + (body_h - la.height) / 2
    mid_y = top + body_h / 2
    a0, a1 = pad + wb + 18, pad + wb + arrow - 18
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif">',
        f"<title>{_e(title)}</title>",
        "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" "
        "markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">"
        "<path d=\"M0,0 L10,5 L0,10 z\" fill=\"#555\"/></marker></defs>",
        "<style>.edge{fill:none;stroke:#555;stroke-width:1.3}"
        "text{text-anchor:middle;fill:#222}.head{font-size:13px;font-weight:bold}"
        ".note{text-anchor:start;font-size:12px;fill:#444}</style>",
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="#ffffff"/>',
        f'<text x="{pad}" y="24" font-size="15" font-weight="bold" style="text-anchor:start">'
        f"{_e(title)}</text>",
        f'<text class="head" x="{pad + wb / 2:.1f}" y="{top - 14:.1f}">{_e(heads[0])}</text>',
        f'<text class="head" x="{pad + wb + arrow + wa / 2:.1f}" y="{top - 14:.1f}">'
        f"{_e(heads[1])}</text>",
        f'<path class="edge" d="M{a0:.1f},{mid_y:.1f} L{a1:.1f},{mid_y:.1f}" '
        'stroke-width="2" marker-end="url(#arrow)"/>',
        f'<text x="{(a0 + a1) / 2:.1f}" y="{mid_y - 8:.1f}" font-size="12">fold</text>',
    ]
    parts += _panel(lb, xb, yb)
    parts += _panel(la, xa, ya)
    for i, note in enumerate(notes):
        y = top + body_h + pad + 14 + 18 * i
        parts.append(f'<text class="note" x="{pad}" y="{y:.1f}">{_e(note)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# --- the picture of one block -----------------------------------------------------------------

@dataclass
class Picture:
    """A block drawn before and after folding: ``svg`` is the document, ``html()`` a page.

    ``ops_before`` and ``ops_after`` count ops as :func:`reparam.count_ops` does (and so as
    ``fold`` and ``explain`` report them); ``input_shapes`` are what the block was folded on."""

    path: str
    kind: str
    svg: str
    report: Report
    ops_before: int
    ops_after: int
    input_shapes: tuple[tuple[int, ...], ...] = ()

    def html(self) -> str:
        title = f"reparam: {self.path or 'model'} ({self.kind}) before and after folding"
        shapes = ", ".join(shape_text(s) for s in self.input_shapes) or "unknown"
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n"
            "<style>body{font-family:Helvetica,Arial,sans-serif;margin:2em;color:#222}"
            "pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}"
            "svg{max-width:100%;height:auto}</style>\n</head>\n<body>\n"
            f"<h1>{_e(self.path or 'model')} <small>({_e(self.kind)})</small></h1>\n"
            f"<p>Input {_e(shapes)}; ops {self.ops_before} &rarr; {self.ops_after}, params "
            f"{self.report.params_before:,} &rarr; {self.report.params_after:,}.</p>\n"
            f"{self.svg}"
            "<h2>Report</h2>\n"
            f"<pre>{_e(self.report)}</pre>\n</body>\n</html>\n"
        )


def picture(model: nn.Module, path: str, example_inputs: tuple | None = None, *,
            rules: Sequence[Rule] = ALL, max_cost: float = 1.0) -> Picture:
    """Draw the submodule ``model.<path>`` (``""``: the whole model) before and after folding.

    ``example_inputs`` are the model's; the block is folded on what it receives from them.
    """
    block, inputs, kind = _block(model, path, example_inputs)
    before = trace(lambda: light_copy(block), recognizer=recognizer_for(tuple(rules))).module()
    after = fold(block, inputs, rules=rules, max_cost=max_cost)
    if not isinstance(after, fx.GraphModule):
        raise ReparamError(f"'{path}' does not trace as a whole, so it cannot be drawn; pass "
                           "--block naming one of its parts")
    report = after.reparam_report
    shapes = tuple(report.input_shapes)
    g_before, g_after = op_graph(before, shapes), op_graph(after, shapes)
    ops_before, ops_after = count_ops(before, rules), count_ops(after, rules)
    used: dict[str, None] = {}
    for region in report.regions:
        used.update(dict.fromkeys(region.rules))
    keys = sorted(set(ops_before) | set(ops_after))
    notes = ["ops: " + ", ".join(f"{k} {ops_before.get(k, 0)} -> {ops_after.get(k, 0)}"
                                 for k in keys) + " (counted as fold and explain count them)"]
    if used:
        notes.append("rules: " + ", ".join(used))
    notes += [f"left unfolded: {x.node} ({x.op}): {x.reason}" for x in report.leftovers[:3]]
    if len(report.leftovers) > 3:
        notes.append(f"... and {len(report.leftovers) - 3} more left unfolded")
    before_n, after_n = sum(ops_before.values()), sum(ops_after.values())
    heads = (f"before: {_plural(before_n, 'op')}, {_plural(report.params_before, 'param')}",
             f"after: {_plural(after_n, 'op')}, {_plural(report.params_after, 'param')}")
    where = ", ".join(shape_text(s) for s in shapes)
    title = f"{path or 'model'} ({kind})" + (f", input {where}" if where else "")
    svg = render(g_before, g_after, title, heads, notes)
    return Picture(path, kind, svg, report, before_n, after_n, shapes)
