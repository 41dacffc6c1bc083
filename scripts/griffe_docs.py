"""A griffe extension for the API reference (mkdocs.yml loads it into mkdocstrings).

reparam's docstrings are written for readers of the source; three things make them read well
on the generated page too, without changing the source:

- Sphinx roles (``:class:`~reparam.Report```) become code spans (`` `Report` ``), and outside code
  spans the characters Markdown would read as markup in formulas (``W * g``, ``[A; B](x)``,
  ``<``) are escaped;
- a law made by ``reparam.law(name, doc)`` is a value, not a function, so griffe finds no
  docstring for it: it gets the law's own ``doc``; a rule (a decorated fold function) gets a first
  line naming the op kinds it folds;
- a rule set (a tuple of rules) gets the ``#:`` comment above its assignment, if any, and the list
  of the rules it holds, read from the imported module.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the values are read from this checkout's reparam
    sys.path.insert(0, str(ROOT))

ROLE = re.compile(r":(?:class|func|data|meth|mod|attr|exc|obj):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)


def _escape(text: str) -> str:
    """``*``, ``[``, ``]`` and ``<`` outside code spans as literal characters."""
    out, last = [], 0
    for match in CODE.finditer(text):
        out.append(_escape_prose(text[last:match.start()]))
        out.append(match.group(0))
        last = match.end()
    out.append(_escape_prose(text[last:]))
    return "".join(out)


BULLET = re.compile(r"^(\s*[*-] )(.*)$", re.DOTALL)


def _escape_prose(text: str) -> str:
    """Escape ``*``, ``[``, ``]`` and ``<``, except the marker that starts a list item."""
    lines = []
    for line in text.split("\n"):
        bullet = BULLET.match(line)
        head, rest = (bullet.group(1), bullet.group(2)) if bullet else ("", line)
        lines.append(head + re.sub(r"([*\[\]])", r"\\\1", rest).replace("<", "&lt;"))
    return "\n".join(lines)


def _runtime(obj: griffe.Object):
    try:
        module = importlib.import_module(obj.module.path)
    except ImportError:
        return None
    return getattr(module, obj.name, None)


def _comment_above(obj: griffe.Object) -> str:
    """The ``#:`` comment lines right above the object's first line."""
    lines = obj.module.lines
    found: list[str] = []
    index = (obj.lineno or 1) - 2
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        found.insert(0, lines[index].lstrip()[2:].strip())
        index -= 1
    return " ".join(found)


class ReparamDocs(griffe.Extension):
    """Docstrings for laws and rule sets, and Sphinx roles as code spans."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.is_alias or not obj.path.startswith("reparam"):
            return
        if obj.is_attribute and obj.docstring is None:
            self._describe_value(obj)
        elif obj.is_function and obj.docstring is not None:
            self._describe_rule(obj)
        if obj.docstring is not None:
            obj.docstring.value = _escape(ROLE.sub(_code, obj.docstring.value))

    def _describe_rule(self, obj: griffe.Object) -> None:
        """A fold function decorated with ``@reparam.rule`` is a rule: say which kinds it folds."""
        from reparam.values import Rule

        value = _runtime(obj)
        if isinstance(value, Rule) and value.kinds:
            kinds = ", ".join(f"`{k}`" for k in value.kinds)
            obj.docstring.value = (f"A rule (a `Rule` value, `@rule`-decorated) folding {kinds}."
                                   f"\n\n{obj.docstring.value}")

    def _describe_value(self, obj: griffe.Object) -> None:
        from reparam.values import Rule

        value = _runtime(obj)
        if isinstance(value, Rule) and value.doc:
            kind = "A law (no op kinds of its own: rules take it)" if not value.kinds else (
                "A rule folding " + ", ".join(f"`{k}`" for k in value.kinds))
            text = f"{kind}.\n\n{inspect.cleandoc(value.doc)}"
        elif (isinstance(value, tuple) and value
              and all(isinstance(r, Rule) for r in value)):
            comment = _comment_above(obj)
            names = ", ".join(f"`{r.name}`" for r in value)
            text = (f"{comment}\n\n" if comment else "") + f"A rule set of {len(value)}: {names}."
        else:
            return
        obj.docstring = griffe.Docstring(text, parent=obj)
