"""``reparam.save`` writes a folded model in the format its file's extension names, and each file
loads back with its format's own loader and computes what the folded model computes (within
1e-5 of its largest output). One fold of RepVGG-A0 on a 1x3x64x64 input serves every test."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from helpers import randomize_bn

import reparam
from reparam.models import repvgg_a0

TOL = 1e-5


@pytest.fixture(scope="module")
def folded():
    torch.manual_seed(0)
    model = randomize_bn(repvgg_a0())
    return reparam.fold(model, torch.randn(1, 3, 64, 64))


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= TOL * want.abs().max().item()


def want(folded, x) -> torch.Tensor:
    with torch.no_grad():
        return folded(x)


def test_pt_is_the_pickled_module(folded, x, tmp_path):
    path = reparam.save(folded, tmp_path / "deploy.pt")
    assert path == tmp_path / "deploy.pt"
    with torch.no_grad():
        assert same(torch.load(path, weights_only=False)(x), want(folded, x))


def test_pt2_is_a_torch_export_program(folded, x, tmp_path):
    reparam.save(folded, tmp_path / "deploy.pt2")  # inputs: the shapes fold recorded
    program = torch.export.load(tmp_path / "deploy.pt2")
    with torch.no_grad():
        assert same(program.module()(x), want(folded, x))


def test_onnx_runs_in_onnxruntime_with_no_bn_or_add_left(folded, x, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    reparam.save(folded, tmp_path / "deploy.onnx", x)
    proto = onnx.load(str(tmp_path / "deploy.onnx"))
    types = Counter(n.op_type for n in proto.graph.node)
    for fn in proto.functions:
        types.update(n.op_type for n in fn.node)
    assert not {"BatchNormalization", "Add", "Sum"} & set(types), types
    assert types["Conv"] == 22, types
    session = ort.InferenceSession(str(tmp_path / "deploy.onnx"),
                                   providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert same(torch.from_numpy(out), want(folded, x))


def test_ts_is_torchscript(folded, x, tmp_path):
    reparam.save(folded, tmp_path / "deploy.ts")
    with torch.no_grad():
        assert same(torch.jit.load(str(tmp_path / "deploy.ts"))(x), want(folded, x))


def test_safetensors_is_the_folded_state_dict(folded, x, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    reparam.save(folded, tmp_path / "deploy.safetensors")
    weights = safetensors.load_file(str(tmp_path / "deploy.safetensors"))
    assert weights.keys() == folded.state_dict().keys()
    fresh = reparam.fold(repvgg_a0().eval(), torch.randn(1, 3, 64, 64))  # other weights
    fresh.load_state_dict(weights)
    with torch.no_grad():
        assert same(fresh(x), want(folded, x))


def test_safetensors_missing_names_the_install(folded, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(reparam.ReparamError, match="pip install safetensors"):
        reparam.save(folded, tmp_path / "deploy.safetensors")
    assert not (tmp_path / "deploy.safetensors").exists()


def test_unknown_extension_lists_the_supported_ones(folded, tmp_path):
    with pytest.raises(reparam.ReparamError, match=r"\.pt, \.pth, \.pt2, \.onnx, \.ts, "
                                                   r"\.safetensors"):
        reparam.save(folded, tmp_path / "deploy.tflite")


def test_formats_that_trace_need_inputs_for_a_model_fold_did_not_return(tmp_path):
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(reparam.ReparamError, match="needs example inputs"):
        reparam.save(plain, tmp_path / "plain.ts")
    reparam.save(plain, tmp_path / "plain.ts", torch.randn(1, 3, 8, 8))  # given: fine
    reparam.save(plain, tmp_path / "plain.pt")  # pickling runs nothing: no inputs needed
    with pytest.raises(reparam.ReparamError, match="does not exist"):
        reparam.save(plain, tmp_path / "no" / "such" / "plain.pt")
    with pytest.raises(reparam.ReparamError, match="expects a torch.nn.Module"):
        reparam.save("model", tmp_path / "plain.pt")
