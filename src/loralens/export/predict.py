"""``loralens predict RUN_DIR|MODEL_DIR --task T --input FILE --output FILE``: batch
prediction with any trained model, without serving.

The model is a run directory's job (``--method``, ``--seed``; by default the LoRA model of
the smallest seed, else the full one), a job directory, or an artifact directory (a PEFT
adapter, whose base is ``--model``, else ``base_model_name_or_path`` where that directory
exists, else the hub id and revision its model card records; or a sequence-classification
checkpoint), in either layout. An artifact's ``max_length`` is the one its card records
(training's) unless ``--max-length`` says otherwise. Inputs are TSV (GLUE's files, test splits included), CSV or
JSON lines with the task's text columns (GLUE's names or nyu-mll/glue's, e.g.
``sentence1``/``sentence2``), an ``index`` column kept when present. Each example is
preprocessed as in training (fields stripped, pairs joined by EOS, truncated at
``max_length``). The output (TSV, CSV or JSON lines, by its extension) has per row the
index, the label id, the label name and each label's probability.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from loralens.core.run_dir import RunDir
from loralens.models.methods import is_study_lora
from loralens.tasks.spec import TaskSpec
from loralens.tasks.registry import get_task
from loralens.tasks.registry import resolve_config_tasks

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


class PredictError(ValueError):
    """A bad input file, row or model directory (the message names it)."""


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    label_names: tuple[str, ...]
    max_length: int
    source: str


# --------------------------------------------------------------------------- inputs

def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PredictError(f"{path}: unknown format {path.suffix!r}; use .tsv, .csv or .jsonl")
    return fmt


def _columns(spec: TaskSpec, header: Sequence[str], where: str) -> list[str]:
    """The task's text columns, or those of one of its sources (GLUE's or the hub's names)."""
    options = [spec.text_columns, *(s.text_columns for s in spec.sources if s.text_columns)]
    for cols in options:
        if all(c in header for c in cols):
            return list(cols)
    raise PredictError(f"{where}: no text column(s) {' or '.join(map(str, map(list, options)))}"
                       f" for task {spec.name}; found {list(header)}")


def read_inputs(path: str | Path, spec: TaskSpec) -> tuple[list[Any], list[tuple[str, ...]]]:
    """(indices, text fields) of every row; an ``index`` column, else the row number."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{path}: file not found")
    fmt = _format(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        if fmt == "jsonl":
            records = []
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise PredictError(f"{path}:{n}: not JSON: {e}") from None
            if not records:
                raise PredictError(f"{path}: no rows")
            cols = _columns(spec, list(records[0][1]), f"{path}:{records[0][0]}")
        else:
            reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv"
                      else csv.reader(f))
            header = next(reader, None)
            if header is None:
                raise PredictError(f"{path}:1: empty file, expected a header row")
            cols = _columns(spec, header, f"{path}:1")
            records = [(n, dict(zip(header, r))) for n, r in enumerate(reader, start=2) if r]
            for n, r in records:
                if len(r) != len(header):
                    raise PredictError(f"{path}:{n}: expected {len(header)} fields")
    indices, texts = [], []
    for i, (n, rec) in enumerate(records):
        fields = tuple(str(rec.get(c) or "").strip() for c in cols)
        if not all(fields):
            raise PredictError(f"{path}:{n}: empty or missing text in {cols}")
        indices.append(rec.get("index", i))
        texts.append(fields)
    return indices, texts


# --------------------------------------------------------------------------- models

def load_model(target: str | Path, task: str, method: str | None = None,
               seed: int | None = None, max_length: int | None = None,
               model: str | None = None, revision: str | None = None) -> Loaded:
    """The trained model ``target`` names, with its tokenizer and label names. An artifact's
    ``max_length`` defaults to the one its card records (training's), else 384; a bare
    adapter's base is ``model`` (``--model``), else the one it records
    (:func:`loralens.models.adapter_base.adapter_base`)."""
    from loralens.models.cards import read_record

    target, spec = Path(target), get_task(task)
    if RunDir(target).is_run_dir():
        return _from_run(target, spec, method, seed, max_length)
    for sub in (RunDir.job_adapter_dir(target), RunDir.job_model_dir(target)):  # a job dir
        if sub.is_dir():
            target = sub
    recorded = read_record(target).get("max_length")
    return _from_artifact(target, spec, max_length or recorded or 384, model, revision)


def _from_run(root: Path, spec: TaskSpec, method, seed, max_length) -> Loaded:
    from loralens.models.classifier import load_base
    from loralens.models.saving import load_trained

    run = RunDir(root)
    jobs = [j for j in run.finished_jobs() if j[0] == spec.name
            and (method is None or j[1] == method) and (seed is None or j[2] == seed)]
    if not jobs:
        have = sorted({f"{j[1]}/seed{j[2]}" for j in run.finished_jobs() if j[0] == spec.name})
        raise PredictError(f"{root}: no finished {spec.name} model"
                           + (f" with method {method}" if method else "")
                           + (f" and seed {seed}" if seed is not None else "")
                           + f"; the run has {', '.join(have) or 'none'}")
    methods = list(dict.fromkeys(j[1] for j in run.finished_jobs()))
    jobs.sort(key=lambda j: (not is_study_lora(j[1]), methods.index(j[1]), j[2]))
    cfg = run.load_config()
    resolve_config_tasks(cfg)
    base = load_base(cfg)
    model = load_trained(run.job_dir(*jobs[0]), base.backbone(), spec.num_labels)
    return Loaded(model, base.tokenizer, spec.label_names, max_length or cfg.data.max_length,
                  str(run.job_dir(*jobs[0])))


def _from_artifact(path: Path, spec: TaskSpec, max_length: int, base_model: str | None = None,
                   revision: str | None = None) -> Loaded:
    from loralens.models.adapter_base import adapter_base
    from loralens.models.artifacts import is_adapter_dir, label_names, load_adapter, load_full
    from loralens.models.classifier import CausalLMClassifier
    from loralens.models.registry import ResolvedModel, load_backbone, load_tokenizer, resolve_model

    if is_adapter_dir(path):
        ref = adapter_base(path, base_model, revision)
        if ref is None:
            raise PredictError(f"{path}: the adapter records no base model "
                               "(base_model_name_or_path); give it with --model, or give "
                               "its run directory instead")
        base = resolve_model(ref.name)
        own = (path / "tokenizer_config.json").is_file()  # saved beside the adapter
        tok = load_tokenizer(ResolvedModel(str(path), str(path), "") if own else base,
                             revision=None if own else ref.revision)
        model = CausalLMClassifier(load_backbone(base, revision=ref.revision), spec.num_labels)
        return Loaded(load_adapter(model, path), tok, spec.label_names, max_length, str(path))
    if not (path / "config.json").is_file():
        raise PredictError(f"{path}: neither a run directory, a job directory, a PEFT adapter "
                           "nor a model checkpoint")
    from transformers import AutoConfig, AutoModel

    names = tuple(label_names(path) or spec.label_names)
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(str(path)), dtype=torch.float32)
    model = load_full(CausalLMClassifier(backbone, len(names)), path)
    tok = load_tokenizer(ResolvedModel(str(path), str(path), ""))
    return Loaded(model, tok, names, max_length, str(path))


# --------------------------------------------------------------------------- predict

def predict_texts(loaded: Loaded, texts: Sequence[Sequence[str]], batch_size: int = 32
                  ) -> np.ndarray:
    """Probabilities [rows, labels] with training's preprocessing and loralens's forward."""
    from loralens.training import batches as B
    from loralens.training.loop import evaluate

    ids = [B.encode_texts(loaded.tokenizer, [t.strip() for t in r], loaded.max_length)
           for r in texts]
    enc = B.Encoded(ids, np.zeros(len(ids), dtype=np.int64), np.arange(len(ids)))
    logits = evaluate(loaded.model, enc, loaded.tokenizer.pad_token_id, batch_size)["logits"]
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()


def render(indices, probs: np.ndarray, names: Sequence[str], fmt: str) -> str:
    rows = [{"index": i, "label": int(p.argmax()), "label_name": names[int(p.argmax())],
             "probabilities": {n: float(x) for n, x in zip(names, p)}}
            for i, p in zip(indices, probs)]
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
    w.writerow(["index", "label", "label_name", *[f"p_{n}" for n in names]])
    for r in rows:
        w.writerow([r["index"], r["label"], r["label_name"],
                    *[f"{r['probabilities'][n]:.6f}" for n in names]])
    return buf.getvalue()


def predict_file(target, task: str, input_path, output_path, method: str | None = None,
                 seed: int | None = None, batch_size: int = 32,
                 max_length: int | None = None, model: str | None = None,
                 revision: str | None = None) -> dict:
    """Predict every row of ``input_path`` into ``output_path``; returns a summary."""
    from loralens.core.files import atomic_write_text

    out = Path(output_path)
    fmt = _format(out)
    indices, texts = read_inputs(input_path, get_task(task))
    loaded = load_model(target, task, method, seed, max_length, model, revision)
    probs = predict_texts(loaded, texts, batch_size)
    atomic_write_text(out, render(indices, probs, loaded.label_names, fmt))
    counts = np.bincount(probs.argmax(1), minlength=len(loaded.label_names))
    return {"rows": len(texts), "model": loaded.source, "output": str(out),
            "predicted": dict(zip(loaded.label_names, counts.tolist()))}
