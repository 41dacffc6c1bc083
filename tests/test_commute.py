"""A BN moved through the ops it commutes with (layout changes, averages) to the linear layer it
folds into: FastViT's attention norm, NextViT's token norm after its pool, norm -> pool -> head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import BN, assert_equivalent, assert_exact64, n_ops, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam.rules import ALL, REPVGG


class Chain(nn.Module):
    """BN on channels-first input, then ``steps`` (each ``step(y, nd, batch, channels)``), then
    one or two Linear layers on the last axis."""

    def __init__(self, c: int, nd: int, steps, heads: int = 1, out: int = 5) -> None:
        super().__init__()
        self.bn = BN[nd](c)
        self.nd, self.steps = nd, steps
        self.heads = nn.ModuleList(nn.Linear(c, out, bias=i % 2 == 0) for i in range(heads))

    def forward(self, x):
        y = self.bn(x)
        b, c = y.shape[:2]  # shape queries on the BN's output, as FastViT's attention has
        for step in self.steps:
            y = step(y, self.nd, b, c)
        outs = [h(y) for h in self.heads]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


def to_tokens(y, nd, b, c):  # (B, C, *S) -> (B, N, C), NextViT's way
    return y.reshape(b, c, -1).transpose(1, 2)


def to_last(y, nd, b, c):  # channels to the last axis by permute
    return y.permute(0, *range(2, nd + 2), 1)


def global_pool(y, nd, b, c):
    return F.adaptive_avg_pool1d(y.flatten(2), 1).flatten(1)


def spatial_mean(y, nd, b, c):
    return y.mean(dim=tuple(range(2, nd + 2)))


def unpadded_pool(y, nd, b, c):
    return F.avg_pool1d(y.flatten(2), 2).transpose(-1, -2)


STEPS = {"tokens": [to_tokens], "permute": [to_last],
         "movedim": [lambda y, *_: y.movedim(1, -1)],
         "torch.movedim": [lambda y, nd, b, c: torch.movedim(y, (1,), (nd + 1,))],
         "tokens+contiguous": [to_tokens, lambda y, *_: y.contiguous()],
         "global pool": [global_pool], "mean": [spatial_mean], "pool then tokens": [unpadded_pool],
         "flatten.transpose": [lambda y, *_: y.flatten(2).transpose(-2, -1)]}


def moved(folded) -> bool:
    ops = reparam.count_ops(folded)
    return not any(ops.get(k) for k in ("batch_norm", "mul", "add"))


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 6), nd=st.sampled_from([1, 2, 3]), heads=st.integers(1, 2),
       steps=st.sampled_from(sorted(STEPS)), size=st.integers(2, 5))
def test_bn_moves_through_commuting_ops_into_the_linear(c, nd, heads, steps, size):
    model = randomize_bn(Chain(c, nd, STEPS[steps], heads))
    x = torch.randn(2, c, *([size * 2] * nd))
    folded = reparam.fold(model, x)
    assert_equivalent(model, folded, x)
    assert moved(folded), reparam.count_ops(folded)
    assert n_ops(folded, "linear") == 1 and not n_ops(folded, "cat")  # two heads: one Linear
    assert not any("moved" in name for name, _ in folded.named_buffers())  # nothing left over
    assert_exact64(model, x)


@pytest.mark.parametrize("steps, why", [
    ([lambda y, nd, b, c: y.flatten(1).reshape(b, -1, 4)],
     "flattening the channels with positions mixes them"),
    ([lambda y, *_: F.avg_pool1d(y.flatten(2), 3, 1, 1), lambda y, *_: y.transpose(1, 2)],
     "a zero-padded average counts the padding"),
    ([to_tokens, lambda y, *_: torch.relu(y)], "a ReLU before the Linear"),
    ([lambda y, *_: y.transpose(1, 2)], "channels not on the last axis"),
])
def test_bn_stays_where_moving_it_would_not_fold_or_not_be_exact(steps, why):
    model = randomize_bn(Chain(4, 2, steps))
    x = torch.randn(2, 4, 4, 4)
    folded = reparam.fold(model, x)
    assert_equivalent(model, folded, x)
    ops = reparam.count_ops(folded)
    assert ops.get("batch_norm") == 1 and not ops.get("mul"), (why, ops)


def test_bn_read_by_another_op_stays():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(4, 3)

        def forward(self, x):
            y = self.bn(x)
            return self.fc(y.flatten(2).transpose(1, 2)).sum() + y.relu().sum()

    model = randomize_bn(Twice())
    x = torch.randn(2, 4, 5, 5)
    folded = reparam.fold(model, x)
    assert_equivalent(model, folded, x)
    assert n_ops(folded, "batch_norm") == 1


def test_a_rule_set_without_the_scale_rule_leaves_the_bn():
    model = randomize_bn(Chain(4, 2, [to_tokens]))
    x = torch.randn(2, 4, 6, 6)
    folded = reparam.fold(model, x, rules=REPVGG)
    assert_equivalent(model, folded, x)
    assert n_ops(folded, "batch_norm") == 1 and not n_ops(folded, "mul")
    assert moved(reparam.fold(model, x, rules=ALL))


def test_the_caller_model_keeps_its_bn():
    model = randomize_bn(Chain(4, 2, [to_tokens]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reparam.fold(model, torch.randn(2, 4, 6, 6))
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("step", [
    lambda y, nd, b, c: y.reshape(1, c, -1).transpose(1, 2),
    lambda y, nd, b, c: y.flatten(0, 1).reshape(-1, c, y.shape[-1]).transpose(1, 2),
])
def test_a_reshape_that_mixes_the_batch_into_the_channels_keeps_the_bn(step):
    """Shapes are traced on one sample, where ``reshape(1, c, -1)`` of ``(1, c, n)`` keeps the
    channels whole; with three samples it mixes them with the batch. The BN must stay."""
    model = randomize_bn(Chain(4, 1, [step]))
    x = torch.randn(3, 4, 6)
    folded = reparam.fold(model, x)
    assert_equivalent(model, folded, x)
    assert n_ops(folded, "batch_norm") == 1


def test_an_input_written_in_place_after_the_bn_keeps_the_bn():
    """Found by the fuzzer: the BN reads ``t``, then ``t`` is multiplied in place, then the
    BN's output is averaged into a Linear. Moving the BN makes the average read ``t``: after the
    write. The BN must stay."""

    class Written(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x):
            t = self.conv(x)
            y = self.bn(t)
            t.mul_(2.0)
            return self.fc(y.mean(dim=2)) + t.sum()

    model = randomize_bn(Written())
    x = torch.randn(2, 3, 5)
    folded = reparam.fold(model, x)
    assert_equivalent(model, folded, x)
    assert_exact64(model, x)


class NextViTAttention(nn.Module):
    """NextViT's E-MHSA after its ``norm1``: the tokens go to ``q`` and, through an average pool
    and the pool's own ``norm``, to ``k`` and ``v``. Both BNs fold (the first composes with the
    second where its path meets it)."""

    def __init__(self, c: int, nd: int, relu_after_pool: bool = False) -> None:
        super().__init__()
        self.norm1 = BN[nd](c)
        self.q, self.k, self.v = (nn.Linear(c, c) for _ in range(3))
        self.sr, self.norm = nn.AvgPool1d(2, 2), nn.BatchNorm1d(c)
        self.relu_after_pool = relu_after_pool

    def forward(self, x):
        y = self.norm1(x)
        b, c = y.shape[:2]
        t = y.reshape(b, c, -1).transpose(-1, -2)  # (B, N, C)
        q = self.q(t)
        s = self.norm(self.sr(t.transpose(1, 2)))
        if self.relu_after_pool:
            s = torch.relu(s)
        s = s.transpose(1, 2)
        return q.sum(1) + self.k(s).sum(1) * self.v(s).mean(1)


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 6), nd=st.sampled_from([1, 2]), size=st.sampled_from([2, 4]))
def test_branching_paths_and_a_second_bn_on_the_way_fold(c, nd, size):
    model = randomize_bn(NextViTAttention(c, nd))
    x = torch.randn(2, c, *([size] * nd))
    folded = reparam.fold(model, x)
    assert_equivalent(model, folded, x)
    assert_exact64(model, x)
    ops = reparam.count_ops(folded)
    assert not ops.get("batch_norm") and ops.get("avg_pool") == 1, ops
    assert not any("moved" in name for name, _ in folded.named_buffers())


def test_a_path_that_meets_a_bn_that_cannot_move_still_folds_the_first_bn():
    """The pool's ``norm`` is followed by a ReLU, so nothing linear takes it in after the pool;
    it folds into the pool instead (a conv). ``norm1`` is a per-channel map read by both paths:
    it folds into ``q`` on one and, duplicated, into that conv on the other. No BN is left."""
    model = randomize_bn(NextViTAttention(4, 2, relu_after_pool=True))
    x = torch.randn(2, 4, 4, 4)
    folded = reparam.fold(model, x)
    assert_equivalent(model, folded, x)
    assert_exact64(model, x)
    left = [n.target for n in folded.graph.nodes if n.op == "call_module"
            and isinstance(folded.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]
    assert left == [], reparam.count_ops(folded)
    assert not reparam.count_ops(folded).get("batch_norm")
