"""Repro of engine issues N1 and N2 (issue 8; see docs/research.md, "What the engine does not do
yet"). Every fold here is exact; the point is the folds the engine misses.

    python experiments/engine_repro_issue8.py
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402
from torch import nn  # noqa: E402

import reparam  # noqa: E402
from reparam.models import ZeroPad, conv_bn  # noqa: E402


def rand_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.25, 1.75)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model.eval()


class Mix(nn.Module):
    """``dw5x5+BN + 3x3+BN + (1x1 -> pad -> BN -> 3x3+BN) + gamma * 1x1 + BN(x)``."""

    def __init__(self, c: int, mid: int, relu_point: bool = False) -> None:
        super().__init__()
        self.dw5 = conv_bn(c, c, 5, 1, 2, groups=c)
        self.dense3 = conv_bn(c, c, 3, 1, 1)
        self.chain = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(c, mid, 1, bias=False), pad=ZeroPad(1), bn=nn.BatchNorm2d(mid),
            square=conv_bn(mid, c, 3, 1, 0)))
        self.point = nn.Conv2d(c, c, 1, bias=False)
        self.gamma = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.act = nn.ReLU() if relu_point else nn.Identity()
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        return (self.dw5(x) + self.dense3(x) + self.chain(x)
                + self.act(self.point(x) * self.gamma) + self.identity(x))


class NoDW(nn.Module):
    """The same block without its depthwise 5x5 branch."""

    def __init__(self, m: Mix) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        m = self.m
        return m.dense3(x) + m.chain(x) + m.point(x) * m.gamma + m.identity(x)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)

    x = torch.randn(1, 16, 12, 12)
    b = rand_bn(Mix(16, 16))
    f = reparam.fold(b, x)
    print("N1 engine: MACs", reparam.count_macs(b, x), "->", reparam.count_macs(f, x),
          reparam.count_ops(f))
    g = reparam.fold(NoDW(b).eval(), x)
    print("N1 without the dw5 branch:", reparam.count_macs(g, x), reparam.count_ops(g),
          "(+ the dw5 conv 57,600 + one add 2,304)")

    x = torch.randn(1, 8, 12, 12)
    b = rand_bn(Mix(8, 16, relu_point=True))
    f = reparam.fold(b, x)
    print("N2 engine:", reparam.count_macs(f, x), reparam.count_ops(f))
    print(f.reparam_report)


if __name__ == "__main__":
    main()
