"""Reading a task's rows from its source: the canonical GLUE directory, local tables (CSV,
TSV, JSON Lines, Parquet) or a Hugging Face dataset; a validation split carved from train
where the source has none.

Every row is checked: a missing column names the columns that exist, a label outside the
task's declared set names the file and the row, a real-valued label column (regression)
is refused. Nothing is skipped silently. Example ids are row positions within the split
(0-based), as for the GLUE files.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from loralens.tasks.rows import (
    GLUE_ENV, DataError, Example, Split, count_labels, read_glue_tsv, resolve_glue_dir,
)
from loralens.tasks.spec import Source, TaskSpec

SPLITS = ("train", "validation")


def load_split(spec: TaskSpec, split: str, glue_dir=None) -> Split:
    """``split`` ("train" or "validation") of a task from its first usable source.

    The GLUE source is used when a GLUE directory is given (argument or
    ``$LORALENS_GLUE_DIR``), then local files, then the hub. A source without a
    validation split gets one carved from train (``spec.carve_validation``: a fixed,
    label-stratified slice drawn with its own recorded seed, by :meth:`Split.carve`, the
    machinery of the selection slice); train is then the rest.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} of {spec.name}; use one of {list(SPLITS)}")
    src, root = choose_source(spec, glue_dir)
    splits = src.splits or spec.splits
    if "validation" in splits:
        return read_source(spec, src, split, splits[split], root)
    if "train" not in splits:
        raise DataError(f"task {spec.name} ({spec.file}): its {src.kind} source has no "
                        f"train split (splits: {list(splits)})")
    held, rest = carve_validation(spec, read_source(spec, src, "train", splits["train"], root))
    return held if split == "validation" else rest


def carve_validation(spec: TaskSpec, train: Split) -> tuple[Split, Split]:
    """(validation, train rest): the validation rows carved from a training split."""
    c = spec.carve_validation
    if len(train) < 2:
        raise DataError(f"{train.source}: {len(train)} training row(s) of {spec.name} are too "
                        f"few to carve a validation split from (task {spec.file} has none)")
    held, rest = train.carve(c["fraction"], c["minimum"], c["seed"])
    note = f"validation carved from train: fraction {c['fraction']}, seed {c['seed']}"
    return (replace(held, name="validation", source=f"{train.source} ({note})"),
            replace(rest, source=f"{train.source} (without the {note})"))


def choose_source(spec: TaskSpec, glue_dir) -> tuple[Source, Path | None]:
    kinds = {s.kind: s for s in spec.sources}
    if "glue" in kinds:
        root = resolve_glue_dir(glue_dir)
        if root is not None:
            return kinds["glue"], root
    for kind in ("files", "hub"):
        if kind in kinds:
            return kinds[kind], None
    raise DataError(f"task {spec.name}: no GLUE directory given (--glue-dir or ${GLUE_ENV}) "
                    f"and the task ({spec.file}) names no other source")


def read_source(spec: TaskSpec, src: Source, split: str, name: str, root: Path | None
                ) -> Split:
    """One split from one source (``name``: the source's own name of the split)."""
    texts = src.text_columns or spec.text_columns
    label = src.label_column or spec.label_column
    if src.kind == "glue":
        return read_glue_tsv(root / src.location / f"{name}.tsv", spec, split,
                             header=src.header or None, text_columns=texts, label_column=label)
    if src.kind == "hub":
        return read_hub(spec, src, split, name, texts, label)
    path = Path(src.file or name)
    records = read_table(path, src.format or table_format(path), src.header)
    where_ok = str(path)
    if src.file:
        records = _only_split(records, src.split_column, name, path)
        where_ok = f"{path} [{src.split_column} = {name}]"
    return to_split(spec, split, where_ok, records, texts, label)


def table_format(path: Path) -> str:
    from loralens.tasks.task_file import FORMATS

    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the table format from the suffix "
                        f"(csv, tsv, jsonl, parquet)")
    return fmt


# --------------------------------------------------------------------------- local tables

def read_table(path: Path, fmt: str, header: tuple[str, ...] = ()
               ) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    """(column names, iterator of (where, row)) of a CSV, TSV, JSON Lines or Parquet file;
    ``where`` is "file:line" (text formats) or "file row N" (Parquet, 0-based)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # not a Parquet file, truncated, ...
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        rows = table.to_pylist()
        return list(table.column_names), ((f"{path} row {i}", r) for i, r in enumerate(rows))
    if fmt == "jsonl":
        return read_jsonl(path)
    return _read_delimited(path, "," if fmt == "csv" else "\t", header)


def _read_delimited(path: Path, delimiter: str, header: tuple[str, ...]):
    f = open(path, encoding="utf-8-sig", newline="")
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    cols = list(header) if header else next(reader, None)
    if cols is None:
        f.close()
        raise DataError(f"{path}:1: empty file, expected a header row")

    def rows():
        with f:
            for fields in reader:
                line = reader.line_num
                if not fields:
                    continue
                if len(fields) != len(cols):
                    raise DataError(f"{path}:{line}: expected {len(cols)} fields, found "
                                    f"{len(fields)}")
                yield f"{path}:{line}", dict(zip(cols, fields))
    return cols, rows()


def read_jsonl(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    """(the columns, in order of first appearance; ``(where, row)`` per non-empty line, with
    ``where`` = ``path:line``) of a JSON Lines file; a ``DataError`` naming the line for one
    that is not a JSON object."""
    rows, cols = [], {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line")
            cols.update(dict.fromkeys(row))
            rows.append((f"{path}:{line_no}", row))
    return list(cols), iter(rows)


def _only_split(records, column: str, value: str, path: Path):
    cols, rows = records
    if column not in cols:
        raise DataError(f"{path}: no split column {column!r}; the file has columns {cols}")
    return cols, ((w, r) for w, r in rows if str(r.get(column)).strip() == value)


# --------------------------------------------------------------------------- the hub

def read_hub(spec: TaskSpec, src: Source, split: str, name: str, texts, label) -> Split:
    where = f"hf://{src.location}" + (f"/{src.config}" if src.config else "") + f"/{name}" \
        + (f"@{src.revision}" if src.revision else "")
    try:
        import datasets

        ds = datasets.load_dataset(src.location, src.config, split=name, revision=src.revision)
    except Exception as e:  # offline, hub down, unknown id, ...
        glue = " no GLUE directory given (--glue-dir or $%s) and" % GLUE_ENV \
            if spec.source("glue") else ""
        raise DataError(f"task {spec.name}:{glue} {where} could not be loaded from the Hugging "
                        f"Face hub: {type(e).__name__}: {e}") from e
    return dataset_split(spec, split, where, ds, texts, label)


def dataset_split(spec: TaskSpec, split: str, where: str, ds, texts, label) -> Split:
    """A split from a ``datasets.Dataset`` (integer labels of a ``ClassLabel`` column are
    read by their names when they are not declared raw values themselves)."""
    feature = getattr(ds, "features", {}).get(label) if hasattr(ds, "features") else None
    names = getattr(feature, "names", None)
    cols = list(ds.column_names)
    rows = ((f"{where} row {i}", r) for i, r in enumerate(ds))
    return to_split(spec, split, where, (cols, rows), texts, label, class_names=names)


# --------------------------------------------------------------------------- checking rows

def to_split(spec: TaskSpec, split: str, source: str, records, texts: Iterable[str],
             label: str, class_names: list[str] | None = None) -> Split:
    cols, rows = records
    texts = tuple(texts)
    missing = [c for c in (*texts, label) if c not in cols]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing} of task {spec.name} "
                        f"({spec.file}); the columns are {list(cols)}")
    out: list[Example] = []
    for where, row in rows:
        values = tuple(_text(row.get(c)) for c in texts)
        empty = [c for c, v in zip(texts, values) if not v]
        if empty:
            raise DataError(f"{where}: empty text in column(s) {empty}")
        out.append(Example(len(out), values, label_id(spec, row.get(label), where, label,
                                                      class_names)))
    if not out:
        raise DataError(f"{source}: no rows for split {split!r} of task {spec.name}")
    return Split(spec.name, split, out, source, count_labels(out))


def _text(value: Any) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    return str(value).strip()


def label_id(spec: TaskSpec, value: Any, where: str, column: str,
             class_names: list[str] | None = None) -> int:
    """The class id of a raw label (declared raw values; integer-valued numbers match their
    integer; a ClassLabel's integer matches by its name)."""
    raw = _raw_label(value)
    if raw in spec.label_map:
        return spec.label_map[raw]
    if class_names and isinstance(value, int) and 0 <= value < len(class_names):
        name = class_names[value]
        if name in spec.label_map:
            return spec.label_map[name]
        if name in spec.label_names:
            return spec.label_names.index(name)
    try:
        number = float(raw)
    except ValueError:
        number = None
    if isinstance(value, float) or number is not None and math.isfinite(number) \
            and not number.is_integer():  # a real-valued column: a regression target
        raise DataError(f"{where}: label {value!r} in column {column!r} is a real number: "
                        f"regression tasks (such as STS-B) are not supported; task "
                        f"{spec.name} ({spec.file}) declares the labels {list(spec.label_map)}")
    raise DataError(f"{where}: label {raw!r} is not one of {list(spec.label_map)}, the labels "
                    f"task {spec.name} declares ({spec.file})")


def _raw_label(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return _text(value)
