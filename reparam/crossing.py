"""Whether capturing a module whole could merge more than folding its parts one by one.

A torch.export capture costs seconds (a minute on a window-attention network), folding each child
of a module on what it receives costs little; they differ only where a linear op with parameters
meets another one across the children's borders, or in the module's own ``forward``: DBB's BN,
its border fill and the next branch's conv; OREPA's conv on a kernel its forward computes; ECBSR's
branch sum; Ultralytics' concatenation of two heads. :func:`merges_across` runs the module once
in eager mode, watches the aten ops (a dispatch mode) and the child each one runs in, and follows
each activation back to the parameterized linear ops it came from through layout ops and
parameter-free arithmetic. It is a cheap necessary condition: a capture is tried only where it
holds, and the capture's fold decides the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SELF = ""  # the owner of an op the module's own forward runs

_WITH_PARAMETERS = {  # linear in their activation, given constant (parameter) operands
    aten.convolution, aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d,
    aten.conv_transpose2d, aten.conv_transpose3d, aten.linear, aten.addmm, aten.mm, aten.matmul,
    aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
    aten.native_batch_norm, aten.mul, aten.mul_, aten.div, aten.div_, aten.add, aten.add_,
    aten.sub, aten.sub_, aten.cudnn_batch_norm,
}
_PASSING = {  # layout ops and parameter-free linear arithmetic: sources pass through
    aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.t,
    aten.slice, aten.select, aten.narrow, aten.pad, aten.constant_pad_nd, aten.clone,
    aten.contiguous, aten.copy_, aten.copy, aten.expand, aten.squeeze, aten.unsqueeze,
    aten.flatten, aten.alias, aten.detach, aten.split, aten.split_with_sizes, aten.chunk,
    aten.unbind, aten.cat, aten.stack, aten.add, aten.add_, aten.sub, aten.sub_, aten.mul,
    aten.mul_, aten.div, aten.div_, aten.neg, aten.slice_scatter, aten.fill_, aten.zero_,
    aten.flip, aten.roll, aten.index_select, aten.dropout, aten.native_dropout, aten.avg_pool2d,
    aten.avg_pool1d, aten.avg_pool3d, aten.sum, aten.mean, aten.empty_like, aten.zeros_like,
}


class _Watch(TorchDispatchMode):
    """Each activation's sources: the ``(owner, root)`` of every parameterized linear op it
    comes from, ``root`` being the activation that op's chain started from (branches merge only
    where they start from one root); a constant (parameters, what is computed from them alone)
    has none and is not tracked."""

    def __init__(self, inputs: list[torch.Tensor], owner: list[str], self_opaque: bool):
        super().__init__()
        self.self_opaque = self_opaque
        self.sources: dict[int, tuple[torch.Tensor, frozenset]] = {
            id(t): (t, frozenset()) for t in inputs}
        self.roots: dict[int, int] = {}  # a view or copy of an activation: the activation
        self.computed: set[int] = set()  # constants computed in forward (a generated kernel)
        self.owner = owner
        self.crosses: tuple | None = None

    def _across(self, owners: set[str]) -> bool:
        """Ops of several parts meet, or ops of an opaque forward (what torch.fx cannot see)."""
        return len(owners) > 1 or self.self_opaque and SELF in owners

    def _of(self, t: torch.Tensor) -> frozenset | None:
        found = self.sources.get(id(t))
        return None if found is None else found[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.crosses:
            return out
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        live = [(t, s) for t, s in ((t, self._of(t)) for t in tensors) if s is not None]
        if not live:  # computed from parameters and constants only: a constant too
            if tensors:
                self.computed.update(id(t) for t in pytree.tree_leaves(out)
                                     if isinstance(t, torch.Tensor))
            return out
        packet, owner = func.overloadpacket, self.owner[-1]
        sourced = [s for _, s in live if s]
        root = None
        if packet in _WITH_PARAMETERS and len(live) == 1 and len(tensors) > 1:
            if sourced and self._across({o for o, _ in sourced[0]} | {owner}):
                self.crosses = (func, owner, sourced)  # a chain across a border
            elif self.self_opaque and owner == SELF and any(
                    id(t) in self.computed for t in tensors):  # OREPA's, ECBSR's kernels
                self.crosses = (func, owner, "a kernel computed from parameters")
            start = self.roots.get(id(live[0][0]), id(live[0][0]))
            roots = {r for _, r in sourced[0]} if sourced else {start}
            result = frozenset((owner, r) for r in roots)
        elif packet in _PASSING and sourced and len(sourced) < len(live):
            result = frozenset()  # a residual sum with an unweighted activation: a join
        elif packet in _PASSING and len(sourced) > 1:
            shared = set.intersection(*({r for _, r in s} for s in sourced))
            if not shared:  # branches from different roots: a join (a residual sum)
                result = frozenset()
            else:  # branches from one root, summed or concatenated
                result = frozenset().union(*sourced)
                if self._across({o for o, r in result if r in shared} | {owner}):
                    self.crosses = (func, owner, sourced)
        elif packet in _PASSING:
            result = sourced[0] if sourced else frozenset()
            if not sourced and len(live) == 1:
                root = self.roots.get(id(live[0][0]), id(live[0][0]))
        else:
            result = frozenset()
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.sources[id(t)] = (t, result)
                if root is not None:
                    self.roots[id(t)] = root
        if func._schema.is_mutable and tensors:  # an in-place write: its target carries it
            self.sources[id(tensors[0])] = (tensors[0], result)
        return out


def merges_across(module: nn.Module, args: tuple, parts: Sequence[str] | None = None) -> bool:
    """Whether, on ``args``, a parameterized linear op reads (through layout ops and
    parameter-free arithmetic) the output of one in another part, or two such outputs from one
    root are summed or concatenated. The parts are ``module``'s children and its own forward
    (``parts=None``: a module torch.fx cannot trace, whose parts are folded one by one), or
    the submodules named in ``parts`` and the rest of ``module`` (torch.fx traced the rest)."""
    inputs = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    owner = [SELF]

    def leave(child: nn.Module, args: tuple, out) -> None:
        owner.pop()

    named = module.named_children() if parts is None else (
        (p, module.get_submodule(p)) for p in parts)
    hooks = []
    for name, child in named:
        hooks.append(child.register_forward_pre_hook(lambda m, a, n=name: owner.append(n)))
        hooks.append(child.register_forward_hook(leave))
    watch = _Watch(inputs, owner, self_opaque=parts is None)
    try:
        with torch.no_grad(), watch:
            module(*args)
    except Exception:  # noqa: BLE001 - a module that fails here is the capture's to report
        return True
    finally:
        for h in hooks:
            h.remove()
    return bool(watch.crosses)
