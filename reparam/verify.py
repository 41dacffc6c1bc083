"""Verification: a folded model is compared with the original before ``fold`` returns it.

``screen`` runs the folded model on the example inputs and compares it with the eager original at
a tolerance fitted to the dtype. When it does not match, the fold is localized region by region:
each region's module is run against the original ops it replaced, extracted from the graph it was
folded from (:func:`region_module`), on a random float64 input of the region's input shape. A
linear map that is exact on a random input is exact on every input of that shape, so this judges
each region alone, whatever the conditioning of the rest of the model. Regions that diverge are
kept unfolded; when none does, a float64 run of the original tells an ill-conditioned model (the
unfolded model in its own dtype is itself that far off) from a fold that is wrong.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn

from .nodes import shape_of

# max |got - want| / max |want| that the folded model may differ from the original, by dtype
SCREEN = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
# the same, for one region's module against the ops it replaced, on a float64 input
LOCAL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def tolerance(table: dict[torch.dtype, float], dtype: torch.dtype | None) -> float:
    return table.get(dtype, table[torch.float32])


def flat(out) -> list[torch.Tensor]:
    """Every tensor of a model's output (tensors, tuples, lists, dicts), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat(o)]
    return []


def relative_error(got, want) -> float:
    """``max |got - want| / max |want|`` over all output tensors, in float64; ``inf`` when the
    outputs do not have the same structure, or one is not finite where the other is."""
    got, want = flat(got), flat(want)
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            return float("inf")
        g, w = g.detach().to(torch.complex128 if g.is_complex() else torch.float64), \
            w.detach().to(torch.complex128 if w.is_complex() else torch.float64)
        finite = torch.isfinite(w)
        if not torch.equal(finite, torch.isfinite(g)):
            return float("inf")
        if not bool(finite.any()):
            continue
        scale = w[finite].abs().max().item() or 1.0
        worst = max(worst, (g[finite] - w[finite]).abs().max().item() / scale)
    return worst


@dataclass(frozen=True)
class Divergence:
    """A region whose module does not compute what the ops it replaced computed."""

    output: str  # the original node the region's value replaced
    error: float

    def reason(self) -> str:
        return (f"verification: the folded module differs from the ops it replaces by "
                f"{self.error:.2g} (relative), so this region is kept unfolded; please report it")


class NotExtractable(Exception):
    """A region reads a tensor other than its source (it cannot be checked alone)."""


def region_module(gm: fx.GraphModule, source: fx.Node, nodes: Iterable[fx.Node], out: fx.Node,
                  is_const: Callable[[fx.Node], bool]) -> fx.GraphModule:
    """The ops of one region as a module of its source alone: ``out`` computed from ``source``
    through ``nodes``, with the constants they read (parameters, constant arithmetic) and the
    observed values of shape queries on other tensors."""
    inside = set(nodes)
    graph = fx.Graph()
    env: dict[fx.Node, object] = {source: graph.placeholder("x")}

    def take(n: fx.Node):
        if n in env:
            return env[n]
        if (n.op == "get_attr" or n in inside or is_const(n)
                or _reads_only(n, env, inside, is_const)):
            env[n] = graph.node_copy(n, take)
        elif "reparam_value" in n.meta:
            env[n] = n.meta["reparam_value"]
        else:
            raise NotExtractable(n.name)
        return env[n]

    graph.output(take(out))
    return fx.GraphModule(gm, graph)


def _reads_only(n: fx.Node, env, inside, is_const) -> bool:
    """A shape query (``x.size(0)``) of a node that is itself part of the region."""
    return (n.op in ("call_method", "call_function") and bool(n.all_input_nodes)
            and all(i in env or i in inside or is_const(i) for i in n.all_input_nodes)
            and "reparam_value" in n.meta)


def check_region(sub: fx.GraphModule, module: nn.Module, source_shape, dtype: torch.dtype,
                 seed: int = 0) -> float:
    """Relative error of ``module`` against the original ops ``sub``, both in float64 (the
    module's weights as they are, rounded to the model's dtype), on a random input."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(source_shape), generator=generator, dtype=torch.float64)
    want_m, got_m = copy.deepcopy(sub).double(), copy.deepcopy(module).double()
    with torch.no_grad():
        return relative_error(got_m(x), want_m(x))


def divergences(captured: dict[str, tuple[fx.GraphModule, nn.Module, fx.Node]],
                dtype: torch.dtype) -> list[Divergence]:
    """Every captured region whose module differs from its ops beyond the local tolerance."""
    tol = tolerance(LOCAL, dtype)
    bad = []
    for output, (sub, module, source) in captured.items():
        shape = shape_of(source)
        if shape is None:
            continue
        try:
            err = check_region(sub, module, shape, dtype)
        except Exception:  # noqa: BLE001 - a region that cannot run alone is suspect
            err = float("inf")
        if not err <= tol:
            bad.append(Divergence(output, err))
    return bad
