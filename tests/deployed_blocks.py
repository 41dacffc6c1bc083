"""Small blocks written the way deployed re-parameterizable code writes them.

Each block imitates the *style* of one project that people deploy (the official DBB, OREPA, ECBSR,
Ultralytics YOLO, YOLOv7): slice assignment into padded tensors, kernels generated in forward from
several parameter tensors, ``int(t.size(0) / groups)`` arithmetic, ``list(x.chunk(2, 1))``,
forwards that switch on ``self.training``, ``get_device()``, an ``nn.Sequential`` routed by its
parent through ``f`` / ``i`` attributes, heads with shape-dependent Python. No model built from
them traces with ``torch.fx.symbolic_trace`` (small parts such as ``ConvNormAct`` do). The code
is our own, written for the tests; each docstring says which project writes it this way and
what its deploy form is. ``tests/test_deployed.py`` checks that each block computes what its
docstring claims, and what ``reparam.fold`` must make of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --- the official DBB (and OREPA's copy of it): BN-and-pad by slice assignment ----------------


class BorderFilledBN(nn.Module):
    """``bn(x)`` zero-padded by ``pad`` pixels, the border then overwritten with the BN's output at
    zero, ``beta - mean * gamma / sqrt(var + eps)``, by four slice assignments.

    The official DBB writes its BN-and-pad layer this way. It equals ``bn(F.pad(x, [pad] * 4))``,
    so a following *unpadded* KxK conv reads exactly what the same conv with zero padding would
    read of the BN's input: the pair (and the 1x1 before it) folds into one padded KxK conv.
    """

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        if self.pad == 0:
            return out
        bn, p = self.bn, self.pad
        at_zero = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(
            bn.running_var + bn.eps)
        at_zero = at_zero.view(1, -1, 1, 1)
        out = F.pad(out, [p, p, p, p])
        out[:, :, 0:p, :] = at_zero
        out[:, :, -p:, :] = at_zero
        out[:, :, :, 0:p] = at_zero
        out[:, :, :, -p:] = at_zero
        return out


class ShiftedIdentityConv1x1(nn.Conv2d):
    """A 1x1 conv whose effective weight is ``weight + I`` (``I`` the grouped Dirac kernel).

    The official DBB's first conv of its 1x1 -> KxK branch: an ``nn.Conv2d`` subclass whose own
    forward adds an identity tensor kept as a plain attribute (not a buffer, so it is in no
    state_dict) and moved to the weight's device on every call. Deploy form: a 1x1 conv.
    """

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        per_group = channels // groups
        eye = torch.zeros(channels, per_group, 1, 1)
        for c in range(channels):
            eye[c, c % per_group, 0, 0] = 1.0
        self.eye = eye

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.weight + self.eye.to(self.weight.device)
        return F.conv2d(x, kernel, None, stride=1, padding=0, groups=self.groups)


class SliceAssignDBB(nn.Module):
    """Four branches summed with in-place ``+=``, in the official DBB's manner: KxK conv + BN;
    1x1 conv + BN; 1x1 conv -> :class:`BorderFilledBN` -> KxK average pool (no padding) -> BN;
    ``weight + I`` 1x1 conv -> :class:`BorderFilledBN` -> unpadded KxK conv -> BN; then ``act``.

    Deploy form: one KxK conv (padding K // 2, with bias) followed by ``act``: the two
    BorderFilledBN layers are what makes the avg and 1x1 -> KxK branches exact as padded convs.
    """

    def __init__(self, cin: int, cout: int, k: int = 3, act: nn.Module | None = None) -> None:
        super().__init__()
        p = k // 2
        self.kxk = nn.Sequential(nn.Conv2d(cin, cout, k, padding=p, bias=False),
                                 nn.BatchNorm2d(cout))
        self.pointwise = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.avg = nn.Sequential()
        self.avg.add_module("conv", nn.Conv2d(cin, cout, 1, bias=False))
        self.avg.add_module("bn", BorderFilledBN(cout, p))
        self.avg.add_module("pool", nn.AvgPool2d(k, stride=1, padding=0))
        self.avg.add_module("avgbn", nn.BatchNorm2d(cout))
        self.seq = nn.Sequential()
        self.seq.add_module("idconv", ShiftedIdentityConv1x1(cin))
        self.seq.add_module("bn1", BorderFilledBN(cin, p))
        self.seq.add_module("conv2", nn.Conv2d(cin, cout, k, padding=0, bias=False))
        self.seq.add_module("bn2", nn.BatchNorm2d(cout))
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kxk(x)
        out += self.pointwise(x)
        out += self.avg(x)
        out += self.seq(x)
        return self.act(out)


# --- OREPA: the kernel generated in forward from several parameter tensors --------------------


def _cosine_prior(channels: int, k: int) -> torch.Tensor:
    """A fixed (channels, k, k) basis: cosines of increasing frequency along rows for the first
    half of the channels, along columns for the second half."""
    prior = torch.empty(channels, k, k)
    half = channels // 2
    rows = torch.arange(k, dtype=torch.float64).view(k, 1).expand(k, k)
    cols = rows.t()
    for c in range(channels):
        grid, freq = (rows, c + 1) if c < half else (cols, c + 1 - half)
        prior[c] = torch.cos(math.pi * (grid + 0.5) * freq / k).float()
    return prior


class GeneratedKernelConv(nn.Module):
    """``act(bn(conv(x, weight_gen())))`` where the kernel is built on every call from six
    parameter tensors, a learned per-channel mix ``vector`` and fixed buffers, as OREPA does:

    * ``w_origin`` (O, I/g, K, K), plain;
    * ``w_avg`` (O, I/g, 1, 1) spread over a K x K averaging mask (a buffer);
    * ``w_prior`` (O, I/g, 1, 1) times a fixed cosine basis (O, K, K) (a buffer);
    * ``w_point`` (O, I/g, 1, 1) zero-padded to K x K at the centre;
    * ``w_seq1 + I`` (I, I/g) composed with ``w_seq2`` (O, I/g, K, K) per group (1x1 -> KxK);
    * ``w_dw`` (I*e, 1, K, K) composed with ``w_pw`` (O, I*e/g, 1, 1) (depthwise -> pointwise);

    each scaled per output channel by a row of ``vector`` (einsums), the group arithmetic done on
    ``.size()`` with ``int(t / groups)`` as OREPA writes it. Deploy form: one KxK conv (groups g,
    padding K // 2, with bias) then ``act``; all the sources leave the model.
    """

    def __init__(self, cin: int, cout: int, k: int = 3, groups: int = 1, expand: int = 2,
                 act: nn.Module | None = None) -> None:
        super().__init__()
        self.cin, self.cout, self.k, self.groups = cin, cout, k, groups
        per_group = int(cin / groups)

        def param(*shape: int) -> nn.Parameter:
            w = torch.empty(*shape)
            nn.init.kaiming_uniform_(w, a=1.0)
            return nn.Parameter(w)

        self.w_origin = param(cout, per_group, k, k)
        self.w_avg = param(cout, per_group, 1, 1)
        self.register_buffer("avg_mask", torch.full((k, k), 1.0 / (k * k)))
        self.w_prior = param(cout, per_group, 1, 1)
        self.register_buffer("prior", _cosine_prior(cout, k))
        self.w_point = param(cout, per_group, 1, 1)
        self.w_seq1 = param(cin, per_group, 1, 1)
        eye = torch.zeros(cin, per_group, 1, 1)
        for c in range(cin):
            eye[c, c % per_group, 0, 0] = 1.0
        self.register_buffer("seq_eye", eye)
        self.w_seq2 = param(cout, per_group, k, k)
        self.w_dw = param(cin * expand, 1, k, k)
        self.w_pw = param(cout, int(cin * expand / groups), 1, 1)
        self.vector = nn.Parameter(torch.rand(6, cout) + 0.25)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act if act is not None else nn.Identity()

    def _seq_kernel(self) -> torch.Tensor:
        first = (self.w_seq1 + self.seq_eye).squeeze(3).squeeze(2)  # (T, I/g)
        second = self.w_seq2  # (O, T/g, K, K)
        g = self.groups
        t, ig = first.size()
        o, tg, h, w = second.size()
        first = first.view(g, int(t / g), ig)
        second = second.view(g, int(o / g), tg, h, w)
        return torch.einsum("gti,gothw->goihw", first, second).reshape(o, ig, h, w)

    def _separable_kernel(self) -> torch.Tensor:
        t, _, h, w = self.w_dw.size()
        o = self.w_pw.size(0)
        g = self.groups
        e = int(t / self.cin)
        dw = self.w_dw.view(g, int(self.cin / g), e, h, w)
        pw = self.w_pw.view(g, int(o / g), int(self.cin / g), e)
        return torch.einsum("giehw,goie->goihw", dw, pw).reshape(o, int(self.cin / g), h, w)

    def weight_gen(self) -> torch.Tensor:
        v = self.vector
        origin = torch.einsum("oihw,o->oihw", self.w_origin, v[0])
        avg = torch.einsum("oi,hw->oihw", self.w_avg.squeeze(3).squeeze(2), self.avg_mask)
        avg = torch.einsum("oihw,o->oihw", avg, v[1])
        prior = torch.einsum("oi,ohw->oihw", self.w_prior.squeeze(3).squeeze(2), self.prior)
        prior = torch.einsum("oihw,o->oihw", prior, v[2])
        p = self.k // 2
        point = torch.einsum("oihw,o->oihw", F.pad(self.w_point, [p, p, p, p]), v[3])
        seq = torch.einsum("oihw,o->oihw", self._seq_kernel(), v[4])
        separable = torch.einsum("oihw,o->oihw", self._separable_kernel(), v[5])
        return origin + avg + prior + point + seq + separable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_gen()
        out = F.conv2d(x, weight, None, stride=1, padding=self.k // 2, groups=self.groups)
        return self.act(self.bn(out))


# --- ECBSR: bias-filled padding, edge masks, a forward that switches on self.training ---------

EDGE_MASKS = {
    "sobel_x": ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0)),
    "sobel_y": ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0)),
    "laplacian": ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0)),
}


def _device_of(t: torch.Tensor) -> int | None:
    """``t.get_device()`` as ECBSR uses it: -1 (CPU) becomes ``None``."""
    index = t.get_device()
    return None if index < 0 else index


class BiasPaddedBranch(nn.Module):
    """A biased 1x1 conv, zero padding of 1 whose border is overwritten with that 1x1's bias by
    slice assignment, then an unpadded 3x3: a learned dense conv (``kind="conv"``) or a depthwise
    conv whose weight is ``scale * mask`` for a fixed edge mask (a buffer) plus a learned bias.

    ECBSR writes its sequential 1x1 -> 3x3 branches this way. Filling the border with the 1x1's
    bias makes the branch exactly one 3x3 conv of ``x`` with zero padding: :meth:`merged` returns
    it (kernel, bias), built the way ECBSR's deploy path does (a Python loop writing the diagonal
    of a zero tensor created on ``get_device()``'s device, einsums over the two kernels).
    """

    def __init__(self, kind: str, cin: int, cout: int, mid: int | None = None) -> None:
        super().__init__()
        self.kind, self.cout = kind, cout
        if kind == "conv":
            self.pw = nn.Conv2d(cin, mid or cout, 1)
            self.k3 = nn.Conv2d(mid or cout, cout, 3)
        else:
            self.pw = nn.Conv2d(cin, cout, 1)
            self.scale = nn.Parameter(torch.randn(cout, 1, 1, 1) * 0.5)
            self.bias = nn.Parameter(torch.randn(cout) * 0.1)
            mask = torch.tensor(EDGE_MASKS[kind]).view(1, 1, 3, 3).repeat(cout, 1, 1, 1)
            self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw(x)
        y = F.pad(y, (1, 1, 1, 1), "constant", 0)
        border = self.pw.bias.view(1, -1, 1, 1)
        y[:, :, 0:1, :] = border
        y[:, :, -1:, :] = border
        y[:, :, :, 0:1] = border
        y[:, :, :, -1:] = border
        if self.kind == "conv":
            return self.k3(y)
        return F.conv2d(y, self.scale * self.mask, self.bias, groups=self.cout)

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel (O, I, 3, 3), bias (O,)) of the one padded 3x3 conv this branch equals."""
        if self.kind == "conv":
            k3, b3 = self.k3.weight, self.k3.bias
        else:
            depthwise = self.scale * self.mask
            k3 = torch.zeros(self.cout, self.cout, 3, 3, device=_device_of(self.pw.weight),
                             dtype=depthwise.dtype)
            for c in range(self.cout):
                k3[c, c, :, :] = depthwise[c, 0, :, :]
            b3 = self.bias
        kernel = torch.einsum("omhw,mi->oihw", k3, self.pw.weight.flatten(1))
        bias = b3 + torch.einsum("omhw,m->o", k3, self.pw.bias)
        return kernel, bias


class EdgeBlock(nn.Module):
    """A padded 3x3 conv plus four :class:`BiasPaddedBranch` (a 1x1 -> 3x3 of ``mid_ratio``
    times the width, Sobel-x, Sobel-y, Laplacian), optionally plus the identity, then ``act``.

    As in ECBSR, the forward switches on ``self.training``: in training the branches run and are
    summed; in eval the merged kernel is rebuilt from the parameters on every call
    (:meth:`merged`, the identity kernel made on ``get_device()``'s device) and applied as one
    conv. Deploy form: one padded 3x3 conv (with bias) then ``act``.
    """

    def __init__(self, cin: int, cout: int, mid_ratio: float = 2.0, act: bool = True,
                 identity: bool = False) -> None:
        super().__init__()
        self.cin, self.cout = cin, cout
        self.identity = identity and cin == cout
        self.conv3x3 = nn.Conv2d(cin, cout, 3, padding=1)
        self.seq = BiasPaddedBranch("conv", cin, cout, mid=int(cout * mid_ratio))
        self.edges = nn.ModuleList(BiasPaddedBranch(kind, cin, cout) for kind in EDGE_MASKS)
        self.act = nn.PReLU(cout) if act else nn.Identity()

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = self.conv3x3.weight, self.conv3x3.bias
        for branch in (self.seq, *self.edges):
            k, b = branch.merged()
            kernel, bias = kernel + k, bias + b
        if self.identity:
            eye = torch.zeros(self.cout, self.cout, 3, 3, device=_device_of(kernel),
                              dtype=kernel.dtype)
            for c in range(self.cout):
                eye[c, c, 1, 1] = 1.0
            kernel = kernel + eye
        return kernel, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            y = self.conv3x3(x) + self.seq(x)
            for branch in self.edges:
                y = y + branch(x)
            if self.identity:
                y = y + x
        else:
            kernel, bias = self.merged()
            y = F.conv2d(x, kernel, bias, stride=1, padding=1)
        return self.act(y)


class EdgeSR(nn.Module):
    """An ECBSR-shaped super-resolution net: :class:`EdgeBlock` s, the input added back (a
    broadcast over the ``scale**2`` output channels when ``colors == 1``), a pixel shuffle.
    Deploy form: one 3x3 conv per block, the PReLUs, the add and the shuffle."""

    def __init__(self, colors: int = 1, channels: int = 8, blocks: int = 1,
                 scale: int = 2) -> None:
        super().__init__()
        body = [EdgeBlock(colors, channels)]
        body += [EdgeBlock(channels, channels, identity=True) for _ in range(blocks)]
        body += [EdgeBlock(channels, colors * scale * scale, act=False)]
        self.backbone = nn.Sequential(*body)
        self.upsampler = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsampler(self.backbone(x) + x)


# --- Ultralytics: Conv, C2f, and a Sequential routed by its parent ----------------------------


class ConvNormAct(nn.Module):
    """conv (no bias, "same" padding) -> BN -> SiLU, as Ultralytics' ``Conv``, whose activation
    is one ``nn.SiLU`` shared by every instance (a class attribute). Deploy form: the conv with
    the BN folded in (bias added), then the SiLU."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ResidualPair(nn.Module):
    """Two 3x3 :class:`ConvNormAct`, with the input added when ``shortcut`` (Ultralytics'
    ``Bottleneck``). Deploy form: two convs with their BNs folded, the add kept."""

    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = ConvNormAct(c, c, 3)
        self.cv2 = ConvNormAct(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class SplitConcat(nn.Module):
    """Ultralytics' ``C2f``: a 1x1 :class:`ConvNormAct`, its output chunked in two *as a Python
    list*, extended by an ``nn.ModuleList`` of :class:`ResidualPair` each fed the last entry,
    everything concatenated into a final 1x1. Deploy form: no BN left (each conv+BN folded), the
    chunk, the chain and the concat kept."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = ConvNormAct(c1, 2 * self.c, 1)
        self.cv2 = ConvNormAct((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(ResidualPair(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    """``torch.cat`` of the *list* its parent passes (Ultralytics' ``Concat``)."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


def grid_points(feats: list[torch.Tensor], strides: torch.Tensor) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """Cell centres (2, N) and their strides (1, N) of every level, row-major. The stride is
    passed to ``torch.full`` as a 0-d tensor, as Ultralytics' ``make_anchors`` does (torch.export
    captures that; ``make_fx`` in real mode does not: it reads the tensor's value)."""
    points, scales = [], []
    for f, s in zip(feats, strides, strict=True):
        _, _, h, w = f.shape
        ys = torch.arange(h, dtype=f.dtype, device=f.device) + 0.5
        xs = torch.arange(w, dtype=f.dtype, device=f.device) + 0.5
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((gx, gy)).view(2, -1))
        scales.append(torch.full((1, h * w), s, dtype=f.dtype, device=f.device))  # a 0-d fill
    return torch.cat(points, 1), torch.cat(scales, 1)


class GridHead(nn.Module):
    """A tiny Detect-like head: per level a 3x3 :class:`ConvNormAct` and a 1x1 conv to
    ``4 + nc`` channels, written into the input list; then shape-dependent Python, as in
    Ultralytics' ``Detect``: the grid is rebuilt only when the input shape changes (cached on the
    module), boxes decoded against it. Returns ``(decoded, raw feature list)``. Deploy form: the
    BN folded into each 3x3; the Python around it unchanged, at every input size."""

    shape = None  # class attributes until the first call, as in Ultralytics
    anchors = torch.empty(0)
    strides = torch.empty(0)
    export = False

    def __init__(self, nc: int, ch: tuple[int, ...], stride: tuple[float, ...]) -> None:
        super().__init__()
        self.nc, self.nl, self.no = nc, len(ch), nc + 4
        self.stride = torch.tensor(stride)
        self.cv = nn.ModuleList(nn.Sequential(ConvNormAct(c, c, 3), nn.Conv2d(c, self.no, 1))
                                for c in ch)

    def forward(self, x: list[torch.Tensor]):
        for i in range(self.nl):
            x[i] = self.cv[i](x[i])
        shape = x[0].shape
        if self.shape != shape:
            self.anchors, self.strides = grid_points(x, self.stride)
            self.shape = shape
        bs = shape[0]
        out = torch.cat([xi.view(bs, self.no, -1) for xi in x], 2)
        box, cls = out.split((4, self.nc), 1)
        xy = (box[:, :2].sigmoid() * 2 - 0.5 + self.anchors) * self.strides
        wh = box[:, 2:].exp() * self.strides
        y = torch.cat((xy, wh, cls.sigmoid()), 1)
        return y if self.export else (y, x)


def _route(layers: list[tuple[int | list[int], nn.Module]]) -> tuple[nn.Sequential, list[int]]:
    """An ``nn.Sequential`` of ``layers``, each tagged as Ultralytics' ``parse_model`` tags them:
    ``f`` (index or list of indices of the earlier outputs it reads, -1 the previous one), ``i``
    (its index), ``type`` (class name), ``np`` (parameter count); and the sorted indices of the
    outputs some later layer reads (``save``)."""
    save: set[int] = set()
    for i, (f, m) in enumerate(layers):
        m.f, m.i, m.type = f, i, type(m).__name__
        m.np = sum(p.numel() for p in m.parameters())
        save.update(j % i for j in ([f] if isinstance(f, int) else f) if j != -1)
    return nn.Sequential(*(m for _, m in layers)), sorted(save)


class RoutedNet(nn.Module):
    """A miniature of Ultralytics' ``DetectionModel``: ``self.model`` is an ``nn.Sequential``
    that the parent's forward does not call but walks, feeding each layer ``y[m.f]`` (or a list
    of earlier outputs for ``Concat`` and the head) and keeping the outputs listed in
    ``self.save``; :class:`SplitConcat` blocks inside; a :class:`GridHead` at the end. Deploy
    form: no BN left; ``model`` still a sequence of layers with their ``f``, ``i``, ``type`` and
    ``np``; ``save``, ``stride`` and ``names`` kept; runs at any input size divisible by 8."""

    def __init__(self, nc: int = 3) -> None:
        super().__init__()
        self.model, self.save = _route([
            (-1, ConvNormAct(3, 8, 3, 2)),           # 0: /2
            (-1, ConvNormAct(8, 16, 3, 2)),          # 1: /4
            (-1, SplitConcat(16, 16, 1, True)),      # 2
            (-1, ConvNormAct(16, 16, 3, 2)),         # 3: /8
            (-1, SplitConcat(16, 16, 1, True)),      # 4
            (-1, nn.Upsample(scale_factor=2.0, mode="nearest")),  # 5: /4
            ([-1, 2], Concat(1)),                    # 6
            (-1, SplitConcat(32, 16, 1)),            # 7
            ([7, 4], GridHead(nc, (16, 16), (4.0, 8.0))),  # 8
        ])
        self.stride = torch.tensor([4.0, 8.0])
        self.names = {c: f"class{c}" for c in range(nc)}

    def forward(self, x: torch.Tensor):
        return run_routed(self.model, self.save, x)


def run_routed(layers: nn.Sequential, save: list[int], x):
    """Ultralytics' ``_predict_once``: each layer reads ``y[m.f]`` (or a list of earlier
    outputs), and the outputs listed in ``save`` are kept for later layers."""
    y: list[torch.Tensor | None] = []
    for m in layers:
        if m.f != -1:
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        x = m(x)
        y.append(x if m.i in save else None)
    return x


# --- YOLOv7: implicit add and multiply around the head's 1x1 convs ----------------------------


class ImplicitShift(nn.Module):
    """``x + a`` for a learned (1, C, 1, 1) tensor (YOLOv7's ``ImplicitA``). Before a 1x1 conv
    with no padding it folds into that conv's bias: ``b += W a``."""

    def __init__(self, channels: int, std: float = 0.02) -> None:
        super().__init__()
        self.implicit = nn.Parameter(torch.zeros(1, channels, 1, 1))
        nn.init.normal_(self.implicit, mean=0.0, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit + x


class ImplicitScale(nn.Module):
    """``m * x`` for a learned (1, C, 1, 1) tensor (YOLOv7's ``ImplicitM``). After a conv it
    folds into that conv: ``W *= m``, ``b *= m`` per output channel."""

    def __init__(self, channels: int, std: float = 0.02) -> None:
        super().__init__()
        self.implicit = nn.Parameter(torch.ones(1, channels, 1, 1))
        nn.init.normal_(self.implicit, mean=1.0, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit * x


def cell_grid(nx: int, ny: int) -> torch.Tensor:
    """(1, 1, ny, nx, 2) integer cell coordinates (x, y)."""
    gy, gx = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
    return torch.stack((gx, gy), 2).view(1, 1, ny, nx, 2).float()


class ImplicitHead(nn.Module):
    """A YOLOv7 ``IDetect``-like head: per level ``ImplicitScale(conv1x1(ImplicitShift(x)))``
    written back into the input list, reshaped to (bs, anchors, ny, nx, outputs); in eval the
    sigmoid output is decoded *in place by slice assignment* (``y[..., 0:2] = ...``,
    ``y[..., 2:4] = ...``) against a grid cached per level and rebuilt when the shape changes.
    Returns ``(decoded (bs, N, outputs), raw list)`` in eval. Deploy form: each implicit add and
    multiply folded into its 1x1 conv (one conv per level, no implicit parameters left)."""

    stride = None  # set by the parent

    def __init__(self, nc: int, anchors: tuple[tuple[float, ...], ...],
                 ch: tuple[int, ...]) -> None:
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.nl, self.na = len(anchors), len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchor_grid", a.view(self.nl, 1, -1, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.ia = nn.ModuleList(ImplicitShift(c) for c in ch)
        self.im = nn.ModuleList(ImplicitScale(self.no * self.na) for _ in ch)

    def forward(self, x: list[torch.Tensor]):
        decoded = []
        for i in range(self.nl):
            x[i] = self.im[i](self.m[i](self.ia[i](x[i])))
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if self.training:
                continue
            if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                self.grid[i] = cell_grid(nx, ny).to(x[i].device)
            y = x[i].sigmoid()
            y[..., 0:2] = (y[..., 0:2] * 2.0 - 0.5 + self.grid[i]) * self.stride[i]
            y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
            decoded.append(y.view(bs, -1, self.no))
        return x if self.training else (torch.cat(decoded, 1), x)


class ImplicitNet(nn.Module):
    """Two strided :class:`ConvNormAct` levels into an :class:`ImplicitHead`. Deploy form: the
    BNs folded, the implicit tensors folded into the head's 1x1 convs: four convs in all."""

    def __init__(self, nc: int = 2) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, 2)
        self.down = ConvNormAct(8, 16, 3, 2)
        self.head = ImplicitHead(nc, ((4.0, 5.0, 8.0, 10.0), (10.0, 13.0, 16.0, 30.0)), (8, 16))
        self.head.stride = torch.tensor([2.0, 4.0])

    def forward(self, x: torch.Tensor):
        a = self.stem(x)
        b = self.down(a)
        return self.head([a, b])


# --- get_device() inside an otherwise foldable block -------------------------------------------


class DeviceIdentityBlock(nn.Module):
    """``act(bn(conv3x3(x)) + conv(x, I))`` where the identity kernel ``I`` is made on every call
    on the input's device, found with ``x.get_device()`` (-1 on CPU: ``None``), as ECBSR builds
    its identity kernel. Deploy form: one padded 3x3 conv (with bias) then ``act``."""

    def __init__(self, channels: int, act: nn.Module | None = None) -> None:
        super().__init__()
        self.c = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eye = torch.zeros(self.c, self.c, 3, 3, device=_device_of(x), dtype=x.dtype)
        for c in range(self.c):
            eye[c, c, 1, 1] = 1.0
        return self.act(self.bn(self.conv(x)) + F.conv2d(x, eye, padding=1))
