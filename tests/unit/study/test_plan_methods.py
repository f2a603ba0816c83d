"""The dry-run planner for any list of methods (loralens.study.plan.dry_run): every method's work is
counted, each family priced by its stated basis (head: a forward-only backbone; PEFT
methods: LoRA's measured cost; DoRA: more), and the bench stage's served kinds follow the
serving paths of each method (serving/paths.py)."""

from __future__ import annotations

import math

import pytest

from loralens import cli
from loralens.study.plan import dry_run as plan, work as plan_work
from loralens.study.config import load_config
from loralens.models.methods import get_method
from loralens.training.job import prepare_task
from loralens.study.stages import get_stage

from tests.helpers.plan import PLAN, hand_tokens

METHODS = "methods=[full, head, lora, rslora, dora, ia3, pissa]"


def test_cost_basis_per_family():
    cfg = load_config(overrides=["model.name=tiny-random"])
    basis = {m: plan.cost_basis(get_method(m, cfg))[:2]
             for m in ("full", "head", "lora", "rslora", "dora", "ia3", "pissa", "loraplus",
                       "lora-all-linear", "olora")}
    assert basis == {"full": ("full", 1.0), "head": (None, 1.0), "dora": ("lora", 1.3),
                     **{m: ("lora", 1.0) for m in ("lora", "rslora", "ia3", "pissa",
                                                   "loraplus", "lora-all-linear", "olora")}}


def test_estimate_prices_every_method(glue_dir, tiny_base):
    cfg = load_config(overrides=PLAN + [f"data.glue_dir={glue_dir}", "tasks=[rte]",
                                        "seeds=[42]", "methods=[head, dora, ia3]"])
    works, tp = plan.plan_study(cfg, ["train"], base=tiny_base)
    (train,) = works
    assert set(train.train_tokens) == {"head", "dora", "ia3"}
    assert set(tp.train_flops_s) == {"head", "dora", "ia3"}
    # head: forward-only (2N per token at the measured forward rate), no optimizer cost
    assert tp.train_fpt["head"] == tp.forward_fpt
    assert tp.train_flops_s["head"] == tp.forward_flops_s["batched"] and tp.step_s["head"] == 0
    # DoRA: LoRA's FLOPs at 1/1.3 of LoRA's rate; IA3: LoRA's figures as timed
    assert tp.train_fpt["dora"] == tp.train_fpt["ia3"]
    assert tp.train_flops_s["dora"] == pytest.approx(tp.train_flops_s["ia3"] / 1.3)
    assert tp.step_s["dora"] == tp.step_s["ia3"] > 0
    assert tp.basis == {"head": "forward-only backbone (head-only training)",
                        "dora": "LoRA's measured cost x 1.3 (DoRA)",
                        "ia3": "LoRA's measured cost"}
    want = sum(v * tp.train_fpt[m] / tp.train_flops_s[m] for m, v in train.train_tokens.items())
    want += sum(n * tp.step_s[m] for m, n in train.steps.items())
    want += train.forward_tokens["batched"] * tp.forward_fpt / tp.forward_flops_s["batched"]
    want += train.loads * tp.load_s
    assert train.seconds == pytest.approx(want) and math.isfinite(train.seconds)
    text = plan.format_plan(cfg, works, tp)
    assert "training dora: " in text and "(LoRA's measured cost x 1.3 (DoRA))" in text


def test_bench_counts_kinds_per_serving_path(glue_dir, tiny_tokenizer):
    base = PLAN + [f"data.glue_dir={glue_dir}", "tasks=[rte]", "bench.requests=4",
                   "bench.warmup=1", "bench.mixed_batch_size=2", "seeds=[42]",
                   "bench.batch_sizes=[1]"]
    cfg = load_config(overrides=base + ["methods=[head, dora]"])
    p = prepare_task(cfg, "rte", tiny_tokenizer)
    rows = [hand_tokens(e, cfg.data.max_length)
            for e in p.val_split.subset(4, cfg.data.subset_seed).examples]
    total, first = sum(rows), rows[0]
    (w,) = plan_work.count_work(cfg, [get_stage("bench")], tiny_tokenizer, {"rte": p})
    # 3 kinds (head whole; dora merged and separate; no runtime): a warm-up request while
    # loaded, then 4 requests + 1 warm-up; no several-adapter part (nothing lean);
    # identity per dtype: dora's reference and its merged model over its 4 rows
    assert w.forward_tokens == {"batch1": 3 * (total + 2 * first) + 2 * total,
                                "float64": 2 * total}
    assert w.loads == 3 + 2
    assert " x 3 served models x " in w.what
    # lora and rslora (two lean methods, one seed) count as lora over two seeds does:
    # 3 kinds each, several adapters on one base, identity with runtime and merged
    two = plan_work.count_work(load_config(overrides=base + ["methods=[lora, rslora]"]),
                               [get_stage("bench")], tiny_tokenizer, {"rte": p})[0]
    seeds = plan_work.count_work(load_config(overrides=base + ["methods=[lora]",
                                                               "seeds=[42, 1337]"]),
                                 [get_stage("bench")], tiny_tokenizer, {"rte": p})[0]
    assert two.forward_tokens == seeds.forward_tokens and two.loads == seeds.loads


def test_cli_dry_run_plans_every_method(tmp_path, glue_dir, tiny_base, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["run", "--preset", "micro", "--dry-run", "--run-dir", str(run_dir),
                     "--glue-dir", str(glue_dir), "--no-progress", "tasks=[rte]",
                     "seeds=[42]", "search.enabled=false", "--stages", "train,bench",
                     METHODS]) == 0
    out = capsys.readouterr().out
    assert "methods full, head, lora, rslora, dora, ia3, pissa;" in out
    for m in ("full", "head", "lora", "rslora", "dora", "ia3", "pissa"):
        assert f"  training {m}: " in out
    train = next(ln for ln in out.splitlines() if ln.startswith("train "))
    assert "1 task x 7 methods x 1 seed" in train
    bench = next(ln for ln in out.splitlines() if ln.startswith("bench "))
    # full, head: 1 each; lora, rslora: 3; dora, ia3, pissa: 2 (no lean runtime)
    assert " x 14 served models x " in bench
    assert not run_dir.exists()
