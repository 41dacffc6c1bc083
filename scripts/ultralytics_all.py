"""Fold Ultralytics' YOLO models with ``reparam.fold`` and compare with Ultralytics' own ``fuse()``.

    python scripts/ultralytics_all.py --out docs/ultralytics.md        # the default list
    python scripts/ultralytics_all.py --all --json /tmp/u.json          # every shipped yaml
    python scripts/ultralytics_all.py --models 'yolov8n*' --out /tmp/u.md   # a subset

Every model is built from the yaml file Ultralytics ships (``YOLO('yolov8n.yaml')``: random
weights, nothing downloaded), its BN statistics randomized, ``eval()``. For each one: parameters,
conv and BN counts before; after ``model.fuse()`` (Ultralytics' converter, on a deep copy); after
``reparam.fold(model, x)`` (an error is recorded as text). Each output is compared with a float64
run of the original (``max |out - ref| / max |ref|`` over the tensors of the model's inference
output, its first element), at the first input size and at a second one; *structure* says whether
the output tree (types, shapes) equals the original's at both sizes.

Counting: ``nn.Conv*`` and ``*BatchNorm*`` **module instances** in ``model.modules()``, plus the
``conv`` / ``batch_norm`` call_function nodes of any ``torch.fx.GraphModule`` inside (functional
ops on ``get_attr`` weights, as a fold may emit). Op counts on a traced graph are not usable here:
Ultralytics' root forward (``_predict_once``) does not trace with torch.fx, neither before nor
after its ``fuse()``. Module counts see both sides the same way; a module called twice counts
once (no Ultralytics model shares one).

Default list: the plain yaml of each family and task at scale ``n`` (yolov5/6/8/11/12/26 and
their -cls/-seg/-pose/-obb), the smallest model of the families shipped one file per scale
(yolov3-tiny, yolov9t, yolov9c-seg, yolov10n) and rtdetr-l. ``--all`` adds every other yaml of
those tasks (p2/p6, ghost, resnet backbones, world, yoloe, yolov8-rtdetr, the other rt-detr).
Each model runs in its own subprocess, one thread. Environment: ``YOLO_OFFLINE=1`` and a settings
directory under /tmp are set unless given.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "ultralytics_cfg"))

import torch  # noqa: E402
from torch import fx, nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import reparam  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from timm_all import _machine, randomize_bn, write_report  # noqa: E402 - shared report helpers

TASKS = ("detect", "segment", "classify", "pose", "obb")
# families shipped one yaml per scale: the smallest of each, by default
SMALLEST = ("yolov3-tiny", "yolov9t", "yolov9c-seg", "yolov10n", "rtdetr-l")
PLAIN = re.compile(r"^yolo(v\d+|\d+)(-(cls|seg|pose|obb))?$")  # yolov8, yolo11-seg, ...
SIZES = {"classify": (64, 96)}  # other tasks: 160 and 224 (stride 64 models: 192 and 320)


# --- the models ----------------------------------------------------------------------------------

def _cfg_dir() -> Path:
    import ultralytics

    return Path(ultralytics.__file__).parent / "cfg" / "models"


def _task(cfg: dict) -> str:
    from ultralytics.nn.tasks import guess_model_task

    if "RTDETR" in str(cfg["head"][-1][2]):
        return "detect"
    return guess_model_task(cfg)


def _scaled(stem: str, scales: dict) -> str:
    """The name Ultralytics reads the ``n`` scale from (yolov8-seg -> yolov8n-seg)."""
    if not scales or "n" not in scales or re.match(r"^yolo(e-)?v?\d+[nslmxb]", stem):
        return stem  # one scale per file (yolov10n)
    return re.sub(r"^(yolo(?:e-)?v?\d+)", r"\1n", stem, count=1)


def list_models(everything: bool = False) -> list[dict]:
    """``{"name", "yaml", "task"}`` for each model to measure (see the module docstring)."""
    import yaml

    rows = []
    for path in sorted(_cfg_dir().rglob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        task = _task(cfg)
        if task not in TASKS:
            continue
        name = _scaled(path.stem, cfg.get("scales") or {})
        default = (PLAIN.match(path.stem) and "n" in (cfg.get("scales") or {})) or name in SMALLEST
        if everything or default:
            rows.append({"name": name, "yaml": str(path), "task": task})
    return rows


def build(name: str, seed: int = 0) -> nn.Module:
    """The Ultralytics model ``name`` (e.g. ``yolov8n-seg``) from its yaml, random weights."""
    from ultralytics import RTDETR, YOLO

    torch.manual_seed(seed)
    wrapper = RTDETR if "rtdetr" in name else YOLO  # YOLO() cannot guess RT-DETR's task
    model = wrapper(f"{name}.yaml").model
    return randomize_bn(model, seed)


def sizes_for(model: nn.Module, task: str) -> tuple[int, int]:
    if task in SIZES:
        return SIZES[task]
    stride = int(max(getattr(model, "stride", torch.tensor([32.0])).max().item(), 32))
    first = -(-160 // stride) * stride
    return first, first + 2 * stride


# --- counting ----------------------------------------------------------------------------------

_FUNCTIONAL = {"conv": {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"},
               "bn": {"batch_norm", "_native_batch_norm_legit_no_training",
                      "native_batch_norm", "cudnn_batch_norm"}}


def counts(model: nn.Module) -> dict[str, int]:
    """Parameters, conv and BN modules (plus functional ones in fx graphs inside)."""
    conv = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for m in model.modules():
        if isinstance(m, fx.GraphModule):
            for node in m.graph.nodes:
                if node.op != "call_function":
                    continue
                name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
                conv += name in _FUNCTIONAL["conv"]
                bn += name in _FUNCTIONAL["bn"]
    return {"params": sum(p.numel() for p in model.parameters()), "conv": conv, "bn": bn}


# --- outputs -------------------------------------------------------------------------------------

def tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors(o)]
    return []


def structure(out):
    """The output tree: container types and tensor shapes."""
    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, dict):
        return {str(k): structure(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [type(out).__name__, *(structure(o) for o in out)]
    return type(out).__name__


def inference_part(out):
    """What Ultralytics' predictors read: the first element of an ``(y, raw)`` tuple."""
    return out[0] if isinstance(out, tuple) else out


# models whose output rows are a set: RT-DETR's decoder returns its top-300 queries by score, and
# random weights make scores so nearly equal that float32 rounding (fuse()'s as well as a fold's)
# swaps tied rows; their rows are compared in sorted order
UNORDERED = ("RTDETRDetectionModel",)


def _sorted_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of each ``(N, K)`` matrix of ``t`` in lexicographic order."""
    if t.dim() < 2:
        return t
    flat = t.reshape(-1, *t.shape[-2:])
    out = []
    for m in flat:
        order = torch.arange(m.shape[0])
        for col in reversed(range(m.shape[1])):  # stable sorts, last key first
            order = order[torch.sort(m[order, col], stable=True).indices]
        out.append(m[order])
    return torch.stack(out).reshape(t.shape)


def rel_err(got, want, unordered: bool = False) -> float:
    """``max |got - want| / max |want|`` over the tensors of two outputs (float64); with
    ``unordered``, over their rows in sorted order (see :data:`UNORDERED`)."""
    a, b = tensors(inference_part(got)), tensors(inference_part(want))
    if len(a) != len(b):
        return float("nan")
    worst = 0.0
    for g, w in zip(a, b, strict=True):
        if g.shape != w.shape:
            return float("nan")
        g, w = g.double(), w.double()
        if unordered:
            g, w = _sorted_rows(g), _sorted_rows(w)
        worst = max(worst, (g - w).abs().max().item() / (w.abs().max().item() or 1.0))
    return worst


def _run(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


def _compare(model: nn.Module, refs: dict, xs: dict, unordered: bool = False) -> dict:
    """Error at each size against the float64 reference, and whether the output tree matches."""
    row, same = {}, True
    for key, x in xs.items():
        try:
            out = _run(model, x)
        except Exception as e:  # noqa: BLE001 - a model that runs at one size only
            row[f"err_{key}"] = None
            row[f"run_error_{key}"] = f"{type(e).__name__}: {str(e)[:200]}"
            same = False
            continue
        row[f"err_{key}"] = rel_err(out, refs[key]["out"], unordered)
        same = same and structure(out) == refs[key]["structure"]
    row["same_structure"] = same
    return row


def fuse_outputs(model: nn.Module):
    """What ``model.fuse()`` leaves the output of an end-to-end head (YOLOv10, YOLO26) as a
    selection for ``fold(..., outputs=)``: the predictions and the raw output of the branch they
    come from (``fuse()`` deletes the other one); ``None`` for a head with one branch."""
    head = model.model[-1]
    if getattr(head, "one2one_cv2", None) is None:
        return None
    kept = "one2one" if head.end2end else "one2many"

    def as_fuse_returns(out):
        return out[0], out[1][kept]

    return as_fuse_returns


def measure(name: str, task: str, seed: int = 0) -> dict:
    """Everything one table row needs, for one model."""
    model = build(name, seed)
    s1, s2 = sizes_for(model, task)
    gen = torch.Generator().manual_seed(seed)
    xs = {"a": torch.randn(1, 3, s1, s1, generator=gen),
          "b": torch.randn(1, 3, s2, s2, generator=gen)}
    row = {"model": name, "task": task, "type": type(model).__name__, "sizes": [s1, s2],
           "before": counts(model)}
    model64 = copy.deepcopy(model).double()
    refs = {}
    for key, x in xs.items():
        out = _run(model64, x.double())
        refs[key] = {"out": out, "structure": structure(out)}
    unordered = type(model).__name__ in UNORDERED
    row["unordered"] = unordered
    row["orig32_err"] = [rel_err(_run(model, xs[k]), refs[k]["out"], unordered) for k in xs]

    start = time.perf_counter()
    fused = copy.deepcopy(model).fuse(verbose=False)
    row["fuse_s"] = time.perf_counter() - start
    row["fuse"] = {**counts(fused), **_compare(fused, refs, xs, unordered)}

    start = time.perf_counter()
    try:
        folded = reparam.fold(model, xs["a"])
    except Exception as e:  # noqa: BLE001 - the baseline: record, do not stop
        row["fold_s"] = time.perf_counter() - start
        row["fold_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return row
    row["fold_s"] = time.perf_counter() - start
    row["fold"] = {**counts(folded), **_compare(folded, refs, xs, unordered)}
    row["fold_type"] = type(folded).__name__
    report = getattr(folded, "reparam_report", None)
    if report is not None:
        row["regions"] = len(report.regions)
        row["untraced"] = [(p, r[:160]) for p, r in report.untraced][:6]
        row["n_untraced"] = len(report.untraced)
    pick = fuse_outputs(model)
    if pick is not None:  # the same fold, shipping what fuse() ships
        del folded
        start = time.perf_counter()
        lean = reparam.fold(model, xs["a"], outputs=pick)
        row["outputs_s"] = time.perf_counter() - start
        picked = {k: {"out": pick(r["out"]), "structure": structure(_run(fused, xs[k]))}
                  for k, r in refs.items()}
        row["outputs"] = {**counts(lean), **_compare(lean, picked, xs, unordered)}
    return row


# --- the report ----------------------------------------------------------------------------------

def _e(v) -> str:
    return "-" if v is None else ("nan" if v != v else f"{v:.1e}")


def _cb(c: dict) -> str:
    return f"{c['conv']} / {c['bn']}"


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Produced by `{meta['command']}` on {meta['date']}: {meta['machine']}, torch "
        f"{meta['torch']}, ultralytics {meta['ultralytics']}, one thread per process.",
        "",
        "* **conv / BN**: `nn.Conv*` and `*BatchNorm*` module instances (plus functional conv /",
        "  batch_norm nodes inside fx graphs), before, after `model.fuse()`, after `reparam.fold`.",
        "* **err**: `max |out - ref| / max |ref|` over the tensors of the inference output (its",
        "  first element) against a float64 run of the original, at the two sizes (px).",
        "  *fp32 orig* is the unfolded float32 model's own error (what rounding alone costs).",
        "  RT-DETR's rows (its top-300 queries by score) are compared as a set, in sorted order:",
        "  random weights make scores nearly equal, and float32 rounding, `fuse()`'s as well as",
        "  the fold's, swaps tied queries (in order, both are off by 6.8e-03 at 224 px).",
        "* **same**: the output tree (types, tensor shapes) equals the original's at both sizes.",
        "* **time**: `deepcopy + fuse()`, and one `reparam.fold(model, x)`.",
        "",
        "| model | task | px | params before | params fuse | params fold | conv / BN before | "
        "conv / BN fuse | conv / BN fold | err fuse | err fold | fp32 orig | same fuse / fold | "
        "fuse s | fold s |",
        "|---|---|---|---:|---:|---:|---|---|---|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            continue
        fu, fo = r["fuse"], r.get("fold")
        orig = ", ".join(_e(v) for v in r["orig32_err"])
        fold_cols = (
            f"{fo['params']:,} | {_cb(r['before'])} | {_cb(fu)} | {_cb(fo)} | "
            f"{_e(fu['err_a'])}, {_e(fu['err_b'])} | {_e(fo['err_a'])}, {_e(fo['err_b'])} | "
            f"{orig} | {'yes' if fu['same_structure'] else 'no'} / "
            f"{'yes' if fo['same_structure'] else 'no'}"
            if fo else
            f"error | {_cb(r['before'])} | {_cb(fu)} | - | {_e(fu['err_a'])}, "
            f"{_e(fu['err_b'])} | - | {orig} | {'yes' if fu['same_structure'] else 'no'} / -")
        lines.append(
            f"| {r['model']} | {r['task']} | {r['sizes'][0]}, {r['sizes'][1]} | "
            f"{r['before']['params']:,} | {fu['params']:,} | {fold_cols} | "
            f"{r['fuse_s']:.2f} | {r['fold_s']:.2f} |")
    lean = [r for r in rows if "outputs" in r]
    if lean:
        lines += [
            "", "## End-to-end heads, folded with `outputs=`", "",
            "YOLOv10's and YOLO26's heads return both branches in eval mode; `fuse()` deletes "
            "the one their predictions do not use, changing the output. "
            "`reparam.fold(model, x, outputs=fuse_outputs(model))` (the script's selection: the "
            "predictions and the raw output of their branch) ships what `fuse()` ships; *same* "
            "compares its output tree with `fuse()`'s, *err* is against the same selection of a "
            "float64 run of the original.", "",
            "| model | params fuse | params fold, outputs= | conv / BN fuse | "
            "conv / BN fold, outputs= | err fold, outputs= | same as fuse | fold s |",
            "|---|---:|---:|---|---|---|---|---:|"]
        for r in lean:
            o = r["outputs"]
            lines.append(
                f"| {r['model']} | {r['fuse']['params']:,} | {o['params']:,} | "
                f"{_cb(r['fuse'])} | {_cb(o)} | {_e(o['err_a'])}, {_e(o['err_b'])} | "
                f"{'yes' if o['same_structure'] else 'no'} | {r['outputs_s']:.2f} |")
    failed = [r for r in rows if "error" in r or "fold_error" in r]
    if failed:
        lines += ["", "## Errors", "", "| model | where | error |", "|---|---|---|"]
        for r in failed:
            where = "measure" if "error" in r else "reparam.fold"
            text = r.get("error") or r["fold_error"]
            lines.append(f"| {r['model']} | {where} | {text[:300].replace('|', '/')} |")
    notes = [r for r in rows if r.get("untraced")]
    if notes:
        lines += ["", "## What reparam could not trace (first entries of the report)", ""]
        for r in notes:
            lines.append(f"* **{r['model']}** ({r['n_untraced']} entries):")
            for path, reason in r["untraced"][:3]:
                lines.append(f"    * `{path or '<root>'}`: {reason.replace('|', '/')}")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- ultralytics_all.py: begin -->", "<!-- ultralytics_all.py: end -->"


def _run_one(name: str, task: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--task", task]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"model": name, "task": task, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "task": task, "error": tail}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the Markdown report here (e.g. docs/ultralytics.md)")
    p.add_argument("--json", help="also write the raw rows here")
    p.add_argument("--all", action="store_true", help="every shipped yaml of the five tasks")
    p.add_argument("--models", nargs="*", help="fnmatch patterns on the model names")
    p.add_argument("--list", action="store_true", help="print the model names and stop")
    p.add_argument("--timeout", type=float, default=900, help="seconds per model")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.one:
        try:
            print(json.dumps(measure(args.one, args.task)), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"model": args.one, "task": args.task,
                              "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
        return 0

    import ultralytics

    models = list_models(args.all)
    if args.models:
        models = [m for m in models if any(fnmatch.fnmatch(m["name"], pat) for pat in args.models)]
    if args.list:
        print("\n".join(f"{m['name']} ({m['task']})" for m in models))
        return 0
    rows = []
    for i, m in enumerate(models, 1):
        start = time.perf_counter()
        row = _run_one(m["name"], m["task"], args.timeout)
        rows.append(row)
        status = row.get("error") or row.get("fold_error") or (
            f"BN {row['before']['bn']} -> fuse {row['fuse']['bn']}, fold {row['fold']['bn']}; "
            f"err fuse {_e(row['fuse']['err_a'])} fold {_e(row['fold']['err_a'])}")
        print(f"[{i}/{len(models)}] {m['name']} {time.perf_counter() - start:.0f}s {status}",
              flush=True)
    meta = {"command": "python scripts/ultralytics_all.py " + " ".join(argv or sys.argv[1:]),
            "date": datetime.date.today().isoformat(), "machine": _machine(),
            "torch": torch.__version__, "ultralytics": ultralytics.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = render(rows, meta)
    if args.out:
        write_report(Path(args.out), text, BEGIN, END, "Ultralytics models")
    else:
        print(text)
    return 0 if not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
