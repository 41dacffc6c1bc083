"""torch.export in and out: ``reparam.fold(exported_program)`` returns a folded ExportedProgram
with the same signature and symbolic sizes; the caller's program is not changed."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_bn, rel_err
from torch import nn

import reparam
from reparam.models import RepVGGBlock, repvgg_a0


def _ops(program) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def test_repvgg_a0_program_folds_to_22_convolutions_and_no_batch_norm():
    model = randomize_bn(repvgg_a0()).eval()
    x = torch.randn(1, 3, 224, 224)
    program = torch.export.export(model, (x,))
    folded = reparam.fold(program)
    assert isinstance(folded, torch.export.ExportedProgram)
    ops = _ops(folded)
    assert ops.count("aten.conv2d.default") == 22
    assert not [op for op in ops if "batch_norm" in op]
    assert folded.call_spec.in_spec == program.call_spec.in_spec
    assert folded.call_spec.out_spec == program.call_spec.out_spec
    with torch.no_grad():
        assert rel_err(folded.module()(x), model(x)) < 1e-5
    report = folded.reparam_report
    assert len(report.regions) == 22 and report.params_after < report.params_before


def test_symbolic_sizes_stay_symbolic_over_their_range():
    block = randomize_bn(nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 8, stride=2))).eval()
    batch = torch.export.Dim("batch", min=2, max=16)
    side = torch.export.Dim("side", min=4, max=64)
    program = torch.export.export(block, (torch.randn(2, 4, 8, 8),),
                                  dynamic_shapes=({0: batch, 2: side, 3: side},))
    folded = reparam.fold(program)
    assert sorted(str(r) for r in folded.range_constraints.values()) == sorted(
        str(r) for r in program.range_constraints.values())
    for shape in ((3, 4, 10, 10), (16, 4, 33, 33)):
        x = torch.randn(*shape)
        with torch.no_grad():
            assert rel_err(folded.module()(x), block(x)) < 1e-5
    assert not [op for op in _ops(folded) if "batch_norm" in op]


def test_the_callers_program_is_not_changed():
    block = randomize_bn(RepVGGBlock(4, 4)).eval()
    program = torch.export.export(block, (torch.randn(2, 4, 6, 6),))
    before = {k: v.clone() for k, v in program.state_dict.items()}
    nodes = len(program.graph.nodes)
    reparam.fold(program)
    assert len(program.graph.nodes) == nodes
    for k, v in program.state_dict.items():
        assert torch.equal(v, before[k]), k


def test_folded_program_saves_and_loads_back(tmp_path):
    block = randomize_bn(RepVGGBlock(4, 4)).eval()
    x = torch.randn(2, 4, 6, 6)
    folded = reparam.fold(torch.export.export(block, (x,)))
    path = reparam.save(folded, tmp_path / "block.pt2")
    loaded = torch.export.load(path)
    with torch.no_grad():
        assert rel_err(loaded.module()(x), block(x)) < 1e-5
    with pytest.raises(reparam.ReparamError, match=r"\.pt2"):
        reparam.save(folded, tmp_path / "block.pt")  # its module does not pickle
    pytest.importorskip("onnxruntime")
    import onnxruntime

    onnx = reparam.save(folded, tmp_path / "block.onnx")
    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert rel_err(torch.from_numpy(got), block(x).detach()) < 1e-5


def test_keyword_inputs_are_refused_clearly():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x, *, scale):
            return self.conv(x) * scale

    program = torch.export.export(Keyword().eval(), (torch.randn(1, 3, 6, 6),),
                                  {"scale": torch.ones(1)})
    with pytest.raises(reparam.ReparamError, match="keyword inputs"):
        reparam.fold(program)
