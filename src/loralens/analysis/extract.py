"""Extraction: hidden states of every layer, mean-pooled over real tokens, per model.

For each task a fixed sample of validation examples is drawn once (``n_examples``
rows with ``seed``; the whole split when it has fewer rows, and the real count is
recorded). The base model and every finished trained model of the run directory
see exactly these examples, in the same order, with the tokenization and the
dynamic, length-grouped batching of training/evaluation. For each example and
layer the hidden state is averaged over real tokens only (the attention mask),
giving one float32 array ``[examples, layers, hidden]`` per model, the hidden states
as transformers returns them: state 0 is the embedding output, state ``i`` the output
of transformer block ``i``, and the last one block L's output after the model's final
norm (``drift.layers`` picks the states drift averages). No token-level tensor is
stored.

Layout::

    RUN_DIR/extract/<task>/
      manifest.json          the sample (requested and real count, seed, example ids),
                             the model, and one provenance entry per extracted model
      base.npz               hidden [n, layers, d] float32, ids [n] int64, meta (JSON)
      <method>-seed<seed>.npz

Each ``.npz`` is written to a temporary name and renamed into place, and carries
its own provenance (``meta``), so a killed run loses nothing: a rerun skips every
file already there after checking it holds the same examples and comes from the
same trained model (the sha256 of the job's ``metrics.json``). A file that does
not match is an error, never silently overwritten (``overwrite=True`` replaces it).

Pitfalls of the study's published code ruled out here: it mean-pooled over pad
positions too, its "750 samples" silently became 408 (MRPC) and 277 (RTE), and
its evaluation sets differed between methods.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loralens.tasks import rows as D
from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.core.config import StudyConfig
from loralens.models.families import pool
from loralens.models.classifier import Base, build_classifier, load_base
from loralens.models.saving import load_trained
from loralens.core.errors import RunDirError
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_path, atomic_write_json, read_json
from loralens.tasks.registry import get_task

BASE_KEY = "base"
SPLIT = "validation"
FORMAT = "loralens-extract-1"
POOLING = ("mean over real tokens (attention mask); state 0 = embedding output, i = block i, "
           "the last after the final norm")
# Keys of the manifest that define the sample; a rerun with other values is an error.
SAMPLE_KEYS = ("task", "split", "requested", "seed", "max_length", "model", "example_ids")


# --------------------------------------------------------------------------- library

@torch.no_grad()
def pooled_hidden_states(model: nn.Module, encoded: B.Encoded, pad_id: int, batch_size: int = 32,
                         *, group_by_length: bool = True, pad_to: int | None = None,
                         progress: bool = False, desc: str = "extract",
                         pooling: str = "mean") -> np.ndarray:
    """Hidden states of every layer, mean-pooled over real tokens: ``[n, layers, d]`` float32.

    Args:
        model: anything whose forward takes ``input_ids``, ``attention_mask`` and
            ``output_hidden_states=True`` and returns an object with ``hidden_states``
            (embedding output, then one tensor ``[batch, seq, d]`` per layer): a
            ``CausalLMClassifier``, a ``PeftModel`` wrapping one, or a bare backbone.
        encoded: tokenized examples; rows of the result follow its order.
        pad_id: id written into padded positions (masked out; any id gives the same
            result).
        batch_size: examples per forward pass.
        group_by_length: batches of similar length (little padding), as in evaluation.
        pad_to: pad every batch to this width instead of its longest member (for
            benchmarks; the result is the same up to float rounding).
        pooling: ``mean`` over real tokens (the stage's, for causal LMs and encoders
            alike: the study's measure), or ``last``/``cls`` (:func:`model_families.pool`).

    Returns:
        float32 array ``[len(encoded), n_hidden_states, hidden_size]``. Pooling
        (:func:`models.masked_mean`, float32) multiplies pad positions by 0 and divides
        by each row's real-token count, so pads contribute nothing.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: np.ndarray | None = None
    batches = B.eval_batches(encoded.lengths, batch_size, group_by_length)
    try:
        for b in tqdm(B.iter_batches(encoded, batches, pad_id, pad_to), total=len(batches),
                      desc=desc, disable=not progress, unit="batch", dynamic_ncols=True):
            mask = b.attention_mask.to(device)
            res = model(input_ids=b.input_ids.to(device), attention_mask=mask,
                        output_hidden_states=True)
            states = getattr(res, "hidden_states", None)
            if not states:
                raise ValueError(f"{type(model).__name__} returned no hidden_states")
            pooled = torch.stack([pool(h.float(), mask, pooling) for h in states], dim=1)
            if out is None:
                out = np.empty((len(encoded), *pooled.shape[1:]), dtype=np.float32)
            out[b.index] = pooled.float().cpu().numpy()
    finally:
        model.train(was_training)
    if out is None:
        raise ValueError("no examples to extract")
    return out


def sample_split(split: D.Split, n_examples: int | None, seed: int) -> D.Split:
    """The fixed evaluation sample: ``n_examples`` rows drawn with ``seed``, in split order.

    The same rows for every model (the draw depends on the split and seed only); the
    whole split when it has ``n_examples`` rows or fewer (``len`` of the result is
    the real count).
    """
    return split.subset(n_examples, seed)


def model_key(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def job_fingerprint(job_dir: str | Path) -> str:
    """sha256 of a job's metrics.json: changes whenever the job is trained again."""
    return hashlib.sha256(RunDir.job_metrics(job_dir).read_bytes()).hexdigest()


def save_pooled(path: str | Path, hidden: np.ndarray, ids: np.ndarray, meta: dict) -> None:
    """Write ``hidden`` [n, layers, d] float32, ``ids`` [n] and ``meta`` atomically as .npz."""
    path = Path(path)
    hidden = np.asarray(hidden)
    ids = np.asarray(ids, dtype=np.int64)
    if hidden.dtype != np.float32 or hidden.ndim != 3 or hidden.shape[0] != ids.shape[0]:
        raise ValueError(f"expected float32 [n, layers, d] with n = len(ids) = {len(ids)}, "
                         f"got {hidden.dtype} {hidden.shape}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, hidden=hidden, ids=ids, meta=np.array(json.dumps(meta)))


def load_pooled(path: str | Path, hidden: bool = True) -> tuple[np.ndarray | None, np.ndarray,
                                                                 dict]:
    """``(hidden [n, layers, d] float32 or None, ids [n] int64, meta)`` from :func:`save_pooled`."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        return (z["hidden"] if hidden else None), z["ids"], meta


def load_task(run: RunDir, task: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest and every extracted array of a task: ``(manifest, {key: [n, L, d]})``.

    Checks each file holds the manifest's examples in the manifest's order.
    """
    folder, path = run.extract_dir(task), run.extract_manifest(task)
    if not path.is_file():
        raise RunDirError(f"{path} not found: run `loralens extract` first")
    manifest = read_json(path)
    want = np.asarray(manifest["example_ids"], dtype=np.int64)
    arrays = {}
    for key, entry in manifest["models"].items():
        if not (folder / entry["file"]).is_file():
            raise RunDirError(f"{folder / entry['file']} is listed in {path} but missing; "
                              "rerun `loralens extract`")
        hidden, ids, _ = load_pooled(folder / entry["file"])
        if not np.array_equal(ids, want):
            raise RunDirError(f"{folder / entry['file']} holds other examples than "
                              f"{path} (the evaluation set must be the same for every model)")
        arrays[key] = hidden
    return manifest, arrays


def is_extracted(run: RunDir, task: str) -> bool:
    """Whether ``task``'s extraction is complete: the base model and every finished job,
    each from the job as it is now (same metrics.json)."""
    path = run.extract_manifest(task)
    if not path.is_file():
        return False
    models = read_json(path).get("models", {})
    if BASE_KEY not in models:
        return False
    for t, m, s in run.finished_jobs():
        entry = models.get(model_key(m, s))
        if t == task and (entry is None or entry.get("metrics_sha256")
                          != job_fingerprint(run.job_dir(t, m, s))):
            return False
    return True


# --------------------------------------------------------------------------- stage

def run_extract(cfg: StudyConfig, run: RunDir, tasks: Sequence[str] | None = None,
                n_examples: int = 750, seed: int = 0, batch_size: int = 32, *,
                overwrite: bool = False, base: Base | None = None,
                progress: bool = True) -> list[dict]:
    """Extract pooled hidden states of the base model and every finished job, per task.

    Args:
        cfg: the run's resolved config (model, data.glue_dir, data.max_length).
        run: the run directory; trained models come from ``run.finished_jobs()``.
        tasks: tasks to extract (default ``cfg.tasks``).
        n_examples: validation rows per task (the whole split when it has fewer, or
            when None); the real count is recorded next to the requested one.
        seed: seed of the row sample (the same rows for every model).
        batch_size: examples per forward pass (changes float rounding only).
        overwrite: re-extract files that exist (else they are checked and skipped).
        base: the base model (default: loaded from ``cfg``).

    Returns:
        One dict per (task, model): ``task``, ``key``, ``status`` ("extracted" or
        "skipped"), ``file``, ``n_examples``, ``requested``, ``seconds``.

    Raises:
        RunDirError: an existing manifest or file was made with another sample or
            from an earlier version of a trained model (and ``overwrite`` is off).
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    base = base or load_base(cfg)
    finished = run.finished_jobs()
    results = []
    for task in list(tasks or cfg.tasks):
        spec = get_task(task)
        split = TS.load_split(spec, SPLIT, cfg.data.glue_dir)
        sample = sample_split(split, n_examples, seed)
        requested = len(split) if n_examples is None else int(n_examples)
        enc = B.encode_split(base.tokenizer, sample, cfg.data.max_length)
        header = {
            "format": FORMAT, "task": task, "split": SPLIT, "source": split.source,
            "split_rows": len(split), "requested": requested, "n_examples": len(sample),
            "seed": seed, "max_length": cfg.data.max_length, "model": base.name,
            "model_note": base.note, "pooling": POOLING, "dtype": "float32",
            "label_counts": {str(k): v for k, v in sorted(sample.label_counts.items())},
            "mean_tokens": float(enc.lengths.mean()),
            "example_ids": [int(i) for i in enc.ids],
        }
        manifest = _open_manifest(run.extract_manifest(task), header, overwrite)
        jobs = [(BASE_KEY, None, None)] + [(model_key(m, s), m, s)
                                           for t, m, s in finished if t == task]
        for key, method, job_seed in jobs:
            results.append(_extract_one(cfg, run, base, manifest, header, enc, key, method,
                                        job_seed, batch_size, overwrite, progress))
    return results


def _extract_one(cfg, run: RunDir, base: Base, manifest: dict, header: dict, enc: B.Encoded,
                 key: str, method: str | None, job_seed: int | None, batch_size: int,
                 overwrite: bool, progress: bool) -> dict:
    """One model's pooled states of one task (skipped after a check when already there)."""
    task, spec = header["task"], get_task(header["task"])
    path = run.extract_array_path(task, key)
    job_dir = run.job_dir(task, method, job_seed) if method else None
    fingerprint = job_fingerprint(job_dir) if method else None
    if path.is_file() and not overwrite:
        manifest["models"][key] = _check_existing(path, enc.ids, header, fingerprint, key)
        atomic_write_json(run.extract_manifest(task), manifest)
        return _result(task, key, "skipped", path, header, 0.0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    if method is None:
        model = build_classifier(base.backbone(), spec.num_labels, seed=0)
    else:
        model = load_trained(job_dir, base.backbone(), spec.num_labels)
    model.to(device).eval()
    hidden = pooled_hidden_states(model, enc, base.tokenizer.pad_token_id, batch_size,
                                  group_by_length=True, progress=progress,
                                  desc=f"extract {task}/{key}")
    seconds = time.perf_counter() - t0
    del model
    entry = {
        "key": key, "kind": "base" if method is None else "trained",
        "method": method, "seed": job_seed, "file": path.name,
        "job_dir": str(job_dir.relative_to(run.root)) if job_dir else None,
        "metrics_sha256": fingerprint, "model": base.name,
        "shape": list(hidden.shape), "n_examples": len(enc),
        "requested": header["requested"], "sample_seed": header["seed"],
        "max_length": cfg.data.max_length, "batch_size": batch_size,
        "device": str(device), "precision": "fp32", "seconds": seconds,
        "examples_per_s": len(enc) / seconds if seconds > 0 else None,
        "extracted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    save_pooled(path, hidden, enc.ids, entry)
    manifest["models"][key] = entry
    atomic_write_json(run.extract_manifest(task), manifest)
    return _result(task, key, "extracted", path, header, seconds)


def _result(task: str, key: str, status: str, path: Path, header: dict, seconds: float) -> dict:
    return {"task": task, "key": key, "status": status, "file": str(path),
            "n_examples": header["n_examples"], "requested": header["requested"],
            "seconds": seconds}


def _open_manifest(path: Path, header: dict, overwrite: bool) -> dict:
    """The task's manifest: a new one, or the stored one after checking it has the same sample."""
    if path.is_file() and not overwrite:
        old = read_json(path)
        diffs = [k for k in SAMPLE_KEYS if old.get(k) != header[k]]
        if diffs:
            shown = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(header[k])}" for k in diffs)
            raise RunDirError(f"{path} was extracted with another sample ({shown}); use another "
                              "run directory, or overwrite to re-extract every model")
        manifest = {**header, "models": old.get("models", {})}
    else:
        manifest = {**header, "models": {}}
    atomic_write_json(path, manifest)
    return manifest


def _check_existing(path: Path, ids: np.ndarray, header: dict, fingerprint: str | None,
                    key: str) -> dict:
    """Provenance of a finished file, after checking it matches the sample and the model."""
    _, got_ids, meta = load_pooled(path, hidden=False)
    if not np.array_equal(got_ids, ids):
        raise RunDirError(f"{path} holds other examples than the current sample of "
                          f"{header['n_examples']} rows; delete it or overwrite")
    if meta.get("metrics_sha256") != fingerprint:
        raise RunDirError(f"{path} was extracted from an earlier version of model {key!r} "
                          "(its metrics.json changed since: trained again?); delete it or "
                          "overwrite")
    if meta.get("max_length") != header["max_length"] or meta.get("model") != header["model"]:
        raise RunDirError(f"{path} was extracted with model {meta.get('model')!r}, max_length "
                          f"{meta.get('max_length')}; now {header['model']!r}, "
                          f"{header['max_length']}; delete it or overwrite")
    return meta


def _short(v) -> str:
    if isinstance(v, list) and len(v) > 6:
        return f"[{len(v)} ids: {v[0]}, {v[1]}, ..., {v[-1]}]"
    return repr(v)


def summary_line(r: dict) -> str:
    shown = (f"{r['n_examples']} examples" + (f" (of {r['requested']} requested: the whole "
                                             "split)" if r["n_examples"] < r["requested"] else ""))
    how = ("already done, skipped" if r["status"] == "skipped"
           else f"{r['seconds']:.1f} s, {r['n_examples'] / max(r['seconds'], 1e-9):.1f} examples/s")
    return f"extract {r['task']}/{r['key']}: {shown} -> {r['file']} [{how}]"
