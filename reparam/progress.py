"""How far a fold is: the stages it reports while it runs, for a progress bar.

A fold reports ``(stage, done, total)``: ``"tracing"``, ``"running"`` (the observed forward),
``"regions"`` (``done`` of ``total`` regions of one graph materialized), ``"parts"`` (``done`` of
``total`` submodules of a module that does not trace as a whole, folded one by one),
``"capturing"`` (a torch.export capture) and ``"verifying"``. ``total`` is 0 where a stage has no
count. ``fold(..., progress=callback)`` sets the callback for the fold; nothing is reported
otherwise, and a callback's own failure never stops the fold.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Callback = Callable[[str, int, int], None]

_CURRENT: contextvars.ContextVar[Callback | None] = contextvars.ContextVar(
    "reparam_progress", default=None)


def tick(stage: str, done: int = 0, total: int = 0) -> None:
    """Report that the running fold reached ``done`` of ``total`` in ``stage``."""
    callback = _CURRENT.get()
    if callback is None:
        return
    try:
        callback(stage, done, total)
    except Exception:  # noqa: BLE001 - a progress bar must not break a fold
        _CURRENT.set(None)


@contextmanager
def reporting(callback: Callback | None) -> Iterator[None]:
    """Send this thread's progress to ``callback`` while the block runs."""
    token = _CURRENT.set(callback)
    try:
        yield
    finally:
        _CURRENT.reset(token)
