"""reparam.fold against the official code and converters of YOLOv7, OREPA, ECBSR and DBB.

Run beside checkouts of the official repositories (never part of the package or its tests)::

    python scripts/official_converters.py --out docs/deployed.md \\
        --yolov7 ../yolov7 --orepa ../OREPA_CVPR2022 --ecbsr ../ECBSR \\
        --dbb ../DiverseBranchBlock

Each model is built by the repository's own code with random weights (every BN given random
statistics and affine parameters), in a process of its own (OREPA's and DBB's modules share
names). Its converter runs on one copy: YOLOv7's ``Model.fuse()`` (RepConv, conv+BN, the implicit
add and multiply of ``IDetect``), OREPA's and DBB's ``switch_to_deploy()`` on every block, and
ECBSR's own conversion (each ECB's ``rep_params()`` copied into the plain network, ``PlainSR``,
as its ``convert.py`` does). ``reparam.fold(model, x)`` runs on another. Both are compared with a
float64 run of the original: ``max |y - y64| / max |y64|``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from timm_all import _machine, randomize_bn, write_report  # noqa: E402

import reparam  # noqa: E402

BEGIN, END = "<!-- official_converters.py: begin -->", "<!-- official_converters.py: end -->"


# --- the four systems, each built by its own code ------------------------------------------------

def _yolov7(path: Path):
    sys.path.insert(0, str(path))
    from models.yolo import Model

    model = Model(str(path / "cfg/training/yolov7.yaml"), ch=3, nc=80)

    def convert(m):
        return m.fuse()

    return "YOLOv7 (cfg/training/yolov7.yaml)", model, torch.randn(1, 3, 320, 320), convert


def _blocks(path: Path, block: str, name: str):
    sys.path.insert(0, str(path))
    import convnet_utils as cu

    cu.switch_conv_bn_impl(block)
    cu.switch_deploy_flag(False)
    model = cu.build_model("ResNet-18")

    def convert(m):
        for module in m.modules():
            if hasattr(module, "switch_to_deploy"):
                module.switch_to_deploy()
        return m

    return name, model, torch.randn(1, 3, 224, 224), convert


def _orepa(path: Path):
    return _blocks(path, "OREPA", "OREPA ResNet-18")


def _dbb(path: Path):
    return _blocks(path, "DBB", "DBB ResNet-18")


def _ecbsr(path: Path):
    sys.path.insert(0, str(path))
    from models.ecbsr import ECBSR
    from models.plainsr import PlainSR

    sizes = dict(module_nums=4, channel_nums=16, act_type="prelu", scale=2, colors=1)
    model = ECBSR(with_idt=0, **sizes)

    def convert(m):  # what convert.py does: each ECB's kernel and bias into PlainSR's conv
        plain = PlainSR(**sizes).to(torch.float64 if next(m.parameters()).dtype ==
                                    torch.float64 else torch.float32)
        for block, conv in zip(m.backbone, plain.backbone, strict=True):
            k, b = block.rep_params()
            conv.conv3x3.weight.data, conv.conv3x3.bias.data = k, b
            if block.act_type == "prelu":
                conv.act.weight.data = block.act.weight.data
        return plain.eval()

    return "ECBSR-M4C16 (x2)", model, torch.randn(1, 1, 96, 96), convert


SYSTEMS = {"yolov7": _yolov7, "orepa": _orepa, "ecbsr": _ecbsr, "dbb": _dbb}
# ECBSR's eval forward builds its kernel with float32 zeros, so it cannot run in float64; its
# training forward (the branches, no BN) computes the same function, and is the reference
TRAINING_REFERENCE = {"ecbsr"}


# --- measuring one -----------------------------------------------------------------------------

def _counts(model: nn.Module) -> dict:
    return {"params": sum(p.numel() for p in model.parameters()),
            "bn": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
            "conv": sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _err(got, want) -> float:
    got, want = _first(got).double(), _first(want).double()
    return ((got - want).abs().max() / want.abs().max()).item()


def measure(key: str, path: Path) -> dict:
    torch.manual_seed(0)
    name, model, x, convert = SYSTEMS[key](path)
    model = randomize_bn(model, 0).eval()
    with torch.no_grad():
        reference = copy.deepcopy(model).double()
        if key in TRAINING_REFERENCE:
            reference.train()
        want = reference(x.double())
        row = {"key": key, "name": name, "input": list(x.shape), "before": _counts(model),
               "orig32_err": _err(model(x), want)}
        start = time.perf_counter()
        theirs = convert(copy.deepcopy(model)).eval()
        row["convert_s"] = time.perf_counter() - start
        row["theirs"] = {**_counts(theirs), "err": _err(theirs(x), want)}
        start = time.perf_counter()
        folded = reparam.fold(model, (x,))
        row["fold_s"] = time.perf_counter() - start
        row["ours"] = {**_counts(folded), "err": _err(folded(x), want)}
    report = folded.reparam_report
    row["regions"], row["complete"] = len(report.regions), report.complete
    row["captured"] = len(report.captured)
    return row


# --- the report --------------------------------------------------------------------------------

def render(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Produced by `{meta['command']}` on {meta['date']}: {meta['machine']}, torch "
        f"{meta['torch']}; the official repositories at the commits named below.",
        "",
        "| system | input | params before | params, its converter | params, reparam | "
        "BN before / its / reparam | conv before / its / reparam | err fp32 unfolded | "
        "err its converter | err reparam | blocks captured | fold s |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['key']} | - | - | - | - | - | - | - | - | {r['error'][:200]} "
                         "| - | - |")
            continue
        b, t, o = r["before"], r["theirs"], r["ours"]
        lines.append(
            f"| {r['name']} | {'x'.join(map(str, r['input']))} | {b['params']:,} | "
            f"{t['params']:,} | {o['params']:,} | {b['bn']} / {t['bn']} / {o['bn']} | "
            f"{b['conv']} / {t['conv']} / {o['conv']} | {r['orig32_err']:.1e} | "
            f"{t['err']:.1e} | {o['err']:.1e} | {r['captured']} | {r['fold_s']:.2f} |")
    lines += ["", "Commits: " + ", ".join(f"{k} `{v}`" for k, v in meta["commits"].items())]
    return "\n".join(lines) + "\n"


def _commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key in SYSTEMS:
        p.add_argument(f"--{key}", type=Path, help=f"a checkout of the official {key} code")
    p.add_argument("--out", type=Path, help="write the Markdown table here (docs/deployed.md)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(measure(args.one, getattr(args, args.one))), flush=True)
        return 0
    rows, commits = [], {}
    for key in SYSTEMS:
        path = getattr(args, key)
        if path is None:
            continue
        commits[key] = _commit(path)
        done = subprocess.run([sys.executable, __file__, "--one", key, f"--{key}", str(path)],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {
            "key": key, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        rows.append(row)
        print(key, row.get("error") or f"params {row['before']['params']:,} -> theirs "
              f"{row['theirs']['params']:,}, reparam {row['ours']['params']:,}; err "
              f"{row['theirs']['err']:.1e} / {row['ours']['err']:.1e}", flush=True)
    shown = [f"--out {args.out}"] if args.out else []
    shown += [f"--{k} .../{getattr(args, k).name}" for k in commits]
    meta = {"command": "python scripts/official_converters.py " + " ".join(shown),
            "date": datetime.date.today().isoformat(), "machine": _machine(),
            "torch": torch.__version__, "commits": commits}
    text = render(rows, meta)
    if args.out:
        write_report(args.out, text, BEGIN, END, "The official code")
    else:
        print(text)
    return 0 if not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
