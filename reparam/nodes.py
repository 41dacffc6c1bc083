"""What a traced graph says about a node: its observed shape and dtype, the tensor it names."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn


def _meta(node: Any) -> Any:
    """What the observed run recorded of a node's output (a tensor, or its shape and dtype)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else node.meta.get("tensor_meta")


def shape_of(node: Any) -> torch.Size | None:
    """The observed output shape of ``node`` (see :mod:`reparam.observe`), if it is a tensor."""
    return getattr(_meta(node), "shape", None)


def dtype_of(node: Any) -> torch.dtype | None:
    return getattr(_meta(node), "dtype", None)


def stride_of(node: Any) -> tuple[int, ...] | None:
    """The observed strides of ``node``'s output (its memory layout), from the observed run."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "stride", None)


def fetch(root: nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target`` of ``root`` (a ``get_attr`` node's target)."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def tensor_of(root: nn.Module, arg: Any) -> torch.Tensor | None:
    """An op attribute as a tensor: itself, or what its ``get_attr`` node reads; else ``None``."""
    if isinstance(arg, torch.Tensor):
        return arg
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = fetch(root, str(arg.target))
        return value if isinstance(value, torch.Tensor) else None
    return None


def is_shape_query(node: fx.Node) -> bool:
    """``x.shape``, ``x.size(...)``, ``x.dim()``, ``x.ndim``: read the layout, not the data."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "ndimension")
    return (node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[1] in ("shape", "ndim"))


def is_rank_query(node: fx.Node) -> bool:
    """``x.dim()`` or ``x.ndim``: fixed by the traced layout, safe to read as a constant."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or shape_of(x) is None:
        return False
    if node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1:
        return True
    return (node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[1] == "ndim")


def what(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """What a node computes, in a word: the module's class or the function's name."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return type(module).__name__ if module is not None else str(node.target)
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


_PIECE_FUNCTIONS = {torch.chunk: "chunk", torch.split: "split",
                    torch.ops.aten.chunk.default: "chunk", torch.ops.aten.split.Tensor: "split",
                    torch.ops.aten.split_with_sizes.default: "split"}
_PIECE_METHODS = {"chunk": "chunk", "split": "split"}


def pieces_call(node: Any) -> tuple[str, Any, Any, Any] | None:
    """``(how, input, sections, dim)`` when ``node`` cuts a tensor into pieces: ``chunk``
    (``sections`` pieces) or ``split`` (pieces of ``sections`` elements, or a list of sizes), as
    a method, a torch function or its aten form; else ``None``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        how = _PIECE_METHODS.get(node.target)
    elif node.op == "call_function":
        how = _PIECE_FUNCTIONS.get(node.target)
    else:
        how = None
    if how is None:
        return None
    args, kw = list(node.args), dict(node.kwargs)
    x = args[0] if args else kw.get("input", kw.get("self"))
    sections = args[1] if len(args) > 1 else next(
        (kw[k] for k in ("chunks", "split_size_or_sections", "split_size", "split_sizes")
         if k in kw), None)
    dim = args[2] if len(args) > 2 else kw.get("dim", 0)
    return how, x, sections, dim
