"""What a fold did: the regions it merged, the linear ops it left alone and why."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Region:
    """One merged region: ``replaced`` node names became the module ``name``."""

    name: str
    replaced: tuple[str, ...]
    rules: tuple[str, ...]
    geometry: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    output: str = ""  # the original node this region's value replaces
    node: str = ""  # the new node in the folded graph
    source: str = ""  # the original node the region reads


@dataclass(frozen=True)
class Leftover:
    """A linear op (or a merge of linear ops) left unfolded, with the reason in words."""

    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class Table:
    """A titled table of text cells; ``right`` holds the indices of right-aligned columns."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    right: frozenset[int] = frozenset()

    def lines(self) -> list[str]:
        """The table as plain text: each column as wide as its widest cell, two spaces apart."""
        widths = [max([len(c)] + [len(row[i]) for row in self.rows])
                  for i, c in enumerate(self.columns)]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(c.rjust(w) if i in self.right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

        return ([self.title] if self.title else []) + [line(self.columns)] + [
            line(row) for row in self.rows]


def _arrows(pairs: list[tuple[int, int]]) -> list[str]:
    """``before -> after`` cells with the arrows of a column aligned."""
    texts = [(f"{a:,}", f"{b:,}") for a, b in pairs]
    width = max((len(a) for a, _ in texts), default=0)
    return [f"{a:>{width}} -> {b}" for a, b in texts]


def shape_text(shape: tuple[int, ...]) -> str:
    """``1x3x224x224``."""
    return "x".join(map(str, shape))


@dataclass
class Report:
    """The report of one fold. ``str(report)`` is a table."""

    regions: list[Region] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    max_error: float | None = None
    fold_seconds: float = 0.0
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)  # what fold ran on
    verified_error: float | None = None  # folded vs original on the example inputs (verify)
    notes: list[str] = field(default_factory=list)  # what else a user should know
    # sums and concats of tensors that are not one linear map of one input (a ResNet's
    # residuals), products of two computed tensors (SE gates): joins of the network, not leftovers
    joins: list[Leftover] = field(default_factory=list)
    # (path, how) of each part torch.fx could not trace that was captured with torch.export
    captured: list[tuple[str, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """No linear op that could merge with another is left, and everything was traced (joins
        of different tensors, a ResNet's residual adds, do not count: nothing could merge them).
        """
        return not self.leftovers and not self.untraced

    def merge(self, other: Report, prefix: str) -> None:
        """Fold a sub-module's report into this one, its names under ``prefix``."""
        dot = f"{prefix}." if prefix else ""

        def under(path: str) -> str:
            return f"{dot}{path}" if path else prefix

        for r in other.regions:
            self.regions.append(replace(r, name=dot + r.name,
                                        replaced=tuple(dot + n for n in r.replaced)))
        self.leftovers += [Leftover(dot + x.node, x.op, x.reason) for x in other.leftovers]
        self.joins += [Leftover(dot + x.node, x.op, x.reason) for x in other.joins]
        self.untraced += [(under(p), why) for p, why in other.untraced]
        self.captured += [(under(p), how) for p, how in other.captured]
        self.notes += [f"{prefix}: {n}" if prefix else n for n in other.notes]

    def summary(self) -> list[str]:
        """The lines above the tables: counts, the input the MACs were measured at, the error."""
        joins = f", {len(self.joins)} joins" if self.joins else ""
        lines = [f"reparam: {len(self.regions)} regions folded, "
                 f"{len(self.leftovers)} linear ops left{joins}, "
                 f"params {self.params_before:,} -> {self.params_after:,}"]
        if self.input_shapes:
            lines.append("input: " + ", ".join(shape_text(s) for s in self.input_shapes)
                         + " (MACs are per sample at this size)")
        if self.ops_before:
            keys = sorted(set(self.ops_before) | set(self.ops_after))
            lines.append("ops: " + ", ".join(
                f"{k} {self.ops_before.get(k, 0)} -> {self.ops_after.get(k, 0)}" for k in keys))
        if self.max_error is not None:
            lines.append(f"max error |folded - original| / max|original|: {self.max_error:.1e}")
        if self.verified_error is not None:
            lines.append(f"verified: the folded model matches the original on the example "
                         f"inputs (relative error {self.verified_error:.1e})")
        return lines

    def tables(self) -> list[Table]:
        """The folded regions, the linear ops left unfolded, the parts not traced, the notes."""
        tables = []
        if self.regions:
            params = _arrows([(r.params_before, r.params_after) for r in self.regions])
            macs = _arrows([(r.macs_before, r.macs_after) for r in self.regions])
            rows = tuple((r.name, r.geometry, str(len(r.replaced)), p, m, ", ".join(r.rules))
                         for r, p, m in zip(self.regions, params, macs, strict=True))
            tables.append(Table("", ("module", "folded", "nodes", "params", "MACs", "rules"),
                                rows, frozenset({2})))
        if self.leftovers:
            rows = tuple((x.node, x.op, x.reason) for x in self.leftovers)
            tables.append(Table("left unfolded:", ("node", "op", "reason"), rows))
        if self.joins:
            rows = tuple((x.node, x.op, x.reason) for x in self.joins)
            tables.append(Table("joins (of tensors that are not one linear map of one input):",
                                ("node", "op", "reason"), rows))
        if self.untraced:
            rows = tuple((path or "(the model)", why) for path, why in self.untraced)
            tables.append(Table("not traced (folded inside where possible):",
                                ("module", "reason"), rows))
        if self.captured:
            rows = tuple((path or "(the model)", how) for path, how in self.captured)
            tables.append(Table("captured with torch.export (torch.fx could not trace them):",
                                ("module", "how"), rows))
        if self.notes:
            tables.append(Table("notes:", ("note",), tuple((n,) for n in self.notes)))
        return tables

    def __str__(self) -> str:
        lines = self.summary()
        for table in self.tables():
            lines += ["", *table.lines()]
        return "\n".join(lines)
