"""Peak memory of one model, measured in a fresh process; prints one JSON line.

    python -m benchmarks.probe THREADS infer SPEC METHODS BATCHES
    python -m benchmarks.probe THREADS fold SPEC METHOD

e.g. ``2 infer timm:repvgg_a0 train,reparam,timm 1,8`` or ``2 fold stack:1000:16:8 reparam``.

What is measured is the increase of the process's peak resident set size (Linux ``VmHWM``, reset
to the current RSS through ``/proc/self/clear_refs`` just before) over the RSS at that moment.
``benchmarks.run`` starts this with glibc's mmap threshold fixed at 16 KiB, so that freed tensors
go back to the system and a later allocation shows up again as new resident pages.

- ``infer``: for each method in turn, the model is built and converted (what the previous method
  left is freed first); then, per batch size, one warm-up forward pass, a reset, and one measured
  forward pass. The result is what one inference touches beyond the weights (activations, oneDNN
  workspaces, allocator slack); weights are reported apart.
- ``fold``: after a warm-up fold of a tiny model (imports, first-call caches), the training-time
  model is built and run once on the example input (what that leaves resident, torch's caches
  for this input size, is reported apart as ``warm_forward``), the mark reset, and the model
  converted. The result includes everything the
  conversion holds at its peak: the traced copy, float64 kernels, the shape-propagation forward
  pass, and the new model itself. For ``reparam`` the RSS and the peak so far are also recorded
  as each phase of the fold returns.
"""

from __future__ import annotations

import json
import sys

import torch

from .common import (
    build,
    convert,
    example_input,
    param_bytes,
    peak_rss,
    reset_peak,
    rss,
    state_bytes,
)


def infer(spec: str, methods: list[str], batches: list[int]) -> dict:
    results = {}
    for method in methods:
        model = build(spec)
        deployed = convert(model, method, example_input(spec, 1))
        del model
        result = {"weights": state_bytes(deployed), "peak": {}, "rss_before": {}}
        with torch.inference_mode():
            for b in batches:
                x = example_input(spec, b)
                deployed(x)
                reset_peak()
                before = rss()
                out = deployed(x)
                result["peak"][b] = peak_rss() - before
                result["rss_before"][b] = before
                del out
        results[method] = result
        del deployed
    return results


_PHASES = ("trace", "observe", "_eager", "fold_graph", "_run", "own_tensors")


def _watch_phases(marks: list, before: int) -> None:
    """Record RSS and peak RSS (over ``before``) as each phase of ``reparam.fold`` returns.

    Wraps the functions ``reparam.api`` calls, in this process only; a phase the engine no
    longer has is skipped.
    """
    import reparam.api as api

    for name in _PHASES:
        fn = getattr(api, name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            out = _fn(*args, **kwargs)
            marks.append([_name, rss() - before, peak_rss() - before])
            return out

        setattr(api, name, wrapped)
    _watch_plan(marks)


def _watch_plan(marks: list) -> None:
    """Record the bytes of the kernels the analysis holds when materialization starts.

    Reads engine internals (``Materializer.run``, its analysis's ``values``, ``value.kernel``);
    if they are gone, nothing is recorded."""
    try:
        from reparam.materialize import Materializer
    except ImportError:
        return
    run = getattr(Materializer, "run", None)
    if run is None:
        return

    def wrapped(self, *args, **kwargs):
        held = {}
        for value in getattr(getattr(self, "a", None), "values", {}).values():
            kernel = getattr(value, "kernel", None)
            for t in (getattr(kernel, "weight", None), getattr(kernel, "bias", None)):
                if isinstance(t, torch.Tensor) and not t.is_meta:  # meta: spent, holds nothing
                    held[t.data_ptr()] = t.numel() * t.element_size()
        marks.append(["plan kernels", sum(held.values()), None])
        return run(self, *args, **kwargs)

    Materializer.run = wrapped


def fold(spec: str, method: str) -> dict:
    if method == "reparam":  # warm up: imports and first-call caches, as in the timed runs
        import reparam
        from reparam.models import RepVGGBlock

        reparam.fold(torch.nn.Sequential(RepVGGBlock(4, 4)).eval(), torch.randn(1, 4, 8, 8))
    else:
        import timm.utils.model  # noqa: F401
    model = build(spec)
    x = example_input(spec, 1)
    # one forward pass at this input size first, as any user has run the model before converting
    # it: torch keeps oneDNN and allocator caches from it for the life of the process, which
    # reparam's shape propagation would otherwise be charged for (recorded apart)
    reset_peak()
    start = rss()
    with torch.no_grad():
        model(x)
    reset_peak()
    warm = rss() - start
    marks: list = []
    before = rss()
    if method == "reparam":
        _watch_phases(marks, before)
    deployed = convert(model, method, x)
    peak = peak_rss() - before
    reset_peak()  # collects garbage and gives freed heap pages back: what is really still held
    retained = rss() - before
    return {"peak": peak, "retained": retained, "warm_forward": warm,
            "param_bytes": param_bytes(model),
            "state_bytes": state_bytes(model), "out_bytes": state_bytes(deployed),
            "phases": marks}


def main(argv: list[str]) -> None:
    torch.set_num_threads(int(argv[0]))
    what, spec, method = argv[1:4]
    if what == "infer":
        result = infer(spec, method.split(","), [int(b) for b in argv[4].split(",")])
    elif what == "fold":
        result = fold(spec, method)
    else:
        raise SystemExit(f"unknown probe {what!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
