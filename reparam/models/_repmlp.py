"""RepMLP (Ding et al., "RepMLP: Re-parameterizing Convolutions into Fully-connected Layers for
Image Recognition", 2021) and RepMLPNet (Ding et al., "RepMLPNet: Hierarchical Vision MLP with
Re-parameterized Locality", CVPR 2022).

A feature map is cut into h x w patches by reshape and permute; a fully-connected layer (a
grouped 1x1 conv over the flattened patch) mixes each patch, and conv+BN branches on the same
patches ("local perceptron") add their outputs to the FC's. The convs fold into the FC: a conv on
an h x w patch is the FC whose matrix is the conv applied to the identity basis. Nothing here
folds anything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import conv_bn


def partition(x: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    """``(N, C, H, W) -> (N, H/h, W/w, C, h, w)``: the patches, by reshape and permute."""
    h_parts, w_parts = x.size(2) // h, x.size(3) // w
    return x.reshape(-1, channels, h_parts, h, w_parts, w).permute(0, 2, 4, 1, 3, 5)


def merge(patches: torch.Tensor, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """``(M, H/h, W/w, C', h, w) -> shape``: permute the patches back and reshape to ``shape``
    (a tuple, or an input's ``size()`` read at run time)."""
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(shape)


def _local_branches(kernels: Sequence[int], in_ch: int, out_ch: int, groups: int) -> nn.ModuleDict:
    for k in kernels:
        if k < 1 or k % 2 == 0:
            raise ValueError(f"local perceptron kernels must be odd, got {k}")
    return nn.ModuleDict(
        {f"conv{k}": conv_bn(in_ch, out_ch, k, 1, k // 2, groups) for k in kernels})


def _sum_of(branches: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    """The sum of every branch applied to ``x`` (at least one branch)."""
    outputs = [branch(x) for branch in branches.values()]
    total = outputs[0]
    for y in outputs[1:]:
        total = total + y
    return total


def _check_patches(size: int, patch: int, axis: str) -> None:
    if size % patch:
        raise ValueError(f"the map's {axis} ({size}) must be a multiple of the patch's ({patch})")


class RepMLPUnit(nn.Module):
    """The RepMLP module of the RepMLP paper, on a fixed ``C x H x W`` map cut into ``h x w``
    patches (``O`` output channels).

    * Global perceptron (only when the map holds more than one patch): ``avg`` (an h x w average
        pool with stride h x w, then BN over C), flattened to ``C * (H/h) * (W/w)``, then
        ``fc1`` -> ReLU -> ``fc2`` (linears, width divided by ``fc1_fc2_reduction``); the result
        is added to every pixel of its patch.
    * Partition perceptron: each patch flattened to ``C*h*w`` values feeds ``fc3``, a 1x1
        ``Conv2d(C*h*w, O*h*w, groups=fc3_groups, bias=False)`` (orthogonal init), then
        ``fc3_bn``, a ``BatchNorm1d(O*h*w)``.
    * Local perceptron: for each ``k`` of ``reparam_conv_k``, a KxK conv (padding k//2,
        ``groups=fc3_groups``) + BN on the ``(N*H/h*W/w, C, h, w)`` patches; the outputs are
        added to the FC's. Then the patches are merged back to ``(N, O, H, W)``.

    Deploy form: ``fc3`` with a bias, holding ``fc3_bn`` and every local conv+BN (each the FC
    of its response to the identity basis of ``C*h*w``; exact as each conv reads only its
    patch, with zero padding at the patch border); the ``avg`` BN folds into ``fc1``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        H: int,
        W: int,
        h: int,
        w: int,
        reparam_conv_k: Sequence[int] = (1, 3, 5),
        fc1_fc2_reduction: int = 1,
        fc3_groups: int = 1,
    ) -> None:
        super().__init__()
        _check_patches(H, h, "height")
        _check_patches(W, w, "width")
        if in_ch % fc3_groups or out_ch % fc3_groups:
            raise ValueError(f"channels {in_ch}, {out_ch} must be divisible by fc3_groups "
                             f"{fc3_groups}")
        self.in_ch, self.out_ch = in_ch, out_ch
        self.H, self.W, self.h, self.w = H, W, h, w
        self.h_parts, self.w_parts = H // h, W // w
        if (H, W) != (h, w):
            pooled = in_ch * self.h_parts * self.w_parts
            hidden = pooled // fc1_fc2_reduction
            self.avg = nn.Sequential(OrderedDict(pool=nn.AvgPool2d((h, w)),
                                                 bn=nn.BatchNorm2d(in_ch)))
            self.fc1_fc2 = nn.Sequential(OrderedDict(fc1=nn.Linear(pooled, hidden),
                                                     act=nn.ReLU(),
                                                     fc2=nn.Linear(hidden, pooled)))
        else:
            self.avg = self.fc1_fc2 = None
        self.fc3 = nn.Conv2d(in_ch * h * w, out_ch * h * w, 1, groups=fc3_groups, bias=False)
        nn.init.orthogonal_(self.fc3.weight)
        self.fc3_bn = nn.BatchNorm1d(out_ch * h * w)
        self.local = _local_branches(reparam_conv_k, in_ch, out_ch, fc3_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w, hp, wp = self.in_ch, self.h, self.w, self.h_parts, self.w_parts
        grid = x.reshape(-1, c, hp, h, wp, w)
        if self.avg is not None:
            v = self.fc1_fc2(self.avg(x).reshape(-1, c * hp * wp))
            grid = grid + v.reshape(-1, c, hp, 1, wp, 1)
        patches = grid.permute(0, 2, 4, 1, 3, 5)  # N, H/h, W/w, C, h, w
        o = self.out_ch
        y = self.fc3(patches.reshape(-1, c * h * w, 1, 1))
        y = self.fc3_bn(y.reshape(-1, o * h * w)).reshape(-1, hp, wp, o, h, w)
        if len(self.local):
            tiles = patches.reshape(-1, c, h, w)
            y = y + _sum_of(self.local, tiles).reshape(-1, hp, wp, o, h, w)
        return merge(y, (-1, o, self.H, self.W))


class GlobalPerceptron(nn.Module):
    """RepMLPNet's channel gate: ``sigmoid(fc2(relu(fc1(mean over H, W))))`` with 1x1 convs
    (biases) and ``channels // reduction`` hidden units; returns the ``(N, C, 1, 1)`` gate."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, (1, 1)))))
        return torch.sigmoid(v).reshape(-1, self.channels, 1, 1)


class RepMLPBlock(nn.Module):
    """RepMLPNet's RepMLP block on ``channels`` (in = out) with ``h x w`` patches and
    ``num_sharesets`` (S) share-sets; the map size is read from the input at run time.

    * ``gp``: a ``GlobalPerceptron`` gate that multiplies the output.
    * ``fc3``: the channels of every patch are cut into groups of S consecutive channels, each
        flattened to ``S*h*w`` values, through a 1x1 ``Conv2d(S*h*w, S*h*w, groups=S,
        bias=False)`` (each share-set channel has its own h*w x h*w matrix, shared by all C/S
        groups), reshaped to ``(-1, S, h, w)``, then ``fc3_bn`` (``BatchNorm2d(S)``).
    * ``local``: for each ``k`` of ``reparam_conv_k``, a depthwise KxK conv (``groups=S``) + BN
        on the same ``(-1, S, h, w)`` tiles, added to the FC's output.

    The outputs are reshaped to ``(-1, H/h, W/w, S, h, w)`` and permuted back as the authors'
    code does; with more channels than share-sets (C > S) that reshape lays the C/S groups out in
    a fixed interleaved order, a permutation that the FC and the convs share.

    Deploy form: ``fc3`` with a bias of ``S*h*w``, holding ``fc3_bn`` and every local conv+BN
    (exact as each conv reads only its tile). The gate is not linear and stays.
    """

    def __init__(
        self,
        channels: int,
        h: int,
        w: int,
        reparam_conv_k: Sequence[int] = (1, 3),
        globalperceptron_reduce: int = 4,
        num_sharesets: int = 1,
    ) -> None:
        super().__init__()
        if channels % num_sharesets:
            raise ValueError(f"channels {channels} must be divisible by num_sharesets "
                             f"{num_sharesets}")
        self.channels, self.h, self.w, self.S = channels, h, w, num_sharesets
        s = num_sharesets
        self.gp = GlobalPerceptron(channels, globalperceptron_reduce)
        self.fc3 = nn.Conv2d(s * h * w, s * h * w, 1, groups=s, bias=False)
        self.fc3_bn = nn.BatchNorm2d(s)
        self.local = _local_branches(reparam_conv_k, s, s, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gp(x)
        s, h, w = self.S, self.h, self.w
        h_parts, w_parts = x.size(2) // h, x.size(3) // w
        patches = partition(x, self.channels, h, w)
        y = self.fc3(patches.reshape(-1, s * h * w, 1, 1))
        y = self.fc3_bn(y.reshape(-1, s, h, w)).reshape(-1, h_parts, w_parts, s, h, w)
        if len(self.local):
            tiles = patches.reshape(-1, s, h, w)
            y = y + _sum_of(self.local, tiles).reshape(-1, h_parts, w_parts, s, h, w)
        return merge(y, x.size()) * gate


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(in_ch, out_ch, kernel_size, stride,
                                                    bias=False),
                                     bn=nn.BatchNorm2d(out_ch), act=nn.ReLU()))


class FFNBlock(nn.Module):
    """``conv_bn(1x1, C -> eC)``, GELU, ``conv_bn(1x1, eC -> C)``."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        self.fc1 = conv_bn(channels, channels * expand, 1)
        self.act = nn.GELU()
        self.fc2 = conv_bn(channels * expand, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RepMLPNetUnit(nn.Module):
    """``y = x + repmlp(prebn1(x))``, then ``y + ffn(prebn2(y))``."""

    def __init__(self, channels: int, h: int, w: int, reparam_conv_k: Sequence[int],
                 globalperceptron_reduce: int, num_sharesets: int, ffn_expand: int = 4) -> None:
        super().__init__()
        self.prebn1 = nn.BatchNorm2d(channels)
        self.repmlp = RepMLPBlock(channels, h, w, reparam_conv_k, globalperceptron_reduce,
                                  num_sharesets)
        self.prebn2 = nn.BatchNorm2d(channels)
        self.ffn = FFNBlock(channels, ffn_expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.repmlp(self.prebn1(x))
        return y + self.ffn(self.prebn2(y))


class RepMLPNet(nn.Module):
    """RepMLPNet: a ``patch_size`` stride-``patch_size`` conv+BN+ReLU embedding, then stages of
    ``RepMLPNetUnit`` (stage i: ``channels[i]``, patches ``hs[i] x ws[i]``,
    ``sharesets_nums[i]`` share-sets) joined by 2x2 stride-2 conv+BN+ReLU embeddings, then BN,
    global average pooling, flatten and a linear classifier. The input's map size at stage i
    must be a multiple of ``hs[i] x ws[i]`` (224 input: 56, 28, 14, 7 for ``patch_size=4``).
    """

    def __init__(
        self,
        channels: Sequence[int] = (64, 128, 256, 512),
        hs: Sequence[int] = (56, 28, 14, 7),
        ws: Sequence[int] = (56, 28, 14, 7),
        num_blocks: Sequence[int] = (2, 2, 6, 2),
        sharesets_nums: Sequence[int] = (1, 4, 16, 128),
        reparam_conv_k: Sequence[int] = (1, 3),
        globalperceptron_reduce: int = 4,
        patch_size: int = 4,
        num_classes: int = 1000,
        in_ch: int = 3,
    ) -> None:
        super().__init__()
        n = len(channels)
        if not len(hs) == len(ws) == len(num_blocks) == len(sharesets_nums) == n:
            raise ValueError("give channels, hs, ws, num_blocks and sharesets_nums per stage")
        self.embedding = _conv_bn_relu(in_ch, channels[0], patch_size, patch_size)
        self.stages = nn.ModuleList(
            nn.Sequential(*(RepMLPNetUnit(channels[i], hs[i], ws[i], reparam_conv_k,
                                          globalperceptron_reduce, sharesets_nums[i])
                            for _ in range(num_blocks[i])))
            for i in range(n))
        self.downsamples = nn.ModuleList(
            _conv_bn_relu(channels[i], channels[i + 1], 2, 2) for i in range(n - 1))
        self.head_norm = nn.BatchNorm2d(channels[-1])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embedding(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        return self.head(self.flatten(self.pool(self.head_norm(x))))


def _repmlpnet(channels, res, blocks, sharesets, num_classes) -> RepMLPNet:
    hs = tuple(res // 4 // 2**i for i in range(4))
    return RepMLPNet(channels, hs, hs, blocks, sharesets, (1, 3), num_classes=num_classes)


def repmlpnet_t224(num_classes: int = 1000) -> RepMLPNet:
    """RepMLPNet-T224 (the smallest): channels 64-512, blocks 2, 2, 6, 2, share-sets 1, 4, 16,
    128, patches 56, 28, 14, 7 (224 input). 38,293,608 training parameters (38.3M)."""
    return _repmlpnet((64, 128, 256, 512), 224, (2, 2, 6, 2), (1, 4, 16, 128), num_classes)


def repmlpnet_t256(num_classes: int = 1000) -> RepMLPNet:
    """RepMLPNet-T256: T224's widths, patches 64, 32, 16, 8 (256 input). 58.7M training."""
    return _repmlpnet((64, 128, 256, 512), 256, (2, 2, 6, 2), (1, 4, 16, 128), num_classes)


def repmlpnet_b224(num_classes: int = 1000) -> RepMLPNet:
    """RepMLPNet-B224: channels 96-768, blocks 2, 2, 12, 2, share-sets 1, 4, 32, 128. 68.2M."""
    return _repmlpnet((96, 192, 384, 768), 224, (2, 2, 12, 2), (1, 4, 32, 128), num_classes)


def repmlpnet_b256(num_classes: int = 1000) -> RepMLPNet:
    """RepMLPNet-B256: B224's widths at 256 input. 96.5M training parameters."""
    return _repmlpnet((96, 192, 384, 768), 256, (2, 2, 12, 2), (1, 4, 32, 128), num_classes)


def repmlpnet_d256(num_classes: int = 1000) -> RepMLPNet:
    """RepMLPNet-D256: channels 80-640, blocks 2, 2, 18, 2, share-sets 1, 4, 16, 128. 86.9M."""
    return _repmlpnet((80, 160, 320, 640), 256, (2, 2, 18, 2), (1, 4, 16, 128), num_classes)


def repmlpnet_l256(num_classes: int = 1000) -> RepMLPNet:
    """RepMLPNet-L256: channels 96-768, blocks 2, 2, 18, 2, share-sets 1, 4, 32, 256. 117.6M."""
    return _repmlpnet((96, 192, 384, 768), 256, (2, 2, 18, 2), (1, 4, 32, 256), num_classes)
