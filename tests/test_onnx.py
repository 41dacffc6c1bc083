"""A folded model exports to ONNX and onnxruntime computes what the original computes.

Both exporters work offline here: the TorchScript-based one (``dynamo=False``) and the
``torch.export``-based one (``dynamo=True``, needs onnxscript, part of the ``onnx`` extra). The
RepVGG network folds completely, so no BatchNormalization, Add or AveragePool node may be left
anywhere in its ONNX graph; timm's MobileOne-S0 folds completely as well.
"""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from helpers import randomize_bn, rel_err, run64

import reparam

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = 1e-4
FOLDED_AWAY = {"BatchNormalization", "Add", "Sum", "AveragePool", "Pad"}
EXPORTERS = [pytest.param(False, id="legacy"), pytest.param(True, id="dynamo")]


def export(model: torch.nn.Module, x: torch.Tensor, dynamo: bool):
    if dynamo:
        pytest.importorskip("onnxscript")
        return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def run_onnx(proto, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def op_types(proto) -> Counter:
    """Node types of the main graph and of every function the exporter defined."""
    types = Counter(n.op_type for n in proto.graph.node)
    for fn in proto.functions:
        types.update(n.op_type for n in fn.node)
    return types


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_repvgg_exports_as_plain_convs(dynamo):
    model = randomize_bn(reparam.models.repvgg_a0())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    folded = reparam.fold(model, x)
    proto = export(folded, x, dynamo)
    onnx.checker.check_model(proto)
    types = op_types(proto)
    assert not FOLDED_AWAY & set(types), types
    assert types["Conv"] == reparam.count_ops(folded)["conv"] == 22, types
    assert rel_err(run_onnx(proto, x), run64(model, x)) < TOL


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_timm_mobileone_exports(dynamo):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobileone_s0", pretrained=False))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    folded = reparam.fold(model, x)
    ops = reparam.count_ops(folded)
    assert ops.get("batch_norm", 0) == ops.get("add", 0) == 0, ops  # it folds completely
    proto = export(folded, x, dynamo)
    onnx.checker.check_model(proto)
    types = op_types(proto)
    assert not FOLDED_AWAY & set(types), types
    assert types["Conv"] == reparam.count_ops(folded)["conv"], types
    assert rel_err(run_onnx(proto, x), run64(model, x)) < TOL
