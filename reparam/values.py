"""What the graph layer knows about a node: linear in one source, a constant, or opaque.

Rules are small values (:class:`Rule`); their fold functions receive a :class:`Context` that
resolves operands and records which laws were used. A rule whose pattern does not apply returns
``None``; one whose pattern applies but whose exactness condition fails raises :class:`NoFold`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import fx

from .kernel import Kernel


class NoFold(Exception):
    """A rule applies to this node but cannot fold it exactly; ``str(self)`` says why.

    ``barrier`` names a node that, materialized on its own, would let the fold succeed (two
    branches that meet only if one of them starts where the other passes through).
    """

    def __init__(self, reason: str, barrier: object = None) -> None:
        super().__init__(reason)
        self.barrier = barrier


@dataclass(frozen=True, eq=False)
class Lin:
    """``node = kernel(source)``: the node's value is one affine map of an opaque ``source``.

    ``nodes`` are the op nodes folded into ``kernel`` (empty for the source itself) and ``rules``
    the names of the rules and laws used, in first-use order.
    """

    source: fx.Node
    kernel: Kernel
    nodes: frozenset[fx.Node]
    rules: tuple[str, ...] = ()

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
    """A fold rule: the op ``kinds`` it folds and how; or, with no kinds, a law other rules use.

    ``fold(ctx, op)`` returns the node's :class:`Lin` value, ``None`` when the rule does not apply,
    or raises :class:`NoFold` with the reason when the fold would not be exact.
    """

    name: str
    kinds: tuple[str, ...]
    fold: Callable[[Any, Any], Lin | None] | None
    doc: str

    def __repr__(self) -> str:
        return f"Rule({self.name})"


def rule(name: str, *kinds: str) -> Callable[[Callable], Rule]:
    """Decorator: turn a fold function into a :class:`Rule` named ``name`` for op ``kinds``."""

    def wrap(fn: Callable) -> Rule:
        return Rule(name, kinds, fn, (fn.__doc__ or "").strip())

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
