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

    @property
    def complete(self) -> bool:
        """Every linear op that could meet another was merged, and everything was traced."""
        return not self.leftovers and not self.untraced

    def merge(self, other: Report, prefix: str) -> None:
        """Fold a sub-module's report into this one, its names under ``prefix``."""
        dot = f"{prefix}." if prefix else ""
        for r in other.regions:
            self.regions.append(replace(r, name=dot + r.name,
                                        replaced=tuple(dot + n for n in r.replaced)))
        self.leftovers += [Leftover(dot + x.node, x.op, x.reason) for x in other.leftovers]
        self.untraced += [(dot + p, why) for p, why in other.untraced]
        self.notes += [f"{prefix}: {n}" if prefix else n for n in other.notes]

    def __str__(self) -> str:
        lines = [f"reparam: {len(self.regions)} regions folded, "
                 f"{len(self.leftovers)} linear ops left, "
                 f"params {self.params_before:,} -> {self.params_after:,}"]
        if self.ops_before:
            keys = sorted(set(self.ops_before) | set(self.ops_after))
            lines.append("ops: " + ", ".join(
                f"{k} {self.ops_before.get(k, 0)} -> {self.ops_after.get(k, 0)}" for k in keys))
        if self.max_error is not None:
            lines.append(f"max error |folded - original| / max|original|: {self.max_error:.2e}")
        if self.verified_error is not None:
            lines.append(f"verified: the folded model matches the original on the example "
                         f"inputs (relative error {self.verified_error:.1e})")
        if self.regions:
            lines.append("")
            lines.append(f"{'module':<40} {'folded':<28} {'nodes':>5} {'params':>19} "
                         f"{'MACs':>23}  rules")
            for r in self.regions:
                lines.append(
                    f"{r.name:<40} {r.geometry:<28} {len(r.replaced):>5} "
                    f"{r.params_before:>9,}->{r.params_after:<9,} "
                    f"{r.macs_before:>11,}->{r.macs_after:<11,} {', '.join(r.rules)}")
        if self.leftovers:
            lines.append("")
            lines.append("left unfolded:")
            lines += [f"  {x.node} ({x.op}): {x.reason}" for x in self.leftovers]
        if self.untraced:
            lines.append("")
            lines.append("not traced (folded inside where possible):")
            lines += [f"  {path or '(the model)'}: {why}" for path, why in self.untraced]
        if self.notes:
            lines.append("")
            lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
