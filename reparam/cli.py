"""The ``reparam`` command line (also ``python -m reparam``): fold, explain and draw a model.

A model is named by a SPEC: a builder ``package.module:function`` (called with no arguments, e.g.
``reparam.models:repvgg_a0``; ``--weights FILE`` loads a state_dict into it), ``timm:NAME``
(``timm.create_model(NAME, pretrained=False)``), or a file written by ``torch.save(module)``,
which is loaded only with ``--trust-pickle`` (loading it runs code pickled in it). Files are read
with ``torch.load(..., weights_only=True)`` otherwise. ``fold -o OUT`` writes the format OUT's
extension names (``reparam.save``). Errors are one line on stderr (``reparam: error: ...``) with
exit status 1, or 2 for a malformed command line; ``--debug`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import fx, nn

from . import __version__, rules
from .api import count_macs, fold, max_error
from .deploy import HOW_TO_LOAD, format_of, save
from .errors import ReparamError
from .files import load_weights, read_model
from .nodes import dtype_of, shape_of
from .report import Report
from .select import Keep

RULE_SETS = {"repvgg": rules.REPVGG, "acnet": rules.ACNET, "dbb": rules.DBB, "all": rules.ALL}

SPEC_HELP = ("a builder package.module:function called with no arguments (e.g. "
             "reparam.models:repvgg_a0; --weights FILE loads a state_dict into it), timm:NAME, "
             "or a module saved with torch.save(model, FILE) (loading it runs code pickled in "
             "it: only with --trust-pickle)")


# --- progress ---------------------------------------------------------------------------------

class _Status:
    """What the fold last reported (see :mod:`reparam.progress`), read by the status line."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if total:
            filled = round(20 * done / total)
            self.text = f"{stage} {done}/{total} [{'#' * filled}{'.' * (20 - filled)}]"
        else:
            self.text = stage


@contextmanager
def progress(label: str) -> Iterator[_Status]:
    """A status line on stderr while the block runs (only on a terminal): a spinner, the
    elapsed time, and the stage the fold reports, with a bar over its regions or parts (pass
    the yielded object as ``fold(..., progress=...)``)."""
    status = _Status()
    stream = sys.stderr
    if not stream.isatty():
        yield status
        return
    done = threading.Event()
    start = time.perf_counter()

    def spin() -> None:
        for mark in itertools.cycle("|/-\\"):
            stage = f": {status.text}" if status.text else ""
            line = f"{mark} {label}{stage} ({time.perf_counter() - start:.1f} s)"
            stream.write(f"\r\033[K{line[:200]}")
            stream.flush()
            if done.wait(0.1):
                break
        stream.write("\r\033[K")
        stream.flush()

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield status
    finally:
        done.set()
        thread.join()


# --- loading a model --------------------------------------------------------------------------

def warn(message: str) -> None:
    print(f"reparam: warning: {message}", file=sys.stderr)


def load_model(spec: str, *, seed: int = 0, eval_mode: bool = False, trust_pickle: bool = False,
               weights: str | None = None) -> nn.Module:
    """The module a SPEC names. Builders and timm models are put in eval mode; a saved file is
    taken as it is (``eval_mode=True`` switches it too). A pickled module is loaded only with
    ``trust_pickle``; ``weights`` is a state_dict file loaded into the module, strictly."""
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # builders and pickled classes of the current folder
    torch.manual_seed(seed)  # the same SPEC and seed give the same weights and random inputs
    path = Path(spec)
    if path.exists():
        model = read_model(path, trust_pickle=trust_pickle, warn=warn)
        if isinstance(model, torch.export.ExportedProgram):
            if weights is not None:
                raise ReparamError(f"{spec} is a torch.export program, which holds its weights: "
                                   "--weights is for a builder")
            return model  # exported from an eval-mode model, or its BNs are in the graph as such
        if eval_mode:
            model.eval()
    elif spec.startswith("timm:"):
        model = _timm_model(spec[len("timm:"):]).eval()
    elif ":" in spec and not spec.endswith(FILE_SUFFIXES):
        model = _build(spec).eval()
    else:
        raise ReparamError(f"'{spec}' is neither a file nor a builder; SPEC is {SPEC_HELP}")
    if weights is not None:
        load_weights(model, Path(weights), spec)
    training = [name or type(model).__name__ for name, m in model.named_modules()
                if m.training and type(m) is not nn.Module]  # not a graph module's bare holders
    if training:
        raise ReparamError(
            f"{spec} holds a module in training mode ({training[0]}); save it after "
            "model.eval(), or pass --eval to switch it to eval mode here")
    return model


FILE_SUFFIXES = (".pt", ".pth", ".pt2", ".onnx", ".ts", ".safetensors", ".pkl", ".bin")


def _timm_model(name: str) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise ReparamError("timm:NAME needs timm: pip install timm") from e
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as e:  # timm's "Unknown model (...)"
        raise ReparamError(f"timm cannot create '{name}': {e}") from e


def _build(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ReparamError(f"'{spec}' is not package.module:function; SPEC is {SPEC_HELP}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ReparamError(f"cannot import '{module_name}' (from '{spec}'): {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ReparamError(f"'{module_name}' has no attribute '{attr}' (from '{spec}')")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise ReparamError(f"'{spec}' is a {type(obj).__name__}, not a builder function")
        try:
            obj = obj()
        except Exception as e:  # noqa: BLE001 - user code
            raise ReparamError(f"{spec}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(obj, nn.Module):
        raise ReparamError(f"{spec}() returned a {type(obj).__name__}, not a torch.nn.Module")
    return obj


# --- folding ----------------------------------------------------------------------------------

def make_inputs(model: nn.Module, shapes: Sequence[tuple[int, ...]] | None) -> tuple | None:
    """Random inputs of the given shapes, in the dtype and on the device of the model, checked
    by one run of the model (a wrong shape is named here, before any tracing)."""
    if not shapes:
        return None
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else None
    inputs = tuple(torch.randn(shape, dtype=dtype, device=device) for shape in shapes)
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:  # noqa: BLE001 - user code
        given = " and ".join("x".join(map(str, shape)) for shape in shapes)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ReparamError(f"{type(model).__name__} does not run on inputs of shape {given} "
                           f"({type(e).__name__}: {first}); fix --input-shape") from e
    return inputs


def guessed_inputs(folded: nn.Module) -> tuple | None:
    """Random inputs of the shapes ``fold`` guessed (recorded on the folded graph's inputs; a
    folded program's own example inputs)."""
    if isinstance(folded, torch.export.ExportedProgram):
        examples = getattr(folded, "example_inputs", None)
        return tuple(examples[0]) if examples else None
    if not isinstance(folded, fx.GraphModule):
        return None
    shapes = [(shape_of(n), dtype_of(n)) for n in folded.graph.nodes if n.op == "placeholder"]
    if not shapes or any(s is None or d is None or not d.is_floating_point for s, d in shapes):
        return None
    return tuple(torch.randn(s, dtype=d) for s, d in shapes)


def fold_and_measure(model: nn.Module, args: argparse.Namespace, *, check: bool = False,
                     measure: bool = True, status=None) -> tuple[nn.Module, Report, tuple | None]:
    """``reparam.fold`` with the command line's options; returns the folded model, its report
    and the inputs used (the given shapes, else the ones ``fold`` guessed). With ``measure``,
    the max error on those inputs is set on the report, as ``explain`` does."""
    inputs = make_inputs(_as_module(model), args.input_shape)
    outputs = Keep(*args.outputs) if args.outputs else None
    folded = fold(model, inputs, rules=RULE_SETS[args.rules], max_cost=args.max_cost,
                  check=check, progress=status, outputs=outputs)
    report = folded.reparam_report
    inputs = inputs if inputs is not None else guessed_inputs(folded)
    if measure and inputs is not None:
        report.max_error = max_error(_as_module(model), _as_module(folded), inputs,
                                     outputs=outputs)
    return folded, report, inputs


def _as_module(model):
    """The module that runs a model: an ExportedProgram's ``module()``, a module itself."""
    return model.module() if isinstance(model, torch.export.ExportedProgram) else model


def _macs(model: nn.Module, folded: nn.Module, inputs: tuple | None) -> str | None:
    """``"before -> after (change) per sample"``, or ``None`` where they cannot be counted."""
    if inputs is None:
        return None
    try:
        before = count_macs(_as_module(model), inputs)
        after = count_macs(_as_module(folded), inputs)
    except ReparamError:
        return None
    change = f" ({after / before - 1:+.1%})" if before else ""
    return f"{before:,} -> {after:,}{change} per sample"


def _count(ops: dict[str, int]) -> int:
    return sum(ops.values())


def _shapes(inputs: tuple | None) -> str:
    if inputs is None:
        return "unknown (pass --input-shape)"
    return ", ".join("x".join(map(str, t.shape)) for t in inputs)


def _input_source(model: nn.Module) -> str:
    """Where an input shape nobody gave came from (as ``reparam.trace.guess_inputs`` picks)."""
    if isinstance(model, torch.export.ExportedProgram):
        return "the program's example inputs"
    if getattr(model, "default_input_size", None):
        return "the model's default_input_size"
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return "timm's input_size for the model"
    return "guessed from the first layer"


def _size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _dtype(module: nn.Module) -> str:
    param = next(iter(_as_module(module).parameters()), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else "float32"


def _output(path: str) -> Path:
    """The output path, checked before the work rather than after it."""
    out = Path(path)
    if out.is_dir():
        raise ReparamError(f"cannot write {out}: it is a folder; name a file")
    if not out.parent.is_dir():
        raise ReparamError(f"cannot write {out}: the folder {out.parent} does not exist")
    return out


def _load(args: argparse.Namespace) -> nn.Module:
    with progress(f"loading {args.spec}"):
        return load_model(args.spec, seed=args.seed, eval_mode=args.eval,
                          trust_pickle=args.trust_pickle, weights=args.weights)


def cmd_fold(args: argparse.Namespace) -> int:
    out = _output(args.output)
    suffix = format_of(out)
    model = _load(args)
    start = time.perf_counter()
    with progress("folding" + (" and checking in float64" if args.check else "")) as status:
        folded, report, inputs = fold_and_measure(model, args, check=args.check, status=status)
    wall = time.perf_counter() - start
    with progress(f"saving {out}"):
        save(folded, out, inputs)
    before, after = report.ops_before, report.ops_after
    ops = ", ".join(f"{k} {before.get(k, 0)} -> {after.get(k, 0)}"
                    for k in sorted(set(before) | set(after)))
    params = (f"{report.params_before:,} -> {report.params_after:,}")
    if report.params_before:
        params += f" ({report.params_after / report.params_before - 1:+.1%})"
    guessed = "" if args.input_shape else f" ({_input_source(model)}; set it with --input-shape)"
    macs = _macs(model, folded, inputs)
    lines = [
        f"folded {args.spec} ({type(model).__name__})",
        f"  input     {_shapes(inputs)}{guessed}",
        f"  ops       {_count(before)} -> {_count(after)}: {ops}",
        f"  params    {params}",
        *([f"  MACs      {macs}"] if macs else []),
        f"  regions   {len(report.regions)} folded, {len(report.leftovers)} linear ops left "
        "unfolded" + (f", {len(report.untraced)} parts not traced" if report.untraced else ""),
        f"  time      fold {report.fold_seconds:.2f} s"
        + (f", check and error {max(wall - report.fold_seconds, 0):.2f} s" if args.check
           else ""),
    ]
    if report.max_error is not None:
        lines.append(f"  error     {report.max_error:.1e} max |folded - original| / max |original| "
                     f"({_dtype(folded)} against the float64 original)")
    if args.check:
        lines.append("  check     passed: a float64 fold matches the float64 original")
    lines.append(f"  saved     {out} ({_size(out)}); load it with "
                 + HOW_TO_LOAD[suffix].replace("FILE", repr(str(out))))
    for x in report.leftovers[:3]:
        lines.append(f"  left      {x.node} ({x.op}): {x.reason}")
    if len(report.leftovers) > 3 or report.untraced:
        lines.append(f"  more      reparam explain {args.spec} lists every region and leftover")
    print("\n".join(lines))
    return 0


def print_report(report: Report) -> None:
    """The report on stdout: a rich table on a terminal (where rich is installed), else the
    plain text of ``str(report)``."""
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            console = Console(highlight=False)
            for line in report.summary():
                console.print(line, markup=False)
            for table in report.tables():
                view = Table(title=table.title or None, title_justify="left")
                last = len(table.columns) - 1  # only the rules or reasons wrap
                for i, column in enumerate(table.columns):
                    view.add_column(column, justify="right" if i in table.right else "left",
                                    no_wrap=i < last, overflow="fold")
                for row in table.rows:
                    view.add_row(*row)
                console.print(view)
            return
    print(report)


def cmd_explain(args: argparse.Namespace) -> int:
    model = _load(args)
    with progress("folding") as status:
        _, report, _ = fold_and_measure(model, args, status=status)
    print_report(report)
    return 0


def cmd_draw(args: argparse.Namespace) -> int:
    from . import draw  # networkx is imported only to draw

    out = _output(args.output)
    model = _load(args)
    if isinstance(model, torch.export.ExportedProgram):
        raise ReparamError(f"{args.spec} is a torch.export program: draw takes a module (its "
                           "builder); reparam fold and explain take the program")
    with progress("tracing and folding"):
        inputs = make_inputs(model, args.input_shape)
        path = args.block
        if path is None or inputs is None:  # fold the whole model to find the block or inputs
            _, report, inputs = fold_and_measure(model, args, measure=False)
            path = draw.block_of(model, report) if path is None else path
        picture = draw.picture(model, path, inputs, rules=RULE_SETS[args.rules],
                               max_cost=args.max_cost)
    text = picture.html() if out.suffix.lower() in (".html", ".htm") else picture.svg
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ReparamError(f"cannot write {out}: {e.strerror or e}") from e
    report = picture.report
    print(f"drew {picture.path or 'the whole model'} ({picture.kind}): ops "
          f"{picture.ops_before} -> {picture.ops_after}, params {report.params_before:,} -> "
          f"{report.params_after:,}; wrote {out}")
    return 0


# --- the command line -------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        self.exit(2, f"reparam: error: {message} (see {self.prog} --help)\n")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a shape: give positive sizes separated by commas, e.g. 1,3,224,224")
    return shape


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive ratio")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="reparam",
        description="Fold the linear branches of re-parameterizable blocks into plain convs, "
                    "exactly, and show what folded and why the rest did not.")
    parser.add_argument("--version", action="version", version=f"reparam {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    common.add_argument("--rules", choices=sorted(RULE_SETS), default="all",
                        help="rule set (default: all)")
    common.add_argument("--input-shape", type=_shape, action="append", metavar="N,C,H,W",
                        help="example input shape (repeat for several inputs); default: guessed "
                             "from the first layer")
    common.add_argument("--max-cost", type=_ratio, default=1.0, metavar="R",
                        help="largest folded/original multiply-add ratio per region (default 1)")
    common.add_argument("--outputs", action="append", metavar="PATH",
                        help="keep only this part of the model's output: indices and keys "
                             "joined by dots, e.g. 0 or 1.one2many (repeat for a tuple of "
                             "several); what only the rest needs leaves the folded model")
    common.add_argument("--seed", type=int, default=0,
                        help="random seed for builder weights and inputs (default 0)")
    common.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads for torch (default 1: a fold works on many small "
                             "tensors, where more threads cost more time than they save)")
    common.add_argument("--eval", action="store_true",
                        help="switch a module loaded from a file to eval mode")
    common.add_argument("--weights", metavar="FILE",
                        help="a state_dict (torch.save(model.state_dict(), FILE), or "
                             ".safetensors) to load into the model SPEC builds, strictly; read "
                             "without running pickled code")
    common.add_argument("--trust-pickle", action="store_true",
                        help="load a module pickled with torch.save(model, FILE): this runs "
                             "code pickled in the file, so only for files you trust")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("fold", parents=[common], help="fold a model and save it",
                       description="Fold every exactly-mergeable linear region and save the "
                                   "folded model in the format OUT's extension names.")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="where to save the folded model: OUT.pt (torch.save), OUT.pt2 "
                        "(torch.export), OUT.onnx, OUT.ts (TorchScript) or OUT.safetensors "
                        "(the state_dict)")
    p.add_argument("--check", action="store_true",
                   help="also fold a float64 copy and compare it with the float64 original "
                        "(fails naming the first region that diverges)")
    p.set_defaults(run=cmd_fold)

    p = sub.add_parser("explain", parents=[common], help="print what folds, what does not, why",
                       description="Print a table of each folded region (nodes replaced, rules, "
                                   "params and MACs before and after) and of each linear op "
                                   "left unfolded, with the reason.")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("draw", parents=[common], help="draw a block before and after folding",
                       description="Draw one block before and after folding, side by side, as "
                                   "SVG or as an HTML page.")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="FILE.svg or FILE.html")
    p.add_argument("--block", metavar="PATH",
                   help="submodule to draw, e.g. stage1.1 (default: the block of the first of "
                        "the largest folded regions)")
    p.set_defaults(run=cmd_draw)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "draw" and Path(args.output).suffix.lower() not in (".svg", ".html",
                                                                           ".htm"):
        parser.error(f"draw writes .svg or .html, not '{args.output}'")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, not {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("reparam: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`reparam explain ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # noqa: BLE001 - the command line reports every failure in one line
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(e).split()) or "(no message)"
        if not isinstance(e, ReparamError):
            message = f"{type(e).__name__}: {message}"
        elif "example_inputs" in message:
            message += " (here: --input-shape)"
        print(f"reparam: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

