"""Reading model and weight files without running code pickled in them.

``torch.save(model, FILE)`` pickles the module: loading it imports and calls whatever the pickle
names, so a file from someone else can run any code. Here a file is first looked at (its zip
entries, the globals its pickles name, read with ``pickletools`` without executing anything):

- a state_dict (tensors only) loads with ``torch.load(..., weights_only=True)``;
- a pickled module loads only when the caller trusts the file (``trust_pickle=True``);
- a ``torch.export`` program (``.pt2``) loads with ``torch.export.load`` when none of its parts is
  pickled code;
- TorchScript, ONNX, safetensors, damaged and unknown files get a message naming what they are and
  what to do.

Every failure is a :class:`~reparam.errors.ReparamError` whose message is one sentence for a user,
never torch's internal error text.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ReparamError

BUILDER_ROUTE = ("give the model's builder as SPEC and a state_dict as --weights "
                 "(e.g. reparam fold package.module:builder --weights state_dict.pt -o OUT.pt)")


@dataclass(frozen=True)
class FileKind:
    """What a file holds, found without unpickling it: ``kind`` is one of ``"torch"``
    (``torch.save``), ``"pt2"``, ``"torchscript"``, ``"safetensors"``, ``"onnx"``, ``"damaged"``
    or ``"unknown"``; ``code`` names the globals its pickles would import and call (empty: tensors
    and containers only, loadable with ``weights_only=True``), ``None`` where it is not known
    before loading."""

    kind: str
    code: tuple[str, ...] | None = ()


def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _pickled_code(data: bytes | Path) -> tuple[str, ...]:
    """The globals a ``torch.save`` zip's pickles name, other than the ones
    ``weights_only=True`` allows."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    return tuple(torch.serialization.get_unsafe_globals_in_checkpoint(source))


def _pt2_code(path: Path, names: list[str]) -> tuple[str, ...]:
    """What a ``torch.export`` archive would unpickle beyond tensors: its weights or constants
    stored as pickles, custom objects, and globals named in its ``.pt`` members (its sample
    inputs, which ``torch.export.load`` falls back to unpickling in full)."""
    found: list[str] = []
    with zipfile.ZipFile(path) as z:
        for name in names:
            if name.endswith("_config.json"):
                config = json.loads(z.read(name)).get("config", {})
                for key, meta in config.items():
                    pickled = meta.get("use_pickle") or not str(meta.get("path_name", "")
                                                                 ).startswith(("weight_",
                                                                               "tensor_"))
                    if pickled:
                        found.append(f"the pickled entry '{key}'")
            elif name.endswith(".pt"):
                try:
                    found += _pickled_code(z.read(name))
                except Exception:  # noqa: BLE001 - not a torch.save zip: cannot vouch for it
                    found.append(f"the unreadable member '{name}'")
    return tuple(dict.fromkeys(found))


def _is_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header."""
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 0 < size < 100_000_000 and head[8:9] == b"{"


def file_kind(path: Path) -> FileKind:
    """What ``path`` holds (see :class:`FileKind`), read without running any of it."""
    with open(path, "rb") as f:
        head = f.read(64)
    names = _zip_names(path)
    if names is not None:
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return FileKind("pt2", _pt2_code(path, names))
        if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n
                                                                   for n in names):
            return FileKind("torchscript")
        if any(n.endswith("data.pkl") for n in names):
            try:
                return FileKind("torch", _pickled_code(path))
            except Exception:  # noqa: BLE001 - a zip torch cannot read
                return FileKind("damaged")
        return FileKind("unknown")
    if head.startswith(b"PK\x03\x04"):
        return FileKind("damaged")  # a zip without its end: truncated
    if _is_safetensors(head):
        return FileKind("safetensors")
    if path.suffix.lower() == ".onnx":
        return FileKind("onnx")
    return FileKind("torch", None)  # perhaps torch.save's legacy format: known only by loading


# --- loading ----------------------------------------------------------------------------------

def _check_path(path: Path) -> None:
    if path.is_dir():
        raise ReparamError(f"{path} is a folder, not a saved model")
    if not path.is_file():
        raise ReparamError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise ReparamError(f"{path} is empty (0 bytes): it was not saved completely; save it "
                           "again")


def _safe_load(path: Path):
    """``torch.load(path, weights_only=True)`` with its failures put in words."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise _NeedsTrust(()) from e
        raise ReparamError(f"{path} is not a file written by torch.save (nor by "
                           "torch.export.save): it cannot be read as a model or weights") from e
    except Exception as e:  # noqa: BLE001 - torch's reader fails in many internal ways
        raise ReparamError(f"{path} could not be read as a torch.save file (damaged or "
                           "truncated?): save or copy it again") from e


class _NeedsTrust(Exception):
    def __init__(self, code: tuple[str, ...]) -> None:
        super().__init__(", ".join(code))
        self.code = code


def _trusted_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as e:
        raise ReparamError(
            f"cannot load {path}: {e}; the classes the module was saved with must be importable "
            "(run from their folder or add it to PYTHONPATH)") from e
    except Exception as e:  # noqa: BLE001 - unpickling can fail in many ways
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ReparamError(f"cannot load {path}: {type(e).__name__}: {first}") from e


def _what(code: tuple[str, ...]) -> str:
    if not code:
        return ""
    shown = ", ".join(code[:3]) + (f" and {len(code) - 3} more" if len(code) > 3 else "")
    return f" (it names {shown})"


def _untrusted(path: Path, code: tuple[str, ...], what: str) -> ReparamError:
    return ReparamError(
        f"{path} is {what}: loading it runs code pickled in it{_what(code)}. Pass --trust-pickle "
        f"if you trust the file, or better, {BUILDER_ROUTE}")


def _is_weights(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


_NOT_A_MODULE = {  # what a file of each kind is, and what to do instead
    "torchscript": "{path} is a TorchScript module (torch.jit.save): torch.fx cannot trace it; "
                   "fold the eager model, then script the folded one",
    "onnx": "{path} is an ONNX model: reparam folds PyTorch modules; fold the model before "
            "exporting it (reparam fold SPEC -o OUT.onnx)",
    "safetensors": "{path} holds weights only (safetensors), no model: "
                   + BUILDER_ROUTE.replace("state_dict.pt", "{path}"),
    "damaged": "{path} is a damaged or truncated zip archive: save or copy it again",
    "unknown": "{path} is a zip archive but not one torch.save or torch.export.save wrote",
}


def read_model(path: Path, *, trust_pickle: bool = False,
               warn: Callable[[str], None] = lambda message: None
               ) -> nn.Module | torch.export.ExportedProgram:
    """The module saved in ``path``. A pickled module (``torch.save(model)``) is loaded only with
    ``trust_pickle``, after ``warn`` is told; a torch.export program (returned as the
    ``ExportedProgram``, which ``fold`` takes) only when nothing in it is pickled code (or with
    ``trust_pickle``)."""
    _check_path(path)
    found = file_kind(path)
    if found.kind == "pt2":
        return _read_program(path, found.code, trust_pickle, warn)
    if found.kind in _NOT_A_MODULE:
        raise ReparamError(_NOT_A_MODULE[found.kind].format(path=path))
    if found.code:  # a torch.save zip that names classes or functions: a pickled module
        if not trust_pickle:
            raise _untrusted(path, found.code, "a pickled module (torch.save(model))")
        warn(f"loading {path} runs code pickled in it: only do this for files you trust")
        obj = _trusted_load(path)
    else:
        try:
            obj = _safe_load(path)
        except _NeedsTrust:
            if not trust_pickle:
                raise _untrusted(path, (), "a pickled object in torch.save's legacy format") \
                    from None
            warn(f"loading {path} runs code pickled in it: only do this for files you trust")
            obj = _trusted_load(path)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        what = ("a state_dict (weights, no model)" if _is_weights(obj)
                else "a dict, not a module (a training checkpoint?)")
        raise ReparamError(f"{path} holds {what}: "
                           f"{BUILDER_ROUTE.replace('state_dict.pt', str(path))}")
    raise ReparamError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")


def _read_program(path: Path, code: tuple[str, ...], trust_pickle: bool,
                  warn: Callable[[str], None]) -> torch.export.ExportedProgram:
    if code and not trust_pickle:
        raise _untrusted(path, code, "a torch.export program with pickled parts")
    if code:
        warn(f"loading {path} runs code pickled in it: only do this for files you trust")
    try:
        program = torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - the deserializer fails in many internal ways
        raise ReparamError(f"{path} could not be read as a torch.export program (written by "
                           "another torch version, or damaged): export it again") from e
    return program


# --- weights ----------------------------------------------------------------------------------

_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``path`` (``torch.save(model.state_dict())`` or safetensors), read
    without running pickled code. A training checkpoint holding it under ``"state_dict"``,
    ``"model"``, ... is unwrapped, and a ``module.`` prefix (DataParallel) removed."""
    _check_path(path)
    found = file_kind(path)
    if found.kind == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ReparamError(f"reading {path} needs safetensors: pip install safetensors") from e
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise ReparamError(f"{path} could not be read as safetensors (damaged?)") from e
    if found.kind == "pt2":
        raise ReparamError(f"{path} is a torch.export program, not a state_dict: --weights "
                           "takes torch.save(model.state_dict(), FILE)")
    if found.kind in _NOT_A_MODULE:
        raise ReparamError(_NOT_A_MODULE[found.kind].format(path=path))
    if found.code:
        raise ReparamError(f"{path} is a pickled module, not a state_dict{_what(found.code)}: "
                           "--weights takes torch.save(model.state_dict(), FILE), which loads "
                           "without running code")
    try:
        obj = _safe_load(path)
    except _NeedsTrust:
        raise ReparamError(f"{path} is not a state_dict: it pickles code; --weights takes "
                           "torch.save(model.state_dict(), FILE)") from None
    if isinstance(obj, Mapping) and not _is_weights(obj):
        inner = [obj[k] for k in _WRAPPERS if _is_weights(obj.get(k))]
        if inner:
            obj = inner[0]
    if not _is_weights(obj):
        raise ReparamError(f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of "
                           "names to tensors): save it with torch.save(model.state_dict(), FILE)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_weights(model: nn.Module, path: Path, spec: str) -> None:
    """Load the state_dict in ``path`` into ``model`` (built from ``spec``), strictly: every key
    the model has, none it lacks, every shape equal; otherwise one line naming the keys."""
    weights = read_weights(path)
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [f"{k} ({'x'.join(map(str, weights[k].shape))} in the file, "
             f"{'x'.join(map(str, own[k].shape))} in the model)"
             for k in own if k in weights and weights[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if wrong:
        problems.append(f"other shapes for {_names(wrong)}")
    if problems:
        raise ReparamError(f"the weights in {path} do not fit {spec}: " + "; ".join(problems)
                           + "; pass the builder (and its arguments) the weights were saved from")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ReparamError(f"the weights in {path} do not fit {spec}: "
                           f"{' '.join(str(e).split())[:200]}") from e
