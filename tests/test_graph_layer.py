"""The graph layer: open recognition, one read per node, sharing, dead code, honest completeness,
and the import contract between the algebra, the graph layer, the rules and the models."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equivalent, n_ops, randomize_bn
from torch import nn

import reparam
from reparam import kernel as K
from reparam.pattern import Effect, Function, Module, Op, Recognizer

ROOT = Path(__file__).resolve().parents[1] / "reparam"
ALGEBRA = {"kernel.py"}
GRAPH = {"pattern.py", "values.py", "context.py", "ir.py", "analysis.py", "policies.py",
         "cost.py", "materialize.py", "rewrite.py", "observe.py", "verify.py", "trace.py",
         "nodes.py", "report.py", "errors.py"}


def imports(path: Path) -> set[str]:
    """The reparam modules a file imports (relative imports resolved)."""
    package = ".".join(("reparam", *path.relative_to(ROOT).parent.parts)).rstrip(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
                found |= {target} | {f"{target}.{a.name}" for a in node.names}
            elif node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == "reparam" or m.startswith("reparam.")}


def test_the_algebra_imports_no_graph_code():
    for name in ALGEBRA:
        assert imports(ROOT / name) <= {"reparam.errors", "reparam.errors.ReparamError"}, name


def test_the_graph_layer_imports_no_rule_file_and_no_model():
    for name in GRAPH:
        bad = {m for m in imports(ROOT / name) if m.startswith(("reparam.rules", "reparam.models"))}
        assert not bad, f"{name} imports {bad}"


def test_rules_import_no_models_and_models_import_no_engine():
    for path in (ROOT / "rules").glob("*.py"):
        bad = {m for m in imports(path) if m.startswith("reparam.models")}
        assert not bad, f"{path.name} imports {bad}"
    for path in (ROOT / "models").glob("*.py"):
        bad = {m for m in imports(path) if not m.startswith("reparam.models")}
        assert not bad, f"models/{path.name} imports {bad}"


def test_the_graph_layer_compares_no_op_kind_string():
    """The driver dispatches from the rule set's patterns and reads effects: no ``x.kind ==`` or
    ``x.kind in (...)`` anywhere in the graph layer."""
    for name in GRAPH:
        tree = ast.parse((ROOT / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                kind = any(isinstance(s, ast.Attribute) and s.attr == "kind" for s in sides)
                text = any(_strings(s) for s in sides)
                assert not (kind and text), f"{name}:{node.lineno} compares an op kind"


def _strings(node: ast.AST) -> bool:
    """A string constant, or a tuple, list or set of them."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)


# --- open recognition ------------------------------------------------------------------------


class Doubler(nn.Module):
    """A user's module reparam does not know (and torch.fx could trace: the rule keeps it whole)."""

    def forward(self, x):
        return x * 2.0


DOUBLE = Module(Doubler, kind="double", effect=Effect.AFFINE)


@reparam.rule("doubled", DOUBLE)
def doubled(ctx, op):
    """A(x) * 2 => A'(x). Always exact."""
    a = ctx.lin(op.inputs[0])
    return ctx.result(K.scale_out(a.kernel, 2.0), a, rule="doubled")


def test_a_module_pattern_keeps_the_module_whole_and_its_rule_folds_it():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Doubler(),
                                       nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, x, rules=reparam.rules.ALL + (doubled,))
    assert reparam.count_ops(folded) == {"conv": 1}
    assert "doubled" in folded.reparam_report.regions[0].rules
    assert_equivalent(model, folded, x)


def test_a_subclass_that_inherits_forward_matches_one_that_overrides_it_does_not():
    class Tripler(Doubler):  # inherits forward: computes x * 2, matches
        pass

    class Other(Doubler):
        def forward(self, x):
            return x * 3.0

    recognizer = Recognizer(reparam.rules.ALL + (doubled,))
    assert recognizer.is_leaf(Tripler()) and not recognizer.is_leaf(Other())


def test_a_parametrized_conv_is_still_a_conv_and_becomes_a_plain_one():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    nn.utils.parametrizations.weight_norm(conv)
    model = randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, x)
    assert n_ops(folded, "batch_norm") == 0
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in folded.modules())
    assert_equivalent(model, folded, x)


def test_a_user_function_pattern_with_a_signature():
    FLIP = Function(torch.flip, "input, dims", kind="flip", effect=Effect.LAYOUT)
    assert FLIP.signature.bind((1, [1]), {}) == {"input": 1, "dims": [1]}
    assert FLIP.signature.bind((1,), {}) is None  # a required argument is missing


def test_each_node_is_read_once(monkeypatch):
    reads: Counter = Counter()
    real = Recognizer.matches

    def counting(self, node, modules):
        reads[node] += 1
        return real(self, node, modules)

    monkeypatch.setattr(Recognizer, "matches", counting)
    from reparam.models import RepVGGBlock

    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 4)))
    reparam.fold(model, torch.randn(1, 4, 6, 6), verify=False)
    assert reads and max(reads.values()) == 1, reads.most_common(3)


# --- sharing, dead code, completeness ------------------------------------------------------


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y * 2) + torch.sigmoid(y + 1)


def test_a_value_read_by_two_non_linear_consumers_is_a_frontier():
    model = randomize_bn(Shared())
    x = torch.randn(2, 3, 8, 8)
    folded = reparam.fold(model, x)
    assert n_ops(folded, "batch_norm") == 0 and n_ops(folded, "conv") == 1
    assert folded.reparam_report.regions[0].replaced == ("conv", "bn")
    assert not any("read by ," in x.reason for x in folded.reparam_report.leftovers)
    assert_equivalent(model, folded, x)


class DeadParts(nn.Module):
    """An auxiliary head computed but not returned, a learned scale folded away, and a conv whose
    weight is computed from two parameters in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
        self.gamma = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.mask = nn.Parameter(torch.rand(4, 4, 3, 3), requires_grad=False)

    def forward(self, x):
        y = self.bn(self.conv(x)) * self.gamma
        self.aux(y)  # computed, never returned
        return F.conv2d(torch.relu(y), self.w * self.mask, padding=1)


def test_dead_outputs_and_folded_away_parameters_leave_the_model():
    model = randomize_bn(DeadParts())
    x = torch.randn(2, 3, 8, 8)
    folded = reparam.fold(model, x)
    names = {n for n, _ in folded.named_parameters()}
    assert not any(n.startswith(("aux", "gamma", "w", "mask")) for n in names), names
    report = folded.reparam_report
    assert report.params_after == sum(p.numel() for p in folded.parameters())
    assert report.params_after == (4 * 3 * 9 + 4) + 4 * 4 * 9  # two plain convs
    assert_equivalent(model, folded, x)


def test_a_lone_conv_with_a_computed_weight_becomes_a_plain_conv():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.register_buffer("mask", torch.rand(4, 3, 3, 3))

        def forward(self, x):
            return torch.relu(F.conv2d(x, self.w * self.mask, padding=1))

    model = Masked().eval()
    x = torch.randn(2, 3, 6, 6)
    folded = reparam.fold(model, x)
    assert [type(m) for m in folded.modules()][1:] == [nn.Conv2d]
    assert_equivalent(model, folded, x)


def test_resnet18_folds_completely():
    from reparam.models import resnet18

    model = randomize_bn(resnet18(num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    folded = reparam.fold(model, x)
    report = folded.reparam_report
    assert report.complete, str(report)
    assert len(report.joins) == 8 and not report.leftovers  # one residual add per block
    assert n_ops(folded, "batch_norm") == 0
    assert_equivalent(model, folded, x)


def test_a_lone_bn_between_nonlinearities_is_still_a_leftover():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4),
                                       nn.Sigmoid()))
    report = reparam.fold(model, torch.randn(2, 3, 8, 8)).reparam_report
    assert not report.complete and [x.op for x in report.leftovers] == ["batch_norm"]


class ConvThenTokens(nn.Module):
    """A conv, then a linear layer on its channels-last tokens (``movedim`` or ``permute``), and
    back: one conv in effect, which no rule folds across the permute."""

    def __init__(self, groups: int, out: int, permute: bool) -> None:
        super().__init__()
        self.conv, self.lin = nn.Conv2d(4, 4, 3, padding=1, groups=groups), nn.Linear(4, out)
        self.permute = permute

    def forward(self, x):
        y = self.conv(x)
        t = y.permute(0, 2, 3, 1) if self.permute else y.movedim(1, -1)
        return self.lin(t).movedim(-1, 1)


@pytest.mark.parametrize("permute", [False, True], ids=["movedim", "permute"])
def test_a_linear_layer_on_a_convs_permuted_output_is_a_leftover(permute):
    """The two would merge into one conv (no dearer): the report says so, not ``complete``."""
    model = ConvThenTokens(1, 4, permute).eval()
    report = reparam.fold(model, torch.randn(2, 4, 5, 6)).reparam_report
    assert not report.complete and [x.op for x in report.leftovers] == ["linear"], str(report)
    assert "across a permute" in report.leftovers[0].reason


def test_a_depthwise_conv_before_a_wider_linear_layer_is_not_a_leftover():
    """Merged, a depthwise 3x3 and a 4 -> 16 linear layer would be a dense 3x3 conv, dearer than
    the two: nothing that should merge is left."""
    model = ConvThenTokens(4, 16, False).eval()
    report = reparam.fold(model, torch.randn(2, 4, 5, 6)).reparam_report
    assert report.complete, str(report)


class BranchesOnData(nn.Module):
    """A root torch.fx cannot trace (it branches on the data), folded part by part: a conv+BN
    part, and a BN the root calls on its own after a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 1
        return self.bn(torch.relu(y))


def test_a_lone_bn_part_is_a_leftover_not_an_untraced_module():
    """Before, the lone BN was listed as a module that "does not trace" (its forward tests
    ``input.dim()``, which torch.fx cannot trace as a root), with the root's reason."""
    model = randomize_bn(BranchesOnData())
    x = torch.randn(2, 3, 8, 8)
    folded = reparam.fold(model, x)
    report = folded.reparam_report
    assert [(x.node, x.op) for x in report.leftovers] == [("bn", "batch_norm")], str(report)
    assert [path for path, _ in report.untraced] == [""] and len(report.regions) == 1
    assert_equivalent(model, folded, x)


@pytest.mark.parametrize("op", ["cat", "add"])
def test_joins_of_two_blocks_are_not_leftovers(op):
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

        def forward(self, x):  # two tensors of two non-linear ops: nothing could merge them
            y = self.a(x)
            z = torch.relu(self.b(y))
            return torch.cat([y, z], 1) if op == "cat" else y + z

    report = reparam.fold(randomize_bn(Two()), torch.randn(2, 3, 6, 6)).reparam_report
    assert report.complete and [x.op for x in report.joins] == [op], str(report)


def test_op_a_pattern_reads_keeps_its_arguments():
    op = Op("flip", ("x",), {"dims": [1]}, effect=Effect.LAYOUT)
    assert op["dims"] == [1] and op.effect is Effect.LAYOUT
