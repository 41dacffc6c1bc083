"""The command line, driven as a user drives it: ``python -m reparam`` (and the installed
``reparam`` script, where there is one) in a subprocess, on small models. Error paths that stop
before any folding also run in-process through ``reparam.cli.main``, which is quicker.

The small model comes two ways: as a builder ``tinynet:build`` plus a state_dict (the safe
route, ``--weights``), and as a module pickled with ``torch.save`` (loaded only with
``--trust-pickle``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from reparam.cli import main
from reparam.models import RepVGGBlock, repvgg_a0

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


TINYNET = """from torch import nn

from reparam.models import RepVGGBlock


def build():
    return nn.Sequential(RepVGGBlock(4, 8, stride=2), RepVGGBlock(8, 8))
"""


def reparam_cli(*args: str, cwd: Path, script: list[str] | None = None,
                path: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), *map(str, path), env.get("PYTHONPATH")) if p)
    command = script or [sys.executable, "-m", "reparam"]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def random_stats(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    return model.eval()


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> bool:
    return (got - want).abs().max().item() <= rel * want.abs().max().item()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A folder with a two-block RepVGG-style model with random BN statistics: its builder
    ``tinynet.py``, its state_dict ``tiny_weights.pt``, and the module pickled as ``tiny.pt``."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "tinynet.py").write_text(TINYNET)
    torch.manual_seed(0)
    model = random_stats(nn.Sequential(RepVGGBlock(4, 8, stride=2), RepVGGBlock(8, 8)))
    torch.save(model, folder / "tiny.pt")
    torch.save(model.state_dict(), folder / "tiny_weights.pt")
    return folder


@pytest.fixture(scope="module")
def tiny(models) -> Path:
    """The pickled module (needs --trust-pickle)."""
    return models / "tiny.pt"


@pytest.fixture(scope="module")
def safe_tiny(models) -> list[str]:
    """The same model named the safe way: its builder and its state_dict."""
    return ["tinynet:build", "--weights", str(models / "tiny_weights.pt")]


@pytest.fixture
def in_process(tmp_path, monkeypatch, capsys, models):
    """Run ``reparam.cli.main`` here (for the quick error paths): (status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(models), *sys.path])  # the CLI adds the working folder

    def run(*args: str) -> tuple[int, str, str]:
        try:
            status = main(list(args))
        except SystemExit as e:
            status = e.code
        out, err = capsys.readouterr()
        return status, out, err

    return run


def one_line_error(stderr: str, words: str) -> None:
    assert stderr.startswith("reparam: error: ") and words in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_fold_builder_then_load_matches_the_original(tmp_path):
    out = ok(reparam_cli("fold", "reparam.models:repvgg_a0", "-o", "a0.pt", "--check",
                         "--input-shape", "1,3,32,32", cwd=tmp_path))
    assert "22 folded, 0 linear ops left" in out
    assert "params    9,108,968 -> 8,309,384" in out and "MACs      " in out
    assert "check     passed" in out and "error     " in out and "a0.pt" in out
    folded = torch.load(tmp_path / "a0.pt", weights_only=False)
    torch.manual_seed(0)  # the CLI builds with --seed 0
    model = repvgg_a0().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert close(folded(x), model(x))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_fold_a_saved_module_file(tiny, tmp_path):
    result = reparam_cli("fold", str(tiny), "-o", "deploy.pt", "--trust-pickle", cwd=tmp_path)
    out = ok(result)
    assert result.stderr.strip() == (f"reparam: warning: loading {tiny} runs code pickled in it: "
                                     "only do this for files you trust")
    assert "2 folded, 0 linear ops left" in out
    assert "guessed" in out  # no --input-shape: the input comes from the first layer
    assert "batch_norm 5 -> 0" in out and "conv 4 -> 2" in out
    folded = torch.load(tmp_path / "deploy.pt", weights_only=False)
    model = torch.load(tiny, weights_only=False)
    x = torch.randn(3, 4, 20, 20)
    with torch.no_grad():
        assert close(folded(x), model(x))


def test_fold_with_weights_matches_the_saved_model(models, safe_tiny, tmp_path, in_process):
    status, out, err = in_process("fold", *safe_tiny, "-o", "deploy.pt2", "--input-shape",
                                  "1,4,16,16")
    assert status == 0 and err == "", err
    assert "2 folded, 0 linear ops left" in out
    assert "load it with torch.export.load('deploy.pt2').module()" in out
    folded = torch.export.load(tmp_path / "deploy.pt2").module()
    model = torch.load(models / "tiny.pt", weights_only=False)
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert close(folded(x), model(x))


def test_explain_prints_the_table(models, safe_tiny, tmp_path):
    out = ok(reparam_cli("explain", *safe_tiny, "--input-shape", "1,4,16,16", cwd=tmp_path,
                         path=[models]))
    assert out.startswith("reparam: 2 regions folded, 0 linear ops left")
    assert "max error" in out and "input: 1x4x16x16 (MACs are per sample at this size)" in out
    header = next(line for line in out.splitlines() if line.startswith("module"))
    assert header.split() == ["module", "folded", "nodes", "params", "MACs", "rules"]
    assert "1.square.conv" in out and "identity_as_dirac" in out


def test_explain_with_a_smaller_rule_set_gives_reasons(safe_tiny, in_process):
    status, out, _ = in_process("explain", *safe_tiny, "--rules", "acnet")
    assert status == 0 and "left unfolded:" in out
    assert "needs the law 'identity_as_dirac', which is not in the rule set" in out


def test_draw_svg_and_html(models, safe_tiny, tmp_path):
    out = ok(reparam_cli("draw", *safe_tiny, "-o", "block.svg", cwd=tmp_path, path=[models]))
    # the block with the identity; ops counted as fold and explain count them (no ReLU)
    assert out.startswith("drew 1 (RepVGGBlock): ops 7 -> 1")
    root = ET.parse(tmp_path / "block.svg").getroot()
    assert root.tag == f"{SVG}svg"
    texts = [t.text for t in root.iter(f"{SVG}text")]
    for label in ("conv3x3 s1 g1", "conv1x1 s1 g1", "BN", "+", "ReLU", "fold"):
        assert label in texts
    assert texts.count("BN") == 3 and texts.count("conv3x3 s1 g1") == 2
    assert texts.count("+") == 1  # the three branches meet in one sum, not a chain of two
    assert any(t.startswith("before: 7 ops") for t in texts)
    assert any(t.startswith("after: 1 op,") for t in texts)
    assert texts[0] == "1 (RepVGGBlock), input 2x8x32x32"  # the guess: 2x3x64x64 into stride 2
    assert texts.count("2x8x32x32") == 2  # each panel's input box

    ok(reparam_cli("draw", *safe_tiny, "-o", "block.html", "--block", "0", cwd=tmp_path,
                   path=[models]))
    page = (tmp_path / "block.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<pre>reparam: 1 regions folded" in page
    assert "<p>Input 2x4x64x64;" in page
    svg = ET.fromstring(page[page.index("<svg"):page.index("</svg>") + len("</svg>")])
    texts = [t.text for t in svg.iter(f"{SVG}text")]
    assert "conv3x3 s2 g1" in texts and "conv1x1 s2 g1" in texts


def test_bad_specs_are_one_line_errors(tmp_path):
    cases = {
        "missing.pt": "neither a file nor a builder",
        "reparam.models:no_such_model": "'reparam.models' has no attribute 'no_such_model'",
    }
    for spec, words in cases.items():
        result = reparam_cli("fold", spec, "-o", "out.pt", cwd=tmp_path)
        assert result.returncode == 1, spec
        one_line_error(result.stderr, words)
        assert not (tmp_path / "out.pt").exists()


def test_more_bad_specs(in_process, tmp_path):
    torch.save({"weight": torch.zeros(1)}, tmp_path / "state.pt")
    (tmp_path / "not_a_model.py").write_text("def build():\n    return 42\n")
    cases = {
        "state.pt": "holds a state_dict (weights, no model)",
        "no_such_package:build": "cannot import 'no_such_package'",
        "not_a_model:build": "not_a_model:build() returned a int, not a torch.nn.Module",
        "timm:no_such_model_name": "no_such_model_name",
    }
    for spec, words in cases.items():
        status, _, err = in_process("explain", spec)
        assert status == 1, spec
        one_line_error(err, words)


def test_a_failed_input_guess_is_one_line(in_process, tmp_path):
    (tmp_path / "flat.py").write_text(
        "from torch import nn\n\n"
        "class Flat(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3)\n\n"
        "    def forward(self, x):\n"
        "        return self.conv(x.view(-1, 3, 7, 7))\n")
    status, _, err = in_process("explain", "flat:Flat")  # guessed 3x64x64 does not fit the view
    assert status == 1
    one_line_error(err, "--input-shape")
    status, out, _ = in_process("explain", "flat:Flat", "--input-shape", "2,147")
    assert status == 0 and out.startswith("reparam: 0 regions folded")


def test_a_wrong_input_shape_is_named(safe_tiny, in_process):
    status, _, err = in_process("explain", *safe_tiny, "--input-shape", "1,3,16,16")
    assert status == 1
    one_line_error(err, "does not run on inputs of shape 1x3x16x16")


def test_debug_shows_the_traceback(tmp_path):
    result = reparam_cli("--debug", "explain", "reparam.models:no_such_model", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("reparam: error: ")


def test_usage_errors_exit_2_in_one_line(tmp_path, in_process):
    result = reparam_cli("fold", "reparam.models:repvgg_a0", cwd=tmp_path)  # no -o
    assert result.returncode == 2
    one_line_error(result.stderr, "the following arguments are required: -o/--output")
    for args, words in ((["explain", "x.pt", "--input-shape", "1,three"], "is not a shape"),
                        (["draw", "x.pt", "-o", "picture.png"], "draw writes .svg or .html"),
                        (["fold", "x.pt", "-o", "y.pt", "--max-cost", "0"], "positive ratio"),
                        (["unfold", "x.pt"], "invalid choice: 'unfold'"),
                        ([], "the following arguments are required: COMMAND")):
        status, _, err = in_process(*args)
        assert status == 2, args
        one_line_error(err, words)


def test_a_module_saved_in_training_mode(tmp_path, in_process):
    torch.save(nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2)), tmp_path / "train.pt")
    status, _, err = in_process("fold", "train.pt", "-o", "out.pt", "--trust-pickle")
    assert status == 1
    assert err.splitlines()[0].startswith("reparam: warning: loading train.pt runs code")
    one_line_error(err.split("\n", 1)[1], "training mode")
    assert "--eval" in err
    status, out, _ = in_process("fold", "train.pt", "-o", "out.pt", "--eval", "--trust-pickle")
    assert status == 0 and "1 folded" in out


def test_installed_console_script(models, safe_tiny, tmp_path):
    script = Path(sys.executable).with_name("reparam")
    if not script.exists():
        pytest.skip("reparam is not installed in this environment (pip install -e .)")
    assert ok(reparam_cli("--version", cwd=tmp_path, script=[str(script)])).startswith("reparam ")
    out = ok(reparam_cli("explain", *safe_tiny, cwd=tmp_path, script=[str(script)],
                         path=[models]))
    assert out.startswith("reparam: 2 regions folded")


# --- no pickled code runs without consent -----------------------------------------------------

class WritesAFile:
    """Unpickling this writes the file MARK in the working folder (a stand-in for any code)."""

    def __reduce__(self):
        import builtins

        return builtins.exec, ("open('MARK', 'w').write('x')",)


def test_a_pickle_runs_no_code_without_trust_pickle(in_process, tmp_path):
    torch.save(WritesAFile(), tmp_path / "evil.pt")
    for command in (["fold", "evil.pt", "-o", "out.pt"], ["explain", "evil.pt"],
                    ["draw", "evil.pt", "-o", "out.svg"]):
        status, out, err = in_process(*command)
        assert status == 1 and out == "", command
        one_line_error(err, "loading it runs code pickled in it (it names builtins.exec)")
        assert "--trust-pickle" in err and "--weights" in err
        assert not (tmp_path / "MARK").exists(), command
    status, _, err = in_process("explain", "evil.pt", "--trust-pickle")
    assert (tmp_path / "MARK").exists()  # consent given: the pickled code ran
    assert status == 1 and "reparam: warning: loading evil.pt runs code pickled in it" in err
    assert err.strip().splitlines()[-1] == ("reparam: error: evil.pt holds a NoneType, not a "
                                            "torch.nn.Module")


def test_the_console_script_runs_no_pickled_code(tmp_path):
    script = Path(sys.executable).with_name("reparam")
    if not script.exists():
        pytest.skip("reparam is not installed in this environment (pip install -e .)")
    torch.save(WritesAFile(), tmp_path / "evil.pt")
    result = reparam_cli("fold", "evil.pt", "-o", "out.pt", cwd=tmp_path, script=[str(script)])
    assert result.returncode == 1
    one_line_error(result.stderr, "--trust-pickle")
    assert not (tmp_path / "MARK").exists() and not (tmp_path / "out.pt").exists()


LEAKS = ("ShapeProp", "enforce fail", "inline_container", "PytorchStreamReader", "corrupted",
         "Traceback", "miniz", "WeightsUnpickler", "pytorch.org")


def test_bad_files_get_one_line_errors_without_internals(in_process, tmp_path, safe_tiny):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2)).eval()
    torch.save(model, tmp_path / "module.pt")
    data = (tmp_path / "module.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    torch.save(model.state_dict(), tmp_path / "state.pt")
    x = torch.randn(1, 2, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "program.pt2")
    (tmp_path / "truncated.pt2").write_bytes((tmp_path / "program.pt2").read_bytes()[:2000])
    torch.jit.save(torch.jit.trace(model, (x,)), str(tmp_path / "scripted.ts"))
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    cases = {
        ("module.pt",): "is a pickled module (torch.save(model)): loading it runs code",
        ("truncated.pt",): "truncated.pt is a damaged or truncated zip archive",
        ("random.pt",): "random.pt is not a file written by torch.save",
        ("empty.pt",): "empty.pt is empty (0 bytes)",
        ("folder",): "folder is a folder, not a saved model",
        ("state.pt",): "state.pt holds a state_dict (weights, no model): give the model's "
                       "builder as SPEC and a state_dict as --weights",
        ("truncated.pt2",): "truncated.pt2 is a damaged or truncated zip archive",
        ("scripted.ts",): "scripted.ts is a TorchScript module",
        ("model.onnx",): "model.onnx is an ONNX model",
        (*safe_tiny[:2], "program.pt2"): "program.pt2 is a torch.export program, not a "
                                         "state_dict",
        (*safe_tiny[:2], "module.pt"): "module.pt is a pickled module, not a state_dict",
        (*safe_tiny[:2], "state.pt"): "the weights in state.pt do not fit tinynet:build: "
                                      "missing keys 0.square.conv.weight",
        (*safe_tiny[:2], "empty.pt"): "empty.pt is empty",
    }
    for spec, words in cases.items():
        status, out, err = in_process("explain", *spec)
        assert status == 1 and out == "", spec
        one_line_error(err, words)
        assert not any(leak in err for leak in LEAKS), err


def test_unknown_output_extension_is_refused_before_any_work(in_process, safe_tiny):
    status, _, err = in_process("fold", *safe_tiny, "-o", "deploy.pkl")
    assert status == 1
    one_line_error(err, "cannot tell which format to write from 'deploy.pkl': name the file "
                        "with one of the extensions .pt, .pth, .pt2, .onnx, .ts, .safetensors")


def test_fold_writes_the_format_the_extension_names(in_process, safe_tiny, tmp_path, tiny):
    safetensors = pytest.importorskip("safetensors.torch")
    model = torch.load(tiny, weights_only=False)
    x = torch.randn(1, 4, 16, 16)
    loaders = {
        "deploy.ts": ("torch.jit.load('deploy.ts')", lambda p: torch.jit.load(str(p))),
        "deploy.safetensors": ("safetensors.torch.load_file('deploy.safetensors')", None),
    }
    for name, (how, load) in loaders.items():
        status, out, err = in_process("fold", *safe_tiny, "-o", name, "--input-shape",
                                      "1,4,16,16")
        assert status == 0, err
        assert f"load it with {how}" in out
        if load is not None:
            with torch.no_grad():
                assert close(load(tmp_path / name)(x), model(x))
    weights = safetensors.load_file(str(tmp_path / "deploy.safetensors"))
    assert not any("bn" in k for k in weights) and len(weights) == 4  # two convs, with biases


def test_explain_draws_a_rich_table_on_a_terminal(in_process, safe_tiny, monkeypatch):
    pytest.importorskip("rich")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    status, out, _ = in_process("explain", *safe_tiny, "--input-shape", "1,4,16,16")
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)  # without the terminal's bold
    assert status == 0 and out.startswith("reparam: 2 regions folded")
    assert "┃ module" in out and "│ 1.square.conv " in out  # a real table, with borders
    for name in ("rich", "rich.console", "rich.table"):  # without rich: the plain text
        monkeypatch.setitem(sys.modules, name, None)
    status, plain, _ = in_process("explain", *safe_tiny, "--input-shape", "1,4,16,16")
    assert status == 0 and "┃" not in plain
    header = next(line for line in plain.splitlines() if line.startswith("module"))
    assert header.split() == ["module", "folded", "nodes", "params", "MACs", "rules"]


def test_fold_reads_a_torch_export_program_and_writes_one(in_process, tmp_path):
    """A .pt2 in, the folded program out (same signature), outputs within 1e-5; draw says it
    takes a module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 2, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "program.pt2")
    out = tmp_path / "folded.pt2"
    status, text, err = in_process("fold", str(tmp_path / "program.pt2"), "-o", str(out))
    assert status == 0, err
    assert "folded" in text and "batch_norm 1 -> 0" in text and "the program's example" in text
    loaded = torch.export.load(out)
    assert not [n for n in loaded.graph.nodes if "batch_norm" in str(n.target)]
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), model(x), rtol=1e-5, atol=1e-5)
    status, _, err = in_process("draw", str(tmp_path / "program.pt2"), "-o",
                                str(tmp_path / "x.html"))
    assert status == 1
    one_line_error(err, "program.pt2 is a torch.export program: draw takes a module")
