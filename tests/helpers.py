"""Helpers shared by tests: random BN statistics, fp64 references, op counts."""

from __future__ import annotations

import torch
from torch import fx, nn

import reparam
from reparam.trace import deep_copy

BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random (not default) statistics and affine parameters; returns eval model."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(c, generator=g) * 2 - 1)
    return model.eval()


def run64(model: nn.Module, *inputs: torch.Tensor):
    m = deep_copy(model).double()
    with torch.no_grad():
        return m(*[x.double() for x in inputs])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def assert_equivalent(model: nn.Module, folded: nn.Module, *inputs: torch.Tensor,
                      tol: float = 1e-5) -> float:
    """The folded model (its own dtype) matches an fp64 run of the original within ``tol``."""
    want = run64(model, *inputs)
    with torch.no_grad():
        got = folded(*inputs)
    err = rel_err(got, want)
    assert err < tol, f"relative error {err:.3g} >= {tol}"
    return err


def assert_exact64(model: nn.Module, *inputs: torch.Tensor, tol: float = 1e-10, **kw) -> nn.Module:
    """Fold a float64 copy and compare with the float64 original: exact to ``tol``."""
    m64 = deep_copy(model).double()
    x64 = [x.double() for x in inputs]
    folded = reparam.fold(m64, tuple(x64), **kw)
    with torch.no_grad():
        err = rel_err(folded(*x64), m64(*x64))
    assert err < tol, f"float64 fold error {err:.3g} >= {tol}"
    return folded


def ops(gm: fx.GraphModule) -> dict[str, int]:
    return reparam.count_ops(gm)


def n_ops(gm: fx.GraphModule, kind: str) -> int:
    return ops(gm).get(kind, 0)
