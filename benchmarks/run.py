"""Run every benchmark of ``reparam.fold`` and write the report.

    python -m benchmarks.run --out docs/benchmarks.md            # the full run (about 10 min)
    python -m benchmarks.run --quick --out /tmp/benchmarks.md    # every section, smaller (< 3 min)

Sections: (1) speed and memory of the folded model against the training-time form and timm's
deploy form; (2) cost of folding against timm's converter, and on RepVGG stacks of 10 to 1000
blocks; (3) float32 error against a float64 run of the original; (4) cProfile of the fold;
(5) GPU throughput when a GPU is present. Ratios come from medians of per-round ratios of
interleaved runs in one process; absolute times are context only. Every goal is judged MET or
NOT MET in the report, with the gap and its cause where it is not met.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import cProfile
import functools
import json
import os
import pstats
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx

from . import common as c
from .common import SLOW_S
from .report import render

TIMM3 = ("train", "reparam", "timm")
OURS2 = ("train", "reparam")


@dataclass
class Config:
    quick: bool
    speed: list[tuple[str, tuple[str, ...]]]
    speed_rounds: dict[int, int]  # rounds per batch size
    chunk_s: float
    fold: list[tuple[str, tuple[str, ...]]]
    fold_rounds: int
    stacks: list[tuple[str, int]]
    precision: list[str]
    precision_batch: int
    profiles: list[str]
    mem_infer: list[tuple[str, tuple[str, ...]]]
    mem_fold: list[tuple[str, str]]
    batches: tuple[int, ...] = (1, 8)  # batch 1 is short and noisy: more rounds (speed_rounds)
    gpu_batch: int = 64
    gpu_rounds: int = 7
    threads: int = field(default_factory=torch.get_num_threads)
    slow: set[str] = field(default_factory=set)  # specs whose single fold took > SLOW_S


def config(quick: bool) -> Config:
    stack = ["stack:10:16:8", "stack:30:16:8", "stack:100:16:8", "stack:1000:16:8"]
    issue2 = "stack:30:64:56"
    if quick:
        return Config(
            quick=True,
            speed=[("timm:repvgg_a0", TIMM3), ("ours:dbb_resnet18", OURS2)],
            speed_rounds={1: 5, 8: 3}, chunk_s=0.1,
            fold=[("timm:repvgg_a0", ("reparam", "unverified", "timm"))], fold_rounds=2,
            stacks=[(s, 2) for s in stack[:3]] + [(issue2, 2)],
            precision=["timm:repvgg_a0"], precision_batch=1,
            profiles=["timm:repvgg_a0", "stack:100:16:8"],
            mem_infer=[("timm:repvgg_a0", TIMM3)],
            mem_fold=[("timm:repvgg_a0", "reparam"), ("timm:repvgg_a0", "timm"),
                      ("stack:10:16:8", "reparam"), ("stack:100:16:8", "reparam")],
            gpu_rounds=3,
        )
    timm3 = [f"timm:{n}" for n in ("repvgg_a0", "repvgg_b0", "mobileone_s0")]
    ours4 = [f"ours:{n}" for n in ("repvgg_a0", "repvgg_b0", "mobileone_s0", "dbb_resnet18")]
    speed = [(s, TIMM3) for s in timm3] + [(s, OURS2) for s in ours4]
    return Config(
        quick=False,
        speed=speed, speed_rounds={1: 21, 8: 7}, chunk_s=0.2,
        fold=[(s, ("reparam", "unverified", "timm")) for s in timm3]
        + [(s, ("reparam", "unverified")) for s in ours4],
        fold_rounds=5,
        stacks=[(s, 3 if s.startswith("stack:1000:") else 5) for s in stack] + [(issue2, 5)],
        precision=timm3 + ours4, precision_batch=2,
        profiles=["timm:repvgg_a0", "ours:repvgg_b0", "timm:repvgg_b0", "ours:mobileone_s0",
                  "timm:mobileone_s0", "stack:1000:16:8"],
        mem_infer=speed,
        mem_fold=[(s, m) for s in timm3 for m in ("reparam", "timm")]
        + [(s, "reparam") for s in ours4 + stack + [issue2]],
    )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ops_of(model: torch.nn.Module) -> dict[str, int]:
    """Counts of conv, batch_norm, add, ... nodes in the model's traced graph."""
    import reparam

    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    return {k: v for k, v in reparam.count_ops(gm).items() if k != "identity"}


def same_layers(a: torch.nn.Module, b: torch.nn.Module) -> float | None:
    """Largest weight difference between the conv and linear layers of two models when they
    have the same layers with the same geometry in the same order; None when they do not."""
    kinds = (torch.nn.Conv2d, torch.nn.Linear)
    la = [m for m in a.modules() if isinstance(m, kinds)]
    lb = [m for m in b.modules() if isinstance(m, kinds)]

    def geometry(m):
        keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                "groups", "padding_mode", "in_features", "out_features")
        return type(m), tuple(getattr(m, k, None) for k in keys), m.bias is None

    if len(la) != len(lb) or any(geometry(x) != geometry(y) for x, y in zip(la, lb, strict=True)):
        return None
    with torch.no_grad():
        return max(((x.weight - y.weight).abs().max().item() for x, y in zip(la, lb, strict=True)),
                   default=0.0)


def guarded(results: dict, key: str, fn, *args) -> None:
    """Run one section; a failure is recorded (and shown in the report), not fatal."""
    start = time.perf_counter()
    log(f"section {key} ...")
    try:
        results[key] = fn(*args)
    except Exception as e:  # noqa: BLE001 - the report says what failed
        import traceback

        traceback.print_exc()
        results[key] = {"error": f"{type(e).__name__}: {e}"}
    results.setdefault("seconds", {})[key] = time.perf_counter() - start
    log(f"section {key} done in {time.perf_counter() - start:.0f} s")


# --- 1. speed ----------------------------------------------------------------------------------

def speed(cfg: Config) -> list[dict]:
    rows = []
    for spec, methods in cfg.speed:
        model = c.build(spec)
        x1 = c.example_input(spec, 1)
        variants = {m: c.convert(model, m, x1) for m in methods}
        ops = {m: ops_of(v) for m, v in variants.items()}
        left = [[x.op, x.reason] for x in variants["reparam"].reparam_report.leftovers]
        same = same_layers(variants["reparam"], variants["timm"]) if "timm" in variants else None
        for b in cfg.batches:
            log(f"  speed {c.display(spec)} batch {b}")
            thr = c.interleaved_throughput(variants, c.example_input(spec, b),
                                           cfg.speed_rounds[b], cfg.chunk_s)
            rows.append({"spec": spec, "batch": b, "throughput": thr, "ops": ops,
                         "leftovers": left, "same_layers": same})
        del variants, model
    return rows


def gpu(cfg: Config) -> list[dict] | dict:
    if not torch.cuda.is_available():
        return {"skipped": "no GPU: skipped"}
    rows = []
    for spec, methods in cfg.speed:
        model = c.build(spec)
        x1 = c.example_input(spec, 1)
        variants = {m: c.convert(model, m, x1).cuda() for m in methods}
        x = c.example_input(spec, cfg.gpu_batch).cuda()
        log(f"  gpu {c.display(spec)} batch {cfg.gpu_batch}")
        thr = c.interleaved_throughput(variants, x, cfg.gpu_rounds, 0.5, torch.cuda.synchronize)
        rows.append({"spec": spec, "batch": cfg.gpu_batch, "throughput": thr})
        del variants, model
        torch.cuda.empty_cache()
    return rows


# --- memory probes (subprocesses) ---------------------------------------------------------------

def _probe(cfg: Config, args: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384",
               PYTHONPATH=os.pathsep.join([str(c.ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "benchmarks.probe", str(cfg.threads), *args]
    done = subprocess.run(cmd, cwd=c.ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"probe {' '.join(args)} failed: {tail[0]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(cfg: Config) -> dict:
    """Peak RSS of inference and of folding, each configuration in its own process.

    Three probes run at a time: memory does not depend on CPU contention, and no timing section
    runs meanwhile (precision does)."""
    if not c.peak_measurable():
        return {"error": "peak RSS cannot be reset here (/proc/self/clear_refs missing)"}
    jobs = {}
    for spec, methods in cfg.mem_infer:
        jobs[("infer", spec)] = ["infer", spec, ",".join(methods),
                                 ",".join(map(str, cfg.batches))]
    for spec, m in cfg.mem_fold:
        jobs[("fold", spec, m)] = ["fold", spec, m]
    out: dict = {"infer": {}, "fold": {}}
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {pool.submit(_probe, cfg, args): key for key, args in jobs.items()}
        for f in concurrent.futures.as_completed(futures):
            key, got = futures[f], f.result()
            if key[0] == "infer":
                methods = dict(cfg.mem_infer)[key[1]]  # a failed probe fails all its methods
                out["infer"][key[1]] = {m: got for m in methods} if "error" in got else got
            else:
                out["fold"].setdefault(key[1], {})[key[2]] = got
            log(f"  memory {key[0]} {c.display(key[1])} {' '.join(key[2:])}")
    return out


# --- 2. fold cost ------------------------------------------------------------------------------

def fold_time(cfg: Config) -> list[dict]:
    rows = []
    for spec, methods in cfg.fold:
        log(f"  fold time {c.display(spec)}")
        model = c.build(spec)
        x1 = c.example_input(spec, 1)
        fns = {m: functools.partial(c.convert, model, m, x1) for m in methods}
        cold = {}
        for m in methods:  # first call in this process for this model: context only
            start = time.perf_counter()
            fns[m]()
            cold[m] = time.perf_counter() - start
        times = c.interleaved_calls(fns, cfg.fold_rounds, warmup=0)
        rows.append({"spec": spec, "times": times, "cold": cold})
        del model
    return rows


def stacks(cfg: Config) -> list[dict]:
    import reparam

    rows = []
    for spec, rounds in cfg.stacks:
        log(f"  fold time {c.display(spec)}")
        model = c.build(spec)
        x1 = c.example_input(spec, 1)
        start = time.perf_counter()
        folded = reparam.fold(model, x1)  # warm-up, and the report
        cold = time.perf_counter() - start
        report = folded.reparam_report
        del folded
        if cold > SLOW_S:  # too slow to repeat: the one call is the measurement
            cfg.slow.add(spec)
            times = [cold]
        else:
            times = c.interleaved_calls({"reparam": functools.partial(reparam.fold, model, x1)},
                                        rounds, warmup=0)["reparam"]
        rows.append({"spec": spec, "blocks": int(spec.split(":")[1]), "times": times,
                     "cold": cold, "regions": len(report.regions),
                     "leftovers": len(report.leftovers), "params": c.param_bytes(model)})
    return rows


# --- 3. precision ------------------------------------------------------------------------------

def precision(cfg: Config) -> list[dict]:
    import reparam

    rows = []
    for spec in cfg.precision:
        log(f"  precision {c.display(spec)}")
        model = c.randomize_bn(c.build(spec), seed=0)
        x = c.example_input(spec, cfg.precision_batch, seed=2)
        with torch.inference_mode():
            want = copy.deepcopy(model).double()(x.double())
            errors = {"unfolded": c.relative_error(model(x), want)}
            errors["reparam"] = c.relative_error(reparam.fold(model, x[:1])(x), want)
            if spec.startswith("timm:"):
                errors["timm"] = c.relative_error(c.convert(model, "timm", x)(x), want)
        # the fold itself, in float64 on both sides: exactness, not float32 rounding
        model64 = copy.deepcopy(model).double()
        with torch.inference_mode():
            errors["fold64"] = c.relative_error(
                reparam.fold(model64, x[:1].double())(x.double()), want)
        rows.append({"spec": spec, "batch": cfg.precision_batch, "errors": errors})
        del model, model64
    return rows


# --- 4. profile --------------------------------------------------------------------------------

# Where a fold's time goes: the functions each of these calls, with the time spent in them when
# called from it (cProfile's caller records), so the breakdown follows the engine as it changes.
PARENTS = [
    ("reparam/api.py", "fold"),
    ("reparam/api.py", "_fold"),
    ("reparam/api.py", "_fold_module"),
    ("reparam/trace.py", "trace"),
    ("reparam/rewrite.py", "fold_graph"),
    ("reparam/rewrite.py", "plan"),
]


def _children(table: dict, file: str, func: str, floor: float) -> list[list]:
    rows = []
    for key, (_, _, _, _, callers) in table.items():
        for caller, (_, calls, _, cum) in callers.items():
            if caller[0].endswith(file) and caller[2] == func and cum >= floor:
                rows.append([f"{_short(key[0])}:{key[1]}({key[2]})", calls, cum])
    return sorted(rows, key=lambda r: -r[2])


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", str(c.ROOT) + "/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def profile(cfg: Config) -> list[dict]:
    import reparam

    rows = []
    for spec in cfg.profiles:
        log(f"  profile {c.display(spec)}")
        model = c.build(spec)
        x1 = c.example_input(spec, 1)
        if spec not in cfg.slow:
            reparam.fold(model, x1)  # warm-up: the profile shows the steady state
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        folded = reparam.fold(model, x1)
        prof.disable()
        wall = time.perf_counter() - start
        stats = pstats.Stats(prof)
        table = stats.stats  # (file, line, func) -> (cc, nc, tottime, cumtime, callers)
        total = max(v[3] for v in table.values())
        phases = [[func, _children(table, file, func, 0.01 * total)]
                  for file, func in PARENTS]
        top = sorted(table.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
        rows.append({
            "spec": spec, "wall": wall, "total": total, "phases": phases,
            "fold_seconds": folded.reparam_report.fold_seconds,
            "top": [[f"{_short(k[0])}:{k[1]}({k[2]})", v[1], v[2], v[3]] for k, v in top],
            "calls": sum(v[1] for v in table.values()),
        })
        del model, folded
    return rows


# --- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown report to write")
    parser.add_argument("--quick", action="store_true", help="every section, fewer models/rounds")
    parser.add_argument("--json", help="also write the raw measurements to this file")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's default, one per core)")
    parser.add_argument("--only", nargs="*", help="run only these sections (for development)")
    parser.add_argument("--render", metavar="JSON",
                        help="write the report from a saved --json run, measuring nothing")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text(encoding="utf-8"))
        text = render(results, config(results["quick"]))
        Path(args.out).write_text(text, encoding="utf-8")
        print(text)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config(args.quick)
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "") + (
        f" --out {args.out}")
    results: dict = {"machine": c.machine(), "command": command, "quick": cfg.quick,
                     "load_start": c.load_average()}
    start = time.perf_counter()
    wanted = set(args.only) if args.only else None

    def run(key, fn):
        if wanted is None or key in wanted:
            guarded(results, key, fn, cfg)

    # sections that time things run alone; then the memory probes (subprocesses, three at a time)
    # run in the background while precision (no timing) runs here
    for key, fn in [("speed", speed), ("fold_time", fold_time), ("stacks", stacks), ("gpu", gpu),
                    ("profile", profile)]:
        run(key, fn)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as background:
        probes = background.submit(run, "memory", memory)
        run("precision", precision)
        probes.result()
    results["load_end"] = c.load_average()
    results["total_seconds"] = time.perf_counter() - start

    text = render(results, cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print(text)
    log(f"wrote {out} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
