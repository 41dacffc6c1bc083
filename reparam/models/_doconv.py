"""DO-Conv (Cao et al., "DO-Conv: Depthwise Over-parameterized Convolutional Layer", TIP 2022).

A DO-Conv layer holds a depthwise kernel ``D`` and a conventional kernel ``W`` and convolves
with their composition ``W' = D o W``, computed in every forward. Nothing here folds anything.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class DOConv2d(nn.Module):
    """Depthwise over-parameterized conv: ``conv2d(x, D o W)`` with an M x N kernel.

    ``D`` has shape ``(in_ch, M*N, D_mul)``: for each input channel ``c`` a matrix mapping the
    ``D_mul`` channels of ``W`` to the ``M*N`` spatial taps. ``W`` has shape
    ``(out_ch, in_ch / groups, D_mul)``. The composed kernel is
    ``W'[o, i, m] = sum_s D[c(o, i), m, s] * W[o, i, s]``, reshaped to
    ``(out_ch, in_ch / groups, M, N)``, where ``c(o, i)`` is the input channel that output
    ``o`` reads as its ``i``-th one (its group's ``i``-th channel). ``D`` starts as the identity
    (``D[c, m, m] = 1``, zero in the columns beyond ``M*N``), so training starts from the plain
    conv with kernel ``W[..., :M*N]``. ``D_mul`` (the depth multiplier) must be at least ``M*N``
    and defaults to it; a 1x1 kernel has no ``D`` (``W'`` is ``W``). ``groups=in_ch`` gives
    DO-DConv (see ``DODConv2d``), other ``groups`` DO-GConv.

    Deploy form: one ``nn.Conv2d`` with the same geometry and the kernel ``W'``; exact, as
    ``W'`` depends on the parameters alone.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: Pair,
        D_mul: int | None = None,
        stride: Pair = 1,
        padding: Pair = 0,
        dilation: Pair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"in_ch {in_ch} and out_ch {out_ch} must be divisible by groups "
                             f"{groups}")
        self.in_ch, self.out_ch, self.groups = in_ch, out_ch, groups
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        taps = self.kernel_size[0] * self.kernel_size[1]
        d_mul = taps if D_mul is None or taps == 1 else D_mul
        if d_mul < taps:
            raise ValueError(f"D_mul must be at least M*N = {taps} (the paper's condition for "
                             f"over-parameterization), got {D_mul}")
        self.D_mul = d_mul
        self.W = nn.Parameter(torch.empty(out_ch, in_ch // groups, d_mul))
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))
        if taps > 1:
            identity = torch.zeros(in_ch, taps, d_mul)
            identity[:, range(taps), range(taps)] = 1.0
            self.D = nn.Parameter(identity)
        else:
            self.register_parameter("D", None)
        if bias:
            bound = 1 / math.sqrt((in_ch // groups) * d_mul)
            self.bias = nn.Parameter(torch.empty(out_ch).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def composed_weight(self) -> torch.Tensor:
        """``W' = D o W`` as an ``(out_ch, in_ch / groups, M, N)`` conv kernel."""
        shape = (self.out_ch, self.in_ch // self.groups, *self.kernel_size)
        if self.D is None:
            return self.W.reshape(shape)
        g, taps = self.groups, self.kernel_size[0] * self.kernel_size[1]
        d = self.D.reshape(g, self.in_ch // g, taps, self.D_mul)
        w = self.W.reshape(g, self.out_ch // g, self.in_ch // g, self.D_mul)
        return torch.einsum("gims,gois->goim", d, w).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.composed_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_ch}, {self.out_ch}, kernel_size={self.kernel_size}, D_mul={self.D_mul}"
                f", stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class DODConv2d(DOConv2d):
    """DO-DConv: a depthwise over-parameterized *depthwise* conv, ``DOConv2d`` with
    ``groups = channels`` and ``channels * multiplier`` outputs.

    Each output channel ``o`` reads input channel ``o // multiplier`` through its own
    ``D[o // multiplier] o W[o]``. Deploy form: one depthwise ``nn.Conv2d`` of the same geometry.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: Pair,
        D_mul: int | None = None,
        stride: Pair = 1,
        padding: Pair = 0,
        dilation: Pair = 1,
        multiplier: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(channels, channels * multiplier, kernel_size, D_mul, stride, padding,
                         dilation, channels, bias)
