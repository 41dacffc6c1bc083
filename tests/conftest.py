"""Shared test set-up: every call to ``reparam.fold`` checks that the input model is unchanged."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

import reparam
import reparam.api

settings.register_profile(
    "ci", deadline=None, max_examples=40, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", deadline=None, max_examples=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


def snapshot(model: torch.nn.Module) -> dict:
    """Everything about a model that fold must leave as it found it."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "structure": repr(model),
        "dict_keys": [sorted(m.__dict__) for m in model.modules()],
        "hooks": [sum(len(getattr(m, h, ())) for h in _HOOKS) for m in model.modules()],
    }


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["structure"] == before["structure"], "fold changed the model's modules"
    assert after["ids"] == before["ids"], "fold replaced tensors of the model"
    assert after["training"] == before["training"], "fold changed train/eval mode"
    assert after["dict_keys"] == before["dict_keys"], "fold left attributes on the model"
    assert after["hooks"] == before["hooks"], "fold left hooks on the model"
    for k, v in before["tensors"].items():
        if v.is_meta:
            continue
        assert torch.equal(after["tensors"][k], v), f"fold wrote into {k}"


@pytest.fixture(autouse=True)
def fold_leaves_input_unchanged(monkeypatch):
    """Wrap ``reparam.fold`` so that every test that folds also proves the input unchanged."""
    original = reparam.api.fold

    def checked(model, *args, **kwargs):
        before = snapshot(model) if isinstance(model, torch.nn.Module) else None
        try:
            out = original(model, *args, **kwargs)
        finally:
            if before is not None:
                assert_unchanged(model, before)
        if before is not None and isinstance(out, torch.nn.Module):
            theirs = {id(m) for m in model.modules()}
            shared = [type(m).__name__ for m in out.modules() if id(m) in theirs]
            assert not shared, f"the folded model holds the caller's modules: {shared[:5]}"
        return out

    monkeypatch.setattr(reparam.api, "fold", checked)
    monkeypatch.setattr(reparam, "fold", checked)
    yield


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: thread start-up costs more than the work (2-core CI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
