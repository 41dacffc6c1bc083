"""Writing a (folded) model for deployment, in the format its file's extension names.

=================  ===========================================  ==================================
extension          what is written                              load it with
=================  ===========================================  ==================================
``.pt``, ``.pth``  the module, pickled (``torch.save``)         ``torch.load(FILE,
                                                                weights_only=False)``
``.pt2``           a ``torch.export`` program                   ``torch.export.load(FILE)``
                                                                ``.module()``
``.onnx``          an ONNX graph (``torch.onnx.export``)        ``onnxruntime.InferenceSession``
``.ts``            TorchScript (``torch.jit.trace``)            ``torch.jit.load(FILE)``
``.safetensors``   the state_dict (needs ``safetensors``)       ``safetensors.torch.load_file``
=================  ===========================================  ==================================

``.pt2``, ``.onnx`` and ``.ts`` run the model once: on ``example_inputs``, or on random inputs of
the shapes ``reparam.fold`` recorded (``model.reparam_report.input_shapes``).
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch import nn

from .errors import ReparamError
from .trace import as_inputs

HOW_TO_LOAD = {
    ".pt": "torch.load(FILE, weights_only=False) (it runs pickled code: only for files you "
           "trust)",
    ".pth": "torch.load(FILE, weights_only=False) (it runs pickled code: only for files you "
            "trust)",
    ".pt2": "torch.export.load(FILE).module()",
    ".onnx": "onnxruntime.InferenceSession(FILE)",
    ".ts": "torch.jit.load(FILE)",
    ".safetensors": "safetensors.torch.load_file(FILE), then load_state_dict into the folded "
                    "model",
}
FORMATS = tuple(HOW_TO_LOAD)


def format_of(path: str | Path) -> str:
    """The extension of ``path`` if it names a format :func:`save` writes, else a
    :class:`~reparam.ReparamError` listing the ones it does."""
    suffix = Path(path).suffix.lower()
    if suffix not in HOW_TO_LOAD:
        raise ReparamError(f"cannot tell which format to write from '{path}': name the file "
                           f"with one of the extensions {', '.join(FORMATS)}")
    return suffix


def _inputs(model: nn.Module, example_inputs, suffix: str) -> tuple:
    inputs = as_inputs(example_inputs)
    if inputs is not None:
        return inputs
    report = getattr(model, "reparam_report", None)
    shapes = getattr(report, "input_shapes", None)
    if not shapes:
        raise ReparamError(
            f"writing {suffix} runs the model once, so it needs example inputs: pass "
            "example_inputs=(torch.randn(...),), or save a model returned by reparam.fold, whose "
            "report records the shapes it was folded on")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else None
    return tuple(torch.randn(s, dtype=dtype, device=device) for s in shapes)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).strip().splitlines()[:1]) if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def save(model: nn.Module | torch.export.ExportedProgram, path: str | Path,
         example_inputs=None) -> Path:
    """Write ``model`` to ``path`` in the format its extension names (``.pt``/``.pth``,
    ``.pt2``, ``.onnx``, ``.ts``, ``.safetensors``; see :data:`HOW_TO_LOAD`) and return the path.

    ``.pt2``, ``.onnx`` and ``.ts`` trace the model on ``example_inputs`` (a tensor or a tuple),
    by default random inputs of the shapes ``reparam.fold`` recorded on the model it returned.
    An unknown extension, a missing optional package, or a model the exporter cannot handle
    raises :class:`~reparam.ReparamError` saying what to do. An ``ExportedProgram`` (what
    ``fold`` returns for one) is written as it is to ``.pt2``, and as its module to ``.onnx``
    and ``.safetensors``.
    """
    if not isinstance(model, (nn.Module, torch.export.ExportedProgram)):
        raise ReparamError(f"save expects a torch.nn.Module or a torch.export.ExportedProgram, "
                           f"got {type(model).__name__}")
    path = Path(path)
    suffix = format_of(path)
    if not path.parent.is_dir():
        raise ReparamError(f"cannot write {path}: the folder {path.parent} does not exist")
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    if program is not None and suffix != ".pt2":  # what fold(program) returns, as its module
        if suffix in (".pt", ".pth", ".ts"):
            raise ReparamError(f"cannot write {path}: an ExportedProgram is written as .pt2 "
                               "(torch.export.save), .onnx or .safetensors; for .pt or .ts, "
                               "fold the model it was exported from")
        if example_inputs is None and getattr(program, "example_inputs", None):
            example_inputs = tuple(program.example_inputs[0])
        model, program = program.module(), None
    try:
        if program is not None:
            torch.export.save(program, path)
        elif suffix in (".pt", ".pth"):
            torch.save(model, path)
        elif suffix == ".safetensors":
            _save_safetensors(model, path)
        else:
            inputs = _inputs(model, example_inputs, suffix)
            with torch.no_grad():
                {".pt2": _save_program, ".onnx": _save_onnx, ".ts": _save_script}[suffix](
                    model, path, inputs)
    except ReparamError:
        raise
    except OSError as e:
        raise ReparamError(f"cannot write {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - exporters fail in many ways
        raise ReparamError(f"cannot write {path} ({suffix}): {_first_line(e)}; save it as .pt "
                           "or .safetensors instead") from e
    return path


def _save_safetensors(model: nn.Module, path: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ReparamError("writing .safetensors needs the safetensors package: pip install "
                           "safetensors (or write .pt)") from e
    # each tensor its own contiguous copy: safetensors refuses tensors that share memory
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def _save_program(model: nn.Module, path: Path, inputs: tuple) -> None:
    program = torch.export.export(model, inputs)
    torch.export.save(program, path)


def _save_onnx(model: nn.Module, path: Path, inputs: tuple) -> None:
    try:
        import onnxscript  # noqa: F401 - the torch.export-based exporter needs it
    except ImportError:
        dynamo = False
    else:
        dynamo = True
    with redirect_stdout(io.StringIO()):  # the exporter reports its steps on stdout
        if dynamo:
            program = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
            program.save(str(path))
        else:
            torch.onnx.export(model, inputs, str(path), dynamo=False)


def _save_script(model: nn.Module, path: Path, inputs: tuple) -> None:
    scripted = torch.jit.trace(model, inputs, check_trace=False)
    torch.jit.save(scripted, str(path))
