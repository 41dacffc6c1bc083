"""The documentation: it builds with ``mkdocs build --strict``, its examples run, the rules page
is generated from the rules as they are now, and the API page names every public name."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import reparam

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUNNABLE = ("quickstart.md", "custom_rule.md", "new_block.md")


def python_blocks(page: str) -> list[str]:
    """The fenced ```python blocks of a page, in order."""
    text = (DOCS / page).read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", RUNNABLE)
def test_examples_run(page, tmp_path, monkeypatch):
    """Every Python block of the page, in order, in one namespace (as a reader would paste them)."""
    blocks = python_blocks(page)
    assert blocks, f"no python examples in docs/{page}"
    monkeypatch.chdir(tmp_path)  # examples may write files
    namespace = {"__name__": f"docs_{Path(page).stem}"}
    for i, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/{page}, example {i}", "exec"), namespace)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_rules_doc", ROOT / "scripts" /
                                                  "gen_rules_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rules_page_is_up_to_date():
    current = (DOCS / "rules.md").read_text(encoding="utf-8")
    assert current == _generator().render(), (
        "docs/rules.md is out of date: run python scripts/gen_rules_doc.py")


def test_rules_page_names_every_rule():
    text = (DOCS / "rules.md").read_text(encoding="utf-8")
    for r in reparam.rules.ALL:
        assert f"### {r.name}\n" in text
        assert r.doc, f"rule {r.name} has no docstring"


def test_custom_rule_page_lists_every_op_kind():
    """The table of op kinds a rule can name covers every kind the built-in rules fold."""
    text = (DOCS / "custom_rule.md").read_text(encoding="utf-8")
    kinds = {k for r in reparam.rules.ALL for k in r.kinds}
    missing = sorted(k for k in kinds if not re.search(rf"^\|[^|]*`{k}`", text, re.MULTILINE))
    assert not missing, f"docs/custom_rule.md's table of op kinds lacks {missing}"


def test_api_page_names_every_public_name():
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [name for name in reparam.__all__
               if not re.search(rf"`(reparam\.)?{name}[`(]", text)]
    assert not missing, f"docs/api.md does not describe {missing}"
    for cls in (reparam.Report, reparam.Region, reparam.Leftover):
        fields = [f.name for f in dataclasses.fields(cls)]
        absent = [f for f in fields if f"`{f}`" not in text]
        assert not absent, f"docs/api.md does not describe {cls.__name__}.{absent}"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for page in ("index.html", "rules/index.html", "algebra/index.html", "api/index.html"):
        assert (site / page).is_file(), page
