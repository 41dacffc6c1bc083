"""The documentation: it builds with ``mkdocs build --strict`` into a site that loads nothing from
the network, its examples run and every output it shows is what the code prints now, the rules
page is generated from the rules as they are now, and the API page documents every public name."""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import reparam

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return sys.modules[name]


outputs = _script("docs_outputs")
RUNNABLE = outputs.pages()


def test_the_pages_with_examples():
    for page in ("quickstart.md", "custom_rule.md", "new_block.md", "index.md", "research.md"):
        assert page in RUNNABLE, page


@pytest.mark.parametrize("page", RUNNABLE)
def test_examples_run_and_print_what_the_page_shows(page):
    """Every Python block of the page, in order, in one namespace (as a reader would paste them),
    and each console command; every output the page shows is what they print now."""
    text = (DOCS / page).read_text(encoding="utf-8")
    assert any(b.lang == "python" for b in outputs.blocks(text)) or "$ reparam" in text
    problems = outputs.stale(text, page)
    assert not problems, "\n".join(problems) + "\n(run python scripts/docs_outputs.py)"


PAGE = """Some prose.

```python
print("reparam: 2 regions")
print("  time      fold 0.57 s")
print(f"max error {2.1e-7:.1e}")
```

<!-- output -->
```text
{shown}
```
"""


def test_a_stale_output_is_caught():
    fresh = "reparam: 2 regions\n  time      fold 3.14 s\nmax error 9.9e-08"  # times, e-floats
    assert outputs.stale(PAGE.replace("{shown}", fresh), "x.md") == []
    stale = outputs.stale(PAGE.replace("{shown}", fresh.replace("2 regions", "3 regions")),
                          "x.md")
    assert stale == ["docs/x.md, line 11: shows 'reparam: 3 regions', the code prints "
                     "'reparam: 2 regions'"]
    assert outputs.stale(PAGE.replace("{shown}", "reparam: 2 regions"), "x.md")  # a line less
    rewritten = outputs.render(PAGE.replace("{shown}", "old"), "x.md")
    assert "```text\nreparam: 2 regions\n  time      fold 0.57 s\nmax error 2.1e-07\n```" in (
        rewritten)


def test_nested_lists_are_indented_for_python_markdown():
    """Python-Markdown reads a list nested in a list item, or a table or code block inside one,
    only when indented by 4 spaces; with 2 it shows the asterisks as text."""
    bad = []
    for page in sorted(DOCS.glob("*.md")):
        fenced = False
        for n, line in enumerate(page.read_text(encoding="utf-8").split("\n"), 1):
            if re.match(r"^ *```", line):
                fenced = not fenced
                if re.match(r"^ {1,3}```", line):
                    bad.append(f"{page.name}:{n}")
                continue
            if not fenced and re.match(r"^ {1,3}([*+-] |\d+\. |\|)", line):
                bad.append(f"{page.name}:{n}")
    assert not bad, f"indent these by 4 spaces: {bad}"


def test_rules_page_is_up_to_date():
    current = (DOCS / "rules.md").read_text(encoding="utf-8")
    assert current == _script("gen_rules_doc").render(), (
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


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once with ``mkdocs build --strict``."""
    pytest.importorskip("mkdocs")
    site = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return site


def test_mkdocs_build_strict(site):
    for page in ("index.html", "rules/index.html", "algebra/index.html", "api/index.html"):
        assert (site / page).is_file(), page
    research = (site / "research" / "index.html").read_text(encoding="utf-8")
    assert "<li><strong>plain</strong>" in research  # a nested list, not literal asterisks
    literal = [f"{p.relative_to(site)}: {m.group(1)[:60]}" for p in site.rglob("*.html")
               for m in re.finditer(r"<p>(?:(?!</p>).)*?\n\s*([*+-] (?:(?!</p>).)*)",
                                    p.read_text(encoding="utf-8"), re.DOTALL)]
    assert not literal, f"list items shown as text (indent or separate them): {literal}"


EXTERNAL = re.compile(
    r"""<(?:link|script|img|iframe|source)\b[^>]*\b(?:href|src)=["']?(?:https?:)?//"""
    r"""|@import\s+(?:url\()?["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//""", re.I)


def test_the_site_loads_nothing_from_the_network(site):
    """No font, style, script or image from elsewhere: the pages read the same offline. (The
    theme's script can fetch a polyfill for browsers without ResizeObserver and mermaid for
    diagrams; no page has a diagram.)"""
    found = []
    for path in site.rglob("*"):
        if path.suffix in (".html", ".css", ".js") and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            if path.suffix == ".js":  # a script's own strings: only style sheets it injects
                text = "\n".join(re.findall(r"@import[^;]*|url\([^)]*\)", text))
            found += [f"{path.relative_to(site)}: {m.group(0)}" for m in EXTERNAL.finditer(text)]
    assert not found, found
    assert not any('class="mermaid"' in p.read_text(encoding="utf-8")
                   for p in site.rglob("*.html"))


def _documented(page: str, path: str) -> bool:
    """Whether the page has the heading mkdocstrings writes for ``path`` and, before the next
    heading of an object, a paragraph of its docstring."""
    match = re.search(rf'<h\d id="{re.escape(path)}" class="doc doc-heading">', page)
    if not match:
        return False
    rest = page[match.end():]
    nxt = re.search(r'class="doc doc-heading"', rest)
    body = rest[:nxt.start()] if nxt else rest
    contents = body.split('class="doc doc-contents', 1)
    if len(contents) != 2:
        return False
    own = re.split(r"</div>|doc doc-children|doc doc-object", contents[1].split(">", 1)[1])[0]
    return re.search(r"<p>\s*\S", own) is not None  # the docstring's first paragraph


def _public(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
    return list(names)


def test_api_page_documents_every_public_name(site):
    """Every public name of reparam, reparam.rules (rules, laws, rule sets), reparam.kernel and
    reparam.models has its entry, with its docstring, on the built API page; so does every field
    of Report, Region and Leftover (in the table of its section)."""
    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [f"reparam.{n}" for n in reparam.__all__ if not _documented(page, f"reparam.{n}")]
    for module in (reparam.rules, reparam.kernel, reparam.models):
        for name in _public(module):
            path = f"{module.__name__}.{name}"
            value = getattr(module, name)
            exported = getattr(reparam, name, None) is value and name in reparam.__all__
            if not (_documented(page, path) or exported and _documented(page, f"reparam.{name}")):
                missing.append(path)
    assert not missing, f"docs/api.md does not document {missing}"
    for cls in (reparam.Report, reparam.Region, reparam.Leftover):
        start = page.index(f'id="reparam.{cls.__name__}"')
        end = page.find('class="doc doc-object doc-class"', start + 1)
        section = html.unescape(page[start:end if end > 0 else None])
        absent = [f.name for f in dataclasses.fields(cls)
                  if f"<code>{f.name}</code>" not in section]
        assert not absent, f"docs/api.md does not describe {cls.__name__}.{absent}"
