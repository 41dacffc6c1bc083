"""Fold every re-parameterizable timm model with ``reparam.fold`` and compare with timm's converter.

    python scripts/timm_all.py --out docs/timm.md            # all 106 models, then the benchmark
    python scripts/timm_all.py --models 'repvgg_a*' --no-bench --out /tmp/t.md   # a subset

For each model (``pretrained=False``, BN statistics randomized, ``eval()``): conv, BN and add ops
before folding, after ``reparam.fold(model)`` and after timm's own
``timm.utils.model.reparameterize_model(model)``; the relative error of each against a float64 run
of the original (``max |out - ref| / max |ref|``); the time each takes. Every model runs in its own
subprocess (one at a time, one thread) so that a crash or a timeout costs one row, not the run.

Ops are counted with :func:`reparam.count_ops` on a torch.fx trace. A submodule that does not trace
(efficientvit's ``LocalWindowAttention``, tiny_vit's ``TinyVitBlock``) is traced as a leaf and its
children are counted one by one, on both sides, so folds inside such leaves are counted too.

``--bench`` (on by default with ``--out``) then measures the throughput of timm's deploy form
against reparam's fold on models where timm leaves conv+BN pairs unfused: batch 1 and 8, median of
interleaved runs in one process. ``tests/test_timm.py`` imports this file for its helpers.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fnmatch
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import fx, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import reparam  # noqa: E402

FAMILIES = ("efficientvim", "efficientvit_m", "fastvit", "ghostnetv3", "iformer", "lcnetv2",
            "levit", "mobileone", "nextvit", "repghostnet", "repvgg", "repvit", "shvit",
            "tiny_vit")
METHODS = ("reparameterize", "fuse", "switch_to_deploy")
KINDS = ("conv", "batch_norm", "add")
QUOTED, QUOTE = r"'[^']*'", "'...'"  # node names in leftover reasons, grouped away
# models whose timm converter leaves plain conv+BN pairs: the throughput comparison
BENCH_MODELS = ("repghostnet_100", "ghostnetv3_100", "lcnetv2_small", "fastvit_t8")


def family_of(name: str) -> str:
    for fam in FAMILIES:
        if name.startswith(fam):
            return "efficientvit" if fam == "efficientvit_m" else fam
    return "?"


def list_models() -> list[str]:
    """timm's models of the 14 families that carry a reparameterize/fuse/switch_to_deploy method
    (each built on the meta device: no memory, no init)."""
    import timm

    names = []
    for fam in FAMILIES:
        for name in timm.list_models(f"{fam}*"):
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
            if any(callable(getattr(mod, a, None)) for mod in m.modules() for a in METHODS):
                names.append(name)
    return names


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random (not default) BN statistics and affine parameters; returns the model in eval mode.
    (The same as ``tests/helpers.py``: scripts do not import tests.)"""
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


def calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BN's running statistics to the batch statistics of ``x`` (its affine parameters
    stay random). Deep nets with random weights and random statistics can be so ill-conditioned
    that float64 itself cannot evaluate them stably (repvgg_d2se: a 1e-14 change of the input
    moves the output by 4%); calibrated statistics keep activations near unit scale."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one batch sets the statistics exactly
        m.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
    return model.eval()


def create(name: str, seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return randomize_bn(timm.create_model(name, pretrained=False), seed)


# --- counting ops ----------------------------------------------------------------------------

class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def trace_with_leaves(module: nn.Module) -> tuple[fx.GraphModule, list[str]]:
    """Trace a copy of ``module``; a submodule whose trace fails becomes a leaf (retried).

    Raises the trace error when ``module`` itself does not trace.
    """
    if isinstance(module, fx.GraphModule):
        return module, []
    leaves: set[str] = set()
    for _ in range(200):
        root = copy.deepcopy(module)  # tracing may write into the model (LeViT's bias cache)
        tracer = _LeafTracer(leaves)
        try:
            graph = tracer.trace(root)
        except Exception:
            stack = list(tracer.module_stack.values())
            path = stack[-1][0] if stack else ""
            if not path or path in leaves:
                raise
            leaves.add(path)
            continue
        return fx.GraphModule(tracer.root, graph, type(root).__name__), sorted(leaves)
    raise RuntimeError("too many untraceable submodules")


def deep_ops(module: nn.Module) -> Counter:
    """``reparam.count_ops`` of a trace of ``module``, plus those inside every submodule that is
    called as a leaf and is not a torch.nn layer (a part that does not trace: its children are
    traced and counted in turn)."""
    try:
        gm, _ = trace_with_leaves(module)
    except Exception:  # noqa: BLE001 - the module itself does not trace: count its children
        total: Counter = Counter()
        for child in module.children():
            total += deep_ops(child)
        return total
    total = Counter(reparam.count_ops(gm))
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules.get(str(node.target))
        if m is None or type(m).__module__.startswith("torch.nn"):
            continue
        for child in m.children():
            total += deep_ops(child)
    return total


def ops3(counts: Counter | dict) -> dict[str, int]:
    return {k: int(counts.get(k, 0)) for k in KINDS}


def linear_ops(counts: Counter | dict) -> int:
    """Every op ``reparam.count_ops`` counts (conv, linear, BN, add, mul, pool, cat...), but the
    shape-only ones (flatten, reshape), which compute nothing."""
    return int(sum(n for k, n in counts.items() if k not in ("flatten", "reshape")))


# --- one model ---------------------------------------------------------------------------------

def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def input_size(model: nn.Module, cap: int | None) -> int:
    """The model's default input size, or ``cap`` when it is smaller and the model accepts it."""
    size = int(model.pretrained_cfg["input_size"][-1])
    if cap is None or cap >= size:
        return size
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, cap, cap))
        return cap
    except Exception:  # noqa: BLE001 - fixed-resolution models (LeViT)
        return size


def measure(name: str, cap: int | None = 224, seed: int = 0, calibrate: bool = False) -> dict:
    """Everything one table row needs, for one model."""
    from timm.utils.model import reparameterize_model

    model = create(name, seed)
    size = input_size(model, cap)
    gen = torch.Generator().manual_seed(seed)
    if calibrate:
        calibrate_bn(model, torch.randn(4, 3, size, size, generator=gen))
    x = torch.randn(1, 3, size, size, generator=gen)
    row = {"model": name, "family": family_of(name), "size": size, "calibrated": calibrate,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        row["orig32_err"] = rel_err(model(x), want)  # float32 rounding alone, no folding
        before = deep_ops(model)
        row["ops_before"], row["all_before"] = ops3(before), linear_ops(before)

        start = time.perf_counter()
        folded = reparam.fold(model, x)
        row["reparam_s"] = time.perf_counter() - start
        row["reparam_err"] = rel_err(folded(x), want)
        after = deep_ops(folded)
        row["ops_reparam"], row["all_reparam"] = ops3(after), linear_ops(after)
        report = folded.reparam_report
        row["regions"] = len(report.regions)
        row["untraced"] = [p for p, _ in report.untraced]
        reasons = Counter(f"{x.op}: {re.sub(QUOTED, QUOTE, x.reason)}" for x in report.leftovers
                          if x.op in ("batch_norm", "conv", "linear"))
        row["leftovers"] = len(report.leftovers)
        row["conv_bn_leftovers"] = reasons.most_common(5)

        start = time.perf_counter()
        deployed = reparameterize_model(model)  # timm's default call, with its own deepcopy
        row["timm_s"] = time.perf_counter() - start
        row["timm_err"] = rel_err(deployed(x), want)
        after = deep_ops(deployed)
        row["ops_timm"], row["all_timm"] = ops3(after), linear_ops(after)

        model64 = copy.deepcopy(model).double()  # the fold itself, without float32 rounding
        row["fold64_err"] = rel_err(reparam.fold(model64, x.double())(x.double()), want)
    return row


# --- throughput --------------------------------------------------------------------------------

def bench(names=BENCH_MODELS, batches=(1, 8), rounds: int = 15) -> list[dict]:
    """Forward time of timm's deploy form against reparam's fold (and the original), batch 1 and
    8, median of ``rounds`` interleaved runs (one forward of each, in turn, per round)."""
    from timm.utils.model import reparameterize_model

    rows = []
    for name in names:
        model = create(name)
        size = int(model.pretrained_cfg["input_size"][-1])
        x1 = torch.randn(1, 3, size, size)
        variants = {"original": model, "timm": reparameterize_model(model),
                    "reparam": reparam.fold(model, x1)}
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            times: dict[str, list[float]] = {k: [] for k in variants}
            with torch.no_grad():
                for m in variants.values():  # warm-up
                    m(x)
                for _ in range(rounds):
                    for key, m in variants.items():
                        start = time.perf_counter()
                        m(x)
                        times[key].append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"model": name, "size": size, "batch": batch,
                         **{f"{k}_ms": 1000 * v for k, v in med.items()},
                         "ops_timm": ops3(deep_ops(variants["timm"])),
                         "ops_reparam": ops3(deep_ops(variants["reparam"]))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- the report ---------------------------------------------------------------------------------

def _ops(d: dict) -> str:
    return "/".join(str(d[k]) for k in KINDS)


def _better(row: dict) -> str:
    r, t = row["ops_reparam"], row["ops_timm"]
    fewer = [k for k in KINDS if r[k] < t[k]]
    more = [k for k in KINDS if r[k] > t[k]]
    names = {"conv": "conv", "batch_norm": "BN", "add": "add"}
    if more:
        total = (f" ({row['all_reparam']} vs {row['all_timm']} ops in all)"
                 if "all_reparam" in row else "")
        return "more " + ", ".join(names[k] for k in more) + total
    if fewer:
        return "**fewer** " + ", ".join(names[k] for k in fewer)
    return "same"


def render(rows: list[dict], failures: list[dict], bench_rows: list[dict], meta: dict) -> str:
    lines = [
        f"Produced by `{meta['command']}` on {meta['date']}: {meta['machine']}, torch "
        f"{meta['torch']}, timm {meta['timm']}, one thread per process.",
        "",
        "* **ops**: conv / BN / add nodes (`reparam.count_ops` on a torch.fx trace; a",
        "  submodule that does not trace is a leaf whose children are counted, on both sides):",
        "  before folding, after `reparam.fold`, after timm's converter.",
        "* **err**: `max |out - ref| / max |ref|`, the float32 output against a float64 run of",
        "  the original, at the model's default input size (capped at 224 where it accepts it);",
        "  *fp32 orig* is the unfolded model's own float32 error (what rounding alone costs);",
        "  *fp64 fold* is reparam folding a float64 copy, against the same reference (the",
        "  exactness of the fold itself).",
        "* **time**: one call of `reparam.fold(model, x)` (copy, trace, shape propagation,",
        "  fold) and one of `reparameterize_model(model)` (timm's default, with its deepcopy).",
        "* **all ops**: every op `reparam.count_ops` counts (conv, linear, BN, add, mul, pool,",
        "  cat...; not the shape-only flatten and reshape), after reparam / after timm.",
        "* **vs timm**: *fewer* where reparam's fold leaves fewer ops of some kind than timm's",
        "  converter and no kind more; *more* names the kind and gives the totals (an avg-pool",
        "  and the BN after it become one conv: one conv more, two ops fewer).",
        "",
    ]
    n_better = sum(1 for r in rows if _better(r).startswith("**fewer"))
    n_same = sum(1 for r in rows if _better(r) == "same")
    n_more = sum(1 for r in rows if _better(r).startswith("more"))
    worst = max((r["reparam_err"] for r in rows), default=0.0)
    worst64 = max((r["fold64_err"] for r in rows), default=0.0)
    over = [r["model"] for r in rows if r["reparam_err"] >= 1e-4]
    lines += [
        f"{len(rows)} models folded, {len(failures)} failed. reparam leaves **fewer** ops than "
        f"timm's converter on {n_better} models, the same on {n_same}, more of some kind on "
        f"{n_more}. Largest float32 error of reparam's fold against float64: {worst:.1e}"
        + (f" ({', '.join(over)}: at or above 1e-4, see *fp32 orig*)" if over else "")
        + f"; largest error of the float64 fold: {worst64:.1e}.",
        "",
    ]
    fams = sorted({r["family"] for r in rows})
    lines += ["## Per family", "",
              "| family | models | BN left (reparam / timm, summed) | conv+BN+add left "
              "(reparam / timm) | all ops left (reparam / timm) | max err reparam / timm |",
              "|---|---:|---:|---:|---:|---:|"]
    for fam in fams:
        rs = [r for r in rows if r["family"] == fam]
        bn_r = sum(r["ops_reparam"]["batch_norm"] for r in rs)
        bn_t = sum(r["ops_timm"]["batch_norm"] for r in rs)
        all_r = sum(sum(r["ops_reparam"].values()) for r in rs)
        all_t = sum(sum(r["ops_timm"].values()) for r in rs)
        er = max(r["reparam_err"] for r in rs)
        et = max(r["timm_err"] for r in rs)
        tot_r = sum(r.get("all_reparam", 0) for r in rs)
        tot_t = sum(r.get("all_timm", 0) for r in rs)
        lines.append(f"| {fam} | {len(rs)} | {bn_r} / {bn_t} | {all_r} / {all_t} | "
                     f"{tot_r} / {tot_t} | {er:.1e} / {et:.1e} |")
    lines += ["", "## Every model", "",
              "| model | px | ops before | ops reparam | ops timm | all ops reparam / timm | "
              "vs timm | err reparam | err timm | fp32 orig | fp64 fold | reparam s | timm s |",
              "|---|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size']} | {_ops(r['ops_before'])} | {_ops(r['ops_reparam'])} "
            f"| {_ops(r['ops_timm'])} | {r.get('all_reparam', '-')} / {r.get('all_timm', '-')} "
            f"| {_better(r)} | {r['reparam_err']:.1e} | "
            f"{r['timm_err']:.1e} | {r['orig32_err']:.1e} | {r['fold64_err']:.0e} | "
            f"{r['reparam_s']:.2f} | {r['timm_s']:.2f} |")
    if failures:
        lines += ["", "## Failures", "", "| model | error |", "|---|---|"]
        for f in failures:
            lines.append(f"| {f['model']} | {f['error'][:300].replace('|', '/')} |")
    left = [r for r in rows if r["conv_bn_leftovers"]]
    if left:
        lines += ["", "## What reparam left, and why", "",
                  "The most frequent reasons reparam gives for conv, BN or linear ops it left "
                  "alone (first model of each family that has any):", ""]
        seen = set()
        for r in left:
            if r["family"] in seen:
                continue
            seen.add(r["family"])
            lines.append(f"* **{r['model']}**:")
            for reason, n in r["conv_bn_leftovers"][:3]:
                lines.append(f"    * {n} x {reason}")
    if bench_rows:
        lines += ["", "## Throughput: folding the conv+BN pairs timm leaves", "",
                  "Forward time in ms (median of interleaved runs in one process, one thread), "
                  "at the model's default input size; speed-up is timm's deploy time over "
                  "reparam's.", "",
                  "| model | batch | original ms | timm deploy ms | reparam ms | reparam vs timm "
                  "| ops timm | ops reparam |",
                  "|---|---:|---:|---:|---:|---:|---|---|"]
        for b in bench_rows:
            lines.append(
                f"| {b['model']} | {b['batch']} | {b['original_ms']:.1f} | {b['timm_ms']:.1f} | "
                f"{b['reparam_ms']:.1f} | {b['timm_ms'] / b['reparam_ms']:.2f}x | "
                f"{_ops(b['ops_timm'])} | {_ops(b['ops_reparam'])} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- timm_all.py: begin -->", "<!-- timm_all.py: end -->"


def write_report(path: Path, text: str, begin: str = BEGIN, end: str = END,
                 title: str = "timm models") -> None:
    """Put the generated part between the markers of an existing page (the text around them is
    written by hand), or write a page of its own. (``scripts/ultralytics_all.py`` uses it too.)"""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1]
        path.write_text(f"{head}{begin}\n{text}{end}{tail}", encoding="utf-8")
    else:
        path.write_text(f"# {title}\n\n{begin}\n{text}{end}\n", encoding="utf-8")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def _run_one(name: str, cap: int | None, timeout: float, calibrate: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--cap", str(cap or 0)]
    if calibrate:
        cmd.append("--calibrate")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "error": tail}


def _load_rows(path: Path) -> dict[str, dict]:
    """Rows of an earlier, interrupted run (failures are run again)."""
    if not path.exists():
        return {}
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)
    return {r["model"]: r for r in rows if "error" not in r}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the Markdown report here (e.g. docs/timm.md)")
    p.add_argument("--json", help="also write the raw rows here")
    p.add_argument("--rows", help="a JSON-lines file: each finished row is appended to it, and "
                   "models already in it are not run again (resume a long run)")
    p.add_argument("--models", nargs="*", help="fnmatch patterns (default: all 106)")
    p.add_argument("--cap", type=int, default=224, help="largest input side (0: default size)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    p.add_argument("--bench", dest="bench", action="store_true", default=None)
    p.add_argument("--no-bench", dest="bench", action="store_false")
    p.add_argument("--calibrate", action="store_true",
                   help="BN statistics from a random batch instead of random (see calibrate_bn)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cap = args.cap or None
    if args.one:
        try:
            print(json.dumps(measure(args.one, cap, calibrate=args.calibrate)), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"model": args.one, "error": f"{type(e).__name__}: {e}"}),
                  flush=True)
        return 0

    import timm

    names = list_models()
    if args.models:
        names = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in args.models)]
    done = _load_rows(Path(args.rows)) if args.rows else {}
    rows, failures = [], []
    for i, name in enumerate(names, 1):
        start = time.perf_counter()
        row = done.get(name) or _run_one(name, cap, args.timeout, args.calibrate)
        if args.rows and name not in done:
            with open(args.rows, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        (failures if "error" in row else rows).append(row)
        status = row.get("error") or (
            f"err {row['reparam_err']:.1e}/{row['timm_err']:.1e} ops "
            f"{_ops(row['ops_before'])} -> {_ops(row['ops_reparam'])} (timm "
            f"{_ops(row['ops_timm'])})")
        print(f"[{i}/{len(names)}] {name} {time.perf_counter() - start:.0f}s {status}",
              flush=True)
    bench_rows = []
    if args.bench or (args.bench is None and args.out and not args.models):
        bench_rows = bench()
    meta = {"command": "python scripts/timm_all.py " + " ".join(argv or sys.argv[1:]),
            "date": datetime.date.today().isoformat(), "machine": _machine(),
            "torch": torch.__version__, "timm": timm.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "failures": failures,
                                               "bench": bench_rows}, indent=1))
    text = render(rows, failures, bench_rows, meta)
    if args.out:
        write_report(Path(args.out), text)
    else:
        print(text)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
