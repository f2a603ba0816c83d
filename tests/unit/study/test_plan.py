"""``loralens run --dry-run`` (loralens.study.plan.dry_run): each stage's work is counted as the stage
does it, checked against hand counts on the tiny random model's byte tokenizer (a text
of b UTF-8 bytes is b tokens, a pair ``<s> s1 </s> s2``); the estimate is positive and
finite; and a dry run leaves no trace in the run directory."""

import math

import numpy as np
import pytest

from loralens import cli
from loralens.study.plan import dry_run as plan, work as plan_work
from loralens.study.config import load_config
from loralens.core.run_dir import RunDir
from loralens.training.job import prepare_task
from loralens.study.stages import get_stage

from tests.helpers.plan import PLAN, hand_tokens



@pytest.fixture(scope="module")
def setup(glue_dir, tiny_tokenizer):
    cfg = load_config(overrides=PLAN + [f"data.glue_dir={glue_dir}"])
    prepared = {t: prepare_task(cfg, t, tiny_tokenizer) for t in cfg.tasks}
    stages = ["sanity", "search", "train", "extract", "drift", "bench", "report"]
    works = {w.stage: w for w in
             plan_work.count_work(cfg, [get_stage(s) for s in stages], tiny_tokenizer, prepared)}
    return cfg, prepared, works


def tokens_of(rows, cfg) -> int:
    return sum(hand_tokens(e, cfg.data.max_length) for e in rows)


def test_hand_count_matches_the_tokenizer(setup):
    cfg, prepared, _ = setup
    p = prepared["mrpc"]
    assert p.train.lengths.tolist() == [hand_tokens(e, cfg.data.max_length)
                                        for e in p.train_split.examples]


def test_train_stage_counts_every_job_epoch_and_evaluation(setup):
    cfg, prepared, works = setup
    w, tc = works["train"], cfg.train
    assert w.jobs == len(cfg.tasks) * len(cfg.methods) * len(cfg.seeds) == 8
    assert w.loads == 8
    per_seed = {t: tokens_of(p.train_split.examples, cfg) for t, p in prepared.items()}
    for m in cfg.methods:
        assert w.train_tokens[m] == sum(per_seed.values()) * tc.epochs * len(cfg.seeds)
        # 8 rows in batches of 4: 2 optimizer steps per epoch
        assert w.steps[m] == len(cfg.tasks) * 2 * tc.epochs * len(cfg.seeds)
    # 2 steps per epoch, 2 evaluations per epoch -> one every step: 4 early-stopping
    # evaluations per job, then the whole validation split once
    forward = 0
    for t, p in prepared.items():
        by_id = {e.id: e for e in p.selection_split.examples}
        early = tokens_of([by_id[i] for i in p.early_stop.ids], cfg)
        assert len(p.early_stop) == 8
        forward += (4 * early + tokens_of(p.val_split.examples, cfg)) * 4  # 2 methods x 2 seeds
    assert w.forward_tokens == {"batched": forward}
    rows = sum((8 * tc.epochs + 4 * 8 + len(p.val_split)) * 4 for p in prepared.values())
    assert w.rows == rows


def test_sanity_and_extract_counts(setup):
    cfg, prepared, works = setup
    from loralens.training.sanity import sanity_rows

    w = works["sanity"]
    assert w.jobs == 4 and w.loads == 4 and not w.forward_tokens
    for m in cfg.methods:
        hand = 0
        for t, p in prepared.items():
            ids = set(sanity_rows(p.train, 4).ids.tolist())
            assert len(ids) == 4
            hand += tokens_of([e for e in p.train_split.examples if e.id in ids], cfg)
        assert w.train_tokens[m] == hand * cfg.sanity.epochs
        assert w.steps[m] == len(cfg.tasks) * 2 * cfg.sanity.epochs   # 4 rows, batches of 2

    w = works["extract"]
    models = 1 + len(cfg.methods) * len(cfg.seeds)                    # the base + 4 trained
    sample = {t: p.val_split.subset(8, cfg.extract.seed).examples for t, p in prepared.items()}
    assert w.forward_tokens == {"batched": models * sum(tokens_of(s, cfg)
                                                        for s in sample.values())}
    assert w.rows == models * 8 * len(cfg.tasks) and w.loads == models * len(cfg.tasks)


def test_bench_counts_served_requests_and_identity_checks(glue_dir, tiny_tokenizer):
    base = PLAN + [f"data.glue_dir={glue_dir}", "tasks=[rte]", "bench.requests=4",
                   "bench.warmup=1", "bench.mixed_batch_size=2"]
    cfg = load_config(overrides=base + ["methods=[full]", "seeds=[42]",
                                        "bench.batch_sizes=[1, 2]"])
    p = prepare_task(cfg, "rte", tiny_tokenizer)
    rows = [hand_tokens(e, cfg.data.max_length)
            for e in p.val_split.subset(4, cfg.data.subset_seed).examples]
    total, first, second = sum(rows), rows[0], rows[1]
    (w,) = plan_work.count_work(cfg, [get_stage("bench")], tiny_tokenizer, {"rte": p})
    # one full model: a warm-up request while loaded, then 4 requests + 1 warm-up at
    # batch 1 and 2 requests + 1 warm-up (rows 0-1) at batch 2; no adapter, no identity
    assert w.forward_tokens == {"batch1": total + 2 * first,
                                "batched": total + first + second}
    assert w.loads == 1

    cfg = load_config(overrides=base + ["methods=[lora]", "seeds=[42, 1337]",
                                        "bench.batch_sizes=[1]"])
    (w,) = plan_work.count_work(cfg, [get_stage("bench")], tiny_tokenizer, {"rte": p})
    # per seed 3 LoRA kinds (separate, merged, runtime): 1 warm-up request while loaded,
    # then 4 requests + 1 warm-up; several adapters (the 2 seeds, 8 rows round robin):
    # stream (runtime, PEFT) 8 + 1 warm-up, mixed in pairs (+ merged) 4 + 1 warm-up;
    # identity (per dtype): per adapter the reference and 2 paths over its 4 rows, then
    # stream and mixed over the 8 rows through 2 paths
    assert w.forward_tokens == {
        "batch1": 2 * 3 * (total + 2 * first) + 2 * (2 * total + first)
                  + 2 * 3 * total + 2 * 2 * total,
        "batched": 3 * (2 * total + 2 * first) + 2 * 2 * total,
        "float64": 2 * 3 * total + 2 * (2 * total) + 2 * (2 * total)}
    assert w.loads == 2 * 3 + 2 + 2 * (2 + 2)


def test_disabled_and_cheap_stages(setup):
    cfg, _, works = setup
    assert works["search"].off and works["search"].tokens == 0
    assert works["drift"].cheap and works["report"].cheap
    assert works["bench"].tokens > 0 and not works["bench"].off
    text = plan.format_plan(cfg, list(works.values()), None)
    line = next(ln for ln in text.splitlines() if ln.startswith("search "))
    assert line.split()[1] == "off"


def test_search_counts_trials(glue_dir, tiny_tokenizer):
    cfg = load_config(overrides=[o for o in PLAN if not o.startswith("search.")] + [
        f"data.glue_dir={glue_dir}", "search.trials=3", "search.train_size=6",
        "search.eval_size=5", "search.epochs=[1, 2]", "search.batch_lora=[2, 4]",
        "search.batch_full=[3]"])
    prepared = {t: prepare_task(cfg, t, tiny_tokenizer) for t in cfg.tasks}
    (w,) = plan_work.count_work(cfg, [get_stage("search")], tiny_tokenizer, prepared)
    assert w.jobs == len(cfg.tasks) * len(cfg.methods) * 3 == w.loads
    # a trial trains on search.train_size rows (search.run_search's own prepare_task)
    from loralens.training.job import with_overrides

    tcfg = with_overrides(cfg, {"data": {"train_size": 6}})
    trial = {t: prepare_task(tcfg, t, tiny_tokenizer) for t in cfg.tasks}
    assert all(len(p.train) == 6 for p in trial.values())
    hand = sum(tokens_of(p.train_split.examples, cfg) for p in trial.values())
    # tokens: 3 trials x the largest epoch choice (2) x the trial's 6 rows
    for m in cfg.methods:
        assert w.train_tokens[m] == 3 * 2 * hand
    # lora: smallest batch 2 -> 3 steps per epoch; full: batch 3 -> 2 steps per epoch
    assert w.steps["lora"] == len(cfg.tasks) * 3 * 2 * 3
    assert w.steps["full"] == len(cfg.tasks) * 3 * 2 * 2
    # both: 2 early-stopping evaluations per epoch (train.evals_per_epoch) x 2 epochs, then
    # the trial's score: 5 passes over the 5 selection rows, per trial
    selection = sum(tokens_of(p.selection_rows(5, cfg.data.subset_seed).examples, cfg)
                    for p in prepared.values())
    assert w.forward_tokens == {"batched": 5 * selection * 3 * len(cfg.methods)}


def test_estimate_on_the_tiny_model(glue_dir, tiny_base):
    cfg = load_config(overrides=PLAN + [f"data.glue_dir={glue_dir}", "methods=[full]"])
    works, tp = plan.plan_study(cfg, ["train", "drift"], base=tiny_base)
    train, drift = works
    assert tp is not None and set(tp.train_flops_s) == {"full"}
    # 6 N and 2 N, N = the tiny Llama's non-embedding parameters and the head, by hand:
    # per layer q 32x32, k and v 32x16, o 32x32, gate and up 32x64, down 64x32, 2 norms
    layer = 1024 + 512 + 512 + 1024 + 2048 + 2048 + 2048 + 64
    n = 2 * layer + 32 + 32 * 2                           # 2 layers, final norm, head
    assert tp.train_fpt["full"] == 6 * n and tp.forward_fpt == 2 * n
    assert train.flops == (train.train_tokens["full"] * 6 * n
                           + train.forward_tokens["batched"] * 2 * n)
    assert math.isfinite(train.seconds) and train.seconds > 0
    assert all(math.isfinite(v) and v > 0 for v in [*tp.train_flops_s.values(),
                                                     *tp.forward_flops_s.values()])
    # drift: its kernels counted for the tiny model's shapes, timed, priced
    from loralens.study.plan.kernels import count_drift

    states, hidden = 3, 32                     # 2 blocks + the embedding output
    n = {t: min(8, len(p.val_split)) for t, p in
         ((t, prepare_task(cfg, t, tiny_base.tokenizer)) for t in cfg.tasks)}
    hand: dict = {}
    for t in cfg.tasks:
        for k, v in count_drift(cfg, n[t], states, hidden).items():
            hand[k] = hand.get(k, 0) + v
    assert not drift.cheap and drift.kernels == hand
    assert drift.seconds == pytest.approx(sum(v * tp.kernel_s[k] for k, v in hand.items()))
    assert drift.seconds > 0


def test_fit_work_respects_max_steps():
    from loralens.core.config import TrainConfig

    w = plan_work.StageWork("x")
    lengths = np.full(10, 7)
    tc = TrainConfig(epochs=3, batch_size=2, max_steps=7, evals_per_epoch=1)
    evals = plan_work.fit_work(w, "lora", lengths, tc, np.full(4, 3))
    # 5 steps per epoch: epoch 1 whole (eval at its end), epoch 2 stops after 2 steps (eval)
    assert w.steps == {"lora": 7} and evals == 2
    assert w.train_tokens == {"lora": 10 * 7 + 4 * 7}
    assert w.forward_tokens == {"batched": 2 * 4 * 3}


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path, glue_dir, tiny_base, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert cli.main(["run", "--preset", "micro", "--dry-run", "--run-dir", str(run_dir),
                     "--glue-dir", str(glue_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    stages = [ln.split()[0] for ln in out.splitlines() if ln.split()
              and ln.split()[0] in (*cli.STAGE_NAMES, "total")]
    assert stages == [*cli.STAGE_NAMES, "total"]
    assert "throughput measured in this process" in out and "nothing was run or written" in out
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []          # no runs/, no jobs.db anywhere


def test_dry_run_leaves_an_existing_run_directory_alone(tmp_path, glue_dir, tiny_base, capsys):
    run = RunDir(tmp_path / "run")
    run.bind_config(load_config(overrides=PLAN + [f"data.glue_dir={glue_dir}"]))
    before = {p: p.read_bytes() for p in run.root.rglob("*")}
    assert cli.main(["run", "--dry-run", "--run-dir", str(run.root), "--glue-dir",
                     str(glue_dir), "--stages", "search,train", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert next(ln for ln in out.splitlines() if ln.startswith("search ")).split()[1] == "off"
    assert "exists: a run skips the work it finished" in out
    assert {p: p.read_bytes() for p in run.root.rglob("*")} == before


def test_a_learning_rate_search_counts_the_configs_epochs_batch_and_rows(glue_dir,
                                                                         tiny_tokenizer):
    """search.params=[lr]: a trial trains as the models do (train.epochs 2, batch 4, the
    data's own rows per task, search.train_size unset); the plan's note says so."""
    cfg = load_config(overrides=[o for o in PLAN if not o.startswith("search.")] + [
        f"data.glue_dir={glue_dir}", "search.trials=2", "search.eval_size=5",
        "search.params=[lr]", "search.epochs=[3]", "search.batch_lora=[1]",
        "search.batch_full=[1]", "data.train_size=6", "data.train_size_per_task={mrpc: 9}"])
    prepared = {t: prepare_task(cfg, t, tiny_tokenizer) for t in cfg.tasks}
    assert {t: len(p.train) for t, p in prepared.items()} == {"rte": 6, "mrpc": 9}
    (w,) = plan_work.count_work(cfg, [get_stage("search")], tiny_tokenizer, prepared)
    hand = sum(tokens_of(p.train_split.examples, cfg) for p in prepared.values())
    # tokens: 2 trials x train.epochs (2) x each task's own rows (not search.epochs' 3)
    for m in cfg.methods:
        assert w.train_tokens[m] == 2 * 2 * hand
    # batch 4 (train.batch_size, not the choices' 1): rte 6 rows -> 2 steps, mrpc 9 -> 3
    assert w.steps["lora"] == w.steps["full"] == 2 * 2 * (2 + 3)
    notes = plan._notes(cfg, [w], None)
    assert any("train.epochs=2" in n for n in notes), notes
