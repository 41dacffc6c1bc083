"""torch.export in and out: ``fold(exported_program)`` returns a folded ``ExportedProgram``.

The program's graph is read as the capture path reads one it made itself
(:func:`reparam.capture.from_program`): aten ops with each eval-mode BN made whole, guarded by
the sizes and ranges the program was exported for. It is folded and verified as any module is,
then exported again with the same inputs, the same outputs and the same symbolic sizes, which is
what ExecuTorch, AOTInductor and TensorRT's deploy paths start from.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .capture import _quiet, check_inputs, from_program
from .errors import ReparamError, TraceError


class Program(nn.Module):
    """An ``ExportedProgram`` run as a module (its ``module()``, guards on); its parameters
    and buffers are the program's own tensors, so that folding never writes them."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        run = program.module()
        object.__setattr__(self, "run", run)  # not a child: an exported module refuses eval()
        object.__setattr__(self, "program", program)
        for name, p in run.named_parameters():
            self.register_parameter(name.replace(".", "__"), p)
        for name, b in run.named_buffers():
            self.register_buffer(name.replace(".", "__"), b)
        self.train(False)

    def forward(self, *args):
        return self.run(*args)


def example_inputs(program: torch.export.ExportedProgram, given) -> tuple | None:
    """The inputs to fold at: those given, else the program's own examples; keyword inputs are
    refused (an exported program keeps them apart from the positional ones)."""
    if given is not None:
        return given
    examples = getattr(program, "example_inputs", None)
    if not examples:
        return None
    args, kwargs = examples
    if kwargs:
        raise ReparamError("this ExportedProgram takes keyword inputs, which reparam does not "
                           "fold yet: export the model with positional inputs only")
    return tuple(args)


def dynamic(program: torch.export.ExportedProgram) -> bool:
    """Whether some input size of the program is symbolic."""
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and any(not isinstance(s, int) for s in val.shape):
            return True
    return False


def capture_of(program: torch.export.ExportedProgram, module: Program):
    """The program's graph as reparam folds it (see :func:`reparam.capture.from_program`)."""
    try:
        return from_program(module.run, program, dynamic(program), type(module).__name__)
    except TraceError as e:
        raise TraceError(f"this ExportedProgram cannot be read for folding ({e})") from e


def export_again(folded: fx.GraphModule, program: torch.export.ExportedProgram, inputs: tuple
                 ) -> torch.export.ExportedProgram:
    """The folded graph exported with the program's signature: each size that was symbolic in
    the program is symbolic again over the same range (else left to export, ``Dim.AUTO``), the
    others stay fixed. The guard node goes first: the new program carries its own guards."""
    for node in list(folded.graph.nodes):
        if node.op == "call_function" and node.target is check_inputs:
            folded.graph.erase_node(node)
    folded.recompile()
    values = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"
              and n.name in _user_inputs(program)]
    spec = pytree.tree_structure(inputs)
    error: Exception = ReparamError("no export was tried")
    for dims in (_dims(program), {}):  # the program's own ranges, else export's choice
        flat = [{d: dims.get(str(s), torch.export.Dim.AUTO) for d, s in enumerate(v.shape)
                 if not isinstance(s, int)} or None for v in values]
        shapes = pytree.tree_unflatten(flat, spec) if len(flat) == spec.num_leaves else None
        try:
            with _quiet():
                return torch.export.export(folded, tuple(inputs), dynamic_shapes=shapes)
        except Exception as e:  # noqa: BLE001 - export's own failures are many
            error = e
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    raise ReparamError(f"the folded program could not be exported again ({type(error).__name__}: "
                       f"{first}); fold the model the program was exported from, then export "
                       "the folded model") from error


def _dims(program: torch.export.ExportedProgram) -> dict[str, object]:
    """A ``torch.export.Dim`` for each symbol of the program, over the range it was exported
    with (one symbol, one Dim: sizes that were equal stay equal)."""
    dims = {}
    for symbol, rng in program.range_constraints.items():
        if not getattr(symbol, "is_Symbol", False):
            continue
        low = int(rng.lower) if rng.lower.is_finite else 0
        high = int(rng.upper) if rng.upper.is_finite else None
        dims[str(symbol)] = torch.export.Dim(f"{symbol}", min=low, max=high)
    return dims


def _user_inputs(program: torch.export.ExportedProgram) -> set[str]:
    sig = program.graph_signature
    return set(sig.user_inputs)
