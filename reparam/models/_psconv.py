"""PSConv (Li, Yao & Chen, "PSConv: Squeezing Feature Pyramid into One Compact Poly-Scale
Convolutional Layer", ECCV 2020), structured as the authors' implementation: three parallel
convs summed, one of them on a channel-shuffled input. Nothing here folds anything.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._layers import check_odd


def swap_halves(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Within each of ``groups`` channel groups, swap the two halves: ``cat(x2, x1)``."""
    chunks = x.chunk(groups, dim=1)
    pieces = []
    for g in range(groups):
        first, second = chunks[g].chunk(2, dim=1)
        pieces += [second, first]
    return torch.cat(pieces, dim=1)


class BlockMask(nn.Module):
    """A weight parametrization ``w -> w * mask`` (``mask`` a 0/1 buffer): the masked entries
    are zero in every forward and get no gradient."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def poly_scale_mask(out_ch: int, in_ch: int, kernel_size: int, parts: int, groups: int
                    ) -> torch.Tensor:
    """The 0/1 mask of the dense conv: within group ``j``, output part ``i`` drops input parts
    ``i`` (read by the dilation-d group-wise conv) and ``(i + parts/2) % parts`` (read by the
    dilation-2d one), so that every (output, input) channel pair is read at one dilation."""
    mask = torch.ones(out_ch, in_ch // groups, kernel_size, kernel_size)
    o, c = out_ch // (groups * parts), in_ch // (groups * parts)
    for j in range(groups):
        for i in range(parts):
            rows = slice((j * parts + i) * o, (j * parts + i + 1) * o)
            for dropped in (i, (i + parts // 2) % parts):
                mask[rows, dropped * c:(dropped + 1) * c] = 0.0
    return mask


class PSConv2d(nn.Module):
    """Poly-scale conv: ``grouped(x) + shifted(swap_halves(x)) + dense(x)``.

    * ``grouped``: KxK conv, dilation ``d``, ``groups * parts`` groups.
    * ``shifted``: KxK conv, dilation ``2d``, ``groups * parts`` groups, on the input whose two
        channel halves (within each of ``groups`` groups) are swapped by chunk and cat; so output
        part ``i`` reads input part ``i + parts/2`` at dilation 2d.
    * ``dense``: KxK conv, dilation 1, ``groups`` groups, whose blocks that the two group-wise
        convs already cover are masked to zero (a ``BlockMask`` parametrization of its weight; the
        authors zero them at initialization and mask their gradient with a hook).

    Each conv pads by its dilation times ``K // 2``, so all three align. Every output channel
    thus sees each input channel at one of the dilations 1, d, 2d: the parameters that are not
    masked number exactly those of one plain KxK conv (the stored ones ``1 + 2 / parts`` times
    that). ``parts`` must be even; channels divisible by ``groups * parts``. No bias by default.

    Deploy form: one dense conv of kernel ``2d(K-1) + 1`` at dilation 1 (padding ``d(K-1)``),
    every branch's taps re-laid on that grid: exact, but dearer than the branches (for K=3,
    d=2: 81 taps against 9 * 1.5); the cheap deploy form keeps the three convs.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        parts: int = 4,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if parts < 2 or parts % 2:
            raise ValueError(f"parts must be even (the shuffle swaps halves), got {parts}")
        if in_ch % (groups * parts) or out_ch % (groups * parts):
            raise ValueError(f"in_ch {in_ch} and out_ch {out_ch} must be divisible by "
                             f"groups * parts = {groups * parts}")
        check_odd(kernel_size)
        k, d, r = kernel_size, dilation, kernel_size // 2
        self.groups = groups
        self.grouped = nn.Conv2d(in_ch, out_ch, k, stride, d * r, d, groups * parts, bias=bias)
        self.shifted = nn.Conv2d(in_ch, out_ch, k, stride, 2 * d * r, 2 * d, groups * parts,
                                 bias=bias)
        self.dense = nn.Conv2d(in_ch, out_ch, k, stride, r, 1, groups, bias=bias)
        mask = poly_scale_mask(out_ch, in_ch, k, parts, groups)
        with torch.no_grad():
            self.dense.weight.mul_(mask)
        parametrize.register_parametrization(self.dense, "weight", BlockMask(mask))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(x) + self.shifted(swap_halves(x, self.groups)) + self.dense(x)
