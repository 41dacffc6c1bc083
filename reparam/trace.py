"""Tracing a copy of the caller's model, shape propagation, and example inputs.

The caller's model is never traced itself: tracing can write into it (LeViT caches a Proxy in its
attention-bias cache). A *light copy* shares parameter and buffer tensors with the original and
copies everything else; nothing reparam does writes into those tensors, and the folded model gets
its own copies of the ones it keeps (:func:`own_tensors`). The copies that are only traced and run
(``share_leaves``) also share torch's own stateless layers (a conv, a BN, an activation, without
hooks), whose forward writes no attribute and which torch.fx does not enter: most of a network's
modules, and most of what copying cost. A shared layer that stays in the folded model is copied
there (:func:`own_tensors`), one that is hooked or folded into first (:func:`own_leaves`).
"""

from __future__ import annotations

import ast
import collections
import copy
import functools
import inspect
import textwrap
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from .errors import ReparamError, TraceError
from .nodes import pieces_call
from .observe import observe


def _cached_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Tensors held in plain attributes and containers of the modules (caches, not state)."""
    found = []
    for module in model.modules():
        for value in module.__dict__.values():
            items = value.values() if isinstance(value, dict) else (
                value if isinstance(value, (list, tuple)) else (value,))
            found += [t for t in items if isinstance(t, torch.Tensor)]
    return found


def light_copy(model: nn.Module, share_leaves: bool = False) -> nn.Module:
    """A structural copy of ``model``: every module is a new object with its own attribute
    dictionaries, lists and sets (so tracing that writes into a cache, as LeViT does, writes into
    the copy), sharing the parameter and buffer tensors and other values with the original.
    Much cheaper than ``copy.deepcopy``; nothing reparam does writes into shared tensors. With
    ``share_leaves``, torch's stateless layers are the original's objects (:func:`shareable`)."""
    try:
        return _clone(model, {}, share_leaves)
    except RuntimeError:  # a module that refuses to be copied this way (parametrizations)
        memo_t = {id(t): t for t in model.parameters()}
        memo_t.update({id(t): t for t in model.buffers()})
        memo_t.update({id(t): t for t in _cached_tensors(model)})
        return copy.deepcopy(model, memo_t)


# torch's layers whose forward reads its module and writes nothing into it (lazy modules are
# refused before a fold; RNNs, which re-flatten their weights, are not listed)
_STATELESS = frozenset(f"torch.nn.modules.{name}" for name in (
    "conv", "batchnorm", "linear", "activation", "pooling", "dropout", "padding", "flatten",
    "normalization", "instancenorm", "pixelshuffle", "upsampling", "channelshuffle", "fold"))
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def shareable(m: nn.Module) -> bool:
    """A torch layer with no children, no hooks and no forward of its own: a copy that is only
    traced and run may use the original object itself."""
    return (type(m).__module__ in _STATELESS and not m._modules and "forward" not in vars(m)
            and not any(getattr(m, h, None) for h in _HOOK_DICTS))


def own_leaves(root: nn.Module, paths: Iterable[str]) -> None:
    """Make the modules at ``paths`` of a copy, and their children, its own objects (each a
    light copy of a shared layer), before they are hooked or folded into."""
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        try:
            parent = root.get_submodule(parent_path) if parent_path else root
        except AttributeError:
            continue
        module = parent._modules.get(name)
        if module is None:
            continue
        if shareable(module):
            module = parent._modules[name] = _clone(module, {})
        for key, child in module._modules.items():
            if child is not None and shareable(child):
                module._modules[key] = _clone(child, {})


def _clone(m: nn.Module, memo: dict[int, nn.Module], share_leaves: bool = False) -> nn.Module:
    """One module of :func:`light_copy` and, recursively, its children (``memo``: the copies made
    so far, by the original's id). A plain function, not a closure that calls itself: such a
    closure is a reference cycle, which would keep every copy alive until the cyclic collector
    runs (and ``fold`` pauses it)."""
    if id(m) in memo:  # a module used in two places stays one module
        return memo[id(m)]
    if share_leaves and shareable(m):
        memo[id(m)] = m
        return m
    cls = type(m)
    state = {key: _shallow(value) for key, value in vars(m).items() if key != "_modules"}
    if cls.__new__ is object.__new__:  # a new object and dict: no __init__, no __reduce_ex__
        new = object.__new__(cls)
        object.__setattr__(new, "__dict__", state)
    else:  # a class with its own __new__ (GraphModule makes a class per instance)
        new = copy.copy(m)
        vars(new).update(state)
    memo[id(m)] = new
    new._modules = type(m._modules)(
        (name, None if child is None else _clone(child, memo, share_leaves))
        for name, child in m._modules.items()
    )
    return new


_PLAIN = (dict, list, set, collections.OrderedDict)


def _shallow(value):
    """A new container with the same items (``.copy()`` of the exact built-in types: far faster
    than ``copy.copy``, which goes through ``__reduce_ex__`` for an OrderedDict); other values
    are shared."""
    if type(value) in _PLAIN:
        return value.copy()
    return copy.copy(value) if isinstance(value, (dict, list, set)) else value


def deep_copy(model: nn.Module) -> nn.Module:
    """A fully independent copy, even of a model holding non-leaf tensors in a cache."""
    try:
        return copy.deepcopy(model)
    except RuntimeError:
        memo = {id(t): t.detach().clone() for t in _cached_tensors(model)
                if not t.is_leaf}
        return copy.deepcopy(model, memo)


def own_tensors(folded: nn.Module, original: nn.Module) -> None:
    """Replace every module and tensor ``folded`` still shares with ``original`` by a copy."""
    theirs = {id(m) for m in original.modules()}
    copies: dict[int, nn.Module] = {}
    for parent in [m for m in folded.modules() if id(m) not in theirs]:
        for name, child in parent._modules.items():
            if child is not None and id(child) in theirs:
                parent._modules[name] = _clone(child, copies)
    shared = {id(t) for t in original.parameters()} | {id(t) for t in original.buffers()}
    for module in folded.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in shared:
                module._parameters[name] = nn.Parameter(p.detach().clone(), p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and id(b) in shared:
                module._buffers[name] = b.detach().clone()


class _Tracer(fx.Tracer):
    """torch.fx's tracer with leaf modules, and parameter names looked up in a table (torch's
    default scans every parameter for every attribute read: quadratic on large models).

    Leaves: the paths named, the modules a pattern of the rule set reads as one op (a user's
    ``Module(Scale)`` rule makes ``Scale`` a leaf), and modules whose code uses
    ``torch.autocast``, which torch.fx does not record (they run as they are; their children are
    folded one by one)."""

    def __init__(self, leaves: set[str] | frozenset[str] = frozenset(),
                 recognizer=None) -> None:
        super().__init__()  # the defaults let torch.load re-create a pickled GraphModule
        self.leaves = leaves
        self.recognizer = recognizer
        self.autocast: dict[str, str] = {}  # path -> why it was kept whole
        self._names: dict[int, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves or super().is_leaf_module(m, qualname):
            return True
        if self.recognizer is not None and self.recognizer.is_leaf(m):
            return True
        if qualname and _uses_autocast(type(m)):
            self.autocast[qualname] = (f"{type(m).__name__} uses torch.autocast, which torch.fx "
                                       "does not record: it runs as it is")
            return True
        return False

    def call_module(self, m: nn.Module, forward, args, kwargs):
        """``nn.Identity`` returns its input itself: record nothing for it (timm's norm+act
        modules hold two each). One with a hook or its own forward is called as usual."""
        if (type(m) is nn.Identity and len(args) == 1 and not kwargs
                and not (m._forward_hooks or m._forward_pre_hooks) and "forward" not in vars(m)):
            return args[0]
        return super().call_module(m, forward, args, kwargs)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        """A call that returns a known number of tensors (``x.chunk(2, 1)``,
        ``x.split([a, b])``) gives a proxy that can be iterated (``list(x.chunk(2, 1))``, as
        Ultralytics' C2f writes it); each item is a ``getitem``. (``chunk`` may return fewer
        chunks on a small axis: the trace is checked against eager mode before it is used.)"""
        count = _parts(node)
        if count is not None:
            return _Parts(node, self, count)
        return super().proxy(node)

    def _name_of(self, t: torch.Tensor) -> str | None:
        if self._names is None:
            self._names = {}
            for name, b in self.root.named_buffers():
                self._names.setdefault(id(b), name)
            for name, p in self.root.named_parameters():
                self._names[id(p)] = name  # a parameter's own name wins, as in torch
        return self._names.get(id(t))

    def create_arg(self, a):
        if isinstance(a, torch.Tensor):
            name = self._name_of(a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        name = self._name_of(attr_val)
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


class _Parts(fx.Proxy):
    """A proxy for a tuple of ``count`` tensors."""

    def __init__(self, node: fx.Node, tracer, count: int) -> None:
        super().__init__(node, tracer)
        self.count = count

    def __iter__(self):
        return iter([self[i] for i in range(self.count)])

    def __len__(self) -> int:
        return self.count


def _parts(node: fx.Node) -> int | None:
    """How many tensors a ``chunk`` or ``split`` by sizes returns, when the call says."""
    call = pieces_call(node)
    if call is None:
        return None
    how, _, sections, _ = call
    if how == "chunk":
        return sections if isinstance(sections, int) and sections > 0 else None
    return len(sections) if isinstance(sections, (list, tuple)) and all(
        isinstance(v, int) for v in sections) else None


@dataclass
class Traced:
    """A traced copy of a model: the copy (``root``, whose modules the graph calls), the graph,
    the model's class name, the ``(path, reason)`` of each submodule kept whole, and how it was
    captured (empty: torch.fx)."""

    root: nn.Module
    graph: fx.Graph
    name: str
    untraced: list[tuple[str, str]]
    how: str = ""

    def module(self) -> fx.GraphModule:
        """The traced graph as a graph module (code is generated here)."""
        return fx.GraphModule(self.root, self.graph, self.name)


def trace(make_copy: Callable[[], nn.Module], leaf_modules: Iterable[str] = (),
          recognizer=None) -> Traced:
    """Trace a fresh copy of the model; a submodule that fails to trace becomes a leaf, retried.

    No code is generated here (a graph module is made once, after folding). Raises
    :class:`TraceError` when the top-level module itself does not trace.
    """
    leaves = set(leaf_modules)
    untraced: list[tuple[str, str]] = []
    for _ in range(1000):
        root = make_copy()
        if "forward" in vars(root):  # torch.fx would trace the class's forward, not this one
            raise TraceError(f"{type(root).__name__}'s forward is replaced on the instance, "
                             "which torch.fx does not trace: it is kept as it is")
        tracer = _Tracer(leaves, recognizer)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = tracer.trace(root)
        except Exception as e:  # noqa: BLE001 - any failure inside user code
            stack = list(tracer.module_stack.values())
            _drop(tracer)
            path = stack[-1][0] if stack else ""
            why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            if not path or path in leaves:
                raise TraceError(
                    f"{type(root).__name__} does not trace with torch.fx ({why})"
                ) from e
            leaves.add(path)
            untraced.append((path, why))
            continue
        traced = Traced(tracer.root, graph, type(root).__name__,
                        untraced + list(tracer.autocast.items()))
        _drop(tracer)
        return traced
    raise TraceError("too many untraceable submodules")  # pragma: no cover


def _drop(tracer: fx.Tracer) -> None:
    """Empty a tracer once it is done: torch.fx's patched functions close over it in a reference
    cycle, which would keep its copy of the model, its graph and its tables alive until the
    cyclic collector runs (``fold`` pauses it)."""
    vars(tracer).clear()


@functools.cache
def _class_trees(cls: type) -> tuple[ast.AST, ...]:
    """The parsed source of the class and its bases outside torch (where it can be read)."""
    trees = []
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("torch."):
            continue
        try:
            trees.append(ast.parse(textwrap.dedent(inspect.getsource(klass))))
        except (OSError, TypeError, SyntaxError):
            continue
    return tuple(trees)


@functools.cache
def _uses_autocast(cls: type) -> bool:
    """Whether the class's code (outside torch) names ``autocast`` (``torch.autocast``,
    ``torch.amp.autocast``, ``torch.cuda.amp.autocast``)."""
    return any(isinstance(n, (ast.Attribute, ast.Name)) and "autocast" in (
        n.attr if isinstance(n, ast.Attribute) else n.id)
        for tree in _class_trees(cls) for n in ast.walk(tree))


@functools.cache
def _augments(cls: type) -> bool:
    """Whether the class (any method: ``forward`` may call helpers) or a base class outside torch
    has an augmented assignment (``x += y``), which torch.fx records as an out-of-place op: wrong
    if another name still refers to the old tensor."""
    return any(isinstance(n, ast.AugAssign) for tree in _class_trees(cls) for n in ast.walk(tree))


def has_augmented_assignment(model: nn.Module) -> bool:
    """Whether any traced-through module's forward (not torch's own) has ``x += y``."""
    return any(_augments(type(m)) for m in model.modules()
               if not type(m).__module__.startswith("torch."))


def as_inputs(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ReparamError("example_inputs must be a tensor or a tuple of tensors")


_FIRST_OPS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1,
              nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3, nn.BatchNorm1d: 1,
              nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def guess_inputs(model: nn.Module, traced: Traced | None = None) -> tuple:
    """A plausible input when the caller gave none: the model's own ``default_input_size`` (the
    zoo networks state their paper's, e.g. ``(3, 224, 224)``), timm's ``input_size``, or one
    fitted to the first layer (in graph order when traced, else in module order)."""
    placeholders = ([n for n in traced.graph.nodes if n.op == "placeholder"]
                    if traced is not None else [])
    if traced is not None and len(placeholders) != 1:
        raise ReparamError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs; pass "
            "example_inputs=(...) to fold"
        )
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else None
    size = getattr(model, "default_input_size", None)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not size and isinstance(cfg, dict):
        size = cfg.get("input_size")
    if size:
        return (torch.randn(1, *size, dtype=dtype, device=device),)
    first = _first_layer(model, traced)
    if isinstance(first, nn.Linear):
        return (torch.randn(2, first.in_features, dtype=dtype, device=device),)
    if isinstance(first, tuple):
        nd, channels = first
        return (torch.randn(2, channels, *([64 if nd < 3 else 16] * nd), dtype=dtype,
                            device=device),)
    raise ReparamError(
        f"reparam could not guess an input for {type(model).__name__}; pass "
        "example_inputs=(torch.randn(...),) to fold"
    )


def _layer_input(m: nn.Module) -> tuple[int, int] | nn.Linear | None:
    if type(m) in _FIRST_OPS:
        channels = getattr(m, "in_channels", None) or getattr(m, "num_features", None)
        return (_FIRST_OPS[type(m)], channels)
    return m if isinstance(m, nn.Linear) else None


def _first_layer(model: nn.Module, traced: Traced | None):
    """The first conv, BN or linear layer the input meets: ``(spatial dims, channels)`` or the
    ``nn.Linear``."""
    if traced is None:
        return next((found for m in model.modules() if (found := _layer_input(m)) is not None),
                    None)
    gm = traced.root
    modules = dict(gm.named_modules())
    frontier = [u for n in traced.graph.nodes if n.op == "placeholder" for u in n.users]
    for _ in range(64):
        if not frontier:
            break
        node = frontier.pop(0)
        m = modules.get(str(node.target)) if node.op == "call_module" else None
        found = _layer_input(m) if m is not None else None
        if found is not None:
            return found
        if node.op == "call_function" and getattr(node.target, "__name__", "").startswith(
            "conv"
        ) and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
            w = _attr(gm, node.args[1])
            if isinstance(w, torch.Tensor):
                return (w.dim() - 2, w.shape[1])
        frontier.extend(node.users)
    return None


def _attr(gm: nn.Module, node: fx.Node):
    if node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj


def clone_inputs(inputs: tuple) -> tuple:
    """Copies of the tensors in ``inputs``, inside lists, tuples and dicts too (a head that takes
    a list of feature maps may write into it)."""
    return tuple(tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t,
                          list(inputs)))


@functools.cache
def branches_on_training(cls: type) -> bool:
    """Whether the class's ``forward`` (outside torch) reads ``self.training``: it computes
    something else in training mode (ECBSR's blocks rebuild their kernel in eval mode)."""
    for tree in _class_trees(cls):
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and fn.name == "forward" and any(
                    isinstance(n, ast.Attribute) and n.attr == "training"
                    and isinstance(n.value, ast.Name) and n.value.id == "self"
                    for n in ast.walk(fn)):
                return True
    return False


def propagate_shapes(gm: fx.GraphModule, inputs: tuple, protect: nn.Module | None = None
                     ) -> tuple:
    """Record every node's output shape and dtype in ``node.meta`` with one observed run on a copy
    of the example inputs (see :func:`reparam.observe.observe`). Returns ``(inputs used,
    output)``."""
    obs = observe(gm, inputs, protect)
    return obs.inputs, obs.output
