"""Round trips of folded models: pickle (torch.save / torch.load), state_dict into a fresh fold of
the same architecture, torch.jit.trace, torch.jit.script, torch.export and ONNX (when installed).

Models: RepVGG-A0 at 32x32 (the zoo), nets of DBB and ACNet blocks, and a small custom module with
functional ops (F.conv2d on parameters, a layer scale, a transposed conv + BN, a pad).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import n_ops, randomize_bn
from torch import fx, nn

import reparam
from reparam.models import ACBlock, DBBlock, repvgg_a0


class Custom(nn.Module):
    """A small module of awkward pieces: functional conv on parameters, layer scale, a DBB-style
    pad-then-BN, a transposed conv + BN, a residual and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.w1 = nn.Parameter(torch.randn(8, 3, 1, 1) * 0.3)
        self.gamma = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.bn = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 8, 1, bias=False)
        self.pad_bn = nn.BatchNorm2d(8)
        self.square = nn.Conv2d(8, 8, 3, bias=False)
        self.up = nn.ConvTranspose2d(8, 4, 4, 2, 1)
        self.up_bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.fc_bn = nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.bn(F.conv2d(x, self.w3, None, 1, 1) + F.conv2d(x, self.w1) * self.gamma)
        y = F.relu(y)
        z = self.square(self.pad_bn(F.pad(self.point(y), [1, 1, 1, 1])))
        y = F.relu(z + y)
        y = F.relu(self.up_bn(self.up(y)))
        return self.fc_bn(self.fc(y.mean((2, 3))))


def dbb_net() -> nn.Module:
    return nn.Sequential(DBBlock(3, 8), nn.ReLU(), DBBlock(8, 16, stride=2), nn.ReLU(),
                         DBBlock(16, 16, groups=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


def acnet_net() -> nn.Module:
    return nn.Sequential(ACBlock(3, 8), nn.ReLU(), ACBlock(8, 16, stride=2), nn.ReLU(),
                         ACBlock(16, 16, kernel_size=5), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


MODELS = {"repvgg_a0": lambda: repvgg_a0(num_classes=10), "dbb": dbb_net, "acnet": acnet_net,
          "custom": Custom}


def build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(MODELS[name](), seed)


@pytest.fixture(scope="module")
def folds():
    """name -> (original, folded, input); folded once per module (RepVGG-A0 takes ~0.3 s)."""
    out = {}
    for name in MODELS:
        model = build(name, 0)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        out[name] = (model, reparam.fold(model, (x,)), x)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


NAMES = sorted(MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_fold_is_a_graph_module_that_folded_every_bn(folds, name):
    model, folded, x = folds[name]
    assert isinstance(folded, fx.GraphModule)
    assert n_ops(folded, "batch_norm") == 0
    same(outputs(folded, x), outputs(model, x))


@pytest.mark.parametrize("name", NAMES)
def test_pickles_with_torch_save_and_load(folds, name):
    _, folded, x = folds[name]
    buf = io.BytesIO()
    torch.save(folded, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(outputs(loaded, x), outputs(folded, x))
    assert str(loaded.reparam_report) == str(folded.reparam_report)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loads_strictly_into_a_fresh_fold(folds, name):
    """A fresh model (other random weights) folds to the same module names and shapes; the first
    fold's state_dict loads into it with strict=True and reproduces the first fold's outputs."""
    _, folded, x = folds[name]
    fresh = build(name, 123)
    refolded = reparam.fold(fresh, (x,))
    assert not torch.allclose(outputs(refolded, x), outputs(folded, x))
    result = refolded.load_state_dict(folded.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(outputs(refolded, x), outputs(folded, x))


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_refold_are_harmless(folds, name):
    _, folded, x = folds[name]
    assert torch.equal(outputs(copy.deepcopy(folded), x), outputs(folded, x))
    again = reparam.fold(folded, (x,))
    assert not again.reparam_report.regions  # nothing left to fold
    assert torch.equal(outputs(again, x), outputs(folded, x))


@pytest.mark.parametrize("name", NAMES)
def test_jit_trace(folds, name):
    _, folded, x = folds[name]
    traced = torch.jit.trace(folded, (x,))
    same(outputs(traced, x), outputs(folded, x))
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    same(outputs(torch.jit.load(buf), x), outputs(folded, x))


@pytest.mark.parametrize("name", NAMES)
def test_jit_script(folds, name):
    """Every fold scripts, also where a plain ``fx.symbolic_trace`` of the model does not: under
    ``from __future__ import annotations`` (reparam.models) fx writes the placeholder type as
    ``_torch_Tensor_``, which TorchScript cannot resolve; the fold drops those annotations (R13)."""
    _, folded, x = folds[name]
    scripted = torch.jit.script(folded)
    same(outputs(scripted, x), outputs(folded, x))


@pytest.mark.parametrize("name", NAMES)
def test_torch_export(folds, name):
    _, folded, x = folds[name]
    exported = torch.export.export(folded, (x,))
    same(outputs(exported.module(), x), outputs(folded, x))


@pytest.mark.parametrize("name", ["custom", "dbb"])
def test_onnx_export_runs_in_onnxruntime(folds, name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    _, folded, x = folds[name]
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(folded, (x,), str(path), dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    same(torch.from_numpy(got), outputs(folded, x))
