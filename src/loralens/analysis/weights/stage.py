"""The weights stage (``loralens weights``): every finished model of the selected tasks
analysed by :mod:`.analyzer` through the job queue, then the study's outputs
(``RUN_DIR/weightspace/``), each method against the reference in a study of more
methods (:func:`.analyzer.method_summary`) and, where
``weights.sweep`` asks for it, the intruder sweep (:mod:`.intruder_sweep`).
"""

from __future__ import annotations

import logging

from loralens.analysis.weights.analyzer import (
    SUMMARY_EPSILON, Analyzer, analyze_job, load_results, method_summary,
    model_summary, summary_lines, write_outputs,
)
from loralens.analysis.weights.intruder_sweep import run_sweep
from loralens.models.methods import is_pair_study

log = logging.getLogger(__name__)


def run_weights(ctx) -> bool:
    """The stage (``ctx``: :class:`stages.Context`): every finished model of the selected
    tasks not analysed yet, through the job queue; then the outputs of all of them."""
    state: dict = {}

    def one(p):
        if "an" not in state:  # the base is loaded only when a model needs analysing
            state["an"] = Analyzer(ctx.cfg, ctx.base)
        r = analyze_job(state["an"], ctx.run, p["task"], p["method"], p["seed"], ctx.progress)
        s = model_summary(r)
        log.info(f"weights {p['task']}/{p['method']}-seed{p['seed']}: {len(r['matrices'])} "
                 f"matrices, own set {r['matrix_set']}: intruders (eps {SUMMARY_EPSILON:g}) "
                 f"{s.get('intruders', float('nan')):g}, "
                 f"|dW|/|W0| {s.get('rel_change', float('nan')):.3g}"
                 + (f", forgetting {s['forgetting']:+.4f} nats/token" if "forgetting" in s
                    else "")
                 + f" ({r['seconds']:.1f} s)")
        ctx.tick()

    # the jobs (every finished model of the selected tasks) and their done test
    # (analyzer.is_done) are the stage table's (loralens.study.stages)
    skipped = ctx.run_queue("weights", one)
    if skipped:
        log.info(f"weights: {len(skipped)} model(s) up to date in {ctx.run.weightspace_dir}")
    finished = ctx.run.finished_jobs()
    summary = write_outputs(ctx.run, load_results(ctx.run, finished), ctx.cfg.tasks,
                            ctx.cfg)
    log.info("\n".join(summary_lines(summary)))
    if not is_pair_study(ctx.cfg.methods):  # more methods: each vs the reference
        method_summary(ctx.cfg, ctx.run, load_results(ctx.run, finished))
        log.info(f"weights of {len(ctx.cfg.methods)} methods vs {ctx.cfg.reference_method}: "
                 f"{ctx.run.weightspace_methods_json}")
    if ctx.cfg.weights.sweep:  # the causal test (intruder_sweep.py): opt-in
        run_sweep(ctx, lambda: state.get("an") or state.setdefault(
            "an", Analyzer(ctx.cfg, ctx.base)))
    return True
