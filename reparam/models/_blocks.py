"""Training-time multi-branch blocks (RepVGG, ACNet, DBB, MobileOne).

Each block is written exactly as its paper draws it, with every branch a plain module call, so
that ``torch.fx`` traces it and ``reparam.fold`` can recognise it. The blocks carry no fold code.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._layers import (
    AVG_POOL,
    SqueezeExcite,
    ZeroPad,
    batch_norm,
    check_dims,
    check_odd,
    conv,
    conv_bn,
)


class RepVGGBlock(nn.Module):
    """RepVGG: ``relu(se?(KxK conv+BN  +  1x1 conv+BN  +  BN identity))``.

    The identity branch exists only when ``in_ch == out_ch`` and ``stride == 1``; the optional
    squeeze-and-excite gate sits after the sum and before the ReLU and is not folded.
    Branches: ``square`` (KxK, padding K//2), ``point`` (1x1, padding 0, same stride and groups),
    ``identity`` (a BN, or ``None``).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        use_se: bool = False,
        *,
        dims: int = 2,
    ) -> None:
        super().__init__()
        check_dims(dims)
        check_odd(kernel_size)
        k = kernel_size
        self.square = conv_bn(in_ch, out_ch, k, stride, k // 2, groups, dims=dims)
        self.point = conv_bn(in_ch, out_ch, 1, stride, 0, groups, dims=dims)
        self.identity = batch_norm(in_ch, dims=dims) if in_ch == out_ch and stride == 1 else None
        self.se = SqueezeExcite(out_ch, dims=dims) if use_se else None
        self.act = nn.ReLU()

    def branches(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of the branches (before the SE gate and the ReLU)."""
        y = self.square(x) + self.point(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches(x)
        if self.se is not None:
            y = self.se(y)
        return self.act(y)


_AXIS_NAMES: dict[int, tuple[str, ...]] = {2: ("ver", "hor"), 3: ("depth", "ver", "hor")}


class ACBlock(nn.Module):
    """ACNet asymmetric convolution block: ``KxK conv+BN  +  Kx1 conv+BN  +  1xK conv+BN``.

    No activation inside. Branches: ``square`` (KxK), ``ver`` (Kx1, padding ``(p, p - K//2)``) and
    ``hor`` (1xK, padding ``(p - K//2, p)``), where ``p`` is the square's padding (default K//2).
    With ``dims=3`` there is one such branch per axis: ``depth`` (Kx1x1), ``ver``, ``hor``.

    For ``p < K//2`` (the ACNet code's "negative padding") the asymmetric branches pad nothing
    across their kernel and read a crop of the input instead: ``ver`` (padding ``(p, 0)``) reads
    ``x[..., c:-c]``, ``hor`` (padding ``(0, p)``) reads ``x[:, :, c:-c, :]``, with
    ``c = K//2 - p`` (``crop``; in 3-d each branch crops both axes across its kernel). Deploy
    form, either way: one KxK conv with padding ``p``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        padding: int | None = None,
        *,
        dims: int = 2,
    ) -> None:
        super().__init__()
        check_dims(dims, (2, 3))
        check_odd(kernel_size)
        k, p = kernel_size, kernel_size // 2 if padding is None else padding
        if p < 0:
            raise ValueError(f"ACBlock needs padding >= 0, got padding={p}")
        self.crop = max(0, k // 2 - p)
        self.square = conv_bn(in_ch, out_ch, k, stride, p, groups, dims=dims)
        self.axis_names = _AXIS_NAMES[dims]
        for axis, name in enumerate(self.axis_names):
            shape = tuple(k if a == axis else 1 for a in range(dims))
            pads = tuple(p if a == axis else max(0, p - k // 2) for a in range(dims))
            self.add_module(name, conv_bn(in_ch, out_ch, shape, stride, pads, groups, dims=dims))

    def cropped(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """``x`` cut by ``crop`` on both sides of every spatial axis but ``axis``."""
        if not self.crop:
            return x
        c, dims = self.crop, len(self.axis_names)
        return x[(slice(None), slice(None)) +
                 tuple(slice(None) if a == axis else slice(c, -c) for a in range(dims))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.square(x)
        for axis, name in enumerate(self.axis_names):
            y = y + getattr(self, name)(self.cropped(x, axis))
        return y


class DBBlock(nn.Module):
    """Diverse Branch Block: four branches, each ending in a BN, summed; no activation inside.

    ``square``: KxK conv+BN. ``point``: 1x1 conv+BN, only when ``groups < out_ch``.
    ``avg``: 1x1 conv, zero pad, BN, KxK average pool (``stride``, padding 0), BN.
    ``seq``: 1x1 conv to ``internal_ch``, zero pad, BN, KxK conv+BN (``stride``, padding 0).

    The paper's "BN and pad" layer fills the padding of the KxK op with the BN's own output at
    zero; ``BN(pad(y))`` is that value exactly and traces as ``F.pad`` then a BN module.
    ``internal_ch`` defaults to ``in_ch`` as in the paper (it sets the internal channels of the
    1x1-KxK branch equal to the input channels); both 1x1 convs of ``avg``/``seq`` use ``groups``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        internal_ch: int | None = None,
        dims: int = 2,
    ) -> None:
        super().__init__()
        check_dims(dims)
        check_odd(kernel_size)
        k, p = kernel_size, kernel_size // 2
        mid = in_ch if internal_ch is None else internal_ch
        self.square = conv_bn(in_ch, out_ch, k, stride, p, groups, dims=dims)
        self.point = (
            conv_bn(in_ch, out_ch, 1, stride, 0, groups, dims=dims) if groups < out_ch else None
        )
        self.avg = nn.Sequential(
            OrderedDict(
                conv=conv(in_ch, out_ch, 1, groups=groups, dims=dims),
                pad=ZeroPad(p, dims),
                bn=batch_norm(out_ch, dims=dims),
                pool=AVG_POOL[dims](k, stride, 0),
                bn_pool=batch_norm(out_ch, dims=dims),
            )
        )
        self.seq = nn.Sequential(
            OrderedDict(
                conv=conv(in_ch, mid, 1, groups=groups, dims=dims),
                pad=ZeroPad(p, dims),
                bn=batch_norm(mid, dims=dims),
                square=conv_bn(mid, out_ch, k, stride, 0, groups, dims=dims),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.square(x)
        if self.point is not None:
            y = y + self.point(x)
        return y + self.avg(x) + self.seq(x)


class MobileOneBlock(nn.Module):
    """MobileOne: ``relu(se?(k x (KxK conv+BN)  +  1x1 conv+BN  +  BN identity))``.

    Branches: ``convs`` (``num_branches`` parallel KxK conv+BN), ``scale`` (1x1 conv+BN, only
    when ``kernel_size > 1``), ``identity`` (a BN, only when ``in_ch == out_ch`` and
    ``stride == 1``). A MobileOne stage alternates a depthwise KxK block (``groups=in_ch``) and a
    pointwise 1x1 block. The optional squeeze-and-excite gate is not folded.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 1,
        use_se: bool = False,
        *,
        dims: int = 2,
    ) -> None:
        super().__init__()
        check_dims(dims)
        check_odd(kernel_size)
        if num_branches < 1:
            raise ValueError(f"num_branches must be at least 1, got {num_branches!r}")
        k = kernel_size
        self.convs = nn.ModuleList(
            conv_bn(in_ch, out_ch, k, stride, k // 2, groups, dims=dims)
            for _ in range(num_branches)
        )
        self.scale = conv_bn(in_ch, out_ch, 1, stride, 0, groups, dims=dims) if k > 1 else None
        self.identity = batch_norm(in_ch, dims=dims) if in_ch == out_ch and stride == 1 else None
        self.se = SqueezeExcite(out_ch, dims=dims) if use_se else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs[0](x)
        for branch in self.convs[1:]:
            y = y + branch(x)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.identity is not None:
            y = y + self.identity(x)
        if self.se is not None:
            y = self.se(y)
        return self.act(y)
