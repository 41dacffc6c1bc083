"""Measure every zoo model before and after ``reparam.fold`` and fill the tables in docs/models.md.

    python scripts/model_table.py            # rewrites the "measured" columns of docs/models.md

Parameters are counted on the modules; multiply-adds per image at 224x224 with
``reparam.count_macs`` (convs, linears, BNs, adds, pools), the same counter before and after.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

import reparam
import reparam.models as M

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
NAMES = {  # the docs' row label -> builder
    **{f"RepVGG-{n[:2].upper()}{n[2:]}": f"repvgg_{n}" for n in
       ("a0", "a1", "a2", "b0", "b1", "b1g2", "b1g4", "b2", "b2g2", "b2g4", "b3", "b3g2",
        "b3g4")},
    **{f"MobileOne-S{i}": f"mobileone_s{i}" for i in range(5)},
    "ResNet-18": "resnet18", "ACNet ResNet-18": "acnet_resnet18",
    "DBB ResNet-18": "dbb_resnet18",
}


def measure(builder: str) -> dict:
    torch.manual_seed(0)
    model = getattr(M, builder)().eval()
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    folded = reparam.fold(model, (x,))
    seconds = time.perf_counter() - start
    return {
        "params": (sum(p.numel() for p in model.parameters()),
                   sum(p.numel() for p in folded.parameters())),
        "macs": (reparam.count_macs(model, (x,)), reparam.count_macs(folded, (x,))),
        "ops": folded.reparam_report.ops_after, "seconds": seconds,
        "complete_blocks": len(folded.reparam_report.regions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    text = args.doc.read_text(encoding="utf-8")
    for label, builder in NAMES.items():
        m = measure(builder)
        p0, p1 = m["params"]
        c0, c1 = m["macs"]
        rows.append(f"| {label} | {p0:,} | {p1:,} | {c0 / 1e9:.2f}G | {c1 / 1e9:.2f}G | "
                    f"{m['ops'].get('conv', 0)} | {m['seconds']:.2f} s |")
        # fill the "measured after reparam.fold" column of the parameter tables
        text = re.sub(rf"^(\| {re.escape(label)} \|.*\|) (TODO|[\d,]+) \|$",
                      lambda mm, p1=p1: f"{mm.group(1)} {p1:,} |", text, flags=re.M)
        print(rows[-1], flush=True)
    table = "\n".join([
        "| model | params (training) | params (folded) | MACs (training) | MACs (folded) | "
        "convs (folded) | fold time |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows])
    block = (f"<!-- measured: begin -->\nMeasured by `python scripts/model_table.py` on "
             f"{time.strftime('%Y-%m-%d')} (torch {torch.__version__}, one CPU thread; "
             f"multiply-adds per 224x224 image):\n\n{table}\n<!-- measured: end -->")
    if "<!-- measured: begin -->" in text:
        text = re.sub(r"<!-- measured: begin -->.*<!-- measured: end -->", block, text,
                      flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Measured: training-time and folded form\n\n" + block + "\n"
    args.doc.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
