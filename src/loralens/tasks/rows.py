"""Rows of a task's splits: :class:`Example` and :class:`Split`, read from the canonical
GLUE layout (:func:`read_glue_tsv`, ``$LORALENS_GLUE_DIR``) with errors that name the file
and line. Other sources (local tables, the hub) are in :mod:`loralens.tasks.sources`.
"""

from __future__ import annotations
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence
import numpy as np
from loralens.tasks.spec import TaskSpec


GLUE_ENV = "LORALENS_GLUE_DIR"


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


@dataclass
class Example:
    id: int                 # row index within its split (stable, 0-based)
    texts: tuple[str, ...]  # one sentence, or (sentence1, sentence2)
    label: int


@dataclass
class Split:
    task: str
    name: str
    examples: list[Example]
    source: str                           # file path or hub id the rows came from
    label_counts: dict[int, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([e.label for e in self.examples], dtype=np.int64)

    def subset(self, n: int | None, seed: int = 0) -> "Split":
        """A fixed random subset of ``n`` rows (all rows when n is None or >= len).

        The subset is drawn with its own seed so that it is the same for every
        method and training seed; rows keep their original order.
        """
        if n is None or n >= len(self.examples):
            return self
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(self.examples), size=n, replace=False))
        rows = [self.examples[i] for i in keep]
        return Split(self.task, self.name, rows, self.source, count_labels(rows))

    def stats(self) -> dict:
        return {"rows": len(self), "source": self.source,
                "label_counts": {str(k): v for k, v in sorted(self.label_counts.items())}}

    def ids(self) -> list[int]:
        return [e.id for e in self.examples]

    def carve(self, fraction: float, minimum: int, seed: int) -> tuple["Split", "Split"]:
        """(held-out slice, the rest): a fixed, label-stratified slice of the rows.

        The slice has ``round(fraction * rows)`` rows, at least ``minimum`` where the
        split allows, never more than half of it. Each label gets its share of the slice
        (largest remainders, so the counts add up exactly), drawn with its own seed, so the
        slice is the same for every method and seed and never depends on other splits.
        Both parts keep the original row order and ids.
        """
        n_rows = len(self.examples)
        n = min(max(round(fraction * n_rows), minimum), n_rows // 2)
        if n < 1:
            raise DataError(f"{self.source}: {n_rows} row(s) of {self.task}/{self.name} are too "
                            "few to hold a selection slice out of (need at least 2)")
        labels = self.labels
        classes = sorted(self.label_counts)
        exact = {c: n * self.label_counts[c] / n_rows for c in classes}
        take = {c: int(exact[c]) for c in classes}
        by_remainder = sorted(classes, key=lambda c: (-(exact[c] - take[c]), c))
        for c in by_remainder[: n - sum(take.values())]:
            take[c] += 1
        rng = np.random.default_rng(seed)
        held = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(labels == c), size=take[c], replace=False)
            for c in classes]))
        mask = np.zeros(n_rows, dtype=bool)
        mask[held] = True
        held_rows = [e for e, m in zip(self.examples, mask) if m]
        rest_rows = [e for e, m in zip(self.examples, mask) if not m]
        return (Split(self.task, "selection", held_rows, self.source, count_labels(held_rows)),
                Split(self.task, self.name, rest_rows, self.source, count_labels(rest_rows)))


def count_labels(rows: Sequence[Example]) -> dict[int, int]:
    """Rows per label id (``Split.label_counts``), labels in order of first appearance."""
    counts: dict[int, int] = {}
    for r in rows:
        counts[r.label] = counts.get(r.label, 0) + 1
    return counts


def resolve_glue_dir(glue_dir: str | os.PathLike | None) -> Path | None:
    """The GLUE root: the argument, else $LORALENS_GLUE_DIR, else None (use the hub)."""
    value = glue_dir if glue_dir not in (None, "") else os.environ.get(GLUE_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"GLUE directory {path} does not exist (from "
                        f"{'--glue-dir' if glue_dir else '$' + GLUE_ENV})")
    return path


def read_glue_tsv(path: Path, spec: TaskSpec, split: str, header: Sequence[str] | None = None,
                  text_columns: Sequence[str] | None = None, label_column: str | None = None
                  ) -> Split:
    """Read one canonical GLUE TSV file (tab-separated, no quoting, maybe a BOM).

    ``header``: the column names of a file without a header row (CoLA); the columns
    default to the task's.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found (task {spec.name}, split {split})")
    text_columns = tuple(text_columns or spec.text_columns)
    label_column = label_column or spec.label_column
    rows: list[Example] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = _checked_rows(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), path)
        given = header is not None
        try:
            header = list(header) if given else next(reader)
        except StopIteration:
            raise DataError(f"{path}:1: empty file, expected a header row") from None
        needed = (*text_columns, label_column)
        missing = [c for c in needed if c not in header]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {missing}; header has {header}")
        cols = [header.index(c) for c in text_columns]
        lab = header.index(label_column)
        for line_no, fields in enumerate(reader, start=1 if given else 2):
            if not fields:
                raise DataError(f"{path}:{line_no}: empty line")
            if len(fields) != len(header):
                raise DataError(f"{path}:{line_no}: expected {len(header)} tab-separated "
                                f"fields, found {len(fields)}")
            raw = fields[lab].strip()
            if raw not in spec.label_map:
                raise DataError(f"{path}:{line_no}: label {raw!r} is not one of "
                                f"{sorted(spec.label_map)} for task {spec.name}")
            texts = tuple(fields[c].strip() for c in cols)
            if any(t == "" for t in texts):
                raise DataError(f"{path}:{line_no}: empty text in column(s) "
                                f"{[text_columns[i] for i, t in enumerate(texts) if not t]}")
            rows.append(Example(len(rows), texts, spec.label_map[raw]))
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return Split(spec.name, split, rows, str(path), count_labels(rows))


def _checked_rows(reader, path: Path) -> Iterator[list[str]]:
    """The rows of a ``csv.reader``; undecodable bytes and csv's own errors (a field over
    its size limit, ...) become a DataError naming the file and line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{_undecodable_line(path)}: not UTF-8 text ({e.reason}); "
                            "GLUE files are UTF-8") from None
        yield row


def _undecodable_line(path: Path) -> int:
    """The first line of ``path`` that is not UTF-8 (the decoder reads ahead in chunks,
    so its error does not say)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line_no
    return 1
