"""Task files: a classification task as a small YAML file (lm-evaluation-harness style).

::

    name: my_reviews                  # how the run directory and the report name the task
    version: "1"                      # optional: bump when the data changes
    description: product reviews      # optional
    text_columns: [title, body]       # one column, or two for a pair (joined "s1 <eos> s2")
    label_column: stars
    labels: [one, two, three, four]   # class names, class id = position; the data holds the
    #                                   names, or give {raw value: name} (e.g. {0: neg, 1: pos})
    splits: {train: train, validation: dev}  # our split -> the source's split (file stem,
    #                                   hub split or value of split_column); no validation:
    #                                   carved from train (validation_carve)
    validation_carve: {fraction: 0.1, minimum: 1, seed: 0}   # optional (these defaults)
    metrics: [f1, accuracy]           # reported: accuracy, f1 (binary for 2 classes, macro
    #                                   for more), mcc (Matthews correlation)
    selection_metric: f1              # selects models (default: the first metric)
    source:                           # one or more of:
      files: {train: train.csv, validation: dev.jsonl}    # csv, tsv, jsonl or parquet, paths
      #      or {file: all.parquet, split_column: split}  #   relative to this file
      glue: {dir: CoLA, header: [source, label, note, sentence]}  # <glue_dir>/CoLA/<split>.tsv;
      #                                   header: column names when the files have none
      hub: {path: nyu-mll/glue, name: cola, revision: null, splits: {...},
            text_columns: [...], label_column: label}   # datasets.load_dataset

A source may name its own ``splits``, ``text_columns`` and ``label_column`` (GLUE's files
and ``nyu-mll/glue`` name their columns differently). Every mistake is a ``TaskFileError``
naming the file and the key.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from loralens.core.errors import ConfigError
from loralens.tasks.spec import METRICS, BUILTIN_DIR, Source, TaskSpec

TOP_KEYS = ("name", "version", "description", "task_type", "text_columns", "label_column",
            "labels", "splits", "validation_carve", "metrics", "selection_metric", "source")
SOURCE_KEYS = {
    "glue": ("dir", "header", "splits", "text_columns", "label_column"),
    "files": ("train", "validation", "file", "split_column", "format", "header", "splits",
              "text_columns", "label_column"),
    "hub": ("path", "name", "revision", "splits", "text_columns", "label_column"),
}
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}
CARVE_DEFAULTS = {"fraction": 0.1, "minimum": 1, "seed": 0}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")


class TaskFileError(ConfigError):
    """A task file is malformed; the message names the file and the key."""


def load_task_file(path: str | Path) -> TaskSpec:
    """Read and check a task file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskFileError(f"{path}: task file not found", "tasks")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskFileError(f"{path}: not valid YAML: {e}", "tasks") from None
    return parse_task(data, str(path.resolve()), base_dir=path.resolve().parent)


def parse_task(data: Any, origin: str, base_dir: Path | None = None) -> TaskSpec:
    """A :class:`TaskSpec` from a task file's mapping (``origin`` names it in errors;
    relative file paths are taken from ``base_dir``)."""
    p = _Parser(origin, base_dir)
    if not isinstance(data, dict):
        p.fail(None, f"expected a mapping of keys at the top level, got {type(data).__name__}")
    p.known(data, TOP_KEYS, "")
    name = p.string(data, "name")
    if not NAME.match(name):
        p.fail("name", f"{name!r} must be letters, digits, '_' or '.' (it names directories)")
    if data.get("task_type", "classification") != "classification" or "labels" not in data:
        p.fail("labels" if "labels" not in data else "task_type",
               "loralens trains classifiers: a task declares its labels (regression tasks such "
               "as STS-B, with a real-valued label column, are not supported)")
    texts = p.columns(data, "text_columns")
    label_column = p.string(data, "label_column")
    label_map, label_names = p.labels(data.get("labels"))
    splits = p.splits(data.get("splits", {"train": "train", "validation": "validation"}),
                      "splits")
    metrics = p.metrics(data, len(label_names))
    selection = data.get("selection_metric", metrics[0])
    if selection not in metrics:
        p.fail("selection_metric", f"{selection!r} is not one of the task's metrics {metrics}")
    carve = p.carve(data.get("validation_carve") or {})  # used where a source has no
    sources = p.sources(data.get("source"), splits)       # validation split
    definition = {**data, "source": p.definitions}
    return TaskSpec(name=name, text_columns=texts, label_column=label_column,
                    label_map=label_map, label_names=label_names, metric=selection,
                    splits=splits, sources=sources,
                    reported=(selection, *[m for m in metrics if m != selection]),
                    carve_validation=carve, version=str(data.get("version", "1")),
                    description=str(data.get("description", "")), file=origin,
                    definition=definition)


class _Parser:
    def __init__(self, origin: str, base_dir: Path | None):
        self.origin, self.base_dir = origin, base_dir
        self.definitions: dict = {}   # the source mappings, paths made absolute

    def fail(self, key: str | None, message: str):
        raise TaskFileError(f"{self.origin}: {key + ': ' if key else ''}{message}",
                            f"tasks ({key})" if key else "tasks")

    def known(self, data: dict, keys: tuple, prefix: str) -> None:
        for k in data:
            if k not in keys:
                close = difflib.get_close_matches(str(k), keys, n=1)
                self.fail(prefix + str(k), "unknown key" + (f"; did you mean {prefix}{close[0]}?"
                                                            if close else
                                                            f"; known keys: {', '.join(keys)}"))

    def string(self, data: dict, key: str, prefix: str = "") -> str:
        if key not in data:
            self.fail(prefix + key, "missing")
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(prefix + key, f"expected a non-empty string, got {value!r}")
        return value

    def columns(self, data: dict, key: str, prefix: str = "") -> tuple[str, ...]:
        value = data.get(key)
        if value is None:
            self.fail(prefix + key, "missing: one text column, or two for a pair")
        cols = (value,) if isinstance(value, str) else value
        if not isinstance(cols, (list, tuple)) or not 1 <= len(cols) <= 2 \
                or not all(isinstance(c, str) and c for c in cols):
            self.fail(prefix + key, f"expected one or two column names, got {value!r}")
        return tuple(cols)

    def labels(self, value: Any) -> tuple[dict[str, int], tuple[str, ...]]:
        """{raw value as text: class id} and the class names."""
        if isinstance(value, dict):
            if any(isinstance(k, bool) for k in value):
                self.fail("labels", f"raw label {next(k for k in value if isinstance(k, bool))!r}"
                                    " is a YAML boolean: quote it")
            raw, names = [str(k).strip() for k in value], [value[k] for k in value]
        elif isinstance(value, list):
            raw, names = [str(v).strip() if v is not None else "" for v in value], list(value)
        else:
            self.fail("labels", f"expected a list of label names or a mapping raw value -> "
                                f"name, got {value!r}")
        if len(names) < 2:
            self.fail("labels", f"a classification task needs at least 2 labels, got {value!r}")
        for n in names:
            if isinstance(n, bool):
                self.fail("labels", f"label name {n!r} is a YAML boolean: quote it (YAML reads "
                                    "yes/no/true/false/on/off unquoted as true or false)")
            if not isinstance(n, (str, int)) or str(n).strip() == "":
                self.fail("labels", f"label name {n!r} is not a string or integer")
        dup = sorted({r for r in raw if raw.count(r) > 1} | {str(n) for n in names
                                                              if names.count(n) > 1})
        if dup:
            self.fail("labels", f"duplicate label(s) {dup}")
        return {r: i for i, r in enumerate(raw)}, tuple(str(n) for n in names)

    def splits(self, value: Any, key: str) -> dict[str, str]:
        if not isinstance(value, dict) or "train" not in value:
            self.fail(key, f"expected a mapping with at least train (and validation), got "
                           f"{value!r}")
        self.known(value, ("train", "validation"), key + ".")
        for k, v in value.items():
            if not isinstance(v, (str, int)) or isinstance(v, bool) or str(v) == "":
                self.fail(f"{key}.{k}", f"expected a split name, got {v!r}")
        return {k: str(v) for k, v in value.items()}

    def metrics(self, data: dict, n_labels: int) -> tuple[str, ...]:
        value = data.get("metrics", [data.get("selection_metric", "accuracy")])
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not value:
            self.fail("metrics", f"expected a list of metrics, got {value!r}")
        for m in value:
            if m not in METRICS:
                self.fail("metrics", f"{m!r} is not one of {list(METRICS)}")
        return tuple(dict.fromkeys(value))

    def carve(self, value: Any) -> dict:
        if not isinstance(value, dict):
            self.fail("validation_carve", f"expected a mapping, got {value!r}")
        self.known(value, tuple(CARVE_DEFAULTS), "validation_carve.")
        out = {**CARVE_DEFAULTS, **value}
        if not isinstance(out["fraction"], (int, float)) or not 0 < out["fraction"] <= 0.5:
            self.fail("validation_carve.fraction", f"expected a number in (0, 0.5], got "
                                                   f"{out['fraction']!r}")
        for k in ("minimum", "seed"):
            if isinstance(out[k], bool) or not isinstance(out[k], int) or out[k] < 0:
                self.fail(f"validation_carve.{k}", f"expected an integer >= 0, got {out[k]!r}")
        return out

    def sources(self, value: Any, splits: dict[str, str]) -> tuple[Source, ...]:
        if not isinstance(value, dict) or not value:
            self.fail("source", f"expected a mapping with glue, files and/or hub, got {value!r}")
        self.known(value, tuple(SOURCE_KEYS), "source.")
        out = []
        for kind in ("glue", "files", "hub"):   # the order of preference
            if kind in value:
                out.append(self.source(kind, value[kind], splits))
        return tuple(out)

    def source(self, kind: str, value: Any, splits: dict[str, str]) -> Source:
        key = f"source.{kind}"
        if kind == "glue" and isinstance(value, str):
            value = {"dir": value}
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping, got {value!r}")
        self.known(value, SOURCE_KEYS[kind], key + ".")
        value = dict(value)
        own = {}
        if "splits" in value:
            own["splits"] = self.splits(value["splits"], f"{key}.splits")
        if "text_columns" in value:
            own["text_columns"] = self.columns(value, "text_columns", key + ".")
        if "label_column" in value:
            own["label_column"] = self.string(value, "label_column", key + ".")
        if "header" in value:
            h = value["header"]
            if not isinstance(h, list) or not all(isinstance(c, str) and c for c in h):
                self.fail(f"{key}.header", f"expected a list of column names, got {h!r}")
            own["header"] = tuple(h)
        if kind == "glue":
            src = Source("glue", location=self.string(value, "dir", key + "."), **own)
        elif kind == "hub":
            for k in ("name", "revision"):
                if value.get(k) is not None and not isinstance(value[k], str):
                    self.fail(f"{key}.{k}", f"expected a string, got {value[k]!r}")
            src = Source("hub", location=self.string(value, "path", key + "."),
                         config=value.get("name"), revision=value.get("revision"), **own)
        else:
            src, value = self.files(value, splits, own)
        self.definitions[kind] = value
        return src

    def files(self, value: dict, splits: dict[str, str], own: dict) -> tuple[Source, dict]:
        key = "source.files"
        if "file" in value:
            for k in ("train", "validation"):
                if k in value:
                    self.fail(f"{key}.{k}", "give either file + split_column or train / "
                                            "validation files, not both")
            path = self.path(value, "file")
            column = self.string(value, "split_column", key + ".")
            value = {**value, "file": path}
            src = Source("files", file=path, split_column=column,
                         format=self.format(value, path), **own)
            return src, value
        if "train" not in value:
            self.fail(key, "expected train (and validation) files, or file + split_column")
        if "split_column" in value:
            self.fail(f"{key}.split_column", "only with one file (file: ...)")
        paths = {k: self.path(value, k) for k in ("train", "validation") if k in value}
        fmts = {self.format(value, p) for p in paths.values()}
        value = {**value, **paths}
        if "splits" in own:
            self.fail(f"{key}.splits", "the files are the splits (train:, validation:)")
        return Source("files", splits=paths, format="" if len(fmts) > 1 else fmts.pop(),
                      **own), value

    def path(self, value: dict, k: str) -> str:
        raw = self.string(value, k, "source.files.")
        path = Path(raw).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        return str(path)

    def format(self, value: dict, path: str) -> str:
        if "format" in value:
            fmt = value["format"]
            if fmt not in set(FORMATS.values()):
                self.fail("source.files.format", f"{fmt!r} is not one of "
                                                 f"{sorted(set(FORMATS.values()))}")
            return fmt
        suffix = Path(path).suffix.lower()
        if suffix not in FORMATS:
            self.fail("source.files", f"cannot tell the format of {path} from its suffix; "
                                      f"give format: ({', '.join(sorted(set(FORMATS.values())))})")
        return FORMATS[suffix]


def is_builtin_file(spec: TaskSpec) -> bool:
    return Path(spec.file).parent.name in (BUILTIN_DIR, "task_files")  # task_files: before 0.1 moved it


def from_definition(name: str, d: Any) -> TaskSpec:
    """The task a config's ``task_defs`` entry ({file, task}) defines."""
    if not isinstance(d, dict) or not isinstance(d.get("task"), dict):
        raise ConfigError(f"task_defs.{name}: expected {{file: ..., task: {{...}}}}",
                          f"task_defs.{name}")
    return parse_task(d["task"], f"{d.get('file')} (kept in task_defs)")
