"""Graph fuzzer: random DAGs of linear and non-linear ops; ``fold`` never hands back a wrong model.

Each example is a :class:`Program`, an ``nn.Module`` whose ``forward`` interprets a random list of
instructions: convs of random geometry (1d/2d/3d, kernels 1-5 incl. asymmetric, stride,
dilation, groups, integer / "same" / "valid" padding, every padding mode, bias on/off, module
and functional form), BN (random statistics; some without running statistics or affine
parameters; module and ``F.batch_norm``), ConvTranspose (+BN), ``F.pad`` (constant, non-zero
constant, reflect, replicate, circular, asymmetric), average pools (count_include_pad, ceil_mode,
divisor_override), sums / differences of branches (operator, ``torch.add`` with alpha, method),
cats, scalings by constants and per-channel (and per-position) parameters, activations (incl.
in-place ``relu_`` / ``add_`` / ``mul_`` / ``nn.ReLU(inplace=True)``), identity / dropout / clone,
channels-last copies (what follows must keep that memory layout), in-place writes through
aliases (Identity, eval dropout, contiguous, clone) while a region spans them, writes through
``out=``, ``.data`` and ``torch.ops.aten`` in-place overloads, leaf modules (named in
``leaf_modules``) that write the tensor they receive, convs whose ``forward`` is
replaced on the instance, random ops (``rand_like``, dropout in training mode, gumbel noise),
shared modules called twice, linear layers on channels-last tokens and a pooled linear+BN
head, and multi-branch blocks (RepVGG / ACNet / DBB-like, with random and sometimes misaligned
geometry) whose branches start at random earlier nodes. Shapes come from running every
instruction on a probe tensor while the program is built, so every program is valid.

For each program: the float64 fold, unverified (``verify=False``: the engine must be right on its
own), must match the float64 original within 1e-9 (relative); the float32 fold, verified as by
default, must match the float64 original within 1e-4; the caller's example input is not
modified, and no region is dearer than the ops it replaced.

The CI profile runs ``FACTOR`` x the profile's ``max_examples`` graphs per test (a few hundred in
all); ``--hypothesis-profile=long`` runs thousands. ``REPARAM_FUZZ_EXAMPLES`` overrides the count
and ``REPARAM_FUZZ_COUNT_FILE`` names a file the number of graphs run (and wrong outputs seen) is
written to (``scripts/fuzz_long.sh`` reads it).

The end of the file tests the self-check, ``fold(..., check=True)``: it passes on good models and
random graphs, and raises ``reparam.CheckError`` naming the right region when a law of
``reparam.kernel`` is monkeypatched to be subtly wrong.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torch import nn

import reparam

F64 = torch.float64
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
FPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
MODES = ("zeros", "reflect", "replicate", "circular")
SIZES = {1: (6, 16), 2: (5, 10), 3: (3, 6)}
MAX_CHANNELS = 12
MAX_NUMEL = 2 * 12 * 20 * 20  # per probe tensor: keeps every graph tiny

FACTOR = 4  # graphs per test = FACTOR * the profile's max_examples (ci: 40 -> 160)
EXAMPLES = int(os.environ.get("REPARAM_FUZZ_EXAMPLES", 0)) or settings.default.max_examples * FACTOR

TOL64 = 1e-9
TOL32 = 1e-4

# Open engine bugs (a failing regression test in test_regressions.py, described in
# /work/survey/ENGINE_ISSUES.md) whose trigger patterns the fuzzer should not generate while they
# are open, so that it keeps guarding against new bugs; e.g. REPARAM_FUZZ_KNOWN=R1,R2 (empty: none,
# everything is generated). Patterns that can be switched off:
#   R1: in-place writes through aliases (Identity/Dropout/contiguous/+x outputs, copies such as
#       clone or a 1x1 avg-pool that the fold removes): the fuzzer then writes in place only into
#       tensors that share storage with no other value and are not a copy of one.
#   R2, R14: a model that writes into its input (fold wrote into the caller's example input;
#       check=True compared two runs on one input). The fuzzer then never writes into the input.
#   R6: ``t += c`` (eager writes in place, torch.fx records an out-of-place add): the fuzzer then
#       generates no augmented assignment.
# R1, R2 and R14 were fixed in 6a581d7; R6c (the ``+=`` in ``Program.step``, not in ``forward``)
# in 9d3863f: such a program is refused with a ReparamError, which the fuzzer accepts.
KNOWN_BUGS = frozenset(filter(None, os.environ.get("REPARAM_FUZZ_KNOWN", "").split(",")))


# --- counting (for scripts/fuzz_long.sh and docs/reliability.md) ------------------------------

COUNTS = {"graphs": 0, "wrong": 0, "errors": 0, "regions": 0}


def _write_counts() -> None:
    path = os.environ.get("REPARAM_FUZZ_COUNT_FILE")
    if path:
        with open(path, "w") as f:
            f.write(" ".join(f"{k}={v}" for k, v in COUNTS.items()) + "\n")


atexit.register(_write_counts)


def _write_case(case, error: BaseException) -> None:
    """Append a failing program to ``REPARAM_FUZZ_COUNT_FILE``'s ``.cases`` file as soon as it
    fails: a long run cut at its deadline while hypothesis shrinks keeps what it found."""
    path = os.environ.get("REPARAM_FUZZ_COUNT_FILE")
    if path:
        with open(path + ".cases", "a") as f:
            f.write(f"{type(error).__name__}: {str(error).splitlines()[0][:300]}\n{case!r}\n\n")


# --- the program ------------------------------------------------------------------------------


class WriteLeaf(nn.Module):
    """A module kept as a leaf (``leaf_modules``) that writes the tensor it receives."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x):
        x.mul_(self.c)
        return x * 1.0


def doubled_forward(self: nn.Module, x):
    """A forward set on a conv instance (accelerate-style): it computes 2 * conv(x)."""
    return self._conv_forward(x, self.weight, self.bias) * 2.0


class Program(nn.Module):
    """``forward`` runs ``self.code``: a list of instructions, each reading earlier values."""

    def __init__(self, nd: int) -> None:
        super().__init__()
        self.nd = nd
        self.mods = nn.ModuleDict()
        self.params = nn.ParameterDict()
        self.code: list[tuple] = []
        self.outputs: list[int] = []
        self.leaves: list[str] = []  # module paths fold must not trace into

    def forward(self, x):
        vals = [x]
        for ins in self.code:
            vals.append(self.step(ins, vals))
        outs = tuple(vals[i] for i in self.outputs)
        return outs[0] if len(outs) == 1 else outs

    def step(self, ins: tuple, vals: list):  # noqa: C901 - one branch per instruction
        op, args = ins[0], ins[1:]
        nd = self.nd
        if op == "call":
            name, src = args
            return self.mods[name](vals[src])
        if op == "fconv":
            w, b, src, stride, padding, dilation, groups = args
            bias = self.params[b] if b is not None else None
            return FCONV[nd](vals[src], self.params[w], bias, stride, padding, dilation, groups)
        if op == "fbn":
            name, src = args
            bn = self.mods[name]
            return F.batch_norm(vals[src], bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                False, 0.1, bn.eps)
        if op == "pad":
            src, pads, mode, value = args
            if mode == "constant":
                return F.pad(vals[src], pads, mode="constant", value=value)
            return F.pad(vals[src], pads, mode=mode)
        if op == "fpool":
            src, k, s, p, ceil, cip, div = args
            if nd == 1:
                return FPOOL[nd](vals[src], k, s, p, ceil, cip)
            return FPOOL[nd](vals[src], k, s, p, ceil, cip, div)
        if op == "add":
            a, b, form = args
            if form == "op":
                return vals[a] + vals[b]
            if form == "torch":
                return torch.add(vals[a], vals[b])
            if form == "alpha":
                return torch.add(vals[a], vals[b], alpha=0.5)
            return vals[a].add(vals[b])
        if op == "sub":
            a, b, form = args
            if form == "op":
                return vals[a] - vals[b]
            if form == "torch":
                return torch.sub(vals[a], vals[b])
            return vals[a].sub(vals[b], alpha=2)
        if op == "cat":
            srcs, form = args
            tensors = [vals[i] for i in srcs]
            if form == "concat":
                return torch.concat(tensors, dim=1)
            if form == "neg":
                return torch.cat(tensors, -(nd + 1))
            return torch.cat(tensors, 1)
        if op == "const":
            src, kind, c = args
            v = vals[src]
            return {
                "mul": lambda: v * c, "rmul": lambda: c * v, "div": lambda: v / c,
                "add": lambda: v + c, "radd": lambda: c + v, "sub": lambda: v - c,
                "rsub": lambda: c - v, "neg": lambda: -v, "tmul": lambda: torch.mul(v, c),
                "mmul": lambda: v.mul(c),
            }[kind]()
        if op == "param":
            src, kind, name = args
            p = self.params[name]
            if kind == "mul":
                return vals[src] * p
            if kind == "rmul":
                return p * vals[src]
            if kind == "add":
                return vals[src] + p
            return vals[src] / p
        if op == "act":
            src, kind = args
            v = vals[src]
            if kind == "relu":
                return F.relu(v)
            if kind == "relu_":
                return v.relu_()
            if kind == "frelu_":
                return F.relu(v, inplace=True)
            if kind == "gelu":
                return F.gelu(v)
            if kind == "tanh":
                return torch.tanh(v)
            return F.leaky_relu(v, 0.1)
        if op == "iadd":
            a, b = args
            return vals[a].add_(vals[b])
        if op == "write":  # in place, through out= / .data / an aten overload called directly
            a, how, c = args
            v = vals[a]
            if how == "out":
                return torch.mul(v, c, out=v)
            if how == "data":
                v.data.mul_(c)
                return v
            return torch.ops.aten.mul_.Scalar(v, c)
        if op == "noise":
            src, name = args
            return vals[src] + torch.rand_like(self.params[name])
        if op == "rand":
            src, how = args
            v = vals[src]
            if how == "rand_like":
                return v * torch.rand_like(v)
            if how == "dropout":
                return F.dropout(v, 0.3, training=True)
            return v + torch.empty_like(v).exponential_()  # gumbel_softmax's noise
        if op == "imul":
            a, c = args
            return vals[a].mul_(c)
        if op == "aug":  # eager: writes into vals[a]; torch.fx records an out-of-place add
            a, c = args
            v = vals[a]
            v += c
            return v
        if op == "ident":
            src, kind = args
            v = vals[src]
            if kind == "contiguous":
                return v.contiguous()
            if kind == "clone":
                return v.clone()
            if kind == "dropout":
                return F.dropout(v, 0.3, False)
            if kind == "channels_last":  # what follows runs on (and must keep) that layout
                fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(nd)  # not v.dim():
                # a proxy under torch.fx, which would trace the other branch
                return v.contiguous(memory_format=fmt) if fmt else v.transpose(1, -1).contiguous(
                ).transpose(1, -1)
            return +v
        if op == "tokens":  # a linear layer on channels-last tokens, back to channels-first
            name, src = args
            return self.mods[name](vals[src].movedim(1, -1)).movedim(-1, 1)
        if op == "flat":  # a view, which runs only on the memory layout the original computed
            (src,) = args
            return vals[src].view(vals[src].shape[0], -1)
        if op == "mean":
            (src,) = args
            return vals[src].mean(dim=tuple(range(2, nd + 2)))
        if op == "patches":
            return self.patches(vals[args[0]], *args[1:])
        raise AssertionError(op)

    def patches(self, v, c, o, h, w, hp, wp, fc, bn, bn2d, convs, variant):
        """RepMLP: an FC over each flattened ``h x w`` patch (+ BN), convs on the same patches,
        summed on the patch grid and merged back; ``variant`` makes it hostile: the grid read
        at run time, tiles sized at run time or transposed, a BN over two patches at once, the
        branches subtracted."""
        if variant == "runtime":
            hp, wp = v.size(2) // h, v.size(3) // w
        patches = v.reshape(-1, c, hp, h, wp, w).permute(0, 2, 4, 1, 3, 5)
        linear = isinstance(self.mods[fc], nn.Linear)
        y = self.mods[fc](patches.reshape(-1, c * h * w) if linear
                          else patches.reshape(-1, c * h * w, 1, 1))
        if bn is not None:
            y = self.mods[bn](y.reshape(-1, o, h, w) if bn2d else y.reshape(
                -1, 2 * o * h * w if variant == "wide_bn" else o * h * w))
        y = y.reshape(-1, hp, wp, o, h, w)
        tiles = patches.reshape(-1, c, h, w)
        if variant == "runtime_tiles":
            tiles = patches.reshape(-1, c, patches.size(4), patches.size(5))
        elif variant == "transposed":
            tiles = patches.transpose(-1, -2).reshape(-1, c, w, h)
        for name in convs:
            z = self.mods[name](tiles).reshape(-1, hp, wp, o, h, w)
            y = y - z if variant == "sub" else y + z
        return y.permute(0, 3, 1, 4, 2, 5).reshape(-1, o, hp * h, wp * w)


# --- building a random program ---------------------------------------------------------------


def uses(ins: tuple) -> list[int]:
    """The value indices an instruction reads."""
    op = ins[0]
    if op in ("call", "fbn", "tokens"):
        return [ins[2]]
    if op == "fconv":
        return [ins[3]]
    if op in ("add", "sub", "iadd"):
        return [ins[1], ins[2]]
    if op == "cat":
        return list(ins[1])
    return [ins[1]]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Builder:
    """Draws a valid random program: every instruction is run on probe tensors as it is added,
    and one that torch rejects (a bad geometry) is dropped."""

    def __init__(self, draw, nd: int, channels: int, size: tuple[int, ...], seed: int) -> None:
        self.draw, self.nd = draw, nd
        self.gen = torch.Generator().manual_seed(seed)
        self.prog = Program(nd)
        self.x = torch.randn(2, channels, *size, dtype=F64, generator=self.gen)
        self.vals = [self.x.clone()]
        self.count = 0
        self.convs: list[str] = []  # conv modules that may be called again (shared)
        # values an in-place op may not write into while a known bug (KNOWN_BUGS) is open
        self.unsafe: set[int] = {0} if KNOWN_BUGS & {"R2", "R14"} else set()

    # --- helpers ---------------------------------------------------------------------------
    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def pick(self, p, *choices):
        return self.draw(st.sampled_from(choices)) if p is None else p

    def flag(self, p: float = 0.5) -> bool:
        return self.draw(st.integers(0, 99)) < p * 100

    def spatial(self) -> list[int]:
        return [i for i, v in enumerate(self.vals) if v.dim() == self.nd + 2]

    def source(self) -> int:
        cands = self.spatial()
        if self.flag(0.45):
            return cands[-1]
        return self.draw(st.sampled_from(cands))

    def channels(self, i: int) -> int:
        return self.vals[i].shape[1]

    def randomize(self, module: nn.Module) -> nn.Module:
        g = self.gen
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(c, generator=g, dtype=F64) * 2 - 1)
                    m.running_var.copy_(torch.rand(c, generator=g, dtype=F64) * 1.5 + 0.25)
                if m.affine:
                    m.weight.data.copy_(torch.rand(c, generator=g, dtype=F64) + 0.5)
                    m.bias.data.copy_(torch.rand(c, generator=g, dtype=F64) * 2 - 1)
                m.eps = self.draw(st.sampled_from([1e-5, 1e-3]))
            elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                fan_in = m.weight[0].numel() if not isinstance(
                    m, nn.modules.conv._ConvTransposeNd) else m.weight.shape[0] * math.prod(
                    m.weight.shape[2:]) // max(m.groups, 1)
                std = 1.0 / math.sqrt(max(fan_in, 1))
                m.weight.data.copy_(torch.randn(m.weight.shape, generator=g, dtype=F64) * std)
                if m.bias is not None:
                    m.bias.data.copy_(torch.randn(m.bias.shape, generator=g, dtype=F64) * 0.5)
        return module.eval()

    def emit(self, ins: tuple, mods: dict | None = None, params: dict | None = None) -> int | None:
        """Add one instruction (and its new modules/parameters); None if torch rejects it."""
        for name, m in (mods or {}).items():
            self.prog.mods[name] = self.randomize(m)
        for name, p in (params or {}).items():
            self.prog.params[name] = nn.Parameter(p, requires_grad=False)
        try:
            with torch.no_grad():
                out = self.prog.step(ins, self.vals)
            ok = (isinstance(out, torch.Tensor) and out.dim() >= 2 and out.numel() > 0
                  and out.numel() <= MAX_NUMEL and bool(torch.isfinite(out).all())
                  and (out.dim() == 2 or out.shape[1] <= MAX_CHANNELS))
        except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
            ok, out = False, None
        if not ok:
            for name in mods or {}:
                del self.prog.mods[name]
            for name in params or {}:
                del self.prog.params[name]
            return None
        self.prog.code.append(ins)
        self.vals.append(out)
        index = len(self.vals) - 1
        for i in set(uses(ins)):
            v = self.vals[i]
            shares = out.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
            if "R1" in KNOWN_BUGS and (shares or (out.shape == v.shape and torch.equal(out, v))):
                self.unsafe |= {i, index}  # an alias or a copy of an earlier value
            if shares and i in self.unsafe and KNOWN_BUGS & {"R2", "R14"}:
                self.unsafe.add(index)  # e.g. an alias of the input
        return index

    def writable(self, i: int) -> bool:
        return i not in self.unsafe and self.vals[i].dim() == self.nd + 2

    def call(self, module: nn.Module, src: int, prefix: str) -> int | None:
        name = self.name(prefix)
        out = self.emit(("call", name, src), {name: module})
        if out is not None and isinstance(module, nn.modules.conv._ConvNd):
            self.convs.append(name)
        return out

    def bn(self, src: int, kind: str | None = None) -> int | None:
        c = self.channels(src)
        kind = self.pick(kind, "module", "module", "module", "functional", "no_stats",
                         "no_affine")
        if kind == "functional":
            name = self.name("fbn")
            return self.emit(("fbn", name, src), {name: BN[self.nd](c, dtype=F64)})
        m = BN[self.nd](c, dtype=F64, affine=kind != "no_affine",
                        track_running_stats=kind != "no_stats")
        return self.call(m, src, "bn")

    # --- convs -----------------------------------------------------------------------------
    def conv(self, src: int, out: int | None = None, k=None, stride=None, padding=None,
             dilation=None, groups=None, mode=None, bias=None, functional=None) -> int | None:
        nd, c = self.nd, self.channels(src)
        draw = self.draw
        if k is None:
            if nd > 1 and self.flag(0.25):  # asymmetric: 1xK, Kx1, 2x3, ...
                k = tuple(draw(st.integers(1, 5 if nd < 3 else 3)) for _ in range(nd))
            else:
                k = draw(st.sampled_from([1, 1, 2, 3, 3, 3, 4, 5] if nd < 3 else [1, 2, 3]))
        groups = groups if groups is not None else draw(st.sampled_from(divisors(c)))
        if out is None:
            out = groups * draw(st.integers(1, max(1, MAX_CHANNELS // groups // 2)))
        if out % groups:
            return None
        if stride is None:
            stride = draw(st.sampled_from([1, 1, 1, 2])) if nd == 1 or self.flag(0.8) else tuple(
                draw(st.integers(1, 2)) for _ in range(nd))  # anisotropic
        if dilation is None:
            dilation = draw(st.sampled_from([1, 1, 1, 2])) if nd == 1 or self.flag(0.85) else (
                tuple(draw(st.integers(1, 2)) for _ in range(nd)))
        ks = (k,) * nd if isinstance(k, int) else tuple(k)
        if padding is None:
            how = draw(st.sampled_from(["centre", "centre", "zero", "random", "same", "valid"]))
            ds = (dilation,) * nd if isinstance(dilation, int) else dilation
            if how == "centre":
                padding = tuple(d * (kk - 1) // 2 for kk, d in zip(ks, ds, strict=True))
            elif how == "zero":
                padding = 0
            elif how == "random":
                padding = tuple(draw(st.integers(0, kk)) for kk in ks)
            else:
                padding = how
        mode = mode or draw(st.sampled_from(["zeros", "zeros", "zeros", *MODES[1:]]))
        bias = bias if bias is not None else self.flag(0.4)
        functional = functional if functional is not None else self.flag(0.15)
        if functional:
            w = torch.randn(out, c // groups, *ks, generator=self.gen, dtype=F64)
            w /= math.sqrt(w[0].numel())
            wn, bn = self.name("w"), self.name("b") if bias else None
            params = {wn: w}
            if bias:
                params[bn] = torch.randn(out, generator=self.gen, dtype=F64) * 0.5
            return self.emit(("fconv", wn, bn, src, stride, padding, dilation, groups), None,
                             params)
        try:
            m = CONV[nd](c, out, k, stride, padding, dilation, groups, bias, mode, dtype=F64)
        except ValueError:  # e.g. padding="same" with a stride: torch refuses
            return None
        return self.call(m, src, "conv")

    def conv_t(self, src: int) -> int | None:
        draw, c = self.draw, self.channels(src)
        groups = draw(st.sampled_from(divisors(c)))
        out = groups * draw(st.integers(1, 3))
        k = draw(st.integers(1, 4 if self.nd < 3 else 3))
        s = draw(st.integers(1, 2))
        d = draw(st.sampled_from([1, 1, 2]))
        p = draw(st.integers(0, max(0, d * (k - 1))))
        op = draw(st.integers(0, max(s, d) - 1))
        try:
            m = CONV_T[self.nd](c, out, k, s, p, op, groups, self.flag(0.5), d, dtype=F64)
        except ValueError:
            return None
        y = self.call(m, src, "convT")
        if y is not None and self.flag(0.8):
            y = self.bn(y, "module") or y
        return y

    # --- other ops -------------------------------------------------------------------------
    def pad(self, src: int, amount=None, mode=None) -> int | None:
        draw = self.draw
        mode = mode or draw(st.sampled_from(["constant", "constant", "reflect", "replicate",
                                             "circular"]))
        axes = draw(st.integers(1, self.nd))
        if amount is None:
            pads = [draw(st.integers(0, 2)) for _ in range(2 * axes)]
            if self.flag(0.6):
                pads = [pads[2 * (i // 2)] for i in range(2 * axes)]  # symmetric
        else:
            pads = [amount] * (2 * self.nd)
        value = 0.0 if self.flag(0.8) else 0.5
        return self.emit(("pad", src, pads, mode, value))

    def pool(self, src: int, k=None, s=None, p=None, cip=None, ceil=None) -> int | None:
        draw = self.draw
        k = k if k is not None else draw(st.integers(1, 3))
        s = s if s is not None else draw(st.sampled_from([1, 1, 2, k, None]))
        p = p if p is not None else draw(st.integers(0, k // 2))
        cip = cip if cip is not None else self.flag(0.6)
        ceil = ceil if ceil is not None else self.flag(0.25)
        div = None if self.nd == 1 or self.flag(0.85) else draw(st.integers(1, 9))
        if self.flag(0.5):
            kw = {} if self.nd == 1 else {"divisor_override": div}
            m = POOL[self.nd](k, s, p, ceil, cip, **kw)
            return self.call(m, src, "pool")
        return self.emit(("fpool", src, k, s, p, ceil, cip, div))

    def scale(self, src: int) -> int | None:
        draw, c, nd = self.draw, self.channels(src), self.nd
        kind = draw(st.sampled_from(["const", "const", "channel", "channel", "position"]))
        if kind == "const":
            how = draw(st.sampled_from(["mul", "rmul", "div", "add", "radd", "sub", "rsub",
                                        "neg", "tmul", "mmul"]))
            value = draw(st.sampled_from([0.5, -1.5, 2.0, 3]))
            return self.emit(("const", src, how, value))
        how = draw(st.sampled_from(["mul", "mul", "rmul", "add", "div"]))
        if kind == "channel":
            shape = draw(st.sampled_from([(1, c) + (1,) * nd, (c,) + (1,) * nd]))
        else:  # varies along the last spatial axis: not a per-channel map
            shape = (self.vals[src].shape[-1],)
        p = torch.rand(shape, generator=self.gen, dtype=F64) + 0.5
        name = self.name("p")
        return self.emit(("param", src, how, name), None, {name: p})

    def act(self, src: int) -> int | None:
        kind = self.draw(st.sampled_from(["relu", "relu", "relu_", "frelu_", "module_",
                                          "gelu", "tanh", "leaky"]))
        if kind.endswith("_") and not self.writable(src):
            kind = "relu"
        if kind == "module_":
            return self.call(nn.ReLU(inplace=True), src, "act")
        return self.emit(("act", src, kind))

    def identity(self, src: int) -> int | None:
        kind = self.draw(st.sampled_from(["Identity", "Dropout", "contiguous", "clone",
                                          "dropout", "pos", "channels_last"]))
        if kind == "Identity":
            return self.call(nn.Identity(), src, "id")
        if kind == "Dropout":
            return self.call(nn.Dropout(0.3).eval(), src, "drop")
        return self.emit(("ident", src, kind))

    def alias(self, src: int) -> int | None:
        """An alias of ``src`` (Identity, eval Dropout, contiguous, +x return their input) that
        is then modified in place: the write reaches ``src`` and everything aliasing it."""
        if "R1" in KNOWN_BUGS or not self.writable(src):
            return None
        # a region that starts before the write and ends after it, and a reader after the write
        pre = self.bn(src, "module") if self.flag(0.5) else None
        kind = self.draw(st.sampled_from(["Identity", "Dropout", "contiguous", "dropout",
                                          "pos", "clone"]))
        if kind == "Identity":
            y = self.call(nn.Identity(), src, "id")
        elif kind == "Dropout":
            y = self.call(nn.Dropout(0.3).eval(), src, "drop")
        else:
            y = self.emit(("ident", src, kind))
        if y is None or not self.writable(y):  # e.g. an alias of the input (R2, R14)
            return None
        how = self.draw(st.sampled_from(["relu_", "frelu_", "imul", "iadd"]))
        if how == "imul":
            out = self.emit(("imul", y, -0.5))
        elif how == "iadd":
            same = [b for b in self.spatial() if self.vals[b].shape == self.vals[y].shape]
            out = self.emit(("iadd", y, self.draw(st.sampled_from(same))))
        else:
            out = self.emit(("act", y, how))
        if pre is not None:
            self.scale(pre)
        if self.flag(0.7):
            self.conv(src) if self.flag() else self.bn(src, "module")
        return out

    def write(self, src: int) -> int | None:
        """An in-place write by out=, .data or an aten overload between two reads of ``src``
        whose results are then summed: a fold that missed the write would read ``src`` unwritten
        in both."""
        if not self.writable(src):
            return None
        pre = self.bn(src, "module") if self.flag(0.6) else self.conv(src, self.channels(src))
        how = self.draw(st.sampled_from(["out", "data", "aten"]))
        out = self.emit(("write", src, how, self.draw(st.sampled_from([2.0, -0.5]))))
        if out is None or pre is None:
            return out
        post = self.conv(src, self.channels(src)) if self.flag() else self.bn(src, "module")
        if post is not None and self.vals[post].shape == self.vals[pre].shape:
            return self.emit(("add", pre, post, "op"))
        return out

    def leaf(self, src: int) -> int | None:
        """A leaf module that writes the tensor it receives (named in leaf_modules)."""
        if not self.writable(src):
            return None
        pre = self.bn(src, "module") if self.flag(0.6) else None
        name = self.name("leaf")
        out = self.emit(("call", name, src), {name: WriteLeaf(self.draw(st.sampled_from(
            [2.0, -1.0])))})
        if out is not None:
            self.prog.leaves.append(f"mods.{name}")
        if pre is not None:
            self.conv(pre)
        return out

    def override(self, src: int) -> int | None:
        """A conv whose forward is replaced on the instance, followed by a BN."""
        c = self.channels(src)
        m = CONV[self.nd](c, self.draw(st.integers(1, MAX_CHANNELS)), 3, padding=1, dtype=F64)
        m = self.randomize(m)
        m.forward = types.MethodType(doubled_forward, m)  # deepcopy rebinds it
        y = self.call(m, src, "over")
        return self.bn(y, "module") if y is not None else None

    def rand(self, src: int) -> int | None:
        """A random op: on the data, or input-free noise (``rand_like`` of a parameter), which a
        fold that missed its randomness would bake into a bias."""
        how = self.draw(st.sampled_from(["rand_like", "dropout", "gumbel", "noise"]))
        if how == "noise":
            shape = (1, self.channels(src)) + (1,) * self.nd
            name = self.name("p")
            y = self.emit(("noise", src, name), None, {name: torch.zeros(shape, dtype=F64)})
        else:
            y = self.emit(("rand", src, how))
        if y is not None and self.flag(0.6):
            self.conv(y) if self.flag() else self.bn(y, "module")
        return y

    def equal_pairs(self) -> list[tuple[int, int]]:
        idx = self.spatial()
        return [(a, b) for a in idx for b in idx
                if a != b and self.vals[a].shape == self.vals[b].shape]

    def combine(self, kind: str | None = None) -> int | None:
        draw = self.draw
        kind = self.pick(kind, "add", "add", "sub", "cat", "iadd", "imul", "aug")
        if kind == "aug":
            src = self.source()
            if "R6" in KNOWN_BUGS or not self.writable(src):
                return None
            out = self.emit(("aug", src, draw(st.sampled_from([1.0, -0.5]))))
            if out is not None and self.flag(0.7):  # read the written tensor again
                self.scale(src)
            return out
        if kind == "imul":
            src = self.source()
            if not self.writable(src):
                return None
            return self.emit(("imul", src, draw(st.sampled_from([2.0, -0.5]))))
        pairs = self.equal_pairs()
        if kind == "cat":
            idx = self.spatial()
            a = self.source()
            same = [b for b in idx if self.vals[b].shape[2:] == self.vals[a].shape[2:]]
            others = draw(st.lists(st.sampled_from(same), min_size=1, max_size=2))
            return self.emit(("cat", [a, *others], draw(st.sampled_from(["cat", "concat",
                                                                         "neg"]))))
        if not pairs:
            return None
        a, b = draw(st.sampled_from(pairs))
        if kind == "iadd":
            return self.emit(("iadd", a, b)) if self.writable(a) else None
        forms = ["op", "op", "torch", "alpha", "method"] if kind == "add" else [
            "op", "torch", "method"]
        return self.emit((kind, a, b, draw(st.sampled_from(forms))))

    def shared(self, src: int) -> int | None:
        """Call an existing conv module again (shared weights)."""
        c = self.channels(src)
        fits = [n for n in self.convs if self.prog.mods[n].in_channels == c]
        if not fits:
            return None
        name = self.draw(st.sampled_from(fits))
        return self.emit(("call", name, src))

    def tokens(self, src: int) -> int | None:
        c = self.channels(src)
        out = self.draw(st.integers(1, MAX_CHANNELS))
        name = self.name("lin")
        y = self.emit(("tokens", name, src), {name: nn.Linear(c, out, self.flag(), dtype=F64)})
        if y is not None and self.flag(0.5):
            y = self.bn(y, "module") or y
            if self.flag(0.4):  # two BNs: a per-channel affine on the tokens' channels-last data
                y = self.bn(y, "module") or y
        if y is not None and self.flag(0.3):  # R24: a view that needs the BN's dense layout
            self.emit(("flat", y))
        return y

    def head(self, src: int) -> int | None:
        y = self.emit(("mean", src))
        if y is None:
            return None
        c = self.channels(src)
        y = self.call(nn.Linear(c, self.draw(st.integers(1, 6)), self.flag(), dtype=F64), y,
                      "fc") or y
        if self.flag(0.7):
            y = self.call(nn.BatchNorm1d(self.vals[y].shape[1], dtype=F64), y, "bnfc") or y
        return y

    def patches(self, src: int) -> int | None:
        """A RepMLP partition perceptron on ``src`` (2d only): see :meth:`Program.patches`."""
        if self.nd != 2:
            return None
        draw = self.draw
        _, c, H, W = self.vals[src].shape
        h = draw(st.sampled_from([d for d in divisors(H) if d <= 4]))
        w = draw(st.sampled_from([d for d in divisors(W) if d <= 4]))
        o = draw(st.integers(1, 4))
        variant = draw(st.sampled_from(["plain", "plain", "plain", "runtime", "runtime_tiles",
                                        "transposed", "wide_bn", "sub"]))
        if variant == "transposed" and h != w:
            variant = "plain"
        mods: dict[str, nn.Module] = {}
        fc = self.name("pfc")
        if self.flag(0.3):
            mods[fc] = nn.Linear(c * h * w, o * h * w, self.flag(0.3), dtype=F64)
        else:
            g = draw(st.sampled_from(divisors(math.gcd(c * h * w, o * h * w))))
            mods[fc] = nn.Conv2d(c * h * w, o * h * w, 1, groups=g, bias=self.flag(0.3),
                                 dtype=F64)
        bn, bn2d = None, self.flag(0.4)
        if self.flag(0.8):
            bn = self.name("pbn")
            width = o if bn2d else (2 if variant == "wide_bn" else 1) * o * h * w
            mods[bn] = (nn.BatchNorm2d if bn2d else nn.BatchNorm1d)(width, dtype=F64)
        convs = []
        for k in draw(st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3)):
            name = self.name("pconv")
            g = draw(st.sampled_from(divisors(math.gcd(c, o))))
            mode = draw(st.sampled_from(["zeros", "zeros", "circular", "reflect"]))
            conv = nn.Conv2d(c, o, k, padding=k // 2, groups=g, bias=self.flag(0.3),
                             padding_mode=mode, dtype=F64)
            mods[name] = nn.Sequential(conv, nn.BatchNorm2d(o, dtype=F64)) if self.flag(
                0.7) else conv
            convs.append(name)
        return self.emit(("patches", src, c, o, h, w, H // h, W // w, fc, bn, bn2d, tuple(convs),
                          variant), mods)

    # --- multi-branch blocks ---------------------------------------------------------------
    def branch(self, kind: str, src: int, out: int, stride: int, groups: int) -> int | None:
        draw, nd = self.draw, self.nd
        c = self.channels(src)
        k = draw(st.sampled_from([3, 3, 5] if nd < 3 else [3]))
        g = groups if self.flag(0.8) else draw(st.sampled_from(
            [d for d in divisors(math.gcd(c, out))]))
        if kind == "kxk":
            y = self.conv(src, out, k, stride, None, None, g, bias=self.flag(0.3),
                          functional=self.flag(0.1),
                          mode="zeros" if self.flag(0.85) else None)
        elif kind == "asym" and nd > 1:
            axis = draw(st.integers(0, nd - 1))
            ks = tuple(k if a == axis else 1 for a in range(nd))
            y = self.conv(src, out, ks, stride, tuple(kk // 2 for kk in ks), 1, g,
                          "zeros", self.flag(0.2), False)
        elif kind == "1x1":
            y = self.conv(src, out, 1, stride, 0, 1, g, "zeros", self.flag(0.3), False)
        elif kind == "even":  # e.g. k=4, s=2, p=1 beside a strided 1x1: the tap is off-centre
            ke = draw(st.sampled_from([2, 4]))
            y = self.conv(src, out, ke, stride, draw(st.integers(0, ke // 2)), 1, g, "zeros",
                          self.flag(0.3), False)
        elif kind == "identity":
            if stride != 1 or out != c:
                return None
            return self.bn(src, "module") if self.flag(0.7) else src
        elif kind == "seq":  # 1x1 -> [pad+BN] -> KxK (DBB), or 1x1 -> padded KxK
            mid = self.conv(src, c, 1, 1, 0, 1, g, "zeros", self.flag(0.3), False)
            if mid is None:
                return None
            if self.flag(0.6):
                mid = self.pad(mid, k // 2, "constant")
                mid = mid and self.bn(mid, "module")
                y = mid and self.conv(mid, out, k, stride, 0, 1, g, "zeros", False, False)
            else:
                mode = "zeros" if self.flag(0.7) else None
                y = self.conv(mid, out, k, stride, k // 2, 1, g, mode, False, False)
        elif kind == "avg":
            mid = self.conv(src, out, 1, 1, 0, 1, g, "zeros", self.flag(0.3), False)
            if mid is None:
                return None
            if self.flag(0.5):
                mid = self.pad(mid, k // 2, "constant")
                mid = mid and self.bn(mid, "module")
                y = mid and self.pool(mid, k, stride, 0, True, False)
            else:
                y = self.pool(mid, k, stride, k // 2, None, self.flag(0.15))
        elif kind == "bnconv":
            mid = self.bn(src, "module")
            y = mid and self.conv(mid, out, k, stride, k // 2, 1, g, None, self.flag(0.3),
                                  False)
        elif kind == "scale":
            y = self.conv(src, out, draw(st.sampled_from([1, k])), stride, None, 1, g, "zeros",
                          False, False)
            if y is not None and self.flag(0.7):
                y = self.bn(y, "module") or y
            if y is not None:
                p = torch.rand((1, out) + (1,) * nd, generator=self.gen, dtype=F64) + 0.5
                name = self.name("p")
                return self.emit(("param", y, "mul", name), None, {name: p}) or y
            return None
        else:
            return None
        if y is not None and kind not in ("identity",) and self.flag(0.75):
            y = self.bn(y, draw(st.sampled_from(["module", "module", "module", "functional",
                                                 "no_affine"]))) or y
        return y

    def block(self) -> int | None:
        draw = self.draw
        src = self.source()
        c = self.channels(src)
        out = c if self.flag(0.6) else draw(st.sampled_from(
            [m for m in range(1, MAX_CHANNELS + 1)]))
        stride = draw(st.sampled_from([1, 1, 1, 2] + ([(1, 2), (2, 1)] if self.nd == 2 else [])))
        groups = draw(st.sampled_from(divisors(math.gcd(c, out))))
        kinds = draw(st.lists(st.sampled_from(["kxk", "kxk", "1x1", "identity", "seq", "avg",
                                               "asym", "bnconv", "scale", "even"]),
                              min_size=2, max_size=4))
        outs = [self.branch(kind, src, out, stride, groups) for kind in kinds]
        outs = [o for o in outs if o is not None]
        if not outs:
            return None
        # combine the branches whose outputs have one shape (misaligned ones are left alone)
        shape = max((self.vals[o].shape for o in outs),
                    key=lambda s: sum(self.vals[o].shape == s for o in outs))
        same = [o for o in outs if self.vals[o].shape == shape]
        if len(same) > 1 and self.flag(0.2):
            y = self.emit(("cat", same, "cat"))
        else:
            y = same[0]
            for o in same[1:]:
                kind = "sub" if self.flag(0.15) else "add"
                forms = ["op", "op", "torch", "alpha", "method"] if kind == "add" else ["op"]
                y = self.emit((kind, y, o, draw(st.sampled_from(forms)))) or y
        if y is not None and self.flag(0.25):
            y = self.bn(y, "module") or y
        if y is not None and self.flag(0.5):
            y = self.act(y) or y
        return y

    # --- whole programs --------------------------------------------------------------------
    STEPS = ("block", "block", "block", "conv", "conv", "conv", "convT", "bn", "pad", "pool",
             "scale", "act", "act", "identity", "combine", "combine", "shared", "tokens", "alias",
             "write", "leaf", "override", "rand", "patches")
    BLOCK_STEPS = ("block", "block", "block", "block", "act", "combine", "shared", "conv",
                   "alias")

    def step(self, kinds: tuple[str, ...] = STEPS) -> None:
        kind = self.draw(st.sampled_from(kinds))
        if kind == "block":
            self.block()
        elif kind == "combine":
            self.combine()
        else:
            src = self.source()
            getattr(self, {"convT": "conv_t"}.get(kind, kind))(src)


@st.composite
def programs(draw, nd: int | None = None, steps: tuple[int, int] = (1, 7), blocks: bool = False):
    nd = nd if nd is not None else draw(st.sampled_from([1, 2, 2, 2, 3]))
    channels = draw(st.integers(1, 6))
    lo, hi = SIZES[nd]
    size = tuple(draw(st.integers(lo, hi)) for _ in range(nd))
    seed = draw(st.integers(0, 2**31 - 1))
    b = Builder(draw, nd, channels, size, seed)
    for _ in range(draw(st.integers(*steps))):
        b.step(Builder.BLOCK_STEPS if blocks else Builder.STEPS)
    if b.flag(0.1):
        b.head(b.source())
    # every value nothing else reads is an output, so every op reaches an output
    read = {i for ins in b.prog.code for i in uses(ins)}
    outs = [i for i in range(1, len(b.vals)) if i not in read] or [0]
    b.prog.outputs = outs
    return Case(b.prog.eval(), b.x)


class Case:
    def __init__(self, model: Program, x: torch.Tensor) -> None:
        self.model, self.x = model, x

    def __repr__(self) -> str:
        mods = "\n".join(f"    {k}: {v}" for k, v in self.model.mods.items())
        params = "\n".join(f"    {k}: {tuple(v.shape)}" for k, v in self.model.params.items())
        code = "\n".join(f"    v{i + 1} = {ins}" for i, ins in enumerate(self.model.code))
        return (f"Case(nd={self.model.nd}, x={tuple(self.x.shape)}, outputs={self.model.outputs}"
                f"\n  modules:\n{mods}\n  params:\n{params}\n  code:\n{code})")


# --- the property ----------------------------------------------------------------------------


def flat(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in flat(o)]


def rel_error(got, want) -> float:
    worst = 0.0
    for g, w in zip(flat(got), flat(want), strict=True):
        assert g.shape == w.shape, (g.shape, w.shape)
        g, w = g.double(), w.double()
        scale = w.abs().max().item()
        diff = (g - w).abs().max().item()
        worst = max(worst, diff / scale if scale > 1e-12 else diff)
    return worst


def run(model: nn.Module, x: torch.Tensor):
    """One call on a clone of ``x`` (in-place ops may write into the input), with torch's random
    generator seeded: the original and the folded model draw the same random numbers."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(12345)  # not the seed fold runs its own checks with
        return model(x.clone())


def check_program(case: Case, pick=None) -> None:
    """Fold ``case`` in float64 (unverified) and float32 (verified) and compare both with a
    float64 run of the original; with ``pick``, fold with ``outputs=pick`` and compare with
    ``pick`` of the original's output."""
    m64, x64 = case.model, case.x
    want = run(m64, x64)
    if pick is not None:
        want = pick(want)
    note(repr(case))
    COUNTS["graphs"] += 1
    if COUNTS["graphs"] % 50 == 0:
        _write_counts()
    try:
        example = x64.clone()
        try:
            # verify=False: the engine must be right on its own, not saved by the safety net
            folded = reparam.fold(m64, (example,), leaf_modules=m64.leaves, verify=False,
                                  outputs=pick)
        except reparam.ReparamError as e:
            # `t += c` makes the fx trace differ from eager mode: refusing is right
            if any(ins[0] == "aug" for ins in m64.code) and "eager" in str(e):
                return
            raise
        err64 = rel_error(run(folded, x64), want)
        note(str(folded.reparam_report))
        assert err64 <= TOL64, f"float64 fold is wrong: relative error {err64:.3g}"
        for r in folded.reparam_report.regions:
            assert r.macs_after <= r.macs_before, f"region {r.name} got dearer: {r}"
        COUNTS["regions"] += len(folded.reparam_report.regions)

        m32 = copy.deepcopy(m64).float()
        folded32 = reparam.fold(m32, (x64.float(),), leaf_modules=m32.leaves, outputs=pick)
        assert all(p.dtype == torch.float32 for p in folded32.parameters())
        err32 = rel_error(run(folded32, x64.float()), want)
        base32 = run(m32, x64.float())
        base32 = rel_error(base32 if pick is None else pick(base32), want)  # float32 rounding
        assert err32 <= max(TOL32, 10 * base32), (
            f"float32 fold off by {err32:.3g} (unfolded float32: {base32:.3g})")
        assert torch.equal(example, x64), "fold wrote into the example input"
    except AssertionError as e:
        COUNTS["wrong"] += 1
        _write_counts()
        _write_case(case, e)
        raise
    except Exception as e:
        COUNTS["errors"] += 1
        _write_counts()
        _write_case(case, e)
        raise


@settings(max_examples=EXAMPLES)
@given(programs())
def test_random_graph_folds_exactly(case):
    check_program(case)


@settings(max_examples=EXAMPLES)
@given(programs(nd=2, steps=(2, 5), blocks=True))
def test_random_blocks_fold_exactly(case):
    """Block-heavy programs: several multi-branch blocks in a row, 2d (where most models live)."""
    check_program(case)


@settings(max_examples=max(EXAMPLES // 4, 10))
@given(programs(), st.data())
def test_random_graph_keeps_the_outputs_selected(case, data):
    """``fold(..., outputs=)`` returning some of the outputs: the others' ops go (writers and
    random draws stay), and what is kept is exact."""
    n = len(case.model.outputs)
    keep = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True),
                     label="keep")

    def pick(out):
        outs = (out,) if n == 1 else out
        return tuple(outs[i] for i in keep)

    check_program(case, pick)


@pytest.mark.parametrize("nd", [1, 3])
@settings(max_examples=max(EXAMPLES // 4, 10))
@given(data=st.data())
def test_random_graph_1d_3d(nd, data):
    check_program(data.draw(programs(nd=nd)))


@settings(max_examples=max(EXAMPLES // 8, 5))
@given(programs(nd=2, steps=(1, 4)))
def test_check_passes_on_random_graphs(case):
    """``check=True`` folds a float64 copy again and compares it on fresh random inputs."""
    try:
        folded = reparam.fold(case.model, (case.x.clone(),), check=True,
                              leaf_modules=case.model.leaves)
    except reparam.ReparamError as e:  # a `+=` torch.fx would trace out of place: refused (R6)
        if any(ins[0] == "aug" for ins in case.model.code) and "eager" in str(e):
            return
        raise
    COUNTS["graphs"] += 1
    assert rel_error(run(folded, case.x), run(case.model, case.x)) <= TOL64


# --- the self-check: fold(check=True) ----------------------------------------------------------


class StemAndBlock(nn.Module):
    """A conv+BN stem (conv_bn only), then a RepVGG block (needs pad_small_kernel)."""

    def __init__(self) -> None:
        super().__init__()
        from reparam.models import RepVGGBlock

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.block = RepVGGBlock(8, 8)

    def forward(self, x):
        return self.block(F.relu(self.stem(x)))


def good_models():
    from reparam.models import ACBlock, DBBlock, MobileOneBlock, RepVGGBlock, repvgg_a0

    return {
        "repvgg_block": (RepVGGBlock(8, 8, groups=2), (2, 8, 9, 9)),
        "dbb_block": (DBBlock(8, 8, stride=2), (2, 8, 9, 9)),
        "acnet_block": (ACBlock(8, 8), (2, 8, 9, 9)),
        "mobileone_block": (MobileOneBlock(8, 8, 3, groups=8, num_branches=3), (2, 8, 9, 9)),
        "repvgg_a0": (repvgg_a0(num_classes=10), (1, 3, 32, 32)),
        "stem_and_block": (StemAndBlock(), (2, 3, 8, 8)),
    }


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    from helpers import randomize_bn

    return randomize_bn(model, seed)


@pytest.mark.parametrize("name", ["repvgg_block", "dbb_block", "acnet_block", "mobileone_block",
                                  "repvgg_a0", "stem_and_block"])
def test_check_passes_on_good_models(name):
    torch.manual_seed(0)
    model, shape = good_models()[name]
    model = randomize(model)
    x = torch.randn(*shape)
    folded = reparam.fold(model, (x,), check=True)
    assert folded.reparam_report.regions
    assert rel_error(run(folded, x), run(model.double(), x.double())) < TOL32


def region_using(report, law: str) -> str:
    return next(r.name for r in report.regions if law in r.rules)


def test_check_names_the_region_whose_law_is_wrong(monkeypatch):
    """pad_small_kernel made subtly wrong (1e-6 relative): only the block's region uses it, so
    the CheckError names the block's region, not the stem's."""
    model = randomize(StemAndBlock())
    x = torch.randn(2, 3, 8, 8)
    expected = region_using(reparam.fold(model, (x,)).reparam_report, "pad_small_kernel")
    original = reparam.kernel.pad_kernel

    def bad_pad_kernel(k, size, offset):
        out = original(k, size, offset)
        return dataclasses.replace(out, weight=out.weight * (1 + 1e-6))

    monkeypatch.setattr(reparam.kernel, "pad_kernel", bad_pad_kernel)
    with pytest.raises(reparam.CheckError) as e:
        reparam.fold(model, (x,), check=True)
    message = str(e.value)
    assert f"the first region that diverges is '{expected}'" in message
    assert "report this as a bug" in message and "unfolded model" in message


def test_check_names_the_first_region_when_every_region_is_wrong(monkeypatch):
    """scale_out (conv then BN, layer scales) off by 1e-7: every region is wrong; the error names
    the first one in graph order (the stem), with the size of the error."""
    model = randomize(StemAndBlock())
    x = torch.randn(2, 3, 8, 8)
    first = reparam.fold(model, (x,)).reparam_report.regions[0].name
    original = reparam.kernel.scale_out

    def bad_scale_out(k, scale, shift=0.0):
        out = original(k, scale, shift)
        return dataclasses.replace(out, bias=out.bias * (1 + 1e-7) + 1e-7)

    monkeypatch.setattr(reparam.kernel, "scale_out", bad_scale_out)
    with pytest.raises(reparam.CheckError, match=f"diverges is '{first}'") as e:
        reparam.fold(model, (x,), check=True)
    assert "relative, float64" in str(e.value)


def test_check_error_is_a_reparam_error():
    assert issubclass(reparam.CheckError, reparam.ReparamError)


# --- float16 / bfloat16 range --------------------------------------------------------------


@settings(max_examples=max(EXAMPLES // 4, 10))
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16]), log_var=st.integers(-14, 3),
       scale=st.sampled_from([1.0, 30.0, 1000.0]), seed=st.integers(0, 2**31 - 1))
def test_low_precision_folds_never_overflow(dtype, log_var, scale, seed):
    """A RepVGG-like block in float16 / bfloat16 whose BN variances reach 1e-14 and weights
    1000: folding multiplies the BN scale into the weights in float64, and the cast back must
    never give inf or NaN where the original was finite (such a region is kept instead)."""
    gen = torch.Generator().manual_seed(seed)
    c = 4
    branches = [nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c))
                for k in (3, 1)]
    model = nn.ModuleList(branches)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * scale
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(10.0 ** torch.randint(log_var, 4, (c,), generator=gen).double())
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.eps = 10.0 ** log_var

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = model

        def forward(self, x):
            return self.b[0](x) + self.b[1](x)

    block = Block().to(dtype).eval()
    x = (torch.randn(2, c, 5, 5, generator=gen) * 1e-3).to(dtype)
    folded = reparam.fold(block, (x,))
    for name, t in folded.state_dict().items():
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), f"{name} overflowed in {dtype}"
    with torch.no_grad():
        want, got = block(x), folded(x)
    assert bool(torch.isfinite(got[torch.isfinite(want)]).all()), "inf or NaN where it was finite"
