"""Does training-time re-parameterization help a small VGG-style net on 8x8 digits?

Trains, for the same budget and on the same fixed split of scikit-learn's bundled digits data set
(1,797 8x8 images, offline), four training-time forms of ONE deploy architecture:

    plain   each layer conv3x3+BN, ReLU
    repvgg  each layer RepVGGBlock (3x3+BN, 1x1+BN, identity BN when shapes allow; ReLU inside)
    acnet   each layer ACBlock (3x3+BN, 3x1+BN, 1x3+BN), ReLU
    dbb     each layer DBBlock (3x3+BN, 1x1+BN, 1x1-avg, 1x1-3x3), ReLU

then puts each in eval mode, folds it with ``reparam.fold`` (every block becomes one 3x3 conv) and
checks that the folded net gives the same predictions as the training-time net. Writes a results
section into a markdown page (between ``<!-- rep_digits:begin -->`` and ``<!-- rep_digits:end -->``
markers; the rest of the page is left alone), a bar chart, and the raw numbers as JSON.

    pip install scikit-learn matplotlib          # once
    python experiments/rep_digits.py --out docs/research.md

Runs on one CPU thread; about 5 minutes on an idle core with the defaults (4 nets x 5 seeds x
budgets of 30 and 6 epochs), 10 on a busy shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing reparam

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import fx, nn  # noqa: E402

import reparam  # noqa: E402
from reparam.models import ACBlock, DBBlock, RepVGGBlock, conv_bn  # noqa: E402

# (out_channels, stride) of each 3x3 layer; input 1x8x8 -> 16x8x8 -> 16x8x8 -> 32x4x4 -> ... -> 64
LAYERS = ((16, 1), (16, 1), (32, 2), (32, 1), (64, 1))
VARIANTS = ("plain", "repvgg", "acnet", "dbb")
LABELS = {"plain": "plain VGG", "repvgg": "RepVGG", "acnet": "ACNet", "dbb": "DBB"}
BEGIN, END = "<!-- rep_digits:begin -->", "<!-- rep_digits:end -->"


# ---------------------------------------------------------------- models


def layer(kind: str, cin: int, cout: int, stride: int) -> nn.Module:
    """One 3x3 layer of the deploy net (``conv3x3 + bias, ReLU``) in its training-time form."""
    if kind == "plain":
        return nn.Sequential(conv_bn(cin, cout, 3, stride, 1), nn.ReLU())
    if kind == "repvgg":
        return RepVGGBlock(cin, cout, 3, stride)  # has its ReLU
    if kind == "acnet":
        return nn.Sequential(ACBlock(cin, cout, 3, stride), nn.ReLU())
    if kind == "dbb":
        return nn.Sequential(DBBlock(cin, cout, 3, stride), nn.ReLU())
    raise ValueError(kind)


class Net(nn.Module):
    def __init__(self, kind: str, num_classes: int = 10) -> None:
        super().__init__()
        blocks, cin = [], 1
        for cout, stride in LAYERS:
            blocks.append(layer(kind, cin, cout, stride))
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


# ---------------------------------------------------------------- data


def load_data(test_size: float, split_seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=test_size, random_state=split_seed, stratify=digits.target)
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test]


def shift(x: torch.Tensor, g: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Translate each image by up to ``pad`` pixels (zero fill, in normalized units)."""
    n, _, h, w = x.shape
    fill = x.amin()  # the background value after normalization
    xp = F.pad(x, [pad] * 4, value=float(fill))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # n, h, 1
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # n, 1, w
    return xp[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


# ---------------------------------------------------------------- train / evaluate


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch: int,
          lr: float, wd: float, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd, nesterov=True)
    steps = epochs * math.ceil(len(y) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            j = perm[i:i + batch]
            loss = F.cross_entropy(model(shift(x[j], g)), y[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - start


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).double().mean().item()


def train_ops(model: nn.Module) -> dict[str, int]:
    return reparam.count_ops(fx.symbolic_trace(model))


def run_one(kind: str, seed: int, epochs: int, data, args) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = Net(kind)
    seconds = train(model, x_train, y_train, epochs=epochs, batch=args.batch, lr=args.lr,
                    wd=args.wd, seed=seed)
    model.eval()
    logits = logits_of(model, x_test)
    start = time.perf_counter()
    folded = reparam.fold(model, x_test[:1])
    fold_seconds = time.perf_counter() - start
    logits_f = logits_of(folded, x_test)
    report = folded.reparam_report
    x1 = x_test[:1]
    return {
        "variant": kind, "seed": seed, "epochs": epochs,
        "train_seconds": seconds, "fold_seconds": fold_seconds,
        "acc_train_form": accuracy(logits, y_test), "acc_folded": accuracy(logits_f, y_test),
        "pred_disagreements": int((logits.argmax(1) != logits_f.argmax(1)).sum()),
        "max_abs_logit_diff": (logits - logits_f).abs().max().item(),
        "max_rel_logit_diff": ((logits - logits_f).abs().max() / logits.abs().max()).item(),
        "fold_complete": report.complete, "fold_regions": len(report.regions),
        "fold_leftovers": [f"{x.node}: {x.reason}" for x in report.leftovers],
        "params_train": sum(p.numel() for p in model.parameters()),
        "params_deploy": sum(p.numel() for p in folded.parameters()),
        "macs_train": reparam.count_macs(model, x1), "macs_deploy": reparam.count_macs(folded, x1),
        "ops_train": train_ops(model), "ops_deploy": reparam.count_ops(folded),
    }


# ---------------------------------------------------------------- report


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def ops_str(ops: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items()))


def plot(runs: list[dict], budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 3.9), dpi=120,
                             squeeze=False)
    for ax, epochs in zip(axes[0], budgets, strict=True):
        sel = [r for r in runs if r["epochs"] == epochs]
        for i, kind in enumerate(VARIANTS):
            accs = [100 * r["acc_folded"] for r in sel if r["variant"] == kind]
            m, s = mean_std(accs)
            ax.bar(i, m, yerr=s, capsize=6, color=f"C{i}", alpha=0.7)
            ax.scatter([i + (j - (len(accs) - 1) / 2) * 0.06 for j in range(len(accs))], accs,
                       color="black", s=9, zorder=3)
            ax.annotate(f"{m:.2f}", (i, max(m + s, max(accs))), xytext=(0, 5),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
        accs = [100 * r["acc_folded"] for r in sel]
        span = max(accs) - min(accs) + 0.2
        ax.set_ylim(max(0.0, min(accs) - 0.5 * span), max(accs) + 0.35 * span)
        ax.set_xticks(range(len(VARIANTS)), [LABELS[k] for k in VARIANTS])
        ax.set_title(f"{epochs} epochs ({len({r['seed'] for r in sel})} seeds)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), folded net")
    fig.suptitle("8x8 digits, one deploy net trained in four forms (bars: mean ± std; "
                 "dots: seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores (shared), 1 torch thread; "
            f"Linux {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")




def accuracy_table(runs: list[dict]) -> list[str]:
    by = {k: [r for r in runs if r["variant"] == k] for k in VARIANTS}
    plain = {r["seed"]: r["acc_folded"] for r in by["plain"]}
    out = [
        "| net | accuracy (mean ± std) | Δ vs plain, paired (mean ± std) "
        "| better / same / worse seeds | per seed (%) | train time per run |",
        "|---|---|---|---|---|---|",
    ]
    for k in VARIANTS:
        accs = [100 * r["acc_folded"] for r in by[k]]
        m, s = mean_std(accs)
        per_seed = ", ".join(f"{a:.2f}" for a in accs)
        t = statistics.fmean(r["train_seconds"] for r in by[k])
        if k == "plain":
            delta, tally = "—", "—"
        else:
            d = [100 * (r["acc_folded"] - plain[r["seed"]]) for r in by[k]]
            dm, ds = mean_std(d)
            delta = f"{dm:+.2f} ± {ds:.2f} pt"
            tally = (f"{sum(x > 0 for x in d)} / {sum(x == 0 for x in d)} / "
                     f"{sum(x < 0 for x in d)}")
        out.append(f"| {LABELS[k]} | {m:.2f} ± {s:.2f} % | {delta} | {tally} | {per_seed} "
                   f"| {t:.1f} s |")
    return out


def markdown(runs: list[dict], meta: dict, img: str) -> str:
    seeds = sorted({r["seed"] for r in runs})
    budgets = meta["epochs"]
    steps = ", ".join(f"{e} epochs = {e * meta['steps_per_epoch']} steps" for e in budgets)
    out = [
        BEGIN,
        "<!-- generated by experiments/rep_digits.py; edits between these markers are lost -->",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {meta['machine']}  ",
        f"Wall time of the whole run: **{meta['wall_seconds'] / 60:.1f} min** "
        f"({meta['wall_seconds']:.0f} s; training {meta['train_seconds']:.0f} s, "
        f"folding {meta['fold_seconds']:.1f} s); CPU time of the process "
        f"{meta['cpu_seconds']:.0f} s (the machine is shared: wall time grows with the load, "
        f"1-min load average at the end {meta['load_average']:.1f})  ",
        f"Data: scikit-learn digits, {meta['n_train']} train / {meta['n_test']} test images "
        f"(stratified split, `random_state={meta['split_seed']}`), pixels standardized, "
        "random shifts of up to 1 pixel while training.  ",
        f"Budgets, the same for every net: {steps} of batch {meta['batch']}; SGD with Nesterov "
        f"momentum 0.9, one-cycle LR peaking at {meta['lr']}, weight decay {meta['wd']} on all "
        f"parameters; seeds {', '.join(map(str, seeds))} (a seed fixes the initialization and "
        "the batch order; the split is fixed).",
        "",
        f"One test image is {100 / meta['n_test']:.2f} percentage points (pt).",
        "",
    ]
    for epochs in budgets:
        out += [f"### Test accuracy, {epochs} epochs", "",
                *accuracy_table([r for r in runs if r["epochs"] == epochs]), ""]
    out += [
        "Accuracies are those of the folded (deploy) nets; they equal the training-time "
        "nets' accuracies (next table). Δ is the difference from the plain net trained with the "
        "same seed.",
        "",
        f"![test accuracy per net and budget]({img})",
        "",
        "### Folding: training-time form vs folded net",
        "",
        "Every trained net was put in `.eval()` and folded with `reparam.fold(model, x[:1])`; "
        "both forms were run on the whole test set in float32. All budgets together.",
        "",
        "| net | accuracy, training-time form | accuracy, folded | runs with identical "
        "predictions | max abs logit difference | max relative logit difference "
        "| fold complete | fold time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in VARIANTS:
        sel = [r for r in runs if r["variant"] == k]
        acc = " / ".join(
            f"{mean_std([100 * r['acc_train_form'] for r in sel if r['epochs'] == e])[0]:.2f} %"
            for e in budgets)
        acc_f = " / ".join(
            f"{mean_std([100 * r['acc_folded'] for r in sel if r['epochs'] == e])[0]:.2f} %"
            for e in budgets)
        same = sum(r["pred_disagreements"] == 0 for r in sel)
        out.append(
            f"| {LABELS[k]} | {acc} | {acc_f} | {same} / {len(sel)} "
            f"| {max(r['max_abs_logit_diff'] for r in sel):.2e} "
            f"| {max(r['max_rel_logit_diff'] for r in sel):.2e} "
            f"| {sum(r['fold_complete'] for r in sel)} / {len(sel)} "
            f"| {statistics.fmean(r['fold_seconds'] for r in sel):.2f} s |")
    out += [
        "",
        "(Accuracies: mean over seeds, " + " / ".join(f"{e} epochs" for e in budgets) + ".)",
        "",
        "### Cost: training-time form vs deploy form",
        "",
        "Parameters (BN affine parameters included, running statistics not) and multiply-adds "
        "for one 1x8x8 image (`reparam.count_macs`: convs, linears, BNs, adds, pools); op "
        "counts by `reparam.count_ops` (linear ops only; ReLU and the global pool are not "
        "counted) on the traced training-time net and on the folded net.",
        "",
        "| net | params, training | params, deploy | MACs, training | MACs, deploy "
        "| ops, training | ops, deploy |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in VARIANTS:
        r = next(r for r in runs if r["variant"] == k)
        out.append(
            f"| {LABELS[k]} | {r['params_train']:,} | {r['params_deploy']:,} "
            f"| {r['macs_train']:,} | {r['macs_deploy']:,} | {ops_str(r['ops_train'])} "
            f"| {ops_str(r['ops_deploy'])} |")
    same_deploy = len({(r["params_deploy"], r["macs_deploy"], ops_str(r["ops_deploy"]))
                       for r in runs}) == 1
    out += [
        "",
        ("All four nets fold to the same deploy net (same parameter count, multiply-adds and "
         "ops)." if same_deploy else
         "**The folded nets differ in size** (see the table): not every variant folded to the "
         "plain deploy net."),
        "",
        "Raw numbers: `experiments/results/rep_digits.json`.",
        END,
    ]
    return "\n".join(out)


def write_section(page: Path, section: str) -> None:
    if page.exists():
        text = page.read_text()
        if BEGIN in text and END in text:
            pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
            text = pattern.sub(lambda _: section, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        text = "# Research notes\n\n" + section + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="markdown page to write the results section into (e.g. docs/research.md)")
    p.add_argument("--img", type=Path, default=ROOT / "docs/img/rep_digits.png")
    p.add_argument("--json", type=Path, default=ROOT / "experiments/results/rep_digits.json")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, nargs="+", default=[30, 6],
                   help="training budgets in epochs; every net gets each one")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--test-size", type=float, default=0.4)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--from-json", type=Path, default=None,
                   help="do not train: redraw the plot and rewrite the page from a saved run")
    args = p.parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        publish(saved["runs"], saved["meta"], args)
        return

    torch.set_num_threads(1)
    wall, cpu = time.perf_counter(), time.process_time()
    data = load_data(args.test_size, args.split_seed)
    runs = []
    for epochs in args.epochs:
        for seed in range(args.seeds):
            for kind in VARIANTS:
                r = run_one(kind, seed, epochs, data, args)
                runs.append(r)
                print(f"{epochs:3d} ep seed {seed} {kind:7s} acc {100 * r['acc_train_form']:.2f}%"
                      f" -> folded {100 * r['acc_folded']:.2f}%  max|dlogit| "
                      f"{r['max_abs_logit_diff']:.1e}  train {r['train_seconds']:.1f}s  "
                      f"complete {r['fold_complete']}", flush=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    n_train, n_test = len(data[1]), len(data[3])
    meta = {
        "command": "python experiments/rep_digits.py" + (
            " " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "wall_seconds": wall, "cpu_seconds": cpu,
        "load_average": os.getloadavg()[0],
        "train_seconds": sum(r["train_seconds"] for r in runs),
        "fold_seconds": sum(r["fold_seconds"] for r in runs),
        "n_train": n_train, "n_test": n_test, "split_seed": args.split_seed,
        "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "wd": args.wd,
        "steps_per_epoch": math.ceil(n_train / args.batch), "layers": LAYERS,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(f"wall time {wall:.0f} s, CPU time {cpu:.0f} s; raw numbers in {args.json}")
    publish(runs, meta, args)


def publish(runs: list[dict], meta: dict, args) -> None:
    plot(runs, meta["epochs"], args.img)
    print(f"wrote {args.img}")
    if args.out is not None:
        img = os.path.relpath(args.img.resolve(), args.out.resolve().parent)
        write_section(args.out, markdown(runs, meta, img))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
