"""Fold each system of the re-parameterization universe and fill its table in docs/models.md.

    python scripts/universe_table.py          # rewrites the part between the "universe" markers

Each row: a training-time block or network of ``reparam.models`` with random weights and random
BN statistics, ``eval()``; its parameters, after ``reparam.fold(model, x)`` (``max_cost`` as the
row says), and in its authors' deploy form (their converter's count, computed from the geometry
in ``tests/test_models_universe.py``); the ops left (``reparam.count_ops``); the folded float32
model's error against a float64 run of the original, and a float64 fold's error against it
(``max |folded - original| / max |original|``).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reparam  # noqa: E402
import reparam.models as M  # noqa: E402
from reparam.trace import deep_copy  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from timm_all import randomize_bn  # noqa: E402 - the scripts' shared helper (timm not needed)

DOC = ROOT / "docs" / "models.md"
BEGIN, END = "<!-- universe: begin -->", "<!-- universe: end -->"


class DOSample(nn.Module):
    """The DO-Conv authors' sample network: three DOConv2d, 1 -> 16 -> 16 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = M.DOConv2d(1, 16, 3), M.DOConv2d(16, 16, 3), M.DOConv2d(16, 10, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


# label, builder, input shape, authors' deploy params (None: no converter), max_cost
ROWS = [
    ("DO-Conv: the authors' sample (3 `DOConv2d`)", DOSample, (1, 1, 28, 28), 3_930, 1.0),
    ("`DOConv2d(16, 32, 3, D_mul=12)`", lambda: M.DOConv2d(16, 32, 3, D_mul=12),
     (1, 16, 8, 8), 4_640, 1.0),
    ("DiracNet-18", M.diracnet18, (1, 3, 224, 224), 11_511_784, 1.0),
    ("DiracNet-34", M.diracnet34, (1, 3, 224, 224), 21_616_232, 1.0),
    ("DiracNet-28-10 (CIFAR)", M.diracnet_cifar, (1, 3, 32, 32), 36_423_050, 1.0),
    ("`RepMLPUnit(8, 8, 14, 14, 7, 7, (1, 3, 5), 1, 4)`",
     lambda: M.RepMLPUnit(8, 8, 14, 14, 7, 7, (1, 3, 5), 1, 4), (1, 8, 14, 14), 40_920, 1.0),
    ("`RepMLPBlock(8, 8, 8, (3,), 4, 1)` (RepMLPNet, one share-set)",
     lambda: M.RepMLPBlock(8, 8, 8, (3,), 4, 1), (1, 8, 16, 16), 4_202, 1.0),
    ("RepMLPNet-T224", M.repmlpnet_t224, (1, 3, 224, 224), 38_331_720, 1.0),
    ("`PSConv2d(64, 64, dilation=2)`", lambda: M.PSConv2d(64, 64, dilation=2),
     (1, 64, 16, 16), None, 1.0),
    ("`PSConv2d(64, 64, dilation=2)`, `max_cost=10`", lambda: M.PSConv2d(64, 64, dilation=2),
     (1, 64, 16, 16), 331_776, 10.0),
    ("`ACBlock(4, 6, 3, padding=0)`", lambda: M.ACBlock(4, 6, 3, padding=0), (1, 4, 8, 8), 222,
     1.0),
    ("SmallNet 7x7, Expand-CL (r = 4)", lambda: M.smallnet(7, "cl"), (1, 3, 32, 32), 66_186, 1.0),
    ("SmallNet 7x7, Expand-CK (r = 4)", lambda: M.smallnet(7, "ck"), (1, 3, 32, 32), 66_186, 1.0),
    ("RepVGG-D2se", M.repvgg_d2se, (1, 3, 224, 224), 120_387_572, 1.0),
    ("RepVGGplus-L2pse", M.repvggplus_l2pse, (1, 3, 224, 224), 127_151_960, 1.0),
]


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max())


def measure(build, shape, max_cost: float) -> dict:
    torch.manual_seed(0)
    model = randomize_bn(build())
    x = torch.randn(*shape)
    m64, x64 = deep_copy(model).double(), x.double()
    with torch.no_grad():
        want = m64(x64)
    start = time.perf_counter()
    folded = reparam.fold(model, x, max_cost=max_cost)
    seconds = time.perf_counter() - start
    folded64 = reparam.fold(m64, x64, max_cost=max_cost)
    with torch.no_grad():
        e32, e64 = _err(folded(x), want), _err(folded64(x64), want)
    ops = reparam.count_ops(folded)
    return {"train": sum(p.numel() for p in model.parameters()),
            "fold": sum(p.numel() for p in folded.parameters()), "ops": ops,
            "e32": e32, "e64": e64, "seconds": seconds,
            "complete": folded.reparam_report.complete}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [f"Measured by `python scripts/universe_table.py` on {datetime.date.today()} "
             f"(torch {torch.__version__}, one CPU thread).", "",
             "| system | training | after `reparam.fold` | authors' deploy | ops left | "
             "fp32 error | fp64 error | fold time |",
             "|---|---:|---:|---:|---|---|---|---:|"]
    for label, build, shape, deploy, max_cost in ROWS:
        m = measure(build, shape, max_cost)
        ops = ", ".join(f"{k} {v}" for k, v in sorted(m["ops"].items()))
        authors = f"{deploy:,}" if deploy is not None else "no converter"
        lines.append(f"| {label} | {m['train']:,} | {m['fold']:,} | {authors} | {ops} | "
                     f"{m['e32']:.1e} | {m['e64']:.1e} | {m['seconds']:.2f} s |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    old = args.doc.read_text(encoding="utf-8")
    head, rest = old.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    args.doc.write_text(f"{head}{BEGIN}\n{text}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
