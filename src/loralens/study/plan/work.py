"""Dry run, step 1: each stage's work, counted from the real config and the real data the
way the stage's own code does it (:func:`count_work`): jobs, rows and real tokens through
training (per method, with optimizer steps) and through forward-only passes (evaluations,
extraction, serving), and the fresh copies of the base model each job loads.

Rows and tokens count every pass. Early stopping, pruning and the sanity check's early
exit only shorten runs, and the search's epochs are the largest of its choices: the work
counted is an upper bound where a stage may stop early (:mod:`loralens.study.plan.dry_run`'s notes say
where).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from loralens.training import batches as B
from loralens.core.config import StudyConfig

FORWARD_KINDS = {"batched": "forward", "batch1": "forward, batch 1",
                 "float64": "forward, batch 1, float64"}


@dataclass
class StageWork:
    """One stage's work. Rows and tokens count every pass: a row trained for 3 epochs
    counts 3 times, an evaluation's rows count once per evaluation."""

    stage: str
    what: str = ""
    jobs: int = 0
    rows: int = 0
    train_tokens: dict[str, int] = field(default_factory=dict)    # method -> real tokens
    steps: dict[str, int] = field(default_factory=dict)           # method -> optimizer steps
    forward_tokens: dict[str, int] = field(default_factory=dict)  # FORWARD_KINDS key -> tokens
    loads: int = 0            # fresh copies of the base model built
    off: str = ""             # why the stage does no work ("" = it runs)
    cheap: str = ""           # why there is no estimate (report: seconds)
    # calls of kernels timed apart (plan.kernels: weights' eigenproblems, drift's measures)
    kernels: dict[tuple, int] = field(default_factory=dict)
    flops: float | None = None
    seconds: float | None = None
    # the part of this work early stopping may skip (every fit stopped at its earliest
    # possible evaluation): the estimate's lower end is ``seconds`` minus its seconds
    saved: "StageWork | None" = None
    low_seconds: float | None = None

    @property
    def tokens(self) -> int:
        return sum(self.train_tokens.values()) + sum(self.forward_tokens.values())

    def train(self, method: str, tokens: float, rows: int, steps: int) -> None:
        self.train_tokens[method] = self.train_tokens.get(method, 0) + int(round(tokens))
        self.steps[method] = self.steps.get(method, 0) + steps
        self.rows += rows

    def forward(self, kind: str, tokens: float, rows: int) -> None:
        self.forward_tokens[kind] = self.forward_tokens.get(kind, 0) + int(round(tokens))
        self.rows += rows

    def scaled(self, k: int) -> "StageWork":
        """This work done ``k`` times (jobs, rows, tokens, steps, loads, what early stopping
        may skip)."""
        return replace(self, jobs=self.jobs * k, rows=self.rows * k, loads=self.loads * k,
                       train_tokens={m: v * k for m, v in self.train_tokens.items()},
                       steps={m: v * k for m, v in self.steps.items()},
                       forward_tokens={m: v * k for m, v in self.forward_tokens.items()},
                       kernels={m: v * k for m, v in self.kernels.items()},
                       saved=self.saved.scaled(k) if self.saved is not None else None)

    def add(self, other: "StageWork") -> None:
        if other.saved is not None:
            if self.saved is None:
                self.saved = StageWork(self.stage)
            self.saved.add(other.saved)
        self.jobs += other.jobs
        self.loads += other.loads
        self.rows += other.rows
        for m, v in other.train_tokens.items():
            self.train_tokens[m] = self.train_tokens.get(m, 0) + v
        for m, v in other.steps.items():
            self.steps[m] = self.steps.get(m, 0) + v
        for k, v in other.forward_tokens.items():
            self.forward_tokens[k] = self.forward_tokens.get(k, 0) + v
        for k, v in other.kernels.items():
            self.kernels[k] = self.kernels.get(k, 0) + v


def _fit_pass(lengths: np.ndarray, tc, early_stop: bool, stop_after: int | None
              ) -> tuple[float, int, int, int]:
    """(training tokens, rows, optimizer steps, evaluations) of one ``loop.fit`` run that
    stops after its ``stop_after``-th early-stopping evaluation (None: runs to the end)."""
    from loralens.training.loop import eval_interval, steps_per_epoch

    n = len(lengths)
    per_epoch, interval = steps_per_epoch(n, tc), eval_interval(n, tc)
    steps = evals = rows = 0
    tokens = 0.0
    for _ in range(tc.epochs):
        k, stop = 0, False
        for k in range(1, per_epoch + 1):
            steps += 1
            capped = bool(tc.max_steps and steps >= tc.max_steps)
            if early_stop and (k % interval == 0 or k == per_epoch or capped):
                evals += 1
                stop = stop_after is not None and evals >= stop_after
            if capped or stop:
                break
        done = n if k == per_epoch else min(n, k * tc.batch_size * tc.grad_accum)
        rows += done
        tokens += float(lengths.sum()) * done / max(n, 1)
        if stop or (tc.max_steps and steps >= tc.max_steps):
            break
    return tokens, rows, steps, evals


def fit_work(w: StageWork, method: str, lengths: np.ndarray, tc,
             early_stop: np.ndarray | None = None) -> int:
    """Add one ``loop.fit`` run to ``w`` (every epoch, no early stop), as fit steps it:
    ``steps_per_epoch`` optimizer steps per epoch, ``train.max_steps`` respected, an
    early-stopping evaluation of ``early_stop`` rows every ``eval_interval`` steps and at
    the last step of each epoch. Returns the number of evaluations.

    With early stopping on (``early_stop`` rows and ``train.patience`` > 0) the run can
    end at its ``1 + patience``-th evaluation at the earliest (the first evaluation always
    improves on nothing; ``patience`` evaluations without improvement follow): the work
    after that point goes into ``w.saved``, the lower end of the estimate's range."""
    tokens, rows, steps, evals = _fit_pass(lengths, tc, early_stop is not None, None)
    w.train(method, tokens, rows, steps)
    if early_stop is not None and evals:
        w.forward("batched", evals * float(early_stop.sum()), evals * len(early_stop))
    if early_stop is not None and tc.patience > 0 and evals > 1 + tc.patience:
        t2, r2, s2, e2 = _fit_pass(lengths, tc, True, 1 + tc.patience)
        if w.saved is None:
            w.saved = StageWork(w.stage)
        w.saved.train(method, tokens - t2, rows - r2, steps - s2)
        w.saved.forward("batched", (evals - e2) * float(early_stop.sum()),
                        (evals - e2) * len(early_stop))
    return evals


@dataclass(frozen=True)
class ModelShapes:
    """What the weights and drift stages' kernels depend on in the model: its backbone's
    linear layers (name -> weight shape ``(out, in)``), the hidden states it returns
    (embedding output + one per block) and their width."""

    linear: dict[str, tuple[int, int]]
    n_states: int
    hidden: int

    @classmethod
    def of(cls, backbone) -> "ModelShapes":
        from torch import nn

        cfg = backbone.config
        return cls({n: tuple(m.weight.shape) for n, m in backbone.named_modules()
                    if isinstance(m, nn.Linear)},
                   int(cfg.num_hidden_layers) + 1, int(cfg.hidden_size))


def count_work(cfg: StudyConfig, stages: Sequence, tokenizer, prepared: dict,
               model: ModelShapes | None = None) -> list[StageWork]:
    """Each stage's work (``stages``: entries of the stage table, whose ``work`` is one of the
    counts below), from the config and the tasks' data (``prepared``: task ->
    :class:`loralens.training.job.Prepared`) and the model's shapes (``model``: None
    leaves the weights and drift stages' kernels uncounted), as the stage's code does it."""
    return [s.work(cfg, tokenizer, prepared, model) for s in stages]


def _pairs(cfg: StudyConfig) -> list[tuple[str, str]]:
    return [(t, m) for t in cfg.tasks for m in cfg.methods]


def plural(k: int, noun: str) -> str:
    """``plural(2, "task")`` -> "2 tasks", ``plural(1, "epoch")`` -> "1 epoch"."""
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _per_task(values: dict[str, object]) -> str:
    """``{"mrpc": 128, "sst2": 384}`` -> "mrpc 128, sst2 384" ("128" when all are equal)."""
    shown = {str(v) for v in values.values()}
    if len(shown) == 1:
        return shown.pop()
    return ", ".join(f"{t} {v}" for t, v in values.items())


def sanity(cfg, tokenizer, prepared, model=None) -> StageWork:
    from loralens.training.sanity import sanity_rows

    sc = cfg.sanity
    tc = replace(cfg.train, epochs=sc.epochs, batch_size=sc.batch_size, grad_accum=1,
                 max_steps=0, patience=0, eval_every=0)
    w, rows = StageWork("sanity"), {}
    for t, m in _pairs(cfg):
        tiny = sanity_rows(prepared[t].train, sc.examples)
        rows[t] = len(tiny)
        fit_work(w, m, tiny.lengths, tc)
        if sc.epochs > 1:  # it stops once the loss is below the threshold: 1 epoch at least
            tokens, n, steps, _ = _fit_pass(tiny.lengths, tc, False, None)
            one = _fit_pass(tiny.lengths, replace(tc, epochs=1), False, None)
            if w.saved is None:
                w.saved = StageWork(w.stage)
            w.saved.train(m, tokens - one[0], n - one[1], steps - one[2])
        w.jobs += 1
        w.loads += 1
    w.what = (f"{w.jobs} (task, method) overfit {_per_task(rows)} training rows, "
              f"<= {plural(sc.epochs, 'epoch')}")
    return w


def search(cfg, tokenizer, prepared, model=None) -> StageWork:
    from loralens.training.job import prepare_task
    from loralens.training.search import trial_bounds, trial_config

    sc = cfg.search
    w = StageWork("search")
    if not sc.enabled:
        w.off = "search.enabled=false"
        w.what = "off: training uses the config's hyperparameters"
        return w
    # A trial trains on the rows search.trial_config gives it and is scored on
    # search.eval_size selection rows (search.run_search).
    tcfg = trial_config(cfg)
    rows, evals = {}, {}
    for t in cfg.tasks:
        p = prepared[t] if tcfg is cfg else prepare_task(tcfg, t, tokenizer)
        eval_enc = B.encode_split(tokenizer, p.selection_rows(sc.eval_size, cfg.data.subset_seed),
                                  cfg.data.max_length)
        rows[t], evals[t] = len(p.train), len(eval_enc)
        for m in cfg.methods:
            # upper bounds: the largest epoch choice, the smallest batch (most steps, evals)
            epochs, batch = trial_bounds(cfg, m)
            trial_tc = replace(cfg.train, epochs=epochs, batch_size=batch)
            trial = StageWork("search", jobs=1, loads=1)
            fit_work(trial, m, p.train.lengths, trial_tc, eval_enc.lengths)
            trial.forward("batched", float(eval_enc.lengths.sum()), len(eval_enc))
            w.add(trial.scaled(sc.trials))
    most = max(trial_bounds(cfg, m)[0] for m in cfg.methods)
    w.what = (f"{len(_pairs(cfg))} (task, method) x {sc.trials} trials: {_per_task(rows)} rows "
              f"x <= {plural(most, 'epoch')}, scored on {_per_task(evals)} "
              "selection rows")
    return w


def train_settings(cfg: StudyConfig, method: str):
    """The ``TrainConfig`` a training job runs with, as far as it is known before the
    search: with the search on, its largest epoch choice and smallest batch (bounds)."""
    from loralens.training.search import trial_bounds

    if not cfg.search.enabled:
        return cfg.train
    epochs, batch = trial_bounds(cfg, method)
    return replace(cfg.train, epochs=epochs, batch_size=batch)


def train(cfg, tokenizer, prepared, model=None) -> StageWork:
    w = StageWork("train")
    rows, epochs = {}, set()
    for t, m in _pairs(cfg):
        p, tc = prepared[t], train_settings(cfg, m)
        job = StageWork("train", jobs=1, loads=1)
        fit_work(job, m, p.train.lengths, tc, p.early_stop.lengths)
        # then the whole validation split, scored once (train.train_job)
        job.forward("batched", float(p.val.lengths.sum()), len(p.val))
        w.add(job.scaled(len(cfg.seeds)))
        rows[t], epochs = len(p.train), epochs | {tc.epochs}
    first = prepared[cfg.tasks[0]]
    w.what = (f"{plural(len(cfg.tasks), 'task')} x {plural(len(cfg.methods), 'method')} x "
              f"{plural(len(cfg.seeds), 'seed')}: "
              f"{_per_task(rows)} rows x {'/'.join(map(str, sorted(epochs)))} epoch(s), "
              f"early-stop evals of {len(first.early_stop)} rows, validation once")
    return w


def _extract_encoded(cfg, tokenizer, prepared, task: str):
    from loralens.analysis.extract import sample_split

    ec = cfg.extract
    return B.encode_split(tokenizer, sample_split(prepared[task].val_split, ec.examples, ec.seed),
                          cfg.data.max_length)


def extract(cfg, tokenizer, prepared, model=None) -> StageWork:
    w, rows = StageWork("extract"), {}
    models = 1 + len(cfg.methods) * len(cfg.seeds)   # the base and every trained model
    for t in cfg.tasks:
        enc = _extract_encoded(cfg, tokenizer, prepared, t)
        w.forward("batched", models * float(enc.lengths.sum()), models * len(enc))
        w.jobs += 1
        w.loads += models
        rows[t] = len(enc)
    w.what = f"{models} models per task x {_per_task(rows)} validation rows, forward"
    return w


def drift(cfg, tokenizer, prepared, model=None) -> StageWork:
    """The drift stage (analysis/drift): per task, every model's measures against the base
    at every hidden state and the seed floor's pairs (:func:`kernels.count_drift`), timed
    as kernels; without the model's shapes or the data (a plan of cheap stages only) no
    estimate ("seconds")."""
    from loralens.study.plan.kernels import add_calls, count_drift

    models = len(cfg.methods) * len(cfg.seeds)
    w = StageWork("drift", jobs=len(cfg.tasks),
                  what=f"{models} models per task vs the base: CKA, cosine, tests")
    if model is None or tokenizer is None:
        w.cheap = "arithmetic on pooled arrays"
        return w
    for t in cfg.tasks:
        n = len(_extract_encoded(cfg, tokenizer, prepared, t))
        add_calls(w.kernels, count_drift(cfg, n, model.n_states, model.hidden))
    return w


def weights(cfg, tokenizer, prepared, model=None) -> StageWork:
    """The weights stage (weights.py): every trained model loaded once, its analysed
    matrices' eigenproblems and the base's SVDs (:func:`kernels.count_weights`, timed as
    kernels; not counted without the model's shapes) and, with forgetting, a forward pass
    over the general-text sample (and one for the base per task). The intervention sweep
    (``weights.sweep``) is not counted."""
    from loralens.analysis.weights.forgetting import encode_texts, text_sample
    from loralens.study.plan.kernels import count_weights

    wc, models = cfg.weights, len(cfg.methods) * len(cfg.seeds)
    w = StageWork("weights", what=f"{models} models per task: intruders and spectra of the "
                                  "analysed matrices" + (", forgetting" if wc.forgetting else ""))
    if model is not None:
        w.kernels = count_weights(cfg, model.linear)
    for t in cfg.tasks:
        w.jobs += models
        w.loads += models + 1
        if wc.forgetting:
            ids = encode_texts(tokenizer, text_sample(t, wc, cfg.data.glue_dir).texts,
                               wc.forgetting_max_length)
            n_tok = float(sum(len(x) for x in ids))
            w.forward("batched", (models + 1) * n_tok, (models + 1) * len(ids))
    return w


def report(cfg, tokenizer, prepared, model=None) -> StageWork:
    return StageWork("report", jobs=1, cheap="reads the run directory",
                     what="Markdown + HTML from the run directory's files")


def bench(cfg, tokenizer, prepared, model=None) -> StageWork:
    """The serving benchmark (serving/bench*.py, identity.py): per task and benchmarked
    seed every served kind of every method at each batch size (warm-up requests included;
    the kinds of :func:`loralens.models.serving_paths.serving_kinds`), several adapters our runtime
    serves exactly on one base, and the identity checks of every adapter (float64 and the
    serving dtype)."""
    from loralens.models.methods import get_method
    from loralens.serving.bench.multi import choose_adapters
    from loralens.models.serving_paths import lean_inexact, serving_kinds
    from loralens.tasks.registry import get_task

    bc, w = cfg.bench, StageWork("bench", jobs=1)
    seeds = [s for s in cfg.seeds if not bc.seeds or s in bc.seeds]
    if not seeds:
        w.off = f"bench.seeds {bc.seeds} holds no training seed"
        w.what = "off: no model to benchmark"
        return w
    sizes = sorted(set(bc.batch_sizes))
    methods = {m: get_method(m, cfg) for m in cfg.methods}
    kinds = sum(len(serving_kinds(x)) for x in methods.values())
    adapters = [m for m, x in methods.items() if x.is_adapter]
    lean = [m for m in adapters if lean_inexact(methods[m]) is None]
    enc = {t: B.encode_split(tokenizer, prepared[t].val_split.subset(
        bc.requests, cfg.data.subset_seed), cfg.data.max_length).lengths.tolist()
        for t in cfg.tasks}

    def requests(lengths: list[int], batch: int) -> list[list[int]]:
        return [lengths[i:i + batch] for i in range(0, len(lengths), batch)]

    def warm(reqs: list, n: int) -> list:  # time_interleaved's warm-up: n calls, cycling
        return [reqs[i % len(reqs)] for i in range(n)]

    def serve(reqs: list[list[int]], passes: int, kind: str | None = None) -> None:
        """``passes`` models serve ``reqs`` (each a list of row lengths)."""
        if reqs:
            kind = kind or ("batch1" if max(map(len, reqs)) == 1 else "batched")
            w.forward(kind, passes * sum(map(sum, reqs)), passes * sum(map(len, reqs)))

    for t in cfg.tasks:  # bench_task: every served kind of every (task, seed)
        for _ in seeds:
            w.loads += kinds
            serve(requests(enc[t], sizes[0])[:bc.warmup], kinds)   # warm-up while loaded
            for b in sizes:
                reqs = requests(enc[t], b)
                serve(reqs + warm(reqs, bc.warmup), kinds)
    checked = [(t, m) for t in cfg.tasks for m in adapters for _ in seeds]
    chosen = choose_adapters(list(cfg.tasks), [(t, m, s) for t in cfg.tasks for m in lean
                                                for s in seeds], lean)
    peft = len({get_task(t).num_labels for t, _, _ in chosen}) == 1  # heads of one shape

    def round_robin(n: int) -> list[int]:  # row j: adapter j mod k, example j div k
        return [enc[chosen[j % len(chosen)][0]][j // len(chosen)]
                for j in range(n * len(chosen))]

    if len(chosen) >= 2:  # bench_multi: our runtime, PEFT, a merged model for reference
        rows = round_robin(min(len(enc[t]) for t, _, _ in chosen))
        for reqs, passes in ((requests(rows, 1), 1 + peft),
                             (requests(rows, bc.mixed_batch_size), 2 + peft)):
            serve(reqs + warm(reqs, min(bc.warmup, len(reqs))), passes)
        w.loads += 1 + peft
    # identity: float64 (the verdict), then the serving dtype; per adapter its first
    # examples at batch 1 (the reference), then the merged model and, for the methods it
    # serves, our runtime
    ident = bc.identity_examples
    for dtype in ("float64", None):
        for t, m in checked:
            serve(requests(enc[t][:ident], 1), 1, dtype)
            for b in sizes:
                serve(requests(enc[t][:ident], b), 1 + (m in lean), dtype)
            w.loads += 1
        if len(chosen) >= 2:
            rows = round_robin(min(len(enc[t][:ident]) for t, _, _ in chosen))
            for b in (1, bc.mixed_batch_size):  # stream, mixed: our runtime and PEFT
                serve(requests(rows, b), 1 + peft, dtype)
            w.loads += 1 + peft
    w.what = (f"{plural(len(cfg.tasks), 'task')} x {plural(len(seeds), 'seed')} x {kinds} served "
              f"models x {_per_task({t: len(e) for t, e in enc.items()})} requests at batch "
              f"{'/'.join(map(str, sizes))}, several adapters, identity checks")
    return w
