"""Models, conversions and measuring helpers shared by the benchmark sections.

A model is named by a *spec* string, so that a subprocess can rebuild it:

- ``timm:repvgg_a0``: ``timm.create_model("repvgg_a0", pretrained=False)``
- ``ours:repvgg_a0``: ``reparam.models.repvgg_a0()``
- ``stack:N:C:H``: ``nn.Sequential`` of ``N`` ``reparam.models.RepVGGBlock(C, C)``, input
  ``C x H x H``

A *method* turns the training-time model into what is measured: ``train`` (the model as it is,
in eval mode), ``reparam`` (``reparam.fold``) or ``timm``
(``timm.utils.model.reparameterize_model``).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("train", "reparam", "timm")

# A fold slower than this is timed once (its warm-up call), not repeated, and profiled without a
# warm-up: the run stays within its time budget even when the engine is slow on a model.
SLOW_S = 20.0
METHOD_NAMES = {"train": "training-time", "reparam": "reparam.fold", "timm": "timm deploy",
                "unverified": "reparam.fold(verify=False)"}

_NAMES = {
    "repvgg_a0": "RepVGG-A0", "repvgg_b0": "RepVGG-B0", "mobileone_s0": "MobileOne-S0",
    "dbb_resnet18": "DBB ResNet-18", "acnet_resnet18": "ACNet ResNet-18",
}


# --- models -------------------------------------------------------------------------------------

def display(spec: str) -> str:
    """A readable name for a spec: ``RepVGG-A0 (timm)``, ``stack 1000 x RepVGGBlock(16)``."""
    kind, _, rest = spec.partition(":")
    if kind == "stack":
        n, c, h = rest.split(":")
        return f"stack {n} x RepVGGBlock({c}), {c}x{h}x{h}"
    return f"{_NAMES.get(rest, rest)} ({kind})"


def build(spec: str, seed: int = 0) -> nn.Module:
    """The training-time model of ``spec``, randomly initialised (never pretrained), eval mode."""
    torch.manual_seed(seed)
    kind, _, rest = spec.partition(":")
    if kind == "timm":
        import timm

        model = timm.create_model(rest, pretrained=False)
    elif kind == "ours":
        import reparam.models

        model = getattr(reparam.models, rest)()
    elif kind == "stack":
        from reparam.models import RepVGGBlock

        n, c, _ = (int(v) for v in rest.split(":"))
        model = nn.Sequential(*[RepVGGBlock(c, c) for _ in range(n)])
    else:
        raise ValueError(f"unknown model spec {spec!r}")
    return model.eval()


def example_input(spec: str, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if spec.startswith("stack:"):
        _, _, c, h = spec.split(":")
        return torch.randn(batch, int(c), int(h), int(h), generator=g)
    return torch.randn(batch, 3, 224, 224, generator=g)


def convert(model: nn.Module, method: str, example: torch.Tensor) -> nn.Module:
    """``model`` as ``method`` makes it; neither converter modifies ``model``."""
    if method == "train":
        return model
    if method in ("reparam", "unverified"):
        import reparam

        return reparam.fold(model, example[:1], verify=method == "reparam")
    if method == "timm":
        from timm.utils.model import reparameterize_model

        return reparameterize_model(model)  # inplace=False: works on a deep copy
    raise ValueError(f"unknown method {method!r}")


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_bytes(model: nn.Module) -> int:
    """Parameters and buffers: what the model itself holds in memory."""
    return param_bytes(model) + sum(b.numel() * b.element_size() for b in model.buffers())


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random (not default) statistics and affine parameters, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` in float64: the measure of ``reparam.max_error``."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


# --- timing -------------------------------------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """25th and 75th percentiles (the spread shown beside a median)."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _forward(model: nn.Module, x: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        model(x)
    return time.perf_counter() - start


def interleaved_throughput(models: dict[str, nn.Module], x: torch.Tensor, rounds: int,
                           chunk_s: float, sync: Callable[[], None] = lambda: None
                           ) -> dict[str, list[float]]:
    """Images per second of each model, one value per round.

    Every round times each model once, in an order rotated from round to round, for about
    ``chunk_s`` seconds (at least one forward pass), so that load from other processes falls on
    all of them alike. Compare models by the median of their per-round ratios.
    """
    names = list(models)
    calls: dict[str, int] = {}
    with torch.inference_mode():
        for name in names:  # warm up (allocator, oneDNN primitives), then size the chunk
            _forward(models[name], x, 2)
            sync()
            one = _forward(models[name], x, 1)
            sync()
            calls[name] = max(1, round(chunk_s / max(one, 1e-9)))
        out: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            gc.collect()
            for i in range(len(names)):
                name = names[(i + r) % len(names)]
                sync()
                t = _forward(models[name], x, calls[name])
                sync()
                out[name].append(calls[name] * x.shape[0] / t)
    return out


def interleaved_calls(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
                      ) -> dict[str, list[float]]:
    """Seconds per call of each function, one value per round, in a rotated order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            gc.collect()
            start = time.perf_counter()
            result = fns[name]()
            out[name].append(time.perf_counter() - start)
            del result
    return out


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    """Per-round ratios ``a[i] / b[i]`` (same round, so the same background load)."""
    return [x / y for x, y in zip(a, b, strict=True)]


# --- memory -------------------------------------------------------------------------------------

def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS: resident now; VmHWM: peak since reset)."""
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def rss() -> int:
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0: clear_refs 5)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back first
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_measurable() -> bool:
    try:
        reset_peak()
        return peak_rss() > 0
    except OSError:
        return False


# --- the machine --------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = "not installed"
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "memory": f"{mem:.0f} GiB",
        "torch": torch.__version__,
        "timm": timm_version,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load_average() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"
