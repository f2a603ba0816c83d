"""The intervention sweep: rescale LoRA's intruder directions, and a matched control, and
see what happens to score, drift and forgetting.

For each LoRA model (every training seed by default, ``weights.sweep_seeds``), each adapted
matrix ``W0 + dW`` is decomposed as PEFT's ``reduce_intruder_dimension`` does
(peft/tuners/lora/intruders.py; Shuttleworth et al., 2024, arXiv:2410.21228, their
Figure 8): the intruders are those of the top-``k`` (``weights.top_k``) singular directions of
the merged matrix whose largest |cosine| with the base's left singular vectors is below
``weights.sweep_epsilon``. Two arms rescale a set of those directions by ``lambda``
(1 = unchanged, 0 = removed) with the same function (:func:`rescaled_update`):

- intruder arm: the intruder directions (PEFT's mitigation; a test checks it against PEFT);
- control arm: as many non-intruder directions of the same matrix, the largest-singular-value
  ones (the first non-intruders in singular-value order, whether inside the top-``k`` or not).

Both arms then refactor ``(W - W0) / scaling`` as a rank-r adapter from its top r singular
triplets, as PEFT does, so both get the same truncation (lambda < 1 leaves an update of rank
up to r + n that the rebuild truncates: the control carries that confound too, and each
arm's dropped fraction is recorded). A matrix without intruders is left as it is in both
arms. Each model is measured unchanged (the reference) and for every ``lambda`` in
``weights.sweep_lambdas`` and arm, in float32:

- the task's validation score (its metric, and accuracy), on the whole validation split or
  ``weights.sweep_eval_examples`` rows of it (a fixed subset);
- activation drift: 1 - debiased linear CKA against the base model, per hidden state, on
  the extract stage's rows (the base's pooled states are read from ``extract/<task>/``),
  averaged over the states of ``drift.layers`` as the drift stage does;
- forgetting (:mod:`.forgetting`, the weights stage's text sample);
- the weights stage's own intruder count (epsilon 0.5, the compared matrices) of the result.

At lambda = 1 both arms are the same model bit for bit (a rescaling by 1 adds exactly 0):
the control reuses the intruder arm's measurement, and their difference is 0 by
construction (stated, not tested). For lambda < 1, per task, lambda and measure, the
intruder arm's value minus the control's (= the difference of their changes from the
reference) is tested across seeds with a two-sided paired t-test, paired by seed
(:func:`contrasts`): the lambdas of one seed are one model rescaled, not independent
replicates, so pooling seeds x lambdas would overstate n; Wilcoxon's signed-rank test
cannot reach p < 0.25 with 3 pairs. One Bonferroni family per measure: the configured tasks
x the lambdas below 1, declared from the config. With 3 seeds (2 degrees of freedom) the
test has 80% power only for differences of several seed standard deviations
(:func:`loralens.analysis.stats.paired_t_detectable_dz`, stored with each family).

Two PEFT 0.21.2 pitfalls are avoided here: its function leaves the model in train mode
(LoRA dropout active), and the new adapter's ``modules_to_save`` copy of the classification
head starts from the untrained head; the trained head is copied in.

Layout: ``RUN_DIR/weightspace/sweep/<task>-lora-seed<seed>.json`` (one model: its reference
and one entry per arm and lambda, written after each: resumable), ``weightspace/sweep.csv``
and ``sweep.json`` (rows, references, contrasts and their families).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.analysis import stats
from loralens.analysis.drift.measures import drift_states
from loralens.analysis.extract import (
    BASE_KEY, SPLIT, job_fingerprint, load_pooled, pooled_hidden_states, sample_split,
)
from loralens.training.loop import evaluate
from loralens.models.methods import STUDY_LORA, is_study_lora
from loralens.models.saving import load_trained
from loralens.analysis.similarity import cka_against_base
from loralens.core.errors import RunDirError
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, read_json, write_csv
from loralens.tasks.registry import get_task

log = logging.getLogger(__name__)

FORMAT = "loralens-sweep-2"
REDUCED = "intruder_reduced"
INTRUDER, CONTROL = "intruder", "control"
ARMS = (INTRUDER, CONTROL)
REFERENCE = "reference"
CONTROL_RULE = ("the largest-singular-value non-intruder directions of the merged matrix, as "
                "many as it has intruders")
ALPHA = 0.05


# --------------------------------------------------------------------------- one matrix

def merged_svd(w0: torch.Tensor, dw: torch.Tensor):
    """``(U_base, W, U, S, Vh)``: ``W0``'s left singular vectors, ``W = W0 + dW`` and its
    SVD, in float32
    for half-precision weights (torch's SVD refuses them), as PEFT computes them."""
    w0 = w0.float() if w0.dtype in (torch.float16, torch.bfloat16) else w0
    merged = w0 + dw.to(w0.dtype)
    u_base = torch.linalg.svd(w0, full_matrices=False)[0]
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    return u_base, merged, u, s, vh


def intruder_directions(u_base: torch.Tensor, u: torch.Tensor, top_k: int,
                        epsilon: float) -> list[int]:
    """Indices (singular-value order) of the merged matrix's top-``top_k`` left singular
    vectors whose largest |cosine| with a base left singular vector is below ``epsilon``
    (PEFT's rule, Shuttleworth et al. 2024)."""
    cos = (u.T @ u_base).abs().max(dim=1).values
    return torch.where(cos[:top_k] < epsilon)[0].tolist()


def control_directions(intruders: Sequence[int], n_directions: int) -> list[int]:
    """The control arm's directions: as many as ``intruders``, the largest-singular-value
    directions that are not intruders (indices in singular-value order, ``n_directions`` of
    them in all; fewer where the matrix has no more)."""
    taken = set(intruders)
    return [i for i in range(n_directions) if i not in taken][:len(intruders)]


def rescaled_update(w0: torch.Tensor, merged: torch.Tensor, u: torch.Tensor,
                    s: torch.Tensor, vh: torch.Tensor, idx: Sequence[int], lam: float,
                    scaling: float, r: int):
    """Rescale the merged matrix's directions ``idx`` by ``lam`` and refactor the new update
    as a rank-``r`` adapter, as PEFT's mitigation does: ``W' = W + (lam - 1) U_i S_i Vh_i``,
    ``(W' - W0) / scaling`` = its top r singular triplets, split ``B = U sqrt(S)``,
    ``A = sqrt(S) Vh``. The same for both arms (only ``idx`` differs).

    Returns ``(B [out, r], A [r, in], dropped, total)``: the new update's squared Frobenius
    norm that the rank-r truncation removed, and its whole squared norm (both / scaling^2)."""
    w0 = w0.float() if w0.dtype in (torch.float16, torch.bfloat16) else w0
    idx = list(idx)
    new = merged + (lam - 1.0) * ((u[:, idx] * s[idx]) @ vh[idx])
    dw = (new - w0) / scaling
    u2, s2, vh2 = torch.linalg.svd(dw, full_matrices=False)
    root = s2[:r].sqrt()
    return (u2[:, :r] * root, root[:, None] * vh2[:r], float((s2[r:].double() ** 2).sum()),
            float((s2.double() ** 2).sum()))


# --------------------------------------------------------------------------- one model

def rescale_directions(model: nn.Module, lam: float, arm: str, top_k: int = 10,
                       epsilon: float = 0.5) -> dict:
    """Rescale ``arm``'s directions (:data:`INTRUDER` or :data:`CONTROL`) of every
    LoRA-adapted matrix of a ``PeftModel`` by ``lam``, in place: a new adapter
    :data:`REDUCED` becomes the active one, with the trained head copied in and the model in
    eval mode. Returns what was done, summed over the matrices: ``intruders`` (detected,
    the same for both arms), ``directions`` (rescaled), ``modules_changed``,
    ``rescaled_sigma`` (sqrt of the sum of the rescaled singular values squared: the size of
    what the arm rescales) and ``truncated`` (the rebuilt updates' squared norm dropped by
    the rank-r truncation, as a fraction of the squared norm before it)."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    old = "default"
    model.add_adapter(REDUCED, model.peft_config[old])
    out = {"intruders": 0, "directions": 0, "modules_changed": 0, "modules": {}}
    sigma_sq = lost = total = 0.0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        embedding = old not in layer.lora_B
        w0 = layer.get_base_layer().weight.data
        with torch.no_grad():
            u_base, merged, u, s, vh = merged_svd(w0, layer.get_delta_weight(old))
        intruders = intruder_directions(u_base, u, top_k, epsilon)
        idx = intruders if arm == INTRUDER else control_directions(intruders, len(s))
        out["modules"][name] = {"intruders": len(intruders), "directions": idx}
        pairs = ((layer.lora_embedding_B, layer.lora_embedding_A) if embedding else
                 (layer.lora_B, layer.lora_A))
        if not intruders:  # nothing to rescale in either arm: the adapter as it is
            for p in pairs:
                tgt, src = p[REDUCED], p[old]
                (tgt if embedding else tgt.weight).data = (src if embedding else
                                                           src.weight).data.clone()
            continue
        with torch.no_grad():
            b, a, dropped, whole = rescaled_update(w0, merged, u, s, vh, idx, lam,
                                                   layer.scaling[old], layer.r[old])
        b, a = b.to(w0.dtype), a.to(w0.dtype)
        if embedding:
            layer.lora_embedding_B[REDUCED].data, layer.lora_embedding_A[REDUCED].data = b, a
        else:
            layer.lora_B[REDUCED].weight.data, layer.lora_A[REDUCED].weight.data = b, a
        out["intruders"] += len(intruders)
        out["directions"] += len(idx)
        out["modules_changed"] += 1
        sigma_sq += float((s[idx].double() ** 2).sum())
        lost += dropped
        total += whole
    model.set_adapter(REDUCED)
    for mod in model.modules():
        if isinstance(mod, ModulesToSaveWrapper) and REDUCED in mod.modules_to_save:
            mod.modules_to_save[REDUCED].load_state_dict(
                mod.modules_to_save[old].state_dict())
    model.eval()
    out["rescaled_sigma"] = math.sqrt(sigma_sq)
    out["truncated"] = lost / total if total > 0 else 0.0
    return out


# --------------------------------------------------------------------------- per task

def settings(cfg) -> dict:
    wc = cfg.weights
    return {"format": FORMAT, "epsilon": wc.sweep_epsilon, "top_k": wc.top_k,
            "control": CONTROL_RULE, "eval_examples": wc.sweep_eval_examples,
            "drift_layers": cfg.drift.layers, "forgetting": wc.forgetting,
            "max_length": cfg.data.max_length}


class TaskData:
    """A task's scored rows, the extract stage's rows and the base's pooled states on them."""

    def __init__(self, cfg, run: RunDir, base, task: str):
        spec = get_task(task)
        split = TS.load_split(spec, SPLIT, cfg.data.glue_dir)
        n = cfg.weights.sweep_eval_examples
        self.eval_enc = B.encode_split(base.tokenizer, split.subset(n, 0) if n else split,
                                       cfg.data.max_length)
        path = run.extract_manifest(task)
        if not path.is_file():
            raise RunDirError(f"{path} not found: the sweep measures drift on the extract "
                              "stage's rows; run `loralens extract` first")
        manifest = read_json(path)
        entry = manifest["models"].get(BASE_KEY)
        if entry is None:
            raise RunDirError(f"{path}: no base model entry; rerun `loralens extract`")
        self.base_states, ids, _ = load_pooled(run.extract_dir(task) / entry["file"])
        sample = sample_split(split, manifest["requested"], manifest["seed"])
        self.extract_enc = B.encode_split(base.tokenizer, sample, manifest["max_length"])
        if not np.array_equal(self.extract_enc.ids, ids):
            raise RunDirError(f"{path}: its rows could not be drawn again from the split")
        self.states = drift_states(cfg.drift.layers, self.base_states.shape[1])
        self.metric = spec.metric


def drift_of(base_states: np.ndarray, states: np.ndarray, selected: Sequence[int]) -> dict:
    """1 - debiased linear CKA per hidden state, and its mean over ``selected`` states."""
    per = 1.0 - np.asarray(cka_against_base(base_states, {"m": states}, debiased=True)[0],
                           dtype=np.float64)
    return {"per_state": [float(x) for x in per],
            "mean": float(np.mean(per[list(selected)]))}


def measure(an, cfg, td: TaskData, model: nn.Module, task: str) -> dict:
    """Score, drift, forgetting and the remaining intruder count of a (reduced) model."""
    from loralens.analysis.weights.analyzer import SUMMARY_EPSILON, backbone_of

    pad = an.base.tokenizer.pad_token_id
    ev = evaluate(model, td.eval_enc, pad, cfg.train.eval_batch_size)
    hidden = pooled_hidden_states(model, td.extract_enc, pad, cfg.extract.batch_size)
    out = {"metric": td.metric, "score": ev[td.metric], "accuracy": ev["accuracy"],
           "n_eval": ev["n"], "n_drift": len(td.extract_enc),
           "drift": drift_of(td.base_states, hidden, td.states)}
    backbone = backbone_of(model).eval()  # merges the active (reduced) adapter
    rows = an.analyze(backbone, STUDY_LORA)
    out["intruders_after"] = int(sum(r["intruders"][str(SUMMARY_EPSILON)] for r in rows))
    if cfg.weights.forgetting:
        out["forgetting"] = an.forgetting(backbone, task)["forgetting"]
    return out


def _steps(lambdas: Sequence[float]) -> list[tuple[str, float | None]]:
    """What one model's file holds: the reference, then every (arm, lambda)."""
    return [(REFERENCE, None)] + [(arm, lam) for arm in ARMS for lam in lambdas]


def _entry(res: dict, arm: str, lam: float | None) -> dict | None:
    if arm == REFERENCE:
        return res.get(REFERENCE)
    return res.get("arms", {}).get(arm, {}).get(f"{lam:g}")


def sweep_model(an, run: RunDir, td: TaskData, task: str, seed: int,
                progress: bool = False) -> dict:
    """The reference and every (arm, lambda) of one LoRA model not measured yet; the file is
    rewritten after each."""
    cfg = an.cfg
    wc = cfg.weights
    path = run.weightspace_sweep_path(task, seed)
    job_dir = run.job_dir(task, STUDY_LORA, seed)
    head = {"task": task, "seed": seed, "metrics_sha256": job_fingerprint(job_dir),
            "settings": settings(cfg)}
    old = read_json(path) if path.is_file() else {}
    keep = all(old.get(k) == v for k, v in json.loads(json.dumps(head)).items())
    res = {**head, REFERENCE: old.get(REFERENCE) if keep else None,
           "arms": {arm: (old.get("arms", {}).get(arm, {}) if keep else {}) for arm in ARMS}}
    todo = [(arm, lam) for arm, lam in _steps(wc.sweep_lambdas) if _entry(res, arm, lam) is None]
    for arm, lam in tqdm(todo, desc=f"sweep {task}/lora-seed{seed}", disable=not progress,
                         leave=False):
        t0 = time.perf_counter()
        if arm == CONTROL and lam == 1 and _entry(res, INTRUDER, 1.0) is not None:
            # rescaling by 1 adds exactly 0: both arms are the same model, bit for bit
            r = {**_entry(res, INTRUDER, 1.0), "arm": CONTROL, "same_as": "intruder 1"}
        else:
            model = load_trained(job_dir, an.base.backbone(), get_task(task).num_labels).eval()
            r = {"arm": arm}
            if arm != REFERENCE:
                done = rescale_directions(model, lam, arm, wc.top_k, wc.sweep_epsilon)
                r.update({"lambda": lam, **{k: done[k] for k in (
                    "intruders", "directions", "modules_changed", "rescaled_sigma",
                    "truncated")}})
            if arm != REFERENCE and r["modules_changed"] == 0 and res[REFERENCE]:
                # nothing detected (detection does not depend on lambda or the arm): every
                # adapter matrix was copied as it is, so the model is the reference
                r.update({k: v for k, v in res[REFERENCE].items()
                          if k not in ("arm", "seconds", "same_as")}, same_as=REFERENCE)
            else:
                r.update(measure(an, cfg, td, model, task))
        r["seconds"] = time.perf_counter() - t0
        if arm == REFERENCE:
            res[REFERENCE] = r
        else:
            res["arms"][arm][f"{lam:g}"] = r
        atomic_write_json(path, res)
    return res


def is_done(run: RunDir, cfg, task: str, seed: int) -> bool:
    path = run.weightspace_sweep_path(task, seed)
    if not path.is_file():
        return False
    old = read_json(path)
    return (old.get("metrics_sha256") == job_fingerprint(run.job_dir(task, STUDY_LORA, seed))
            and old.get("settings") == json.loads(json.dumps(settings(cfg)))
            and all(_entry(old, arm, lam) is not None
                    for arm, lam in _steps(cfg.weights.sweep_lambdas)))


# --------------------------------------------------------------------------- outputs

def measures(cfg) -> list[str]:
    """The measures whose intruder-minus-control difference is tested (one family each)."""
    return ["score", "drift"] + (["forgetting"] if cfg.weights.forgetting else [])


def _value(e: dict, measure: str) -> float | None:
    v = e.get(measure)
    if isinstance(v, dict):  # drift: per state and mean
        v = v.get("mean")
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _change(e: dict, ref: dict | None, measure: str) -> float | None:
    a, b = _value(e, measure), (_value(ref, measure) if ref else None)
    return None if a is None or b is None else a - b


def sweep_rows(results: Sequence[dict], lambdas: Sequence[float]) -> list[dict]:
    """One row per model, arm and lambda; ``*_change``: minus the unchanged model's value."""
    rows = []
    for r in results:
        ref = r.get(REFERENCE)
        for arm in ARMS:
            for lam in lambdas:
                e = _entry(r, arm, lam)
                if not e:
                    continue
                rows.append({
                    "task": r["task"], "seed": r["seed"], "arm": arm, "lambda": lam,
                    "metric": e["metric"], "score": e["score"],
                    "score_change": _change(e, ref, "score"), "accuracy": e["accuracy"],
                    "n_eval": e["n_eval"], "drift": e["drift"]["mean"],
                    "drift_change": _change(e, ref, "drift"),
                    "forgetting": e.get("forgetting"),
                    "forgetting_change": _change(e, ref, "forgetting"),
                    "intruders": e["intruders"], "directions": e["directions"],
                    "modules_changed": e["modules_changed"],
                    "rescaled_sigma": e["rescaled_sigma"], "truncated": e["truncated"],
                    "intruders_after": e["intruders_after"], "n_drift": e["n_drift"]})
    return rows


def family(tasks: Sequence[str], lambdas: Sequence[float], measure: str, n_seeds: int,
           alpha: float = ALPHA) -> dict:
    """One measure's Bonferroni family, from the config alone: every task x lambda below 1,
    and the standardized difference (d_z) its paired t-test detects with 80% power."""
    members = [f"{t} λ={lam:g} {measure}" for t in tasks for lam in lambdas if lam != 1]
    size = len(members)
    detectable = (stats.paired_t_detectable_dz(n_seeds, alpha / size)
                  if size and n_seeds >= 2 else None)
    return {"measure": measure, "size": size, "members": members, "alpha": alpha,
            "n_seeds": n_seeds, "detectable_dz_80": detectable}


def contrasts(results: Sequence[dict], tasks: Sequence[str], lambdas: Sequence[float],
              measure_names: Sequence[str], n_seeds: int, alpha: float = ALPHA) -> dict:
    """Intruder arm minus control arm, per task, lambda and measure, paired by seed.

    ``results``: the per-model files (:func:`sweep_model`). Each row: the per-seed changes
    from the unchanged model of both arms, their differences, the mean difference, and the
    two-sided paired t-test across seeds with its Bonferroni correction (``family``: one per
    measure). At lambda = 1 the arms are one model: difference 0, ``tested`` False. Zero
    spread or fewer than 2 seeds: p undefined (None), never significant, kept in the family.
    """
    fams = {m: family(tasks, lambdas, m, n_seeds, alpha) for m in measure_names}
    rows = []
    for task in tasks:
        models = sorted((r for r in results if r["task"] == task), key=lambda r: r["seed"])
        for lam in lambdas:
            for m in measure_names:
                seeds, ci, cc = [], [], []
                for r in models:
                    ei, ec = _entry(r, INTRUDER, lam), _entry(r, CONTROL, lam)
                    if not (ei and ec):
                        continue
                    a, b = _change(ei, r.get(REFERENCE), m), _change(ec, r.get(REFERENCE), m)
                    if a is not None and b is not None:
                        seeds.append(r["seed"])
                        ci.append(a)
                        cc.append(b)
                diff = [a - b for a, b in zip(ci, cc)]
                row = {"task": task, "lambda": lam, "measure": m, "seeds": seeds,
                       "intruder_change": ci, "control_change": cc, "difference": diff,
                       "mean_difference": float(np.mean(diff)) if diff else None,
                       "sd_difference": float(np.std(diff, ddof=1)) if len(diff) > 1 else None,
                       "tested": lam != 1, "t": None, "p": None, "p_bonferroni": None,
                       "cohens_d": None, "significant": False, "zero_spread": False,
                       "n_tests": fams[m]["size"], "alpha": alpha, "note": None}
                if lam == 1:
                    row["note"] = ("λ = 1: both arms are the same model (difference 0 by "
                                   "construction)")
                elif len(diff) < 2:
                    row["note"] = f"{len(diff)} seed(s) with both arms measured: no test"
                elif stats.zero_spread(ci, cc):
                    row.update(zero_spread=True, note="zero spread: every seed's difference "
                               f"is {diff[0]:.4g}; p undefined, not significant")
                else:
                    t, p = stats.paired_ttest(ci, cc)
                    pb = float(stats.bonferroni(p, fams[m]["size"]))
                    row.update(t=t, p=p, p_bonferroni=pb, significant=bool(pb < alpha),
                               cohens_d=stats.cohens_d_paired(ci, cc))
                rows.append(row)
    return {"test": "two-sided paired t-test (intruder arm - control arm), paired by seed, "
                    "per task, λ and measure; Bonferroni within each measure's family",
            "families": fams, "rows": rows}


def write_outputs(run: RunDir, cfg, results: Sequence[dict]) -> list[dict]:
    lambdas = list(cfg.weights.sweep_lambdas)
    rows = sweep_rows(results, lambdas)
    write_csv(run.weightspace_sweep_csv, rows)
    atomic_write_json(run.weightspace_sweep_json, {
        "settings": settings(cfg), "lambdas": lambdas, "rows": rows,
        "references": [{"task": r["task"], "seed": r["seed"],
                        **{m: _value(r[REFERENCE], m) for m in ("score", "drift", "forgetting")},
                        "metric": r[REFERENCE]["metric"]}
                       for r in results if r.get(REFERENCE)],
        "contrasts": contrasts(results, list(cfg.tasks), lambdas, measures(cfg),
                               len(sweep_seeds(cfg))),
        "per_state": [{"task": r["task"], "seed": r["seed"], "arm": arm, "lambda": e["lambda"],
                       "drift": e["drift"]["per_state"]}
                      for r in results for arm in ARMS for e in r["arms"][arm].values()]})
    return rows


def sweep_seeds(cfg) -> list[int]:
    n = cfg.weights.sweep_seeds
    return list(cfg.seeds) if n == 0 else list(cfg.seeds)[:n]


def sweep_keys(ctx) -> list[tuple[str, int]]:
    """(task, seed) of the study's LoRA models the sweep takes: finished, of the selected
    tasks, of the seeds of ``weights.sweep_seeds`` (all by default; its jobs in the stage
    table)."""
    wanted = set(sweep_seeds(ctx.cfg))
    return [(t, s) for t, m, s in ctx.run.finished_jobs()
            if is_study_lora(m) and t in ctx.tasks and s in wanted]


def run_sweep(ctx, an_factory) -> list[dict]:
    """The sweep through the job queue (``an_factory()``: the weights stage's Analyzer)."""
    cfg, run = ctx.cfg, ctx.run
    keys = sweep_keys(ctx)
    tasks: dict = {}

    def one(p):
        an = an_factory()
        if p["task"] not in tasks:
            tasks[p["task"]] = TaskData(cfg, run, an.base, p["task"])
        res = sweep_model(an, run, tasks[p["task"]], p["task"], p["seed"], ctx.progress)
        ref = res[REFERENCE]
        for arm in ARMS:
            for lam in cfg.weights.sweep_lambdas:
                e = _entry(res, arm, lam)
                log.info(f"intervention sweep {p['task']}/lora-seed{p['seed']} {arm} "
                         f"lambda {lam:g}: intruders {e['intruders']}, rescaled "
                         f"{e['directions']}, left (eps 0.5) {e['intruders_after']}, "
                         f"{e['metric']} {e['score']:.4f} ({e['score'] - ref['score']:+.4f}), "
                         f"drift {e['drift']['mean']:.4g}"
                         + (f", forgetting {e['forgetting']:+.4f}" if "forgetting" in e else ""))

    ctx.run_queue("weights-sweep", one)  # jobs: sweep_keys; done: is_done (the stage table)
    results = [read_json(run.weightspace_sweep_path(t, s)) for t, s in keys
               if run.weightspace_sweep_path(t, s).is_file()]
    return write_outputs(run, cfg, results)
