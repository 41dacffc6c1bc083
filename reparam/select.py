"""``fold(model, outputs=pick)``: fold the model that returns ``pick(model(x))``.

A model may return more than its deploy path reads: YOLOv10's and YOLO26's end-to-end heads
return their one-to-many branch in eval mode beside the one-to-one predictions, and a network
may return auxiliary heads or features. The fold computes exactly what the model returns, so it
keeps them; ``outputs=`` says what is shipped instead. Whatever only the dropped outputs need
then leaves the folded model (the graph's dead code), and verification compares the folded
model with ``pick`` of the original's output.

``pick`` is a function of the model's output: usually indexing (``lambda out: out[0]``,
``lambda out: (out[0], out[1]["one2one"])``, or :class:`Keep` ``("0", "1.one2one")``, which
pickles and is what the command line's ``--outputs`` builds). In a traced graph it runs once on
the graph's output nodes, so any tensor code it has is traced into the graph; a model folded
part by part carries the selection into the part that produces the model's output, else the
folded model is wrapped in :class:`Selected`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from .errors import ReparamError

Pick = Callable[[Any], Any]


class Selected(nn.Module):
    """``outputs(model(*args))``: a folded model whose output the caller narrowed with
    ``fold(..., outputs=...)`` where the selection could not go into its graph."""

    def __init__(self, model: nn.Module, outputs: Pick) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs(self.model(*args, **kwargs))


@dataclass(frozen=True, init=False)
class Keep:
    """A selection by paths into the output: ``Keep("0", "1.one2many")`` is
    ``lambda out: (out[0], out[1]["one2many"])``, and one path gives the value itself. Each step
    is an index of a tuple or list (negative counts from the end) or a key of a dict. Unlike a
    lambda it pickles, and it is what the command line's ``--outputs`` builds."""

    paths: tuple[str, ...]

    def __init__(self, *paths: str) -> None:
        if not paths or not all(isinstance(p, str) and p.strip(".") for p in paths):
            raise ReparamError("Keep takes one or more paths into the output, each a string of "
                               "indices and keys joined by dots, e.g. Keep('0', '1.one2many')")
        object.__setattr__(self, "paths", paths)

    def __call__(self, out: Any) -> Any:
        got = tuple(_walk(out, path) for path in self.paths)
        return got[0] if len(got) == 1 else got


def _walk(value: Any, path: str) -> Any:
    for step in path.split("."):
        if isinstance(value, dict):
            key: Any = step
            if step not in value and _is_int(step) and int(step) in value:
                key = int(step)
            value = value[key]
        elif _is_int(step):
            value = value[int(step)]
        else:
            raise KeyError(f"'{step}' of '{path}' is not an index, and the value there is a "
                           f"{type(value).__name__}, not a dict")
    return value


def _is_int(step: str) -> bool:
    return step.lstrip("-").isdigit()


def validate(outputs: object) -> None:
    if outputs is not None and not callable(outputs):
        raise ReparamError("outputs must be a function of the model's output that returns what "
                           "to keep, e.g. outputs=lambda out: out[0], or None (keep everything)")


def pick(outputs: Pick | None, value: Any, where: str) -> Any:
    """``outputs(value)`` (``value`` itself when there is no selection), with the caller's
    error said in words."""
    if outputs is None:
        return value
    try:
        return outputs(value)
    except Exception as e:  # noqa: BLE001 - the caller's function
        raise ReparamError(
            f"outputs= raised {type(e).__name__} ({str(e).strip()[:200]}) on the output of "
            f"{where}; it is called with what the model returns (a tensor, or a tuple, list or "
            "dict of them) and must return what to keep") from e


def select_outputs(graph: fx.Graph, outputs: Pick, where: str) -> None:
    """Narrow ``graph``'s output to ``outputs`` of it: the function runs once on proxies of the
    output nodes (indexing picks nodes, tensor code becomes nodes before the output)."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    tracer = fx.proxy.GraphAppendingTracer(graph)
    with graph.inserting_before(out):
        chosen = pick(outputs, _proxies(out.args[0], tracer), where)
        try:
            value = tracer.create_arg(chosen)
        except Exception as e:  # noqa: BLE001 - what the caller's function returned
            raise ReparamError(
                f"outputs= returned a {type(chosen).__name__}, which a graph cannot return: "
                "return tensors, or tuples, lists and dicts of them") from e
    out.args = (value,)


def _proxies(value: Any, tracer: fx.proxy.GraphAppendingTracer) -> Any:
    """The graph's output with a proxy for each node, in plain tuples, lists and dicts
    (torch.fx keeps them immutable), so that ``pick`` sees what the model returns."""
    if isinstance(value, fx.Node):
        return fx.Proxy(value, tracer)
    if isinstance(value, dict):
        return {k: _proxies(v, tracer) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_proxies(v, tracer) for v in value))
    if isinstance(value, tuple):
        return tuple(_proxies(v, tracer) for v in value)
    if isinstance(value, list):
        return [_proxies(v, tracer) for v in value]
    return value
