"""ExpandNets (Guo, Alvarez & Salzmann, "ExpandNets: Linear Over-parameterization to Train
Compact Convolutional Networks", NeurIPS 2020): a compact KxK conv trained as a chain of linear
convs with no nonlinearity between them, and the paper's CIFAR SmallNet. Nothing here folds
anything.

Padding: a chain is exactly one conv only when all of the compact conv's padding sits on the
*first* conv of the chain and the others pad nothing. Then every conv after the first reads
values computed from the padded input (a biased first conv carries its bias into the border
too, as the compact conv's bias does), so the chain is a plain composition of linear maps. With
padding on every conv of the chain, the inner convs read zeros at the border that the compact
conv never sees, and the fold is wrong there (the inner values are not zero).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._layers import check_odd


class _Expansion(nn.Sequential):
    """A chain of linear convs standing for one compact KxK conv ``in_ch -> out_ch``; the
    subclass lays the convs out (``padding`` defaults to K//2, the wide widths to ``rate``
    times the ends)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        rate: int = 4,
        stride: int = 1,
        padding: int | None = None,
        *,
        wide_in: int | None = None,
        wide_out: int | None = None,
    ) -> None:
        check_odd(kernel_size)
        p = kernel_size // 2 if padding is None else padding
        a = rate * in_ch if wide_in is None else wide_in
        b = rate * out_ch if wide_out is None else wide_out
        super().__init__(self.layers(in_ch, out_ch, kernel_size, stride, p, a, b))

    @staticmethod
    def layers(in_ch: int, out_ch: int, kernel_size: int, stride: int, padding: int,
               wide_in: int, wide_out: int) -> OrderedDict[str, nn.Module]:
        raise NotImplementedError


class ExpandCL(_Expansion):
    """Expand-CL: a KxK conv ``in_ch -> out_ch`` trained as ``expand`` (1x1, ``in_ch ->
    wide_in``), ``spatial`` (KxK, ``wide_in -> wide_out``), ``contract`` (1x1, ``wide_out ->
    out_ch``), all linear, each with a bias; ``wide_in = rate * in_ch`` and
    ``wide_out = rate * out_ch`` unless given (the paper's code keeps ``wide_in = 3`` on the RGB
    input). ``padding`` (default "same", K//2) is applied by the first 1x1, ``stride`` by the KxK.

    Deploy form: the compact ``nn.Conv2d(in_ch, out_ch, K, stride, padding, bias=True)``; exact,
    as all the padding is on the first conv.
    """

    @staticmethod
    def layers(in_ch: int, out_ch: int, kernel_size: int, stride: int, padding: int,
               wide_in: int, wide_out: int) -> OrderedDict[str, nn.Module]:
        return OrderedDict(expand=nn.Conv2d(in_ch, wide_in, 1, padding=padding),
                           spatial=nn.Conv2d(wide_in, wide_out, kernel_size, stride),
                           contract=nn.Conv2d(wide_out, out_ch, 1))


class ExpandCK(_Expansion):
    """Expand-CK: a KxK conv (K = 2l + 1 >= 5) trained as ``l`` linear 3x3 convs ``conv0`` ..,
    each with a bias (5x5 -> two 3x3, 7x7 -> three 3x3). Widths: ``in_ch -> wide_in -> wide_out
    -> ... -> wide_out -> out_ch`` with ``wide_in = rate * in_ch`` and ``wide_out = rate *
    out_ch`` unless given (for l = 2: ``in_ch -> wide_in -> out_ch``). All of ``padding``
    (default "same", K//2) is applied by the first 3x3 (the others pad nothing) and ``stride`` by
    the last one.

    Deploy form: the compact ``nn.Conv2d(in_ch, out_ch, K, stride, padding, bias=True)``; exact,
    as all the padding is on the first conv and the stride on the last.
    """

    @staticmethod
    def layers(in_ch: int, out_ch: int, kernel_size: int, stride: int, padding: int,
               wide_in: int, wide_out: int) -> OrderedDict[str, nn.Module]:
        if kernel_size < 5:
            raise ValueError(f"Expand-CK replaces a kernel of 5 or more by 3x3 convs, got "
                             f"{kernel_size}")
        n = kernel_size // 2
        widths = [in_ch, wide_in] + [wide_out] * (n - 2) + [out_ch]
        return OrderedDict(
            (f"conv{i}", nn.Conv2d(widths[i], widths[i + 1], 3, stride if i == n - 1 else 1,
                                   padding if i == 0 else 0))
            for i in range(n))


class SmallNet(nn.Module):
    """The paper's CIFAR SmallNet: three ``conv -> BN -> ReLU -> 2x2 max pool`` stages of 8, 16,
    32 channels, then ``fc1`` (to 64) -> ReLU -> ``fc2``. Each conv is a plain KxK conv with a
    bias (``expand=None``), an ``ExpandCL`` or an ``ExpandCK`` (rate ``rate``; the first one keeps
    3 channels on its RGB side, as the authors' code). Padding K//2 for K = 7, none for K = 3
    (the authors' two SmallNets), so a 32x32 input gives 4x4 or 2x2 maps.
    """

    def __init__(self, kernel_size: int = 7, expand: str | None = None, rate: int = 4,
                 num_classes: int = 10, in_ch: int = 3) -> None:
        super().__init__()
        if expand not in (None, "cl", "ck"):
            raise ValueError(f"expand must be None, 'cl' or 'ck', got {expand!r}")
        k = kernel_size
        p = k // 2 if k > 3 else 0
        ch = in_ch
        for i, width in enumerate((8, 16, 32), 1):
            wide = in_ch if i == 1 else None
            if expand == "cl":
                conv: nn.Module = ExpandCL(ch, width, k, rate, 1, p, wide_in=wide)
            elif expand == "ck":
                conv = ExpandCK(ch, width, k, rate, 1, p, wide_in=wide)
            else:
                conv = nn.Conv2d(ch, width, k, 1, p)
            self.add_module(f"stage{i}", nn.Sequential(OrderedDict(
                conv=conv, bn=nn.BatchNorm2d(width), act=nn.ReLU(), pool=nn.MaxPool2d(2))))
            ch = width
        side = 4 if p else 2
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(32 * side * side, 64)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc2(self.act(self.fc1(self.flatten(x))))


def smallnet(kernel_size: int = 7, expand: str | None = None, rate: int = 4,
             num_classes: int = 10) -> SmallNet:
    """The paper's SmallNet with ``kernel_size`` 7 or 3, optionally expanded (``"cl"`` or
    ``"ck"``, CK for 7 only). 7x7: 66,186 compact parameters, Expand-CL 547,102, Expand-CK
    186,982; 3x3: 15,050 compact, Expand-CL 109,086 (10 classes)."""
    if kernel_size not in (3, 7):
        raise ValueError(f"the paper's SmallNets have 3x3 or 7x7 kernels, got {kernel_size}")
    return SmallNet(kernel_size, expand, rate, num_classes)
