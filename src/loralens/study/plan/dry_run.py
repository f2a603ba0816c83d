"""Dry run: every stage's work and an estimated wall time, before a long run.

``loralens run --dry-run`` resolves the config as a run would, then:

1. counts each stage's work from the real config and the real data, the way the stage's
   own code does it (:func:`loralens.study.plan.work.count_work`): jobs, rows and real tokens
   through training (per method, with optimizer steps) and through forward-only passes
   (evaluations, extraction, serving), and the fresh copies of the base model each job
   loads;
2. measures this machine's throughput on the study's own model
   (:func:`loralens.study.plan.measure.measure`): a few forward + backward steps per method
   family (:func:`cost_basis`: full fine-tuning, and LoRA for every PEFT method) on real
   training rows of the first task, a no-grad forward at ``train.eval_batch_size``,
   and, for the serving benchmark, batch-1 forwards (in the serving dtype, and in float64
   for its identity checks);
3. turns work into FLOPs (``flops.train_flops_per_token``, ``forward_flops_per_token``:
   ``6 N`` / ``4 N + 2 n`` / ``2 N`` per real token) and FLOPs into seconds at the FLOP/s
   achieved in step 2, plus optimizer steps and model loads at their measured seconds
   (:func:`estimate`).

Nothing is written into the run directory (the base model's conversion cache is not in
it); ``--plan FILE`` writes the plan's estimates to FILE as JSON (:func:`plan_record`),
which ``loralens run --plan FILE`` stores in the run directory (:func:`adopt_plan`) so
that the report can show the estimate beside the actual wall time of each stage.

``--peak-gflops G`` plans for another machine (:func:`for_machine`): one whose float32
GEMM peak at the model's shapes is G GFLOP/s. This machine's peak at the same shapes is
measured with the throughput (``training.flops.model_gemm_peak_info``, in float32: the
measurement then trains in float32 too), and every compute-bound rate (training,
forward passes, optimizer steps) is scaled by G / that peak; loading the model (disk and
deserialisation) is not scaled, and tokenization is not counted at all.

Early stopping (``train.patience`` > 0) can end a fit at its ``1 + patience``-th
evaluation: where that can cut work, a stage's estimate is a range (``low_seconds`` to
``seconds``). Early stopping, pruning and the sanity check's early exit only shorten runs, and the
search's epochs are the largest of its choices: the work shown is an upper bound where a
stage may stop early, and the notes say where.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from loralens.core.config import StudyConfig
from loralens.core.errors import ConfigError
from loralens.models.methods import ADAPTER_KIND, FULL_KIND, Method, get_method, is_study_lora
from loralens.study.plan.measure import Throughput, measure
from loralens.study.plan.kernels import kernel_text
from loralens.study.plan.work import FORWARD_KINDS, ModelShapes, StageWork, count_work, plural
from loralens.study.stages import get_stage

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- estimate

def work_seconds(w: StageWork, tp: Throughput) -> float:
    """Seconds of ``w``: its FLOPs at the FLOP/s measured for each kind of work, plus
    optimizer steps, kernel calls (:mod:`loralens.study.plan.kernels`) and model loads at
    their measured seconds."""
    return (sum(v * tp.train_fpt[m] / tp.train_flops_s[m] for m, v in w.train_tokens.items())
            + sum(v * tp.forward_fpt / tp.forward_flops_s[k]
                  for k, v in w.forward_tokens.items())
            + sum(n * tp.step_s[m] for m, n in w.steps.items())
            + sum(n * tp.kernel_s[k] for k, n in w.kernels.items())
            + w.loads * tp.load_s)


def estimate(works: list[StageWork], tp: Throughput) -> list[StageWork]:
    """Fill each stage's FLOPs and seconds (:func:`work_seconds`), and the lower end
    ``low_seconds`` where early stopping may skip work (``StageWork.saved``)."""
    for w in works:
        if w.off or w.cheap:
            continue
        w.flops = float(sum(v * tp.train_fpt[m] for m, v in w.train_tokens.items())
                        + sum(v * tp.forward_fpt for v in w.forward_tokens.values()))
        w.seconds = work_seconds(w, tp)
        w.low_seconds = (w.seconds - work_seconds(w.saved, tp)
                         if w.saved is not None and w.saved.tokens else None)
    return works


def for_machine(tp: Throughput, peak_target: float) -> Throughput:
    """``tp`` (measured here, with ``tp.peak_here``, this machine's float32 model-shape
    peak) scaled to a machine whose peak at the same shapes is ``peak_target`` FLOP/s.

    Scaled by ``r = peak_target / peak_here`` (the same utilisation of a slower peak):
    training and forward FLOP/s (x r), optimizer steps and kernels (/ r: AdamW over the
    weights, eigensolvers and similarity measures are CPU work that a slower core also
    does slower; assumed, not measured). Not scaled:
    loading a model (reading the cached safetensors and building the module: disk and
    memory, not GEMMs)."""
    if not tp.peak_here or tp.peak_here <= 0:
        raise ValueError("for_machine needs this machine's measured peak (measure(peak=True))")
    r = peak_target / tp.peak_here
    return replace(tp, train_flops_s={m: v * r for m, v in tp.train_flops_s.items()},
                   forward_flops_s={k: v * r for k, v in tp.forward_flops_s.items()},
                   step_s={m: v / r for m, v in tp.step_s.items()},
                   kernel_s={k: v / r for k, v in tp.kernel_s.items()},
                   train_fpt=dict(tp.train_fpt), basis=dict(tp.basis), tokens=dict(tp.tokens),
                   peak_target=peak_target)


# Training cost per method family. The dry run times one representative per family and
# estimates the other methods from it (assumptions, not measurements):
# * full: timed (6N FLOPs per real token);
# * every PEFT method: timed as the study's ``lora`` (4N + 2n per token). Other ranks and
#   target modules, rsLoRA, PiSSA/OLoRA initialisation (an SVD/QR once per job, not per
#   token), LoRA+ and IA3 cost about as much per token: the frozen backbone's forward and
#   the backward through its activations dominate, the adapters are a few % of N;
# * DoRA: LoRA's FLOPs, DORA_SLOWDOWN x its seconds: PEFT's DoRA also forms W + s B A and
#   its column norms for every adapted weight at each forward (and backward), work that
#   4N + 2n does not count (assumed, not measured here);
# * head: only the head trains and nothing backpropagates into the frozen backbone: a
#   forward pass (2N per token) at the measured forward throughput; its optimizer step
#   (hidden x labels weights) is negligible.
DORA_SLOWDOWN = 1.3


def cost_basis(method: Method) -> tuple[str | None, float, str]:
    """How the dry run prices ``method``'s training: (the timed representative, ``full`` or
    ``lora``, None for forward-only; slowdown factor; the basis in words)."""
    if method.trains_all:
        return FULL_KIND, 1.0, "timed"
    if method.family == "head":
        return None, 1.0, "forward-only backbone (head-only training)"
    if method.peft.get("use_dora"):
        return ADAPTER_KIND, DORA_SLOWDOWN, f"LoRA's measured cost x {DORA_SLOWDOWN} (DoRA)"
    return ADAPTER_KIND, 1.0, "timed" if is_study_lora(method.name) else "LoRA's measured cost"


def per_method(tp: Throughput, basis: dict[str, tuple]) -> Throughput:
    """Replace the timed representatives' training figures by one entry per method
    (:func:`cost_basis`); ``tp.basis`` says how each was priced."""
    timed = {k: (tp.train_flops_s[k], tp.train_fpt[k], tp.step_s[k]) for k in tp.train_flops_s}
    tp.train_flops_s, tp.train_fpt, tp.step_s, tp.basis = {}, {}, {}, {}
    for m, (rep, slowdown, words) in basis.items():
        flops_s, fpt, step = (timed[rep] if rep else
                              (tp.forward_flops_s["batched"], tp.forward_fpt, 0.0))
        tp.train_flops_s[m], tp.train_fpt[m], tp.step_s[m] = flops_s / slowdown, fpt, step
        tp.basis[m] = words
    return tp


def needs(works: list[StageWork]) -> tuple[list[str], list[str]]:
    """(methods to time training for, forward kinds to time) for these stages' work."""
    methods = sorted({m for w in works if not w.off for m, v in w.train_tokens.items() if v})
    kinds = [k for k in FORWARD_KINDS
             if any(w.forward_tokens.get(k) for w in works if not w.off)]
    return methods, kinds


def plan_study(cfg: StudyConfig, stages: Sequence[str], base=None,
               log: Callable[[str], None] = lambda s: None,
               peak_gflops: float | None = None
               ) -> tuple[list[StageWork], Throughput | None]:
    """Count every stage's work on the real data, measure this machine, estimate (for a
    machine whose float32 model-shape peak is ``peak_gflops`` GFLOP/s when given:
    :func:`for_machine`; the measurement then computes in float32).

    Returns the stages' work (``flops`` and ``seconds`` filled where estimated) and the
    measurement (None when no selected stage computes with the model)."""
    from loralens.models.classifier import load_base
    from loralens.training.job import prepare_task

    entries = [get_stage(s) for s in stages]
    if all(e.cheap for e in entries):  # nothing to count on the data, nothing to measure
        return count_work(cfg, entries, None, {}), None
    base = base or load_base(cfg)
    log(f"dry run: tokenizing the data of {', '.join(cfg.tasks)} ...")
    prepared = {t: prepare_task(cfg, t, base.tokenizer) for t in cfg.tasks}
    works = count_work(cfg, entries, base.tokenizer, prepared, ModelShapes.of(base.backbone()))
    methods, kinds = needs(works)
    kernels = sorted({k for w in works if not w.off for k in w.kernels})
    if not (methods or kinds or kernels):
        return works, None
    basis = {m: cost_basis(get_method(m, cfg)) for m in methods}
    if any(rep is None for rep, _, _ in basis.values()) and "batched" not in kinds:
        kinds = [k for k in FORWARD_KINDS if k in kinds or k == "batched"]
    timed = sorted({rep for rep, _, _ in basis.values() if rep})
    if peak_gflops is None:
        tp = measure(cfg, base, prepared[cfg.tasks[0]], timed, kinds, log, kernels=kernels)
    else:  # the target's peak is a float32 peak: time float32 training here
        fp32 = replace(cfg, train=replace(cfg.train, precision="fp32"))
        tp = for_machine(measure(fp32, base, prepared[cfg.tasks[0]], timed, kinds, log,
                                 peak=True, kernels=kernels), peak_gflops * 1e9)
    return estimate(works, per_method(tp, basis)), tp


# --------------------------------------------------------------------------- text

def human(n: float) -> str:
    """1234 -> "1.2k", 5.6e6 -> "5.6M"."""
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.1f}{unit}"
    return f"{n:.0f}"


def duration_range(low: float | None, high: float | None) -> str:
    """"12-20 min" (both ends in the unit of the larger), or :func:`duration` of ``high``
    when there is no lower end or it rounds to the same."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return duration(high)
    lo, hi = duration(low), duration(high)
    if lo == hi:
        return hi
    if high < 90 or high >= 90 * 60:
        return f"{lo} - {hi}"
    return f"{low / 60:.0f}-{high / 60:.0f} min"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def format_plan(cfg: StudyConfig, works: list[StageWork], tp: Throughput | None,
                run_dir: str | Path | None = None) -> str:
    """The plan as plain text: one row per stage, a total, how throughput was measured,
    and what the numbers leave out."""
    head = f"dry run{f' of {run_dir}' if run_dir else ''}: nothing was run or written"
    lines = [head,
             f"model {cfg.model.name}; tasks {', '.join(cfg.tasks)}; methods "
             f"{', '.join(cfg.methods)}; seeds {', '.join(map(str, cfg.seeds))}"]
    if tp is not None and tp.peak_target is not None:
        lines += _for_machine_header(tp)
    lines.append("")
    rows = [("stage", "jobs", "rows", "tokens", "FLOPs", "est. time", "what")]
    for w in works:
        if w.off:
            rows.append((w.stage, "off", "-", "-", "-", "-", w.what))
        elif w.cheap:
            rows.append((w.stage, str(w.jobs), "-", "-", "-", "seconds", w.what))
        else:
            rows.append((w.stage, str(w.jobs), human(w.rows), human(w.tokens),
                         f"{w.flops:.1e}" if w.flops is not None else "-",
                         duration_range(w.low_seconds, w.seconds), w.what))
    on = [w for w in works if not (w.off or w.cheap)]
    total, low = totals(works)
    cheap = [w.stage for w in works if w.cheap]
    rows.append(("total", str(sum(w.jobs for w in works if not w.off)),
                 human(sum(w.rows for w in on)) if on else "-",
                 human(sum(w.tokens for w in on)) if on else "-",
                 f"{sum(w.flops or 0 for w in on):.1e}" if on else "-",
                 duration_range(low, total),
                 f"+ seconds for {', '.join(cheap)}" if cheap else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(wd) for c, wd in zip(r[1:6], widths[1:])]
        lines.append("  ".join(cells + [r[6]]).rstrip())
    lines.append("")
    if tp is not None:
        lines += _measured(tp)
    lines += _notes(cfg, works, run_dir)
    return "\n".join(lines)


def totals(works: list[StageWork]) -> tuple[float | None, float | None]:
    """(total estimated seconds, its lower end where early stopping may cut work; None
    when no stage can stop early) over the estimated stages."""
    on = [w for w in works if not (w.off or w.cheap) and w.seconds is not None]
    if not on:
        return None, None
    high = sum(w.seconds for w in on)
    if all(w.low_seconds is None for w in on):
        return high, None
    return high, sum(w.seconds if w.low_seconds is None else w.low_seconds for w in on)


def _for_machine_header(tp: Throughput) -> list[str]:
    r = tp.peak_target / tp.peak_here
    return [f"planned for ANOTHER machine: float32 peak at the model's shapes "
            f"{tp.peak_target / 1e9:.1f} GFLOP/s there vs {tp.peak_here / 1e9:.1f} GFLOP/s "
            f"measured here (ratio {r:.2f}); training and forward FLOP/s scaled by {r:.2f}, "
            f"optimizer steps by 1/{r:.2f}; model loads (disk) not scaled, tokenization not "
            "counted; measured in float32 (the target peak is a float32 peak)"]


def _measured(tp: Throughput) -> list[str]:
    scaled = tp.peak_target is not None
    out = [f"throughput measured in this process ({tp.device}, {plural(tp.threads, 'thread')}, "
           f"{tp.seconds:.0f} s) on {tp.model}, real {tp.task} training rows; "
           f"FLOPs = 6N (full) / 4N+2n (LoRA) / 2N (forward) per real token"
           + (f"; rates below scaled to the target machine (x {tp.peak_target / tp.peak_here:.2f})"
              if scaled else "") + ":"]
    for m, fs in tp.train_flops_s.items():
        out.append(f"  training {m}: {tp.tokens_s(m):.0f} tokens/s = {fs / 1e9:.1f} GFLOP/s "
                   f"on {tp.tokens['train']} tokens per step; optimizer step "
                   f"{tp.step_s[m]:.2f} s" + (f" ({tp.basis[m]})" if m in tp.basis else ""))
    for k, fs in tp.forward_flops_s.items():
        n = tp.tokens["batch1" if k == "float64" else k]
        out.append(f"  scoring, {FORWARD_KINDS[k]}: {tp.tokens_s(k):.0f} tokens/s = "
                   f"{fs / 1e9:.1f} GFLOP/s on {n} tokens")
    for k, sec in tp.kernel_s.items():
        out.append(f"  {kernel_text(k)}: {sec * 1e3:.1f} ms (timed on random arrays of "
                   "its shape)")
    out.append(f"  loading a fresh copy of the base model: {tp.load_s:.1f} s (once per model "
               "built)")
    if tp.contention is not None and tp.contention > 0.1:
        out.append(f"  other processes used {tp.contention:.0%} of this machine's CPU meanwhile: "
                   "the estimate holds under that load (shared cores slow torch down a lot)")
        if tp.peak_target is not None:
            out.append("  ... and the plan for another machine is pessimistic under it: the peak "
                       "is the best of short repeats, which catch the moments the cores are "
                       "free, while multi-second training steps cannot (measure it idle)")
    return out


def _notes(cfg: StudyConfig, works: list[StageWork], run_dir) -> list[str]:
    from loralens.core.run_dir import RunDir

    names = {w.stage for w in works if not w.off}
    notes = ["rows and tokens count every pass (each epoch, each evaluation); tokens are real "
             "tokens (padding is work too: the estimate's throughput includes it)"]
    if "sanity" in names:
        notes.append(f"sanity: from 1 epoch to {cfg.sanity.epochs}: it stops once the "
                     f"training loss < {cfg.sanity.loss_threshold}")
    if {"search", "train"} & names:
        bound = ("the search's largest epoch choice and smallest batch size "
                 f"(epochs {cfg.search.epochs}), since training uses the best trial's"
                 if cfg.search.searches("epochs", "batch_size")
                 else f"train.epochs={cfg.train.epochs}")
        prune = "search" in names and cfg.search.enabled and cfg.search.prune
        ranged = any(w.low_seconds is not None for w in works
                     if w.stage in ("search", "train"))
        stop = (f"early stopping (patience {cfg.train.patience}) can end a fit at its "
                f"{1 + cfg.train.patience}th evaluation: the range's lower end"
                if ranged else f"early stopping (patience {cfg.train.patience}) cannot end "
                "a fit before its last evaluation here: no range")
        notes.append(f"search/train: upper bounds: {bound}; {stop}"
                     + ("; pruning cuts trials short" if prune else ""))
    if "bench" in names:
        notes.append("bench: float64 identity checks timed at batch 1; latency timing "
                     "overheads not counted")
    uncounted = "tokenization, saving models, Optuna, drift's tests and report (seconds each)"
    if "weights" in names and cfg.weights.sweep:
        uncounted += "; the weights stage's intervention sweep (weights.sweep)"
    notes.append(f"not counted: {uncounted}")
    if run_dir is not None and RunDir(run_dir).is_run_dir():
        notes.append(f"{run_dir} exists: a run skips the work it finished; counted here "
                     "in full")
    return ["notes:"] + [f"  - {n}" for n in notes]


def dry_run(cfg: StudyConfig, stages: Sequence[str], run_dir: str | Path | None = None,
            peak_gflops: float | None = None, plan_file: str | Path | None = None) -> str:
    """``loralens run --dry-run``: the plan of ``stages`` as text (progress logged at INFO),
    for every method of the study (:func:`cost_basis` prices each family); for a machine
    with a float32 model-shape peak of ``peak_gflops`` GFLOP/s when given
    (:func:`for_machine`); its estimates written to ``plan_file`` (JSON,
    :func:`plan_record`) when given."""
    works, tp = plan_study(cfg, stages, log=log.info, peak_gflops=peak_gflops)
    if plan_file is not None:
        from loralens.core.files import atomic_write_json

        atomic_write_json(Path(plan_file), plan_record(works, tp))
    return format_plan(cfg, works, tp, run_dir)


# --------------------------------------------------------------------------- record

PLAN_VERSION = 1


def plan_record(works: list[StageWork], tp: Throughput | None) -> dict:
    """The plan's estimates as JSON: per stage ``seconds`` (upper end), ``low_seconds``
    (lower end where early stopping may cut work, else null), ``off``/``cheap`` (why no
    estimate); the totals; the CPU it was measured on and, when planned for another
    machine, both peaks (FLOP/s)."""
    from loralens.core.run_dir import cpu_model

    high, low = totals(works)
    return {"version": PLAN_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu": cpu_model(), "device": tp.device if tp else None,
            "contention": tp.contention if tp else None,
            "peak_here": tp.peak_here if tp else None,
            "peak_target": tp.peak_target if tp else None,
            "stages": {w.stage: {"seconds": w.seconds, "low_seconds": w.low_seconds,
                                 "off": w.off, "cheap": w.cheap} for w in works},
            "total_seconds": high, "total_low_seconds": low}


def adopt_plan(run, plan_file: str | Path) -> bool:
    """Store the plan ``plan_file`` (written by ``run --dry-run --plan``) as the run
    directory's ``plan.json`` (``RunDir.plan_path``). The first plan is kept: a run
    directory's timings add up over its invocations, so the plan made before its first
    invocation is the one they compare with; a later plan is not stored (logged).
    Returns whether it was stored."""
    from loralens.core.files import atomic_write_json, read_json

    path = run.plan_path
    if path.exists():
        log.warning(f"{path} exists (the plan of this run directory's first invocation): "
                    f"kept; {plan_file} not stored")
        return False
    if not Path(plan_file).is_file():
        raise ConfigError(f"--plan: {plan_file} does not exist (write it with `loralens run "
                          "--dry-run --plan FILE`)", "--plan")
    record = read_json(Path(plan_file))
    if not isinstance(record, dict) or not isinstance(record.get("stages"), dict):
        raise ConfigError(f"--plan: {plan_file} is not a plan written by `loralens run "
                          "--dry-run --plan`", "--plan")
    atomic_write_json(path, record)
    return True
