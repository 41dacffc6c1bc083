"""One observed run of a traced graph: shapes, writes, random draws and constants, as torch saw
them.

The traced graph runs once on a copy of the example inputs, node by node, under a dispatch mode
that sees every aten op torch executes, inside leaf modules too. From torch's own op metadata it
records, per node:

* **writes**: an op whose schema marks an argument as written (``relu_``, ``mul.out``, ``copy_``,
    setitem's ``fill_``, any in-place overload called directly), on any tensor however it was
    reached (``.data``, ``.detach()``, views, a leaf module writing its input). A node whose storage
    is written after it was produced cannot be read out of order, nor folded through; a parameter
    or buffer that forward writes is *state*, not a constant.
* **random draws**: an op tagged ``nondeterministic_seeded`` (``bernoulli_``, ``exponential_`` of
    gumbel_softmax, ``rand``...). Such a node is never a constant and never folded.
* **shapes and dtypes** of every tensor (``node.meta["tensor_meta"]``) and the Python value of
    every scalar such as ``x.size(3)`` (``node.meta["reparam_value"]``).
* **constants**: the value of every node that depends on no input and no state.

The caller's parameters and buffers are protected: an op that would write one raises
:class:`CallerTensorWritten` before it runs (the caller then runs again on copies), and a
parameter whose data was swapped (``p.data = t``) is put back and reported the same way.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable, Iterator
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .errors import ReparamError


class TensorMeta(NamedTuple):
    """What the fold needs to know of a tensor a node produced."""

    shape: torch.Size
    dtype: torch.dtype
    stride: tuple[int, ...] | None = None  # its memory layout (None: not a strided tensor)


def meta_of(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(t.shape, t.dtype, t.stride() if t.layout is torch.strided else None)


class CallerTensorWritten(Exception):
    """The model's forward tried to write a parameter or buffer shared with the caller."""


@dataclass
class Observation:
    """What one run of a traced graph showed (see the module docstring)."""

    output: Any = None
    inputs: tuple = ()
    # node -> the first node that wrote its storage after it was produced
    first_writer: dict[fx.Node, fx.Node] = field(default_factory=dict)
    writers: set[fx.Node] = field(default_factory=set)  # nodes that wrote a tensor
    random: dict[fx.Node, str] = field(default_factory=dict)  # node -> the random op it ran
    state: set[fx.Node] = field(default_factory=set)  # get_attr nodes whose tensor is written
    consts: dict[fx.Node, Any] = field(default_factory=dict)  # value of input-free nodes

    @property
    def written(self) -> set[fx.Node]:
        """Nodes whose storage is written after they were produced."""
        return set(self.first_writer)


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers
        return None


_ATOMS = (torch.Tensor, int, float, str, type(None))


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value``. A single value, or a flat list or tuple, is read without
    ``tree_flatten``, whose helper closure is a reference cycle per call (thousands per fold,
    left for the cyclic collector)."""
    items = value if isinstance(value, (list, tuple)) else (value,)
    if all(isinstance(v, _ATOMS) for v in items):
        return [v for v in items if isinstance(v, torch.Tensor)]
    leaves, _ = tree_flatten(value)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


_SCHEMA: dict[Any, tuple[tuple[int, ...], tuple[str, ...], bool]] = {}


def _schema_of(func) -> tuple[tuple[int, ...], tuple[str, ...], bool]:
    """Positions and names of the arguments an aten overload writes, and whether it is random."""
    found = _SCHEMA.get(func)
    if found is None:
        written = [(i, a.name) for i, a in enumerate(func._schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write]
        seeded = torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())
        found = (tuple(i for i, _ in written), tuple(n for _, n in written), seeded)
        _SCHEMA[func] = found
    return found


class _Watch(TorchDispatchMode):
    """Records the storages each aten op writes and whether it draws random numbers; refuses to
    write a protected storage (the caller's parameters and buffers)."""

    def __init__(self, protected: set[int]) -> None:
        super().__init__()
        self.protected = protected
        self.writes: set[int] = set()
        self.random: str | None = None

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # nothing is compiled in here: do not import torch._dynamo (seconds)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        positions, names, seeded = _schema_of(func)
        if positions or names:
            for i, name in zip(positions, names, strict=True):
                value = args[i] if i < len(args) else kwargs.get(name)
                for t in _tensors(value):
                    key = _storage_key(t)
                    if key is None:
                        continue
                    if key in self.protected:
                        raise CallerTensorWritten(str(func))
                    self.writes.add(key)
        if seeded and self.random is None:
            self.random = str(func).removeprefix("aten.")
        return func(*args, **kwargs)


def caller_storages(module: nn.Module) -> set[int]:
    """Storage keys of every parameter and buffer of ``module`` (what fold must never write)."""
    return _keys([*module.parameters(), *module.buffers()])


def _keys(tensors: Iterable[torch.Tensor]) -> set[int]:
    keys = set()
    for t in tensors:
        key = _storage_key(t)
        if key is not None:
            keys.add(key)
    return keys


class Protected:
    """The caller's parameters and buffers and their storages, listed once per fold (a large
    model's module tree is walked once, not at every guarded run)."""

    def __init__(self, module: nn.Module) -> None:
        self.tensors = [*module.parameters(), *module.buffers()]
        self.storages = _keys(self.tensors)


def _protected(protect: nn.Module | Protected) -> Protected:
    return protect if isinstance(protect, Protected) else Protected(protect)


@contextlib.contextmanager
def guarded(module: nn.Module | Protected) -> Iterator[_Watch]:
    """Run code that may write tensors shared with ``module`` (the caller's model, or its
    :class:`Protected` tensors): an aten write into one raises :class:`CallerTensorWritten`
    before it happens, and a parameter whose data was replaced (``p.data = t``) is restored and
    reported the same way."""
    protected = _protected(module)
    before = [(t, t.data) for t in protected.tensors]
    watch = _Watch(protected.storages)
    swapped = False
    try:
        with torch.no_grad(), watch:
            yield watch
    finally:
        for t, data in before:
            if t.data_ptr() != data.data_ptr() or t.shape != data.shape:
                t.data = data
                swapped = True
    if swapped:
        raise CallerTensorWritten("a parameter's data was replaced")


class _Interpreter:
    """Runs the graph node by node (a lean loop: each value freed after its last use),
    recording what :class:`Observation` holds."""

    def __init__(self, root: nn.Module, graph: fx.Graph, watch: _Watch) -> None:
        self.root, self.graph, self.watch = root, graph, watch
        self.obs = Observation()
        self.order: dict[fx.Node, int] = {}
        # storage -> nodes that output on it; the weak reference keeps the storage's address from
        # being reused by a new storage while this run lasts, so a key names one storage
        self.producers: dict[int, tuple[StorageWeakRef, list[fx.Node]]] = {}
        self.free: set[fx.Node] = set()  # nodes that may be constants (no input, no random)
        self.values: dict[fx.Node, Any] = {}  # candidate constant values
        self.modules = dict(root.named_modules())

    def run(self, *args: Any) -> Any:
        nodes = list(self.graph.nodes)
        last: dict[fx.Node, fx.Node] = {}  # value -> the last node that reads it
        for n in nodes:
            for i in n.all_input_nodes:
                last[i] = n
        dying: dict[fx.Node, list[fx.Node]] = {}
        for value, reader in last.items():
            dying.setdefault(reader, []).append(value)
        env: dict[fx.Node, Any] = {}
        inputs = iter(args)

        def read(a: fx.Node) -> Any:
            return env[a]

        for n in nodes:
            if n.op == "placeholder":
                value = next(inputs, n.args[0] if n.args else None)
                self.order[n] = len(self.order)
                self._record(n, value)
            elif n.op == "output":
                return fx.node.map_arg(n.args[0], read)
            else:
                value = self._run(n, fx.node.map_arg(n.args, read),
                                  fx.node.map_arg(n.kwargs, read))
            env[n] = value
            for gone in dying.get(n, ()):
                del env[gone]
        return None

    def _run(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        watch = self.watch
        watch.writes, watch.random = set(), None
        if n.op == "get_attr":
            result = fetch_path(self.root, str(n.target))
        elif n.op == "call_function":
            result = n.target(*args, **kwargs)
        elif n.op == "call_method":
            obj, *rest = args
            result = getattr(obj, n.target)(*rest, **kwargs)
        else:  # call_module
            result = self.modules[str(n.target)](*args, **kwargs)
        self.order[n] = len(self.order)
        # writes into tensors that existed before this node: a graph value, or a leaf module's
        # own parameter or buffer (scratch tensors a node makes and fills do not count)
        writes = {key for key in watch.writes if key in self.producers}
        if n.op == "call_module" and watch.writes - writes:
            writes |= watch.writes & caller_storages(self.modules[str(n.target)])
        if writes:
            self.obs.writers.add(n)
            for key in writes:
                for m in self.producers.get(key, (None, ()))[1]:
                    self.obs.first_writer.setdefault(m, n)
                    if m.op == "get_attr":
                        self.obs.state.add(m)
        if watch.random is not None:
            self.obs.random[n] = watch.random
        self._record(n, result)
        return result

    def _record(self, n: fx.Node, result: Any) -> None:
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = meta_of(result)
        elif isinstance(result, (tuple, list)) and result and all(
                isinstance(r, torch.Tensor) for r in result):
            n.meta["tensor_meta"] = tuple(meta_of(r) for r in result)
        elif isinstance(result, (int, float, bool, torch.Size)) or (
                isinstance(result, (tuple, list)) and all(isinstance(r, int) for r in result)):
            n.meta["reparam_value"] = result
        for t in (result,) if isinstance(result, torch.Tensor) else _tensors(result):
            key = _storage_key(t)
            if key is None:
                continue
            entry = self.producers.get(key)
            if entry is None:
                entry = self.producers[key] = (StorageWeakRef(t.untyped_storage()), [])
            entry[1].append(n)
        if n.op == "get_attr" or (
            n.op in ("call_function", "call_method") and n not in self.obs.random
            and n not in self.obs.writers and all(i in self.free for i in n.all_input_nodes)
        ):
            self.free.add(n)
            self.values[n] = result

    def constants(self) -> dict[fx.Node, Any]:
        """The recorded values of nodes that depend on neither an input nor a written tensor."""
        tainted = set(self.obs.state)
        consts = {}
        for n in self.order:  # graph order: inputs before users
            if n not in self.free:
                continue
            if n in tainted or any(i in tainted for i in n.all_input_nodes):
                tainted.add(n)
                continue
            consts[n] = self.values[n]
        return consts


def fetch_path(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _copies(inputs: Iterable) -> tuple:
    return tuple(tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t,
                          list(inputs)))


def observe(gm: nn.Module, inputs: tuple, protect: nn.Module | Protected | None = None,
            graph: fx.Graph | None = None) -> Observation:
    """Run ``gm`` once on copies of ``inputs`` and record what :class:`Observation` holds; the
    storages of ``protect`` (the caller's model) are never written (see :func:`guarded`).

    Runs the whole example batch: the trace's faithfulness and the fold are checked on what is
    observed, and a model that couples its samples (a BN with batch statistics) can agree with
    its trace on one sample and not on the batch (R19). Raises :class:`ReparamError` if it does
    not run and :class:`CallerTensorWritten` if the graph would write the caller's tensors."""
    protected = _protected(protect).storages if protect is not None else set()
    watch = _Watch(protected)
    runner = _Interpreter(gm, graph if graph is not None else gm.graph, watch)
    try:
        with torch.no_grad(), watch, warnings.catch_warnings(), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            output = runner.run(*_copies(inputs))
    except CallerTensorWritten:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own code failed on this input
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ReparamError(
            f"running the model on the example inputs failed ({type(e).__name__}: {message}); "
            "pass example_inputs that the model accepts") from e
    obs = runner.obs
    obs.output, obs.inputs = output, inputs
    obs.consts = runner.constants()
    return obs
