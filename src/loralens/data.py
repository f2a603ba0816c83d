"""Data: splits, GLUE TSV reading, matched tokenization, collation, length-grouped batches.

Rows come from a task's source (:mod:`loralens.task_sources`): the canonical GLUE
directory layout (``<glue_dir>/<TASK>/{train,dev}.tsv``, read here), local tables, or,
when no directory is given, the Hugging Face hub (``nyu-mll/glue`` for the GLUE tasks,
with identical label ids). Every malformed row is an error naming the file and line:
nothing is skipped silently.

Tokenization follows the study: a pair is ``sentence1 <eos> sentence2``, the sequence
is truncated at ``max_length`` tokens, and batches are right-padded with the EOS
token (pad == EOS == separator for Llama-family tokenizers). Because pad, EOS and the
separator share one id, nothing downstream may locate tokens by id: the attention
mask is the only source of truth for which positions are real.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .tasks import TaskSpec

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
        return Split(self.task, self.name, rows, self.source, _count(rows))

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
        return (Split(self.task, "selection", held_rows, self.source, _count(held_rows)),
                Split(self.task, self.name, rest_rows, self.source, _count(rest_rows)))


def _count(rows: Sequence[Example]) -> dict[int, int]:
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
    return Split(spec.name, split, rows, str(path), _count(rows))


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


def load_split(spec: TaskSpec, split: str, glue_dir: str | os.PathLike | None = None) -> Split:
    """Load ``split`` ("train" or "validation") of a task from its source (GLUE files, local
    tables or the hub; :func:`loralens.task_sources.load_split`)."""
    from .task_sources import load_split as _load

    return _load(spec, split, glue_dir)


# --------------------------------------------------------------------------- tokenization

@dataclass
class Encoded:
    """A tokenized split: token ids per example, labels and ids, in split order."""

    input_ids: list[list[int]]
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[int]:
    """Token ids of one example: ``s1`` or ``s1 <eos> s2``, truncated to max_length.

    The first segment gets the tokenizer's own special tokens (e.g. a BOS), the
    second none; the separator is the EOS token, as in the study. An encoder's tokenizer
    (marked by :func:`model_families.prepare_tokenizer`) uses its own pair template
    instead (``[CLS] s1 [SEP] s2 [SEP]``).
    """
    from .model_families import PAIRS_ATTR, encode_native

    if getattr(tokenizer, PAIRS_ATTR, None) == "native":
        return encode_native(tokenizer, texts, max_length)
    ids = list(tokenizer(texts[0], add_special_tokens=True)["input_ids"])
    for extra in texts[1:]:
        ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(extra, add_special_tokens=False)["input_ids"])
    return ids[:max_length]


def encode_split(tokenizer, split: Split, max_length: int) -> Encoded:
    return Encoded(
        input_ids=[encode_texts(tokenizer, e.texts, max_length) for e in split.examples],
        labels=split.labels,
        ids=np.array([e.id for e in split.examples], dtype=np.int64),
    )


def collate(input_ids: Sequence[Sequence[int]], pad_id: int, pad_to: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest member (or to ``pad_to``): (input_ids, attention_mask)."""
    width = max(len(x) for x in input_ids) if pad_to is None else pad_to
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, x in enumerate(input_ids):
        if len(x) > width:
            raise ValueError(f"example of {len(x)} tokens does not fit pad_to={width}")
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


@dataclass
class Batch:
    input_ids: torch.Tensor       # [batch, width] long
    attention_mask: torch.Tensor  # [batch, width] long, 1 = real token
    labels: torch.Tensor          # [batch] long
    index: np.ndarray             # positions of the rows in the Encoded split

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def train_batches(lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool = True,
                  mega_factor: int = 50) -> list[np.ndarray]:
    """One epoch's batches of row positions, shuffled with ``seed``.

    With ``group_by_length`` the shuffled rows are cut into mega-batches of
    ``batch_size * mega_factor`` rows, each sorted by length, so a batch holds rows
    of similar length (little padding) while the epoch stays random (the scheme of
    transformers' LengthGroupedSampler). Batch order is shuffled again.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    if group_by_length:
        mega = batch_size * mega_factor
        chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def eval_batches(lengths: np.ndarray, batch_size: int, group_by_length: bool = True
                 ) -> list[np.ndarray]:
    """Deterministic evaluation batches (sorted by length when grouping)."""
    order = np.argsort(lengths, kind="stable") if group_by_length else np.arange(len(lengths))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def iter_batches(enc: Encoded, batches: Sequence[np.ndarray], pad_id: int,
                 pad_to: int | None = None) -> Iterator[Batch]:
    for idx in batches:
        ids, mask = collate([enc.input_ids[i] for i in idx], pad_id, pad_to)
        yield Batch(ids, mask, torch.as_tensor(enc.labels[idx]), np.asarray(idx))
