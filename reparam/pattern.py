"""Recognition: what a rule matches, declared beside its fold.

A rule names the ops it folds with patterns. Each pattern says where an op may appear in a traced
graph and how to read it into one normalized :class:`Op`:

* :class:`Module` - a ``call_module`` of one of some module types, subclasses included (a module
  under ``torch.nn.utils.parametrize`` is a subclass), unless the subclass or the instance
  computes something else (its own ``forward``, a ``forward`` set on the instance, a hook);
* :class:`Function` - a ``call_function`` of one of some functions (``F.conv2d``, ``torch.flip``,
  ``operator.add``), its arguments bound to a signature;
* :class:`Method` - a ``call_method`` (``x.flip(1)``, ``x.add(y)``);
* :class:`Aten` - a ``call_function`` of an aten overload (``torch.ops.aten.convolution.default``),
  its signature read from the overload's schema.

:class:`Recognizer` builds one dispatch table from the patterns of a rule set (keyed by the module
type, the function object or the method name, never by an op-kind string) and reads each node
once. A pattern's ``kind`` is a label for reports and counts only; its ``effect`` tells the driver
what kind of thing the op does to tensors (apply a kernel, scale channels, join branches, move
elements), and its ``cost`` how many multiply-adds it takes.
"""

from __future__ import annotations

import ast
import enum
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from .errors import ReparamError


class Effect(enum.Enum):
    """What an op does to the tensors it reads (the driver's view of a rule's op)."""

    MAP = "map"  # applies a kernel to one tensor: conv, linear, pool (multiply-adds)
    AFFINE = "affine"  # a per-channel scale and shift: BN, x * c, x + c
    JOIN = "join"  # sums or concatenates tensors of one shape: add, sub, cat
    LAYOUT = "layout"  # moves or copies elements: pad, reshape, permute, contiguous (no MACs)
    IDENTITY = "identity"  # returns its input itself: nn.Identity, eval-mode dropout


@dataclass(frozen=True)
class Op:
    """One op, normalized: ``inputs`` are its data operands (nodes or constants), ``attrs`` its
    settings and parameters (tensors, or ``get_attr`` nodes naming them)."""

    kind: str
    inputs: tuple[Any, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    param_owner: str | None = None  # module path the op's parameters come from (for names)
    effect: Effect = Effect.MAP

    def __getitem__(self, name: str) -> Any:
        return self.attrs[name]


REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Signature:
    """Parameter names with defaults, as ``"input, weight, bias=None, *shape"`` declares them.

    ``bind`` maps a call's arguments to them (``None`` when a required one is missing); a
    ``*name`` parameter collects the remaining positional arguments into a tuple."""

    params: tuple[tuple[str, Any], ...]
    varargs: str | None = None

    @classmethod
    def parse(cls, text: str) -> Signature:
        params, varargs = [], None
        for part in (p.strip() for p in text.split(",") if p.strip()):
            if part.startswith("*"):
                varargs = part[1:]
                continue
            name, _, default = part.partition("=")
            params.append((name.strip(), ast.literal_eval(default.strip()) if default
                           else REQUIRED))
        return cls(tuple(params), varargs)

    @classmethod
    def of(cls, fn: Callable) -> Signature:
        """The signature of a Python function (``F.pad``), read with ``inspect``."""
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError) as e:
            raise ReparamError(
                f"cannot read the signature of {getattr(fn, '__name__', fn)}: give it as a "
                "string, e.g. Function(fn, 'input, dims')") from e
        params, varargs = [], None
        for p in sig.parameters.values():
            if p.kind is p.VAR_POSITIONAL:
                varargs = p.name
            elif p.kind is not p.VAR_KEYWORD:
                params.append((p.name, p.default))
        return cls(tuple(params), varargs)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
        bound = dict(self.params)
        names = [n for n, _ in self.params]
        for name, value in zip(names, args, strict=False):
            bound[name] = value
        if self.varargs is not None:
            rest = tuple(args[len(names):])
            bound[self.varargs] = rest[0] if len(rest) == 1 and isinstance(
                rest[0], (tuple, list)) else rest
        elif len(args) > len(names):
            return None
        for key, value in kwargs.items():
            if key in bound:
                bound[key] = value
        if any(v is REQUIRED for v in bound.values()):
            return None
        return bound


Reader = Callable[[dict[str, Any]], Op | None]
Cost = Callable[[Op, fx.Node, Callable[[Any], Any]], int]


def default_cost(effect: Effect) -> Cost:
    """Multiply-adds of an op by what it does: one per output element for a map, a per-channel
    op or a sum; none for moving elements."""
    def cost(op: Op, node: fx.Node, tensor: Callable[[Any], Any]) -> int:
        if effect in (Effect.LAYOUT, Effect.IDENTITY):
            return 0
        return per_sample(node)

    return cost


def per_sample(node: fx.Node) -> int:
    """Elements of one sample of ``node``'s output."""
    from .nodes import shape_of

    shape = shape_of(node)
    return 0 if not shape else math.prod(shape[1:]) if len(shape) > 1 else 1


class Pattern:
    """Where an op appears and how to read it (see the module docstring)."""

    kind: str
    effect: Effect
    cost: Cost

    def keys(self) -> Iterator[tuple[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, node: fx.Node, target: Any) -> Op | None:  # pragma: no cover - abstract
        raise NotImplementedError


def _op(kind: str, effect: Effect, data: Sequence[str]) -> Reader:
    """The default reader: ``Op(kind, the data arguments, the others)``; a data argument that is
    a list of tensors (``torch.cat``'s) gives one input per tensor."""
    def read(bound: dict[str, Any]) -> Op:
        inputs: list[Any] = []
        for name in data:
            value = bound[name]
            inputs.extend(value if isinstance(value, (list, tuple)) else (value,))
        attrs = {k: v for k, v in bound.items() if k not in data}
        return Op(kind, tuple(inputs), attrs, effect=effect)

    return read


class Function(Pattern):
    """A ``call_function`` of one of ``functions`` (Python functions, builtins or aten overloads).

    ``signature`` names the parameters (``"input, weight, bias=None"``; read from the function
    when omitted); ``data`` the ones that are tensors computed from the input (default: the
    first); ``read`` turns the bound arguments into an :class:`Op` (default: ``Op(kind, data,
    the other arguments)``) or returns ``None`` when the call is not this op after all."""

    def __init__(self, functions: Callable | Sequence[Callable], signature: str | None = None,
                 *, kind: str | None = None, data: Sequence[str] | None = None,
                 read: Reader | None = None, effect: Effect = Effect.MAP,
                 cost: Cost | None = None) -> None:
        self.functions = tuple(functions) if isinstance(functions, (list, tuple)) else (
            functions,)
        first = self.functions[0]
        self.signature = (Signature.parse(signature) if signature is not None
                          else self._signature(first))
        self.kind = kind or getattr(first, "__name__", str(first)).split(".")[0]
        self.effect = effect
        names = [n for n, _ in self.signature.params] or [self.signature.varargs]
        self.data = tuple(data) if data is not None else (names[0],)
        self.reader = read or _op(self.kind, effect, self.data)
        self.cost = cost or default_cost(effect)

    @staticmethod
    def _signature(fn) -> Signature:
        return Signature.of(fn)

    def keys(self) -> Iterator[tuple[str, Any]]:
        for fn in self.functions:
            yield ("function", fn)

    def read(self, node: fx.Node, target: Any) -> Op | None:
        bound = self.signature.bind(node.args, node.kwargs)
        if bound is None:
            return None
        op = self.reader(bound)
        if op is not None and op.effect is not self.effect:
            op = Op(op.kind, op.inputs, op.attrs, op.param_owner, self.effect)
        return op

    def __repr__(self) -> str:
        names = ", ".join(getattr(f, "__name__", str(f)) for f in self.functions)
        return f"Function({names})"


class Aten(Function):
    """A ``call_function`` of aten overloads (``torch.ops.aten.convolution.default``), as
    torch.export and make_fx write ops; the signature is read from the overload's schema (its
    ``self`` named ``input``, as in the torch functions)."""

    @staticmethod
    def _signature(fn) -> Signature:
        schema = getattr(fn, "_schema", None)
        if schema is None:
            raise ReparamError(f"{fn} is not an aten overload (torch.ops.aten.NAME.OVERLOAD)")
        params = []
        for arg in schema.arguments:
            if arg.kwarg_only and arg.name == "out":
                continue
            name = "input" if arg.name == "self" else arg.name  # one name for the tensor
            params.append((name, arg.default_value if arg.has_default_value() else REQUIRED))
        return Signature(tuple(params))

    def __repr__(self) -> str:
        return f"Aten({', '.join(str(f) for f in self.functions)})"


class Method(Pattern):
    """A ``call_method`` of one of ``names`` on a tensor (``x.flip(1)``); the signature's first
    parameter is the tensor itself (``"input, *dims"``)."""

    def __init__(self, names: str | Sequence[str], signature: str, *, kind: str | None = None,
                 data: Sequence[str] | None = None, read: Reader | None = None,
                 effect: Effect = Effect.MAP, cost: Cost | None = None) -> None:
        self.names = (names,) if isinstance(names, str) else tuple(names)
        self.signature = Signature.parse(signature)
        self.kind = kind or self.names[0]
        self.effect = effect
        self.data = tuple(data) if data is not None else (self.signature.params[0][0],)
        self.reader = read or _op(self.kind, effect, self.data)
        self.cost = cost or default_cost(effect)

    def keys(self) -> Iterator[tuple[str, Any]]:
        for name in self.names:
            yield ("method", name)

    read = Function.read

    def __repr__(self) -> str:
        return f"Method({', '.join(self.names)})"


ModuleReader = Callable[[nn.Module, fx.Node], Op | None]


class Module(Pattern):
    """A ``call_module`` of one of ``types`` or a subclass that inherits its ``forward`` (a
    module under ``torch.nn.utils.parametrize`` does). Such a module is kept whole while tracing
    (a leaf), so the graph shows its call.

    ``read(module, node)`` turns the module into an :class:`Op` (default: ``Op(kind, (x,),
    {"module": module})``, ``x`` its first argument); it may return ``None`` when this instance
    is not the op after all (a dropout in training mode)."""

    def __init__(self, types: type | Sequence[type], *, kind: str | None = None,
                 read: ModuleReader | None = None, effect: Effect = Effect.MAP,
                 cost: Cost | None = None) -> None:
        self.types = tuple(types) if isinstance(types, (list, tuple)) else (types,)
        self.kind = kind or self.types[0].__name__.lower()
        self.effect = effect
        self.reader = read or self._default
        self.cost = cost or default_cost(effect)

    def _default(self, module: nn.Module, node: fx.Node) -> Op:
        x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        return Op(self.kind, (x,), {"module": module}, str(node.target), self.effect)

    def keys(self) -> Iterator[tuple[str, Any]]:
        for t in self.types:
            yield ("module", t)

    def read(self, node: fx.Node, target: Any) -> Op | None:
        op = self.reader(target, node)
        if op is not None and op.param_owner is None:
            op = Op(op.kind, op.inputs, op.attrs, str(node.target), op.effect)
        if op is not None and op.effect is not self.effect:
            op = Op(op.kind, op.inputs, op.attrs, op.param_owner, self.effect)
        return op

    def __repr__(self) -> str:
        return f"Module({', '.join(t.__name__ for t in self.types)})"


def patterns_of(matches: Iterable[Any]) -> tuple[Pattern, ...]:
    """Patterns from a rule's declaration: patterns and (nested) tuples of them."""
    out: list[Pattern] = []
    for m in matches:
        if isinstance(m, Pattern):
            out.append(m)
        elif isinstance(m, (list, tuple)):
            out.extend(patterns_of(m))
        else:
            raise ReparamError(
                f"a rule matches patterns (reparam.pattern.Module, Function, Method, Aten or "
                f"the tuples of reparam.rules.ops), not {m!r}")
    return tuple(out)


def module_differs(module: nn.Module, base: type) -> str | None:
    """Why ``module`` (an instance of a subclass of ``base``) may compute something else than
    ``base`` says, or ``None``."""
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{type(module).__name__} has a forward hook, which may change what it computes"
    if "forward" in vars(module):
        return (f"{type(module).__name__}'s forward is replaced on the instance, so it may "
                "compute something else than its class says")
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides {base.__name__}.forward"
    return None


@dataclass
class Match:
    """A node read by a pattern, and the rules that declared it (in rule-set order)."""

    op: Op
    pattern: Pattern
    rules: tuple[Any, ...]


class Recognizer:
    """The dispatch table of a rule set: node -> the ops its patterns read and their rules."""

    def __init__(self, rules: Sequence[Any]) -> None:
        table: dict[tuple[str, Any], list[tuple[Pattern, list[Any]]]] = {}
        for r in rules:
            for p in getattr(r, "matches", ()):
                for key in p.keys():
                    entries = table.setdefault(key, [])
                    for pattern, owners in entries:
                        if pattern is p:
                            owners.append(r)
                            break
                    else:
                        entries.append((p, [r]))
        self.table = table
        self.module_types = tuple(t for kind, t in table if kind == "module")

    def matches(self, node: fx.Node, modules: Mapping[str, nn.Module]
                ) -> tuple[list[Match], str | None]:
        """Every reading of ``node`` by the rule set's patterns, and why a module that a pattern
        names is not read as that op (a hook, its own forward), if so."""
        found: list[Match] = []
        why = None
        for pattern, rules, target in self._candidates(node, modules):
            if isinstance(pattern, Module):
                why = module_differs(target, self._base(target, pattern))
                if why is not None:
                    continue
            try:
                op = pattern.read(node, target)
            except (TypeError, ValueError, AttributeError, KeyError, IndexError):
                op = None  # arguments it cannot read (a size computed at run time)
            if op is not None:
                found.append(Match(op, pattern, tuple(rules)))
        return found, why

    def is_leaf(self, module: nn.Module) -> bool:
        """Whether the tracer should keep ``module`` whole: a pattern reads it as one op."""
        if not isinstance(module, self.module_types):
            return False
        for t in type(module).__mro__:
            for pattern, _ in self.table.get(("module", t), ()):
                if module_differs(module, self._base(module, pattern)) is None:
                    return True
        return False

    @staticmethod
    def _base(module: nn.Module, pattern: Module) -> type:
        return next(t for t in pattern.types if isinstance(module, t))

    def _candidates(self, node: fx.Node, modules: Mapping[str, nn.Module]):
        if node.op == "call_module":
            module = modules.get(str(node.target))
            if module is None:
                return
            seen: set[int] = set()
            for t in type(module).__mro__:  # the most specific registered type first
                for pattern, rules in self.table.get(("module", t), ()):
                    if id(pattern) not in seen:
                        seen.add(id(pattern))
                        yield pattern, rules, module
        elif node.op in ("call_function", "call_method"):
            kind = "function" if node.op == "call_function" else "method"
            try:
                entries = self.table.get((kind, node.target), ())
            except TypeError:  # an unhashable target
                entries = ()
            for pattern, rules in entries:
                yield pattern, rules, node.target
