"""What happened to the rows: counted skips and counted changes, plus the error for unusable input.

Contract: every row that does not reach training is counted here under a short, stable reason key (``skip``), and
every row that reaches training in an altered form (truncated, trailing turns dropped) is counted under a change key
(``change``). For each key the first few ``(row index, detail)`` pairs are kept so a user can open the file and look.
Nothing is dropped without passing through ``skip``. ``DataReport.summary()`` is the text the run summary prints.

``DataError`` is the one exception type for input that cannot be used at all (unknown columns, missing file,
nonexistent split, tokenizer without a chat template): its message is one paragraph meant for the user.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

# Enough examples to find the rows in the file, few enough that a report on a million bad rows stays small.
MAX_EXAMPLES_PER_REASON = 5


class DataError(ValueError):
    """Input that cannot be used at all; the message is one paragraph that names the culprit and the way out."""


@dataclasses.dataclass
class DataReport:
    """Counts of rows read, kept, skipped (by reason) and changed (by kind), with a few examples of each.

    ``rows_read`` counts rows seen by the normaliser; ``kept`` is set by whoever produces the final examples.
    A row may be counted under several change kinds (e.g. prompt and response truncated) but under one skip reason.
    """

    name: str = "data"
    rows_read: int = 0
    kept: int | None = None
    skips: Counter = dataclasses.field(default_factory=Counter)
    changes: Counter = dataclasses.field(default_factory=Counter)
    examples: dict = dataclasses.field(default_factory=dict)

    def skip(self, row: int, reason: str, detail: str = "") -> None:
        """Count one dropped row under ``reason`` (a short key such as ``"bad_role"``)."""
        self.skips[reason] += 1
        self._example(f"skip:{reason}", row, detail)

    def change(self, row: int, kind: str, detail: str = "") -> None:
        """Count one kept-but-altered row under ``kind`` (e.g. ``"response_truncated"``)."""
        self.changes[kind] += 1
        self._example(f"change:{kind}", row, detail)

    def _example(self, key: str, row: int, detail: str) -> None:
        kept = self.examples.setdefault(key, [])
        if len(kept) < MAX_EXAMPLES_PER_REASON:
            # Details can quote hostile content: cap them so a 1 MB turn cannot flood the report.
            kept.append((int(row), detail if len(detail) <= 200 else detail[:197] + "..."))

    @property
    def skipped(self) -> int:
        return sum(self.skips.values())

    def merge(self, other: DataReport) -> DataReport:
        """Add ``other``'s counts into this report (for several files or splits feeding one run); returns self."""
        self.rows_read += other.rows_read
        if other.kept is not None:
            self.kept = (self.kept or 0) + other.kept
        self.skips.update(other.skips)
        self.changes.update(other.changes)
        for key, rows in other.examples.items():
            mine = self.examples.setdefault(key, [])
            mine.extend(rows[: max(0, MAX_EXAMPLES_PER_REASON - len(mine))])
        return self

    def to_dict(self) -> dict:
        """Plain-JSON form for metrics files and the run report."""
        return {
            "name": self.name,
            "rows_read": self.rows_read,
            "kept": self.kept,
            "skipped": dict(self.skips),
            "changed": dict(self.changes),
            "examples": {k: [list(e) for e in v] for k, v in self.examples.items()},
        }

    def summary(self) -> str:
        """Human-readable lines: totals, then one line per skip reason and change kind with example rows."""
        kept = "?" if self.kept is None else str(self.kept)
        lines = [f"{self.name}: read {self.rows_read} rows, kept {kept}, skipped {self.skipped}"]
        for title, counter, prefix in (("skipped", self.skips, "skip"), ("changed", self.changes, "change")):
            for key, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
                shown = "; ".join(
                    f"row {row}" + (f": {detail}" if detail else "")
                    for row, detail in self.examples.get(f"{prefix}:{key}", [])[:2]
                )
                lines.append(f"  {title} {count:>6} {key}" + (f"  (e.g. {shown})" if shown else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
