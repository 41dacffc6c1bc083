"""What the graph layer knows about a node: linear in one source, a constant, or opaque.

Rules are small values (:class:`Rule`): what they match (patterns, :mod:`reparam.pattern`) beside
how they fold. Their fold functions receive a :class:`~reparam.context.Context` that resolves
operands and records which laws were used. A rule returns the node's :class:`Lin`, ``None`` when
the node is not its case ("not mine"), or raises :class:`NoFold` when the fold would not be exact
("not exact, because ...").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .kernel import Kernel
from .nodes import shape_of
from .pattern import Pattern, patterns_of


class NoFold(Exception):
    """A rule applies to this node but cannot fold it exactly; ``str(self)`` says why.

    ``barrier`` names a node that, materialized on its own, would let the fold succeed (two
    branches that meet only if one of them starts where the other passes through). ``join``
    marks a sum or concat of tensors that are not one linear map of one input (a ResNet's
    residual): not a leftover but a join of the network.
    """

    def __init__(self, reason: str, barrier: object = None, join: bool = False) -> None:
        super().__init__(reason)
        self.barrier = barrier
        self.join = join


@dataclass(frozen=True)
class View:
    """``base`` seen through ops that move elements (transpose, permute, flatten, reshape) or
    average them, which a per-channel affine map commutes with: ``chain[-1](...chain[0](base))``,
    each op of ``chain`` re-pointed to read the one before it, the first to read ``base``.

    A per-channel map moved past such ops (a BN before FastViT's ``flatten -> transpose ->
    Linear``) is a map of this view; a region of it reads the view, made anew on ``base``."""

    base: fx.Node
    chain: tuple[fx.Node, ...]

    @property
    def name(self) -> str:
        return self.chain[-1].name

    def __repr__(self) -> str:
        return f"View({self.base.name} -> {' -> '.join(n.name for n in self.chain)})"


Source = fx.Node | View


def source_node(source: Source) -> fx.Node:
    """The graph node a source reads (a view's base)."""
    return source.base if isinstance(source, View) else source


def source_shape(source: Source) -> torch.Size | None:
    """The traced shape of a source (a view's: its last op's output)."""
    return shape_of(source.chain[-1] if isinstance(source, View) else source)


@dataclass(frozen=True, eq=False)
class Lin:
    """``node = kernel(source)``: the node's value is one affine map of an opaque ``source`` (a
    node, or a :class:`View` of one).

    ``nodes`` are the op nodes folded into ``kernel`` (empty for the source itself), ``rules``
    the names of the rules and laws used, in first-use order, and ``biased`` whether one of the
    ops adds a bias (a BN, a biased conv, a shift): the folded module then keeps a bias even
    where its values are zero, as a trained model's deploy form has.

    ``reshaped``, when set, makes the value *flat* (RepMLP's patches): the node's tensor is
    ``kernel(source)`` reshaped as that reshape node reshapes its input. A reshape keeps the
    row-major order of the elements, so the kernel is a map on the flattened sample (a linear
    layer, or a 1x1 conv on ``(n, C*h*w, 1, 1)``). Only rules that ask for flat values
    (:meth:`~reparam.context.Context.flat`) see them; every other rule reads an opaque tensor."""

    source: Source
    kernel: Kernel
    nodes: frozenset[fx.Node]
    rules: tuple[str, ...] = ()
    biased: bool = False
    reshaped: fx.Node | None = None

    @property
    def is_source(self) -> bool:
        return not self.nodes


@dataclass(frozen=True, eq=False)
class Const:
    """A value that depends on no input (a parameter, a buffer, a number)."""

    value: Any


class Opaque:
    """A value reparam does not see through (a non-linear op, a model input)."""

    def __repr__(self) -> str:
        return "OPAQUE"


OPAQUE = Opaque()
Value = Lin | Const | Opaque


@dataclass(frozen=True)
class Rule:
    """A fold rule: the patterns it ``matches`` and how it folds them; or, with no patterns, a
    law other rules use (enabled by its presence in the rule set).

    ``fold(ctx, op)`` returns the node's :class:`Lin` value, ``None`` when the rule does not apply,
    or raises :class:`NoFold` with the reason when the fold would not be exact.
    """

    name: str
    matches: tuple[Pattern, ...]
    fold: Callable[[Any, Any], Lin | None] | None
    doc: str

    @property
    def kinds(self) -> tuple[str, ...]:
        """The op kinds its patterns read (labels for reports and docs)."""
        return tuple(dict.fromkeys(p.kind for p in self.matches))

    def __repr__(self) -> str:
        return f"Rule({self.name})"


def rule(name: str, *matches: Pattern | Iterable[Pattern]) -> Callable[[Callable], Rule]:
    """Decorator: turn a fold function into a :class:`Rule` named ``name`` matching ``matches``
    (patterns, or tuples of them such as :data:`reparam.rules.ops.CONV`)."""
    patterns = patterns_of(matches)

    def wrap(fn: Callable) -> Rule:
        return Rule(name, patterns, fn, (fn.__doc__ or "").strip())

    return wrap


def law(name: str, doc: str) -> Rule:
    """A law that rules call on (e.g. zero-padding a small kernel); enabled by its presence."""
    return Rule(name, (), None, doc.strip())


def merge_rules(*groups: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for group in groups:
        for name in group:
            seen.setdefault(name, None)
    return tuple(seen)
