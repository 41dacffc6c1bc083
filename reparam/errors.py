"""Errors raised by reparam. Every message says what is wrong and what to do."""

from __future__ import annotations


class ReparamError(Exception):
    """Base class of every error reparam raises."""


class TraceError(ReparamError):
    """The model (or a part of it) could not be traced with torch.fx."""


class CheckError(ReparamError):
    """A folded model disagrees with the original (raised by ``fold(..., check=True)``)."""


class GuardError(ReparamError, ValueError):
    """A part captured with torch.export is run on inputs it was not captured for (another size,
    dtype or device its code depends on)."""
