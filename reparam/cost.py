"""The cost model: multiply-adds of one sample, of the original ops and of a folded kernel."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from torch import fx

from .ir import IR
from .kernel import Kernel
from .pattern import per_sample
from .values import Lin, source_shape


def ops_cost(ir: IR, nodes: Iterable[fx.Node]) -> int:
    """What the original ops cost, each as its pattern counts it."""
    return sum(ir.entries[n].macs for n in nodes)


def kernel_cost(node: fx.Node, value: Lin) -> int:
    """What the folded kernel of the region ending at ``node`` costs."""
    k = value.kernel
    if k.transposed:  # a transposed conv scatters from every input position
        shape = source_shape(value.source)
        elements = math.prod(shape[1:]) if shape is not None and len(shape) > 1 else 0
        return k.macs(elements // max(k.in_channels, 1))
    if value.reshaped is not None:  # a flat value: per sample of its source, as its ops count
        shape = source_shape(value.source)
        made = output_shape(k, shape) if shape is not None else None
        return k.macs(math.prod(made[2:])) if made is not None else 0
    positions = per_sample(node) // max(k.out_channels, 1)
    if k.nd == 0:  # nn.Linear has no groups: it costs the dense product
        return k.in_channels * k.out_channels * positions
    return k.macs(positions)


def output_shape(k: Kernel, source: Sequence[int]) -> tuple[int, ...] | None:
    """The shape ``k`` produces from a tensor of shape ``source``, or ``None`` if it cannot run.

    A region that ends inside a shape-only sandwich would give a tensor of another shape than
    the traced one: the driver compares the two before materializing."""
    s = tuple(int(d) for d in source)
    if k.nd == 0:  # a linear map acts on the last axis
        if len(s) < 2 or s[-1] != k.in_channels:
            return None
        return s[:-1] + (k.out_channels,)
    if len(s) != k.nd + 2 or s[1] != k.in_channels:
        return None
    out = []
    for i, size in enumerate(s[2:]):
        taps = k.dilation[i] * (k.kernel_size[i] - 1) + 1
        if k.transposed:
            out.append((size - 1) * k.stride[i] - 2 * k.padding[i] + taps + k.output_padding[i])
        else:
            out.append((size + 2 * k.padding[i] - taps) // k.stride[i] + 1)
    return (s[0], k.out_channels, *out)
