"""``reparam.fold`` and ``reparam.explain``: the public entry points.

A fold works on copies: the caller's model is traced as a light copy (a new module tree sharing
the caller's tensors), run once under :func:`reparam.observe.observe`, folded, and verified
against the eager original on the same inputs before it is returned. Nothing it does writes the
caller's parameters or buffers; a model whose own forward would write them is folded from a deep
copy instead.
"""

from __future__ import annotations

import functools
import gc
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from . import program
from .capture import capture
from .crossing import merges_across
from .errors import CheckError, ReparamError, TraceError
from .ir import IR
from .observe import CallerTensorWritten, Protected, guarded, observe
from .pattern import Effect, Recognizer
from .progress import Callback, reporting, tick
from .report import Leftover, Report
from .rewrite import fold_graph
from .rules import ALL
from .select import Pick, Selected, pick, select_outputs
from .select import validate as validate_outputs
from .trace import (
    Traced,
    _uses_autocast,
    as_inputs,
    branches_on_training,
    clone_inputs,
    deep_copy,
    guess_inputs,
    has_augmented_assignment,
    light_copy,
    own_leaves,
    own_tensors,
    trace,
)
from .values import Rule
from .verify import SCREEN, divergences, flat, relative_error, tolerance

_BN = (nn.modules.batchnorm._BatchNorm,)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _validate(model: object, rules: object, max_cost: object, leaf_modules: object,
              verify: object) -> None:
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
    if not isinstance(verify, bool):
        raise ReparamError("verify must be True (the default: compare the folded model with the "
                           "original before returning it) or False")
    if not isinstance(leaf_modules, (list, tuple)) or not all(
        isinstance(p, str) for p in leaf_modules
    ):
        raise ReparamError("leaf_modules must be a list of submodule paths, e.g. ['stage2.attn']")
    names = {name for name, _ in model.named_modules()} if leaf_modules else set()
    missing = [p for p in leaf_modules if p not in names]
    if missing:
        last = missing[0].rsplit(".", 1)[-1]
        near = sorted(n for n in names if n and n.rsplit(".", 1)[-1] == last)
        hint = f" (did you mean {', '.join(near[:3])}?)" if near else ""
        raise ReparamError(
            f"leaf_modules names {', '.join(repr(p) for p in missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not a submodule of {type(model).__name__}"
            f"{hint}; name submodules as model.named_modules() does, e.g. 'stage2.0.attn'")
    tensors = [*model.parameters(), *model.buffers()]  # the module tree walked once
    if any(nn.parameter.is_lazy(t) for t in tensors):
        raise ReparamError("the model has lazy modules that were never run: run one forward pass "
                           "to initialize them, then fold")
    training = [name or type(model).__name__ for name, m in model.named_modules()
                if m.training and (isinstance(m, _BN) or name == "")]
    if training:
        raise ReparamError(
            f"{type(model).__name__} is in training mode ({', '.join(training[:3])}"
            f"{'...' if len(training) > 3 else ''}): there a BN normalizes by batch statistics "
            "and dropout drops, so folding would change what it computes. Call model.eval() "
            "before reparam.fold(model)."
        )
    for t in tensors:
        if t.is_meta:
            raise ReparamError(
                "the model has parameters on the meta device (no values): load real weights "
                "(e.g. model.to_empty(device='cpu') and load_state_dict) before folding"
            )
    if _global_hooks():
        raise ReparamError(
            "global module hooks are registered (torch.nn.modules.module."
            "register_module_forward_hook / _pre_hook): they run on every module call, so any "
            "fold would change what they see and return. Remove them before folding (the "
            "handle's .remove()), then register them on the folded model")


def _global_hooks() -> bool:
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


@functools.lru_cache(maxsize=16)
def recognizer_for(rules: tuple[Rule, ...]) -> Recognizer:
    """The dispatch table of a rule set (built once per rule set)."""
    return Recognizer(rules)


def count_ops(gm: nn.Module, rules: Sequence[Rule] = ALL, *, graph: fx.Graph | None = None
              ) -> dict[str, int]:
    """How many conv, linear, batch_norm, add, ... ops a traced graph computes from its inputs
    (as the patterns of ``rules`` read them; identities and constant arithmetic not counted)."""
    graph = graph if graph is not None else gm.graph
    recognizer = recognizer_for(tuple(rules))
    modules = dict(gm.named_modules())
    counts: Counter[str] = Counter()
    data: set[fx.Node] = set()  # nodes computed from the inputs (not constant arithmetic)
    for node in graph.nodes:
        if node.op == "placeholder" or any(i in data for i in node.all_input_nodes):
            data.add(node)
            found, _ = recognizer.matches(node, modules)
            if found and found[0].op.effect is not Effect.IDENTITY:
                counts[found[0].op.kind] += 1
    return dict(counts)


def count_macs(model: nn.Module, example_inputs, rules: Sequence[Rule] = ALL) -> int:
    """Multiply-adds of one sample through ``model`` (convs, linears, BNs, adds, pools...)."""
    inputs = as_inputs(example_inputs)
    recognizer = recognizer_for(tuple(rules))
    if isinstance(model, fx.GraphModule):
        root, graph = model, model.graph
        obs = observe(root, inputs, graph=graph)
    else:
        try:
            traced = trace(lambda: light_copy(model), recognizer=recognizer)
            obs = observe(traced.root, inputs, protect=model, graph=traced.graph)
        except CallerTensorWritten:
            traced = trace(lambda: deep_copy(model), recognizer=recognizer)
            obs = observe(traced.root, inputs, graph=traced.graph)
        root, graph = traced.root, traced.graph
    ir = IR(root, graph, recognizer, obs)
    return sum(entry.macs for entry in ir.entries.values())


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fold(model: nn.Module, example_inputs=None, *, rules: Sequence[Rule] = ALL,
         verify: bool = True, check: bool = False, max_cost: float = 1.0,
         leaf_modules: Sequence[str] = (), progress: Callback | None = None,
         outputs: Pick | None = None) -> nn.Module:
    """Fold every exactly-mergeable linear region of ``model`` into one conv or linear layer.

    Returns a new module (a :class:`torch.fx.GraphModule` when the model traces; the input is
    never modified) with the report of what was folded as ``.reparam_report``.

    ``example_inputs`` fixes the input shape (guessed when omitted: a timm model's pretrained
    size, else from the first layer); ``rules`` is a rule set (default
    :data:`reparam.rules.ALL`); ``max_cost`` the largest allowed ratio of folded to original
    multiply-adds per region. ``verify`` (on by default) runs the folded model on those inputs
    and compares it with the original at a tolerance fitted to the dtype before returning it: a
    region that does not match is kept unfolded, with the reason; a mismatch that cannot be
    located raises :class:`~reparam.errors.CheckError`. ``check=True`` also folds a float64 copy
    and compares it with the float64 original on random inputs. Raises
    :class:`~reparam.errors.TraceError` when no part of the model could be captured.

    ``model`` may also be a :class:`torch.export.ExportedProgram` (its BNs in eval mode, as
    ``torch.export.export`` of an eval-mode model leaves them): the folded program comes back as
    an ``ExportedProgram`` with the same inputs, outputs and symbolic sizes, folded at the
    program's own example inputs unless ``example_inputs`` are given.

    ``progress`` is called as ``progress(stage, done, total)`` while the fold runs (stages and
    counts: :mod:`reparam.progress`), for a progress bar on long folds.

    ``outputs`` narrows what the folded model returns to ``outputs(model(x))`` (e.g.
    ``lambda out: out[0]``): what only the other outputs need leaves the model, and the fold is
    verified against that selection of the original's output (:mod:`reparam.select`).
    """
    if progress is not None and not callable(progress):
        raise ReparamError("progress must be a function progress(stage, done, total), or None")
    validate_outputs(outputs)
    if isinstance(model, torch.export.ExportedProgram):
        if outputs is not None:
            raise ReparamError("outputs= does not apply to an ExportedProgram, whose outputs are "
                               "fixed: export the module that returns what you keep, or fold "
                               "the module with outputs=")
        with _one_thread(), _no_cyclic_gc(), _clear_errors(model), reporting(progress):
            return _fold_program(model, example_inputs, tuple(rules), check, verify, max_cost)
    _validate(model, rules, max_cost, leaf_modules, verify)
    with _one_thread(), _no_cyclic_gc(), _clear_errors(model), reporting(progress):
        return _fold(model, example_inputs, tuple(rules), check, verify, max_cost,
                     tuple(leaf_modules), outputs=outputs)


def _fold_program(ep: torch.export.ExportedProgram, example_inputs, rules: tuple, check: bool,
                  verify: bool, max_cost: float) -> torch.export.ExportedProgram:
    """An exported program in, a folded exported program out (see :mod:`reparam.program`)."""
    module = program.Program(ep)
    inputs = program.example_inputs(ep, example_inputs)
    if inputs is None:
        raise ReparamError("this ExportedProgram carries no example inputs (a program loaded "
                           "from an old file): pass example_inputs=... to fold it")
    _validate(module, rules, max_cost, (), verify)
    traced = program.capture_of(ep, module)
    folded = _fold(module, inputs, rules, check, verify, max_cost, (),
                   captures={id(module): traced})
    report = folded.reparam_report
    report.captured.insert(0, ("", "read from the ExportedProgram, exported again folded"))
    out = program.export_again(folded, ep, as_inputs(inputs))
    out.reparam_report = report
    return out


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


@contextmanager
def _clear_errors(model: nn.Module) -> Iterator[None]:
    """No raw Python or torch error leaves ``fold``: what is not already a ReparamError is a bug
    in reparam (the model's own failures are reported where they happen) and says so."""
    try:
        yield
    except ReparamError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ReparamError(
            f"reparam failed while folding {type(model).__name__} ({type(e).__name__}: "
            f"{first[:300]}). This is a bug in reparam: please report it with the model. The "
            "model itself was not changed; fold(..., leaf_modules=[...]) can skip the part "
            "that fails") from e


@dataclass(frozen=True)
class Job:
    """What every part of one fold shares: its options, and the caller's tensors (``protect``,
    listed once: never written; ``None`` when folding a private deep copy)."""

    rules: tuple[Rule, ...]
    max_cost: float
    leaves: tuple[str, ...]
    verify: bool
    protect: Protected | None
    recognizer: Recognizer
    keep: dict[str, str] = field(default_factory=dict)  # qualified node name -> why kept
    # folding a private copy of a model whose forward writes its own tensors: (the copy's
    # tensors, the caller's), copied back before every run so that each starts where the
    # caller's model is now
    state: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    # id(module) -> its torch.export capture (or why it failed): made once per fold
    captures: dict = field(default_factory=dict)
    outputs: Pick | None = None  # fold(..., outputs=): what of the module's output is kept

    def sub(self, path: str) -> Job:
        """The job for the submodule at ``path``: its part of ``keep``, no leaf paths, its
        whole output."""
        dot = f"{path}."
        keep = {k[len(dot):]: v for k, v in self.keep.items() if k.startswith(dot)}
        return replace(self, leaves=(), keep=keep, outputs=None)

    def guard(self):
        """Enter before running model code: the caller's tensors are guarded, a private copy's
        state is reset to the caller's."""
        if self.state is not None:
            with torch.no_grad():
                for mine, theirs in zip(*self.state, strict=True):
                    mine.copy_(theirs)
        return guarded(self.protect) if self.protect is not None else nullcontext()


@dataclass
class Folded:
    """One part's fold: the module, its report, the inputs it ran on, the eager reference
    output on them (``None`` when not verified) and, on request, each region's original ops."""

    module: nn.Module
    report: Report
    inputs: tuple | None
    reference: object = None  # the eager original's output on ``used``
    captured: dict | None = None
    used: tuple | None = None  # the inputs the reference was computed on


def _fold(model: nn.Module, example_inputs, rules: tuple, check: bool, verify: bool,
          max_cost: float, leaf_modules: tuple[str, ...], captures: dict | None = None,
          outputs: Pick | None = None) -> nn.Module:
    inputs = as_inputs(example_inputs)
    start = time.perf_counter()
    job = Job(rules, max_cost, leaf_modules, verify, protect=Protected(model),
              recognizer=recognizer_for(rules), captures=dict(captures or {}), outputs=outputs)
    try:
        done = _fold_verified(model, inputs, job)
    except CallerTensorWritten:  # forward writes its own parameters or buffers: use a copy
        source = deep_copy(model)
        state = (_tensors(source), _tensors(model))
        job = replace(job, protect=None, state=state)
        done = _fold_verified(source, inputs, job)
        job.guard()  # the folded model starts from the caller's state
        done.report.notes.append(f"{type(model).__name__}'s forward writes its own parameters "
                                 "or buffers: they are state, and the fold worked on a copy")
    folded, report = done.module, done.report
    own_tensors(folded, model)
    if not report.regions and any(path == "" for path, _ in report.untraced):
        why = next(why for path, why in report.untraced if path == "")
        raise TraceError(f"nothing in {type(model).__name__} was folded: {why}. Fold the parts "
                         "that trace one by one, or pass leaf_modules=[...] naming the parts "
                         "that cannot be traced")
    report.params_before, report.params_after = _params(model), _params(folded)
    report.notes += _training_branches(model)
    if outputs is not None:
        report.notes.append("outputs=: the folded model returns the selected part of the "
                            f"output; what only the rest needed is gone ({_params(model):,} "
                            f"parameters before, {report.params_after:,} after)")
    report.input_shapes = [tuple(t.shape) for t in done.inputs or ()
                           if isinstance(t, torch.Tensor)]
    report.fold_seconds = time.perf_counter() - start
    folded.reparam_report = report
    if check:
        _check(model, done.inputs, job, report)
    return folded


def _training_branches(model: nn.Module) -> list[str]:
    """Say which classes compute something else in training mode: the fold follows what runs
    in eval mode, so the folded model is for inference only."""
    names = sorted({type(m).__name__ for m in model.modules()
                    if not type(m).__module__.startswith("torch.")
                    and branches_on_training(type(m))})
    if not names:
        return []
    return [f"{', '.join(names[:4])}{' and others' if len(names) > 4 else ''} "
            f"{'branch' if len(names) > 1 else 'branches'} on self.training in forward: the fold "
            "follows the eval-mode branch (what runs now), so the folded model is for inference; "
            "train the original"]


def explain(model: nn.Module, example_inputs=None, *, rules: Sequence[Rule] = ALL,
            max_cost: float = 1.0, outputs: Pick | None = None) -> Report:
    """What ``fold`` would do: regions folded, linear ops left with reasons, params and MACs.

    ``.max_error`` is ``max |folded - original| / max |original|``, the folded model in its own
    dtype against the original run in float64, on ``example_inputs`` (or on random inputs of the
    guessed shape).
    """
    folded = fold(model, example_inputs, rules=rules, max_cost=max_cost, outputs=outputs)
    report = folded.reparam_report
    inputs = as_inputs(example_inputs)
    if inputs is None:  # measured on random inputs of the shapes fold guessed
        inputs = tuple(torch.randn(s, dtype=_dtype(model)) for s in report.input_shapes)
    with _one_thread(), _clear_errors(model):
        report.max_error = max_error(model, folded, inputs, outputs=outputs)
    return report


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def _devices(model: nn.Module) -> list[int]:
    """The CUDA devices holding the model's parameters (none while CUDA is not initialized)."""
    if not torch.cuda.is_initialized():
        return []
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


def _seeded(model: nn.Module, run: Callable[[], object]) -> object:
    """``run()`` with torch's random generators seeded and then restored: the original and the
    folded model draw the same random numbers, so their outputs can be compared."""
    with torch.random.fork_rng(devices=_devices(model)):
        torch.manual_seed(0)
        return run()


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def _keep_hooks(folded: nn.Module, model: nn.Module) -> None:
    """The module's own hooks, which torch.fx does not trace (it traces ``forward``), still apply
    to its folded form."""
    if folded is not model:
        for name in _HOOKS:
            if hasattr(model, name):
                getattr(folded, name).update(getattr(model, name))


def _eager(model: nn.Module, inputs: tuple, job: Job):
    """The model's own output on (copies of) ``inputs`` (the part ``outputs=`` keeps): the
    reference a fold must match. Its ``forward``, as torch.fx traces it: its own hooks run the
    same on the folded form."""
    def run():
        with job.guard(), torch.no_grad():
            return light_copy(model, share_leaves=True).forward(*clone_inputs(inputs))

    try:
        out = _seeded(model, run)
    except CallerTensorWritten:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own code
        raise ReparamError(
            f"{type(model).__name__} raised {type(e).__name__} on the example inputs "
            f"({str(e).strip().splitlines()[0] if str(e).strip() else ''}); pass example_inputs "
            "that the model accepts") from e
    return pick(job.outputs, out, type(model).__name__)


def _run(module: nn.Module, inputs: tuple, job: Job):
    """A folded module's ``forward`` on (copies of) ``inputs``, or the exception it raised."""
    def run():
        with job.guard(), torch.no_grad():
            return module.forward(*clone_inputs(inputs))

    try:
        return _seeded(module, run)
    except CallerTensorWritten:
        raise
    except Exception as e:  # noqa: BLE001 - a fold that does not run is a failed verification
        return e


def _fold_verified(model: nn.Module, inputs: tuple | None, job: Job) -> Folded:
    """Fold ``model`` and verify the result against the eager original; regions that diverge
    are kept unfolded and the model folded again, until it matches (see :mod:`reparam.verify`).
    """
    keep = dict(job.keep)
    capture = False
    for _ in range(6):
        done = _fold_module(model, inputs, replace(job, keep=keep), capture)
        if not job.verify or done.reference is None:
            return done
        tick("verifying")
        got = _run(done.module, done.used, job)
        dtype = _dtype(model)
        err = float("inf") if isinstance(got, Exception) else relative_error(got, done.reference)
        if err <= tolerance(SCREEN, dtype):
            done.report.verified_error = err
            return done
        if not capture:  # fold again, keeping each region's original ops to check it alone
            capture = True
            continue
        bad = divergences(done.captured or {}, dtype)
        if bad:
            keep.update({d.output: d.reason() for d in bad})
            continue
        if not isinstance(got, Exception) and _ill_conditioned(model, done, got, job, dtype):
            done.report.verified_error = err
            return done
        what = (f"raises {type(got).__name__}: {got}" if isinstance(got, Exception)
                else f"differs from the original by {err:.3g} (relative)")
        raise CheckError(
            f"the folded {type(model).__name__} {what}, and no single region is to blame. This "
            "is a bug in reparam: please report it with the model; fold(..., verify=False) "
            "returns the unverified fold, and the unfolded model is correct meanwhile")
    raise CheckError(f"the folded {type(model).__name__} kept diverging after several regions "
                     "were kept unfolded; please report this bug with the model")


def _ill_conditioned(model: nn.Module, done: Folded, got, job: Job, dtype: torch.dtype) -> bool:
    """Every region is exact alone, yet the outputs differ beyond the dtype's tolerance: accept
    when the same fold made in float64 matches the float64 original (the difference is rounding,
    amplified by the model), or moves no more than a float64 run does under a rounding-sized
    change of its input (a chaotic model)."""
    m64 = deep_copy(model).to(torch.float64)
    x64 = tuple(t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point()
                else t for t in done.used)
    job64 = replace(job, protect=None, verify=False)
    want = _run(m64, x64, job64)
    if isinstance(want, Exception):
        return False
    want = pick(job.outputs, want, type(model).__name__)
    try:
        folded64 = _fold_module(m64, x64, job64).module
    except ReparamError:
        return False
    e64 = relative_error(_run(folded64, x64, job64), want)
    nudged = tuple(t * (1 + 1e-12) if isinstance(t, torch.Tensor) and t.is_floating_point()
                   else t for t in x64)
    moved = _run(m64, nudged, job64)
    e_chaos = 0.0 if isinstance(moved, Exception) else relative_error(
        pick(job.outputs, moved, type(model).__name__), want)
    if not e64 <= max(tolerance(SCREEN, torch.float64), 1e4 * e_chaos):
        return False
    e_fold, e_orig = relative_error(got, want), relative_error(done.reference, want)
    done.report.notes.append(
        f"verification: in {str(dtype).removeprefix('torch.')} the folded model is "
        f"{e_fold:.2g} from a float64 run of the original, the unfolded model {e_orig:.2g}; the "
        f"same fold in float64 is exact to {e64:.1g}: rounding, amplified by the model")
    return True


def _fold_module(model: nn.Module, inputs: tuple | None, job: Job, capture: bool = False
                 ) -> Folded:
    """Fold one module: traced with torch.fx; where that fails, captured with torch.export or
    folded part by part (:func:`_fold_untraceable`)."""
    if isinstance(job.captures.get(id(model)), Traced):  # captured already (a verification
        # fold again, an ExportedProgram's graph); a capture that failed is not tried again
        return _fold_traced(model, _captured(model, inputs, job), inputs, job, capture)
    # the reference first: its copy of the module tree is gone before tracing makes another
    reference = _eager(model, inputs, job) if job.verify and inputs is not None else None
    tick("tracing")
    try:
        traced = trace(lambda: light_copy(model, share_leaves=True), job.leaves, job.recognizer)
    except TraceError as e:
        return _fold_untraceable(model, inputs, job, str(e), capture, reference=reference)
    if inputs is None:
        inputs = guess_inputs(model, traced)
    return _fold_traced(model, traced, inputs, job, capture, reference)


def _fold_traced(model: nn.Module, traced: Traced, inputs: tuple, job: Job, capture: bool,
                 reference: object = None) -> Folded:
    """Fold ``model``'s capture ``traced`` on ``inputs``; ``reference``, when given, is the eager
    original's output on them (computed here otherwise, when verifying)."""
    failed = _failed_leaves(traced, job)
    units = _units(traced.root, failed)
    if units != failed:  # each failed leaf inside the block that holds it, captured as a unit
        again = trace(lambda: light_copy(model, share_leaves=True), (*job.leaves, *units),
                      job.recognizer)
        why = dict(traced.untraced)
        again.untraced = [(u, why.get(u) or _holds(u, failed, why)) for u in units] + [
            (p, w) for p, w in again.untraced if p not in units]
        traced, failed = again, []
    if failed and not job.leaves and not _routes_layers(model, _record_calls(
            light_copy(model), inputs, job)):  # the largest part that works, captured whole
        try:
            whole = _captured(model, inputs, job, failed)
        except TraceError:
            pass
        else:
            done = _fold_traced(model, whole, inputs, job, capture, reference)
            done.report.captured.insert(0, ("", f"{whole.how}; torch.fx could not trace "
                                                f"{', '.join(failed[:3])}"
                                                f"{' and others' if len(failed) > 3 else ''}"))
            return done
    root, graph = traced.root, traced.graph
    if job.outputs is not None:  # the model that returns what the caller keeps
        select_outputs(graph, job.outputs, type(model).__name__)
    own_leaves(root, [p for p, _ in traced.untraced])  # hooked, maybe folded into: its own
    hooks, leaf_inputs = _capture_leaf_inputs(root, [p for p, _ in traced.untraced])
    job.guard()  # reset a private copy's state before the run
    tick("running")
    try:
        obs = _seeded(model, lambda: observe(root, inputs, job.protect, graph=graph))
    except ReparamError as e:
        if traced.how:
            raise
        if reference is None:
            reference = _eager(model, inputs, job)  # raises if the model fails on these inputs
        return _fold_untraceable(model, inputs, job, f"its torch.fx graph does not run ({e})",
                                 capture, reference=reference)
    finally:
        for h in hooks:
            h.remove()
    if job.verify:
        if reference is None:
            reference = _eager(model, obs.inputs, job)
        unfaithful = relative_error(obs.output, reference) > tolerance(SCREEN, _dtype(model))
    else:
        unfaithful = _suspicious(model, graph) and relative_error(
            obs.output, _eager(model, obs.inputs, job)) > 1e-5
    if unfaithful:
        return _fold_untraceable(model, inputs, job, _UNFAITHFUL.format(type(model).__name__),
                                 capture, export=not traced.how, reference=reference)
    regions: dict | None = {} if capture else None
    gm, report = fold_graph(root, graph, job.rules, job.max_cost, obs, job.keep, regions,
                            job.recognizer, traced.name)
    report.untraced = list(traced.untraced)
    for path, _ in traced.untraced:
        _fold_inside(gm, path, leaf_inputs.get(path), job, report)
    _keep_hooks(gm, model)
    return Folded(gm, report, inputs, reference, regions, obs.inputs)


def _units(root: nn.Module, failed: list[str]) -> list[str]:
    """Where a submodule that torch.fx could not trace is folded: inside the block that holds
    it (its parent), which is captured whole with torch.export, so that the leaf's ops merge
    with the block's own (DBB's BN-and-pad with its conv); the leaf itself when that parent is
    the root (the root is then captured whole) or a container of blocks (a stage of a
    network: its export would cost as much as the network's)."""
    if any("." not in p for p in failed):
        return failed
    units = []
    for path in failed:
        parent = path.rpartition(".")[0]
        if parent and not isinstance(root.get_submodule(parent), _CONTAINERS):
            path = parent
        if path not in units and not any(path.startswith(u + ".") for u in units):
            units = [u for u in units if not u.startswith(path + ".")] + [path]
    return units


def _holds(path: str, failed: list[str], why: dict[str, str]) -> str:
    inner = [p for p in failed if p.startswith(path + ".")]
    return (f"holds {', '.join(p[len(path) + 1:] for p in inner[:3])}, which torch.fx could "
            f"not trace ({why[inner[0]][:120]})" if inner else "")


def _failed_leaves(traced: Traced, job: Job) -> list[str]:
    """The submodules torch.fx could not trace (not those the caller named, nor those kept
    whole for torch.autocast)."""
    if traced.how:
        return []
    out = []
    for path, _ in traced.untraced:
        try:
            leaf = traced.root.get_submodule(path)
        except AttributeError:
            continue
        if path not in job.leaves and not _uses_autocast(type(leaf)):
            out.append(path)
    return out


_UNFAITHFUL = ("torch.fx traced {} differently from eager mode (an in-place `+=` on a tensor, "
               "torch.autocast, random numbers drawn with no tensor argument, which tracing "
               "bakes in, or Python state in forward)")
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul,
               torch.add, torch.sub, torch.mul, torch.div}


def _suspicious(model: nn.Module, graph: fx.Graph) -> bool:
    """Without verification, the trace is compared with eager mode only where torch.fx is known
    to go wrong: an augmented assignment (``x += y``) or dead arithmetic in the graph."""
    return has_augmented_assignment(model) or any(
        n.op == "call_function" and n.target in _ARITHMETIC and not n.users
        for n in graph.nodes)


# --- what torch.fx cannot trace: captured whole, or folded part by part -------------------------

@dataclass
class Calls:
    """One run of a module with its children watched: the positional arguments of each module
    its own ``forward`` calls (copies, first call), in call order, whether the run finished, and
    the module whose output object the module itself returned (YOLO's head, whose output
    ``_predict_once`` returns)."""

    args: dict[str, tuple] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    ran: bool = False
    returns: str | None = None


def _record_calls(root: nn.Module, inputs: tuple | None, job: Job) -> Calls:
    """What ``root``'s own ``forward`` passes to each module it calls (not to modules those call
    in turn), on ``inputs``."""
    calls = Calls()
    if inputs is None:
        return calls
    depth = [0]

    def before(path: str):
        def hook(module, args, kwargs):
            if depth[0] == 0 and path not in calls.order:
                calls.order.append(path)
                if not kwargs and _tensor_args(args):
                    calls.args[path] = clone_inputs(args)
            depth[0] += 1

        return hook

    last: list = [None, None]  # the last call the root's own forward made: path, output

    def after(path: str):
        def hook(module, args, output):
            depth[0] -= 1
            if depth[0] == 0:
                last[:] = [path, output]

        return hook

    handles = []
    for path, m in root.named_modules():
        if path:
            handles.append(m.register_forward_pre_hook(before(path), with_kwargs=True))
            handles.append(m.register_forward_hook(after(path), always_call=True))
    try:
        with job.guard(), torch.no_grad():
            out = root(*clone_inputs(inputs))
        calls.ran = True
        if last[1] is out and not isinstance(out, (int, float, bool, str, type(None))):
            calls.returns = last[0]
    except CallerTensorWritten:
        raise
    except Exception:  # noqa: BLE001 - what ran before the failure is still useful
        calls.ran = bool(calls.order)
    finally:
        for h in handles:
            h.remove()
    return calls


def _tensor_args(args: tuple) -> bool:
    """Arguments a part can be folded on: tensors (in lists, tuples, dicts), and ``None`` for an
    optional one (RT-DETR's head is called as ``head(feats, batch)`` with ``batch=None``)."""
    leaves = [t for t in tree_leaves(list(args)) if t is not None]
    return bool(leaves) and all(isinstance(t, torch.Tensor) for t in leaves)


def _routes_layers(root: nn.Module, calls: Calls) -> bool:
    """Whether ``root``'s forward runs the layers of one of its containers, every one in turn,
    and nothing else (YOLO's ``_predict_once`` over the ``nn.Sequential`` it routes with each
    layer's ``f`` and ``i``): a network of layers of different kinds, folded layer by layer so
    that it keeps its class and its interface. (A head that runs a list of like convs is not:
    it is captured whole.)"""
    for name, child in root.named_children():
        if isinstance(child, _CONTAINERS) and len(child) > 1:
            items = [f"{name}.{key}" for key, _ in child.named_children()]
            if calls.order == items:
                return len({type(m) for m in child.children()}) > 1
    return False


def _captured(model: nn.Module, inputs: tuple, job: Job, parts: list[str] | None = None
              ) -> Traced:
    """``model`` captured with torch.export on ``inputs`` (once per fold: verification folds
    again), as a fresh copy that folding may change; only where the capture may merge more
    than its parts folded apart (:func:`reparam.crossing.merges_across`: the parts are its
    children, or ``parts`` beside what torch.fx traced)."""
    key = id(model)
    if key not in job.captures:
        try:
            with job.guard():
                if not merges_across(light_copy(model), clone_inputs(inputs), parts):
                    raise TraceError("no parameterized linear op of it meets another across "
                                     "its parts: they are folded one by one (a torch.export "
                                     "capture would merge nothing more)")
                job.captures[key] = capture(model, inputs, type(model).__name__)
        except TraceError as e:
            job.captures[key] = e
    found = job.captures[key]
    if isinstance(found, TraceError):
        raise found
    graph = fx.Graph()
    graph.output(graph.graph_copy(found.graph, {}))
    return Traced(light_copy(found.root), graph, found.name, [], found.how)


def _fold_untraceable(model: nn.Module, inputs: tuple | None, job: Job, why: str,
                      capture_regions: bool = False, export: bool = True,
                      reference: object = None) -> Folded:
    """``model`` does not trace with torch.fx (or not faithfully): captured with torch.export on
    the inputs it receives and folded whole, unless its forward routes layers (then, or when the
    capture fails, each child is folded on what it receives: :func:`_fold_children`).
    ``reference``: the eager original's output on ``inputs``, when already computed."""
    if inputs is None:
        try:
            inputs = guess_inputs(model)
        except ReparamError:
            inputs = None
    root = light_copy(model)
    calls = _record_calls(light_copy(model), inputs, job)  # its run may fill caches: not root's
    if export and inputs is not None and not job.leaves and not _routes_layers(root, calls):
        try:
            traced = _captured(model, inputs, job)
        except TraceError as e:
            why = f"{why}; {str(e)[:300]}"
        else:
            done = _fold_traced(model, traced, inputs, job, capture_regions, reference)
            done.report.captured.insert(0, ("", f"{traced.how}; torch.fx: {why[:200]}"))
            return done
    return _fold_children(model, root, inputs, job, why, calls, reference)


def _fold_children(model: nn.Module, root: nn.Module, inputs, job: Job, why: str,
                   calls: Calls, reference: object = None) -> Folded:
    """Fold each part of ``root`` (a light copy of ``model``) on the arguments it received;
    containers item by item; keep ``root``'s own forward, and verify it with its folded parts,
    with ``verify=False`` too (only running it shows how the root's code uses its parts: it may
    test a part's class): a part whose folded form breaks it or changes its output is put
    back. ``reference``: the eager original's output on ``inputs``, when already computed."""
    report = Report(untraced=[("", why)])
    swaps: list[tuple[nn.Module, str, nn.Module, str]] = []
    head = calls.returns if job.outputs is not None else None
    _fold_tree(root, "", calls, job, report, swaps, head)
    pushed = next((s for s in swaps if s[3] == head), None)

    def selected() -> bool:  # the part whose output the root returns returns the selection
        return pushed is not None and pushed[0]._modules[pushed[1]] is not pushed[2]

    def view(out):
        if job.outputs is None or selected():
            return out
        return pick(job.outputs, out, type(model).__name__)

    if inputs is not None and swaps:  # even unverified: the root's own code uses the parts
        if reference is None:
            reference = _eager(model, inputs, job)
        err = _put_back_breaking(root, swaps, inputs, reference, job, report, _dtype(model),
                                 view)
        if err <= tolerance(SCREEN, _dtype(model)):
            report.verified_error = err
        else:  # every part is its original again: the copy itself differs (state, chaos)
            report.notes.append(f"verification: {type(model).__name__}'s own forward gives "
                                f"{err:.2g} apart from itself on a copy of it; its parts were "
                                "kept as they were")
    if job.outputs is not None and not selected():
        report.notes.append(f"outputs=: {type(model).__name__}'s output is not one part's "
                            "output, so the selection could not go inside: the folded model "
                            "is wrapped in reparam.select.Selected")
        return Folded(Selected(root, job.outputs), report, inputs, None)
    return Folded(root, report, inputs, None)  # root is a copy: it has the model's hooks


def _fold_tree(module: nn.Module, path: str, calls: Calls, job: Job, report: Report,
               swaps: list, head: str | None = None) -> None:
    """Fold the children of ``module`` in place: each one its parent called, on what it
    received; inside each container and each module called otherwise (keywords, or not at all
    by the parent itself). The part at ``head`` (whose output the root returns) is folded with
    the job's ``outputs``."""
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        where = f"{path}.{name}" if path else name
        tick("parts", i, len(children))
        if not _parameterized(child):
            continue
        args = calls.args.get(where)
        inside = any(p.startswith(where + ".") for p in calls.order)
        if args is None and (inside or isinstance(child, (nn.ModuleList, nn.ModuleDict))):
            _fold_tree(child, where, calls, job, report, swaps, head)
            continue
        sub = job.sub(where)
        if where == head:
            sub = replace(sub, outputs=job.outputs)
        folded = _fold_child(child, args, sub, report, where)
        if folded is not None:
            swaps.append((module, name, child, where))
            module._modules[name] = folded


def _put_back_breaking(root: nn.Module, swaps, inputs, reference, job: Job, report: Report,
                       dtype: torch.dtype, view: Callable = lambda out: out) -> float:
    """Put back the original part wherever the folded one makes the root fail or differ; a
    container put back that way (an ``nn.Sequential`` the root also iterates or indexes) is then
    folded item by item, so that it stays what it was. Returns the root's error at its last
    run (``inf`` where it raised); ``view`` is what of the root's output is compared."""
    last = [float("inf")]

    def ok() -> bool:
        got = _run(root, inputs, job)
        if not isinstance(got, Exception):
            try:
                got = view(got)
            except ReparamError as e:
                got = e
        last[0] = float("inf") if isinstance(got, Exception) else relative_error(got, reference)
        return last[0] <= tolerance(SCREEN, dtype)

    if ok():
        return last[0]
    for holder, key, original, where in swaps:
        holder._modules[key] = original
        report.regions = [r for r in report.regions if not r.name.startswith(f"{where}.")]
        report.captured = [c for c in report.captured if not c[0].startswith(where)]
        if isinstance(original, nn.Sequential):
            calls = Calls(_capture_inputs(root, inputs, {
                name: item for name, item in original.named_children()}, job), ran=True)
            inner: list = []
            _fold_tree(original, "", calls, job.sub(where), report_in := Report(), inner)
            report.merge(report_in, where)
            if not ok():
                for item_holder, item_key, item, _ in inner:
                    item_holder._modules[item_key] = item
                report.regions = [r for r in report.regions
                                  if not r.name.startswith(f"{where}.")]
        else:
            report.untraced.append((where, "its folded form changed what its parent computes "
                                           "(the parent may read its attributes): kept as it was"))
        if ok():
            return last[0]
    for holder, key, original, _ in swaps:  # pragma: no cover - every part put back
        holder._modules[key] = original
    return last[0]


def _fold_child(child: nn.Module, args, job: Job, report: Report, path: str
                ) -> nn.Module | None:
    """Fold one part of an untraceable module, keeping the plain attributes its parent may read
    (``self.attn.resolution``, Ultralytics' ``f`` and ``i``); ``None`` when it cannot be folded.
    A BN on its own has nothing to fold into (nor does torch.fx trace it as a root: its forward
    tests ``input.dim()``): a leftover."""
    if isinstance(child, _BN):
        report.leftovers.append(Leftover(path, "batch_norm", _LONE_BN))
        return None
    try:
        done = _fold_verified(child, args, job)
    except CallerTensorWritten:
        raise
    except ReparamError as e:
        report.untraced.append((path, str(e).splitlines()[0][:200]))
        return None
    folded = done.module
    if not done.report.regions and job.outputs is None and _params(folded) == _params(child):
        report.merge(done.report, path)  # nothing folded: the part stays what it was
        return None
    own = vars(folded)
    kept = {key: value for key, value in vars(child).items()  # Ultralytics' f, i, type, np
            if not key.startswith("_") and key not in own and not isinstance(value, nn.Module)}
    for key, value in kept.items():  # object's setattr: Ultralytics' ``type`` shadows a method
        object.__setattr__(folded, key, value)
    if kept and isinstance(folded, fx.GraphModule):  # so that copy.deepcopy keeps them too
        folded.meta.setdefault(_PRESERVED, {}).update(kept)
    report.merge(done.report, path)
    return None if folded is child else folded


_LONE_BN = ("a BN folded on its own, as one part of a module that does not trace: nothing "
            "linear in it to fold it into")
_PRESERVED = "_user_preserved_attributes"  # torch.fx: set again on a GraphModule's deepcopy


def _parameterized(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _capture_inputs(root: nn.Module, inputs, modules: dict[str, nn.Module], job: Job
                    ) -> dict[str, tuple]:
    """What each of ``modules`` receives (its first call) when ``root`` runs on ``inputs``."""
    if inputs is None:
        return {}
    captured: dict[str, tuple] = {}
    hooks = [m.register_forward_pre_hook(_recorder(captured, name))
             for name, m in modules.items()]
    try:
        with job.guard(), torch.no_grad():
            root(*clone_inputs(inputs))
    except CallerTensorWritten:
        raise
    except Exception:  # noqa: BLE001 - whatever ran before the failure is still useful
        pass
    finally:
        for h in hooks:
            h.remove()
    return captured


def _recorder(store: dict, name: str):
    def hook(module, args):
        if name not in store and _tensor_args(args):
            store[name] = clone_inputs(args)

    return hook


def _capture_leaf_inputs(gm: nn.Module, paths: list[str]
                         ) -> tuple[list, dict[str, dict[str, tuple]]]:
    """Hooks that record, during the observed run, what each leaf receives (key ``""``) and
    what each of its children receives; returns their handles (to remove after the run) and
    the store they fill."""
    store: dict[str, dict[str, tuple]] = {}
    handles = []
    for path in paths:
        try:
            leaf = gm.get_submodule(path)
        except AttributeError:
            continue
        store[path] = {}
        handles.append(leaf.register_forward_pre_hook(_recorder(store[path], "")))
        for name, child in leaf.named_children():
            handles.append(child.register_forward_pre_hook(_recorder(store[path], name)))
    return handles, store


def _fold_inside(gm: fx.GraphModule, path: str, captured: dict[str, tuple] | None, job: Job,
                 report: Report) -> None:
    """A leaf that did not trace: captured whole where it can be (on what it received), else its
    children folded one by one. A leaf the caller named, or one that uses autocast, is kept
    whole: only its children are folded."""
    try:
        leaf = gm.get_submodule(path)
    except AttributeError:  # folded away as a whole
        return
    captured = captured or {}
    named = path in job.leaves or _uses_autocast(type(leaf))
    if not named and "" in captured and _parameterized(leaf):
        folded = _fold_child(leaf, captured[""], job.sub(path), sub := Report(), path)
        if folded is not None:
            parent, _, name = path.rpartition(".")
            gm.get_submodule(parent)._modules[name] = folded
            report.untraced = [(p, w) for p, w in report.untraced if p != path]
            report.merge(sub, "")
            return
        why = next((w for p, w in sub.untraced if p == path), None)  # why it stays, in full
        if why:
            report.untraced = [(p, why if p == path else w) for p, w in report.untraced]
    for name, child in list(leaf.named_children()):
        args = captured.get(name)  # None: not reached by the example input
        if not _parameterized(child):
            continue
        folded = _fold_child(child, args, job.sub(f"{path}.{name}"), report, f"{path}.{name}")
        if folded is not None:
            setattr(leaf, name, folded)


def _run64(module: nn.Module, inputs: tuple):
    m = deep_copy(module).to(torch.float64)
    args = [a.to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in inputs]
    with torch.no_grad():
        return m(*args)


def max_error(original: nn.Module, folded: nn.Module, inputs: tuple, *,
              outputs: Pick | None = None) -> float:
    """The folded model (its own dtype) against the original run in float64 (``outputs`` of
    it, for a model folded with ``outputs=``)."""
    want = pick(outputs, _run64(original, clone_inputs(inputs)), type(original).__name__)
    with torch.no_grad():
        got = folded(*clone_inputs(inputs))
    return relative_error(got, want)


def _check(model: nn.Module, inputs: tuple, job: Job, report: Report, tol: float = 1e-9) -> None:
    """Fold a float64 copy the same way and compare it with the float64 original on random
    inputs; on a mismatch name the first region that diverges. (Float64 on both sides, so the
    comparison measures the fold, not float32 rounding.)"""
    original = deep_copy(model).to(torch.float64)
    inputs = tuple(torch.randn_like(t, dtype=torch.float64)
                   if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                   for t in inputs)
    job64 = replace(job, verify=False, protect=None)
    done = _fold_module(original, inputs, job64, capture=True)
    folded, sub = done.module, done.report
    with torch.no_grad():  # both draw the same random numbers (rand_like, train-mode dropout)
        got = _seeded(original, lambda: folded(*clone_inputs(inputs)))
        want = _seeded(original, lambda: original(*clone_inputs(inputs)))
        err = relative_error(got, pick(job.outputs, want, type(model).__name__))
    if err <= tol:
        return
    bad = divergences(done.captured or {}, torch.float64)
    names = {r.output: r.name for r in sub.regions}
    culprit = names.get(bad[0].output, bad[0].output) if bad else None
    where = f"; the first region that diverges is '{culprit}'" if culprit else ""
    raise CheckError(
        f"the folded model differs from the original by {err:.3g} (relative, float64){where}. "
        "Please report this as a bug in reparam, with the model; use the unfolded model "
        "meanwhile."
    )


__all__ = ["count_macs", "count_ops", "explain", "flat", "fold", "max_error", "relative_error"]
