"""Ultralytics YOLO built from its yaml files (random weights, nothing downloaded): the real
models behind ``tests/test_deployed.py``'s routed and C2f blocks. Skipped without ultralytics.

Measured by ``scripts/ultralytics_all.py`` (its ``measure`` is the one used here): Ultralytics'
own ``fuse()`` is the reference (no BN left, output unchanged); ``reparam.fold`` must do at least
as well and keep the model usable by Ultralytics (same output tree at two input sizes).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "ultralytics_all", ROOT / "scripts" / "ultralytics_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # sets YOLO_OFFLINE and a settings dir under /tmp first
    return module


UA = _load_script()
pytest.importorskip("ultralytics")

TOL = 1e-4
CASES = {"yolov8n": "detect", "yolov8n-cls": "classify"}


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    return {}


def _row(rows: dict, name: str) -> dict:
    if name not in rows:
        rows[name] = UA.measure(name, CASES[name])
    return rows[name]


def test_the_default_list_has_every_family_and_task():
    names = {m["name"]: m["task"] for m in UA.list_models()}
    for family in ("yolov5n", "yolov6n", "yolov8n", "yolo11n", "yolo12n", "yolo26n"):
        assert names.get(family) == "detect", family
    for suffix, task in (("-seg", "segment"), ("-cls", "classify"), ("-pose", "pose"),
                         ("-obb", "obb")):
        assert names.get(f"yolov8n{suffix}") == task
    for name in ("yolov3-tiny", "yolov9t", "yolov10n", "rtdetr-l"):
        assert name in names
    assert set(names.values()) <= set(UA.TASKS)
    assert len(UA.list_models(everything=True)) > len(names)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_ultralytics_fuse_is_the_reference(rows, name):
    row = _row(rows, name)
    assert row["before"]["bn"] > 0
    assert row["fuse"]["bn"] == 0
    assert row["fuse"]["err_a"] < TOL and row["fuse"]["err_b"] < TOL
    assert row["fuse"]["same_structure"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_fold_does_as_well_as_ultralytics_fuse(rows, name):
    row = _row(rows, name)
    assert "fold_error" not in row, row.get("fold_error")
    fold = row["fold"]
    assert fold["bn"] == 0, f"{fold['bn']} BN left"
    assert fold["err_a"] is not None and fold["err_a"] < TOL, fold.get("run_error_a")
    assert fold["err_b"] is not None and fold["err_b"] < TOL, fold.get("run_error_b")
    assert fold["same_structure"]
    assert fold["params"] <= row["fuse"]["params"]


@pytest.mark.slow
def test_an_end_to_end_head_folds_to_fuse_with_outputs():
    """YOLOv10's head returns its one-to-many branch in eval mode, which ``fuse()`` deletes;
    ``outputs=`` selecting what ``fuse()`` returns folds to fuse()'s parameters exactly."""
    import copy

    import torch

    import reparam

    model = UA.build("yolov10n")
    fused_outputs = UA.fuse_outputs(model)  # the predictions and the branch fuse() keeps
    fused = copy.deepcopy(model).fuse(verbose=False)
    x = torch.randn(1, 3, 160, 160)
    folded = reparam.fold(model, x, outputs=fused_outputs)
    assert type(folded) is type(model)
    assert UA.counts(folded) == UA.counts(fused)  # parameters, convs, 0 BN
    model64 = copy.deepcopy(model).double()
    for size in (160, 224):
        xs = torch.randn(1, 3, size, size)
        with torch.no_grad():
            got, want = folded(xs), fused_outputs(model64(xs.double()))
        assert UA.structure(got) == UA.structure(fused(xs))
        for g, w in zip(UA.tensors(got), UA.tensors(want), strict=True):
            assert (g.double() - w).abs().max() <= TOL * w.abs().max()
