"""``reparam.fold`` and ``reparam.explain``: the public entry points."""

from __future__ import annotations

import gc
import operator
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import fx, nn

from .errors import CheckError, ReparamError, TraceError
from .ops import describe
from .report import Report
from .rewrite import fold_graph
from .rules import ALL
from .trace import (
    as_inputs,
    clone_inputs,
    deep_copy,
    guess_inputs,
    has_augmented_assignment,
    light_copy,
    own_tensors,
    propagate_shapes,
    trace,
)
from .values import Rule

_BN = (nn.modules.batchnorm._BatchNorm,)


def _validate(model: object, rules: object, max_cost: object, leaf_modules: object) -> None:
    if not isinstance(model, nn.Module):
        raise ReparamError(
            f"fold expects a torch.nn.Module, got {type(model).__name__}; pass the model object "
            "(load a saved state_dict into its class first)"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise ReparamError("a TorchScript module cannot be traced by torch.fx: fold the eager "
                           "model, then script the folded one")
    if not isinstance(rules, (list, tuple)) or not all(isinstance(r, Rule) for r in rules):
        raise ReparamError("rules must be a sequence of reparam rules, e.g. reparam.rules.ALL "
                           "or reparam.rules.REPVGG + (my_rule,)")
    if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)) or not max_cost > 0:
        raise ReparamError("max_cost must be a positive number: the largest allowed ratio of "
                           "folded to original multiply-adds per region (1.0: never dearer)")
    if not isinstance(leaf_modules, (list, tuple)) or not all(
        isinstance(p, str) for p in leaf_modules
    ):
        raise ReparamError("leaf_modules must be a list of submodule paths, e.g. ['stage2.attn']")
    if any(nn.parameter.is_lazy(t) for t in list(model.parameters()) + list(model.buffers())):
        raise ReparamError("the model has lazy modules that were never run: run one forward pass "
                           "to initialize them, then fold")
    training = [name or type(model).__name__ for name, m in model.named_modules()
                if m.training and (isinstance(m, _BN) or name == "")]
    if training:
        raise ReparamError(
            f"{type(model).__name__} is in training mode ({', '.join(training[:3])}"
            f"{'...' if len(training) > 3 else ''}): BN uses batch statistics there, so folding "
            "would change what it computes. Call model.eval() before reparam.fold(model)."
        )
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta:
            raise ReparamError(
                "the model has parameters on the meta device (no values): load real weights "
                "(e.g. model.to_empty(device='cpu') and load_state_dict) before folding"
            )


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    """How many conv, linear, batch_norm, add, ... nodes a traced graph has."""
    modules = dict(gm.named_modules())
    counts: Counter[str] = Counter()
    data: set[fx.Node] = set()  # nodes computed from the inputs (not constant arithmetic)
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(i in data for i in node.all_input_nodes):
            data.add(node)
            op = describe(node, modules)
            if op is not None and op.kind != "identity":  # identities compute nothing
                counts[op.kind] += 1
    return dict(counts)


def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-adds of one sample through ``model`` (convs, linears, BNs, adds, pools...)."""
    from .rewrite import Folder

    inputs = as_inputs(example_inputs)
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        gm, _ = trace(lambda: light_copy(model))
    propagate_shapes(gm, inputs)
    folder = Folder(gm, ())
    return sum(folder.op_cost(n) for n in gm.graph.nodes)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fold(model: nn.Module, example_inputs=None, *, rules: Sequence[Rule] = ALL,
         check: bool = False, max_cost: float = 1.0, leaf_modules: Sequence[str] = ()
         ) -> nn.Module:
    """Fold every exactly-mergeable linear region of ``model`` into one conv or linear layer.

    Returns a new :class:`torch.fx.GraphModule` (the input is never modified) with the report of
    what was folded as ``.reparam_report``. ``example_inputs`` fixes the input shape (guessed from
    the first layer when omitted); ``rules`` is a rule set (default :data:`reparam.rules.ALL`);
    ``max_cost`` the largest allowed ratio of folded to original multiply-adds per region;
    ``check=True`` compares the folded and original models in float64 on random inputs and raises
    :class:`~reparam.errors.CheckError` naming the first region that diverges.
    """
    _validate(model, rules, max_cost, leaf_modules)
    with _one_thread(), _no_cyclic_gc():
        return _fold(model, example_inputs, tuple(rules), check, max_cost, tuple(leaf_modules))


@contextmanager
def _one_thread():
    """Folding is many small tensor ops: torch's thread pool costs more than it saves (several
    times slower on a busy 2-core machine). The caller's setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _no_cyclic_gc():
    """Tracing and copying create many small objects, and each automatic collection scans them
    and the caller's model: a third of the fold time on timm's mobileone_s0. Reference counting
    still frees every tensor as it goes; the collector's state is restored afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _fold(model: nn.Module, example_inputs, rules: tuple, check: bool, max_cost: float,
          leaf_modules: tuple[str, ...]) -> nn.Module:
    inputs = as_inputs(example_inputs)
    start = time.perf_counter()
    folded, report, inputs = _fold_module(model, inputs, rules, max_cost, tuple(leaf_modules))
    own_tensors(folded, model)
    if isinstance(folded, fx.GraphModule):
        for name in ("_forward_hooks", "_forward_pre_hooks"):  # the root's hooks still apply
            getattr(folded, name).update(getattr(model, name))
    report.params_before, report.params_after = _params(model), _params(folded)
    report.input_shapes = [tuple(t.shape) for t in inputs or () if isinstance(t, torch.Tensor)]
    report.fold_seconds = time.perf_counter() - start
    folded.reparam_report = report
    if check:
        _check(model, inputs, rules, max_cost, tuple(leaf_modules), report)
    return folded


def explain(model: nn.Module, example_inputs=None, *, rules: Sequence[Rule] = ALL,
            max_cost: float = 1.0) -> Report:
    """What ``fold`` would do: regions folded, linear ops left with reasons, params and MACs.

    ``.max_error`` is ``max |folded - original| / max |original|``, the folded model in its own
    dtype against the original run in float64, on ``example_inputs`` (or on random inputs of the
    guessed shape).
    """
    folded = fold(model, example_inputs, rules=rules, max_cost=max_cost)
    report = folded.reparam_report
    inputs = as_inputs(example_inputs)
    if inputs is None:  # measured on random inputs of the shapes fold guessed
        inputs = tuple(torch.randn(s, dtype=_dtype(model)) for s in report.input_shapes)
    with _one_thread():
        report.max_error = max_error(model, folded, inputs)
    return report


def _dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def _fold_module(model: nn.Module, inputs: tuple | None, rules, max_cost: float,
                 leaves: tuple[str, ...]) -> tuple[nn.Module, Report, tuple]:
    try:
        gm, untraced = trace(lambda: light_copy(model), leaves)
    except TraceError as e:
        return _fold_children(model, inputs, rules, max_cost, str(e))
    if inputs is None:
        inputs = guess_inputs(model, gm)
    captured = _capture_leaf_inputs(gm, [p for p, _ in untraced])
    used, traced_out = propagate_shapes(gm, inputs)
    _check_trace_fidelity(model, gm, used, traced_out)
    ops_before = count_ops(gm)
    report = fold_graph(gm, rules, max_cost)
    report.ops_before, report.ops_after = ops_before, count_ops(gm)
    report.untraced = list(untraced)
    for path, _ in untraced:
        _fold_inside(gm, path, captured.get(path), rules, max_cost, report)
    return gm, report, inputs


_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul,
               torch.add, torch.sub, torch.mul, torch.div}


def _check_trace_fidelity(model: nn.Module, gm: fx.GraphModule, inputs: tuple,
                          traced_out) -> None:
    """torch.fx records ``t += 1`` on a tensor as an out-of-place add: wrong where another name
    still refers to the old tensor. Where a forward has an augmented assignment or the graph a
    dead arithmetic node, run the eager model on the same input and compare."""
    suspicious = has_augmented_assignment(model) or any(
        n.op == "call_function" and n.target in _ARITHMETIC and not n.users
        for n in gm.graph.nodes)
    if not suspicious:
        return
    with torch.no_grad():
        eager = light_copy(model)(*clone_inputs(inputs))
    if relative_error(traced_out, eager) > 1e-5:
        raise ReparamError(
            f"torch.fx traced {type(model).__name__} differently from eager mode (an in-place "
            "`+=` on a tensor, or Python state in forward): write `x = x + y` instead, or fold "
            "its submodules one by one"
        )


def _fold_children(model: nn.Module, inputs, rules, max_cost: float, why: str):
    """The root does not trace: fold each child that does (recursively) and keep the root."""
    root = light_copy(model)
    report = Report(untraced=[("", why)])
    captured = _capture_child_inputs(root, inputs)
    for name, child in list(root.named_children()):
        args = captured.get(name)  # None: not reached by the example input; guessed instead
        if not _parameterized(child):
            continue
        folded = _fold_child(child, args, rules, max_cost, report, name)
        if folded is not None:
            setattr(root, name, folded)
    return root, report, inputs


def _fold_child(child: nn.Module, args, rules, max_cost: float, report: Report,
                path: str) -> nn.Module | None:
    """Fold one child of an untraceable module, keeping the plain attributes its parent may read
    (``self.attn.resolution``); ``None`` when it cannot be folded or folding changed it."""
    try:
        folded, sub, args = _fold_module(child, args, rules, max_cost, ())
    except ReparamError as e:
        report.untraced.append((path, str(e).splitlines()[0][:200]))
        return None
    for key, value in vars(child).items():
        if not key.startswith("_") and not hasattr(folded, key):
            setattr(folded, key, value)
    try:
        with torch.no_grad():
            same = relative_error(folded(*clone_inputs(args)), child(*clone_inputs(args))) < 1e-4
    except Exception:  # noqa: BLE001 - a child that does not run alone: keep the original
        same = False
    if not same:
        report.untraced.append((path, "folded alone it did not reproduce its output: kept"))
        return None
    report.merge(sub, path)
    return folded


def _parameterized(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _capture_child_inputs(root: nn.Module, inputs) -> dict[str, tuple]:
    if inputs is None:
        return {}
    captured: dict[str, tuple] = {}
    hooks = [child.register_forward_pre_hook(_recorder(captured, name))
             for name, child in root.named_children()]
    try:
        with torch.no_grad():
            root(*inputs)
    except Exception:  # noqa: BLE001 - whatever ran before the failure is still useful
        pass
    finally:
        for h in hooks:
            h.remove()
    return captured


def _recorder(store: dict, name: str):
    def hook(module, args):
        if name not in store and all(isinstance(a, torch.Tensor) for a in args):
            store[name] = tuple(a.detach().clone() for a in args)

    return hook


def _capture_leaf_inputs(gm: fx.GraphModule, paths: list[str]) -> dict[str, dict[str, tuple]]:
    """Set up hooks that record, during shape propagation, what each leaf's children receive."""
    store: dict[str, dict[str, tuple]] = {}
    for path in paths:
        try:
            leaf = gm.get_submodule(path)
        except AttributeError:
            continue
        store[path] = {}
        for name, child in leaf.named_children():
            child.register_forward_pre_hook(_leaf_recorder(store[path], name))
    return store


def _leaf_recorder(store: dict, name: str):
    def hook(module, args):
        if name in store or not all(isinstance(a, torch.Tensor) for a in args):
            return
        store[name] = tuple(a.detach().clone() for a in args)

    return hook


def _fold_inside(gm: fx.GraphModule, path: str, captured: dict[str, tuple] | None, rules,
                 max_cost: float, report: Report) -> None:
    """Fold the children of an untraceable leaf module, one by one."""
    try:
        leaf = gm.get_submodule(path)
    except AttributeError:  # folded away as a whole
        return
    for module in leaf.modules():
        module._forward_pre_hooks.clear()
    for name, child in list(leaf.named_children()):
        args = (captured or {}).get(name)  # None: not reached by the example input
        if not _parameterized(child):
            continue
        folded = _fold_child(child, args, rules, max_cost, report, f"{path}.{name}")
        if folded is not None:
            setattr(leaf, name, folded)


def _run64(module: nn.Module, inputs: tuple):
    m = deep_copy(module).to(torch.float64)
    args = [a.to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in inputs]
    with torch.no_grad():
        return m(*args)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return []


def relative_error(got, want) -> float:
    """``max |got - want| / max |want|`` over all output tensors, computed in float64."""
    worst = 0.0
    for g, w in zip(_flat(got), _flat(want), strict=True):
        g, w = g.double(), w.double()
        scale = w.abs().max().item() or 1.0
        worst = max(worst, (g - w).abs().max().item() / scale)
    return worst


def max_error(original: nn.Module, folded: nn.Module, inputs: tuple) -> float:
    """The folded model (its own dtype) against the original run in float64."""
    want = _run64(original, clone_inputs(inputs))
    with torch.no_grad():
        got = folded(*clone_inputs(inputs))
    return relative_error(got, want)


def _check(model: nn.Module, inputs: tuple, rules, max_cost: float, leaves: tuple[str, ...],
           report: Report, tol: float = 1e-9) -> None:
    """Fold a float64 copy the same way and compare it with the float64 original on random
    inputs; on a mismatch name the first region that diverges. (Float64 on both sides, so the
    comparison measures the fold, not float32 rounding.)"""
    original = deep_copy(model).to(torch.float64)
    inputs = tuple(torch.randn_like(t, dtype=torch.float64)
                   if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                   for t in inputs)
    folded, sub, _ = _fold_module(original, inputs, rules, max_cost, leaves)
    with torch.no_grad():
        err = relative_error(folded(*clone_inputs(inputs)), original(*clone_inputs(inputs)))
    if err <= tol:
        return
    culprit = _first_bad_region(original, folded, inputs, sub, tol)
    where = f"; the first region that diverges is '{culprit}'" if culprit else ""
    raise CheckError(
        f"the folded model differs from the original by {err:.3g} (relative, float64){where}. "
        "Please report this as a bug in reparam, with the model; use the unfolded model "
        "meanwhile."
    )


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.seen = names, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = out
        return out


def _first_bad_region(original: nn.Module, folded: nn.Module, inputs: tuple, report: Report,
                      tol: float) -> str | None:
    """Run the traced original and the folded graph side by side; compare each region's output."""
    if not isinstance(folded, fx.GraphModule):
        return None
    try:
        before, _ = trace(lambda: light_copy(original), [p for p, _ in report.untraced])
    except ReparamError:
        return None
    want = _Recorder(before, {r.output for r in report.regions})
    got = _Recorder(folded, {r.node for r in report.regions})
    with torch.no_grad():
        want.run(*clone_inputs(inputs))
        got.run(*clone_inputs(inputs))
    for r in report.regions:
        a, b = got.seen.get(r.node), want.seen.get(r.output)
        if a is not None and b is not None and relative_error(a, b) > tol:
            return r.name
    return None
