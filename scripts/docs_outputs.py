"""Run the examples of the documentation pages and rewrite the outputs they show.

    python scripts/docs_outputs.py                  # rewrite the shown outputs of every page
    python scripts/docs_outputs.py quickstart.md    # of some pages
    python scripts/docs_outputs.py --check          # exit 1 where a page shows a stale output

A page's ```python blocks run in order in one namespace, as a reader would paste them (torch
seeded with 0, in a fresh temporary folder). Two kinds of block show what the code prints:

- a ```text block right after the line ``<!-- output -->`` is the output of the python block
  before it; ``<!-- output head=N -->`` shows its first N lines and a line ``...``;
- in a ```console block, each ``$ reparam ...`` line is run through ``reparam.cli.main`` and the
  lines after it, up to the next ``$``, are what it printed.

Other blocks are left alone. What legitimately varies between runs and machines is normalized
before comparing: times (``2.17 s``) and numbers in e-notation (``3.4e-07``, rounding noise).
``tests/test_docs.py`` runs the check for every page with examples.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^( *)```(\w*)\s*$")
MARKER = re.compile(r"^ *<!-- output(?: head=(\d+))? -->\s*$")


@dataclass
class Block:
    """A fenced block: its language, its lines (without the fences, dedented), the index of its
    first line in the page, its indentation, and the ``head=`` of an output marker before it
    (``None``: no marker; 0: the whole output)."""

    lang: str
    lines: list[str]
    start: int
    indent: str
    head: int | None


def blocks(text: str) -> list[Block]:
    """The fenced blocks of a page, in order."""
    lines = text.split("\n")
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, lang = match.groups()
        marker = MARKER.match(lines[i - 1]) if i else None
        head = (int(marker.group(1) or 0)) if marker else None
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != f"{indent}```":
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                for line in lines[i + 1:end]]
        found.append(Block(lang, body, i + 1, indent, head))
        i = end + 1
    return found


def normalize(text: str) -> str:
    """The text with what varies between runs replaced: times and e-notation numbers."""
    text = re.sub(r"\b\d+(\.\d+)?e[-+]?\d+\b", "<float>", text)
    text = re.sub(r"\b\d+\.\d+ s\b", "<time> s", text)
    return "\n".join(line.rstrip() for line in text.strip("\n").split("\n"))


def _shown(output: str, head: int) -> list[str]:
    lines = [line.rstrip() for line in output.rstrip("\n").split("\n")]
    if head and len(lines) > head:
        lines = lines[:head] + ["..."]
    return lines


@contextlib.contextmanager
def _sandbox():
    """A fresh working folder, torch seeded, and the process state the CLI changes restored."""
    import torch

    cwd, path, threads = os.getcwd(), list(sys.path), torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        torch.manual_seed(0)
        try:
            yield
        finally:
            os.chdir(cwd)
            sys.path[:] = path
            torch.set_num_threads(threads)


def _run_python(code: str, namespace: dict, where: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, where, "exec"), namespace)
    return out.getvalue()


def _run_console(lines: list[str]) -> list[str]:
    """The console block with each ``$ reparam ...`` command's output put after it."""
    from reparam.cli import main

    new: list[str] = []
    for line in lines:
        if not line.startswith("$ "):
            continue  # an old output line: replaced below
        new.append(line)
        args = shlex.split(line[2:])
        if args[:1] != ["reparam"]:
            raise ValueError(f"console blocks run reparam commands only, not: {line}")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = main(args[1:])
        if status != 0:
            raise RuntimeError(f"'{line[2:]}' exited with {status}: {out.getvalue().strip()}")
        new += _shown(out.getvalue(), 0)
    return new


def has_examples(text: str) -> bool:
    return any(b.lang == "python" or b.lang == "console" and any(
        line.startswith("$ ") for line in b.lines) for b in blocks(text))


def render(text: str, name: str) -> str:
    """The page with every shown output replaced by what the code prints now."""
    lines = text.split("\n")
    namespace = {"__name__": f"docs_{Path(name).stem}"}
    replacements: list[tuple[int, int, list[str], str]] = []
    last_output: str | None = None
    with _sandbox():
        for block in blocks(text):
            if block.lang == "python":
                where = f"docs/{name}, example starting at line {block.start}"
                last_output = _run_python("\n".join(block.lines), namespace, where)
            elif block.lang == "console" and any(s.startswith("$ ") for s in block.lines):
                replacements.append((block.start, len(block.lines),
                                     _run_console(block.lines), block.indent))
            elif block.head is not None:
                if last_output is None:
                    raise ValueError(f"docs/{name}: the output block at line {block.start} "
                                     "follows no python example")
                replacements.append((block.start, len(block.lines),
                                     _shown(last_output, block.head), block.indent))
                last_output = None
    for start, count, new, indent in reversed(replacements):
        lines[start:start + count] = [f"{indent}{line}" if line else "" for line in new]
    return "\n".join(lines)


def stale(text: str, name: str) -> list[str]:
    """Where the page shows an output other than what the code prints now (normalized)."""
    new = render(text, name)
    problems = []
    old_blocks, new_blocks = blocks(text), blocks(new)
    for old, now in zip(old_blocks, new_blocks, strict=True):
        shown, printed = normalize("\n".join(old.lines)), normalize("\n".join(now.lines))
        if shown != printed:
            diff = next((i for i, (a, b) in enumerate(zip(shown.split("\n"), printed.split("\n"),
                                                        strict=False)) if a != b),
                        min(len(shown.split("\n")), len(printed.split("\n"))))
            got = (printed.split("\n") + ["(nothing)"])[diff]
            was = (shown.split("\n") + ["(nothing)"])[diff]
            problems.append(f"docs/{name}, line {old.start + diff + 1}: shows {was!r}, the code "
                            f"prints {got!r}")
    return problems


def pages() -> list[str]:
    """The pages with examples to run."""
    return sorted(p.name for p in DOCS.glob("*.md") if has_examples(p.read_text("utf-8")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="page names in docs/ (default: every page "
                                                  "with examples)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a page shows an output the code no longer prints")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    failed = False
    for name in args.pages or pages():
        path = DOCS / name
        text = path.read_text(encoding="utf-8")
        if args.check:
            for problem in stale(text, name):
                print(problem, file=sys.stderr)
                failed = True
            continue
        new = render(text, name)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote the outputs of docs/{name}")
    if failed:
        print("run python scripts/docs_outputs.py to rewrite them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
