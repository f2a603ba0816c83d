"""The serving benchmark and the export for N methods, on a micro run trained by
``loralens train`` (tiny random model, RTE, one seed): full, head, LoRA, rsLoRA, a LoRA of
another rank and targets, DoRA, IA3 and PiSSA. Each method is served by the paths the rule
gives it (serving/paths.py) and every adapter path passes its float64 identity check
against PEFT's own forward; ``export --method`` exports only the methods named, DoRA and
IA3 as adapters that plain PEFT loads, head-only training as a standard checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loralens import cli
from loralens.report import serving_tables as ST
from loralens.report.run_data import RunData
from loralens.models.serving_paths import LEAN, MERGED, PEFT, WHOLE
from loralens.core.run_dir import RunDir

from tests.helpers.export import dev_rows, plain_logits

METHODS = ["full", "head", "lora", "rslora", "lora-r4", "dora", "ia3", "pissa"]
MICRO = ["--preset", "micro", "tasks=[rte]", "seeds=[42]", "search.enabled=false",
         "data.train_size=8", "data.early_stop_size=8", "data.max_length=32",
         "train.batch_size=8", f"methods=[{', '.join(METHODS)}]",
         "method_defs={lora-r4: {family: peft, peft: {type: lora, r: 4, alpha: 6, "
         "target_modules: [q_proj, k_proj, o_proj, up_proj]}}}"]
SERVED_BY = {"full": WHOLE, "head": WHOLE,
             **{f"{m}_{p}": by for m in ("lora", "rslora", "lora-r4")
                for p, by in (("merged", MERGED), ("separate", PEFT), ("runtime", LEAN))},
             **{f"{m}_{p}": by for m in ("dora", "ia3", "pissa")
                for p, by in (("merged", MERGED), ("separate", PEFT))}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, glue_dir, tiny_base):
    """The micro run, every method trained by ``loralens train`` (one seed, 8 rows)."""
    run = RunDir(tmp_path_factory.mktemp("nmethods") / "run")
    args = ["--run-dir", str(run.root), "--glue-dir", str(glue_dir), "--no-progress"]
    assert cli.main(["train", *args, *MICRO]) == 0
    return run


def test_bench_serves_each_method_by_its_path_and_checks_it(run, tiny_base):
    from loralens.serving.bench.stage import run_bench

    res = run_bench(run.load_config(), run, warmup=1, n_requests=4, progress=False,
                    mixed_batch_size=3, threads=1, base=tiny_base, identity_examples=3)
    seed = res["tasks"]["rte"]["seeds"]["42"]
    assert seed["served_by"] == SERVED_BY
    assert {k: v["served_by"] for k, v in seed["batch"]["1"]["kinds"].items()} == SERVED_BY
    assert {r["kind"]: r["served_by"] for r in res["comparison"]} == SERVED_BY
    assert {r["kind"]: r["method"] for r in res["comparison"]}["lora-r4_runtime"] == "lora-r4"
    why = {m: v["lean_runtime_not_exact"] for m, v in res["served_by"].items()}
    assert why["lora"] is None and why["rslora"] is None and why["lora-r4"] is None
    assert why["dora"].startswith("DoRA") and "rewrites the base" in why["pissa"]
    # the runtime's rows pair with their own method's merged model
    rt = next(r for r in res["comparison"] if r["kind"] == "rslora_runtime")
    assert rt["merged_kind"] == "rslora_merged" and rt["pairs_vs_rslora_merged"] == 4
    # identity: every adapter's merged model, the runtime for the lean ones, and the
    # several-adapter workloads over lora, rslora and lora-r4 (other ranks and targets)
    names = {f"rte/seed42/batch1: {p} == separate" for p in ("runtime", "merged")}
    names |= {f"rte_{m}/seed42/batch1: {p} == separate" for m in ("rslora", "lora-r4")
              for p in ("runtime", "merged")}
    names |= {f"rte_{m}/seed42/batch1: merged == separate" for m in ("dora", "ia3", "pissa")}
    names |= {"multi stream: runtime == single adapter", "multi stream: peft == single adapter",
              "multi mixed batch: runtime == single adapter",
              "multi mixed batch: peft_adapter_names == single adapter"}
    assert res["checks"] == {n: True for n in names}
    assert res["multi"]["adapters"] == ["rte_seed42", "rte_rslora_seed42", "rte_lora-r4_seed42"]
    for c in res["identity"]["checks"]:
        assert c["float64"]["max_abs_diff"] <= 1e-12 and c["float64"]["max_abs_logit"] > 0
    # Table 5 shows the path of every row
    t = ST.table5(RunData(run, serving=res))
    col = t.columns.index("Served by")
    shown = {"head": "head only", "rslora": "rsLoRA", "dora": "DoRA", "ia3": "IA3",
             "pissa": "PiSSA", "lora-r4": "lora-r4"}  # the methods' names in every table
    want = {(ST.KINDS.get(k) or shown[k.rsplit("_", 1)[0]], by) for k, by in SERVED_BY.items()}
    assert {(r[2], r[col]) for r in t.rows} == want and len(t.rows) == len(SERVED_BY)
    assert ("rsLoRA", "lean runtime") in want and ("LoRA, our runtime", "lean runtime") in want
    assert "Not in the lean runtime: dora (DoRA rescales" in " ".join(t.notes)
    multi = " ".join(ST.table5_multi(RunData(run, serving=res)).notes)
    assert "(methods lora, lora-r4, rslora of one task)" in multi


def test_export_only_the_methods_named(run, glue_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "exported"
    assert cli.main(["export", str(run.root), str(out), "--method", "dora", "--method", "ia3",
                     "--method", "head", "--method", "pissa"]) == 0
    assert "exported 4 model(s)" in capsys.readouterr().out
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["methods"] == ["dora", "head", "ia3", "pissa"]
    assert {(a["method"], a["kind"]) for a in manifest["artifacts"]} == {
        ("dora", "peft-adapter"), ("ia3", "peft-adapter"), ("pissa", "peft-adapter"),
        ("head", "sequence-classification")}
    assert sorted(p.name for p in (out / "rte").iterdir()) == ["dora", "head", "ia3", "pissa"]

    rows = dev_rows(glue_dir, 24)
    for method in ("dora", "ia3", "pissa"):  # plain PEFT on plain transformers
        adapter = out / "rte" / method / "seed42"
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
        tok = AutoTokenizer.from_pretrained(str(adapter))
        base = AutoModelForSequenceClassification.from_pretrained(
            cfg["base_model_name_or_path"], num_labels=2)
        base.config.pad_token_id = tok.pad_token_id
        pm = PeftModel.from_pretrained(base, str(adapter)).eval()
        want = np.load(run.val_logits_path("rte", method, 42))[:24]
        np.testing.assert_allclose(plain_logits(pm, tok, rows), want, atol=1e-5, rtol=0,
                                   err_msg=method)
    _checkpoint_reproduces(run, out, "head", rows)


def _checkpoint_reproduces(run, out, method, rows):
    """The exported sequence-classification checkpoint of ``method``, loaded by plain
    transformers, gives the training's own validation logits (within 1e-5)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = out / "rte" / method / "seed42"
    assert not (path / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}
    got = plain_logits(model, AutoTokenizer.from_pretrained(str(path)), rows)
    want = np.load(run.val_logits_path("rte", method, 42))[:len(rows)]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=method)


def test_export_merge_of_one_method_and_unknown_methods(run, glue_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.main(["export", str(run.root), str(out), "--merge", "--method", "dora"]) == 0
    capsys.readouterr()
    assert [p.name for p in (out / "rte").iterdir()] == ["dora"]
    _checkpoint_reproduces(run, out, "dora", dev_rows(glue_dir, 24))

    bad = tmp_path / "bad"
    assert cli.main(["export", str(run.root), str(bad), "--method", "dora",
                     "--method", "olora"]) == 2
    err = capsys.readouterr().err
    assert (f"{run.root}: no finished model of method(s) olora to export; the run has "
            "dora, full, head, ia3, lora, lora-r4, pissa, rslora") in err
    assert not bad.exists()


@pytest.mark.parametrize("method", ["dora", "ia3", "head"])
def test_predict_any_method_of_a_run(run, glue_dir, tmp_path, method):
    """``predict --method`` takes every method of the run: probabilities equal the softmax
    of the training's own validation logits; a method the run lacks names those it has."""
    import torch

    out = tmp_path / "pred.jsonl"
    assert cli.main(["predict", str(run.root), "--task", "rte", "--method", method,
                     "--input", str(glue_dir / "RTE" / "dev.tsv"), "--output", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    p = torch.softmax(torch.from_numpy(np.load(run.val_logits_path("rte", method, 42))), -1)
    np.testing.assert_allclose([[g["probabilities"]["entailment"],
                                 g["probabilities"]["not_entailment"]] for g in got],
                               p.numpy(), atol=1e-6)


def test_predict_names_the_methods_a_run_has(run, glue_dir, tmp_path, capsys):
    rc = cli.main(["predict", str(run.root), "--task", "rte", "--method", "olora",
                   "--input", str(glue_dir / "RTE" / "dev.tsv"),
                   "--output", str(tmp_path / "p.jsonl")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{run.root}: no finished rte model with method olora; the run has " \
           "dora/seed42, full/seed42, head/seed42, ia3/seed42, lora-r4/seed42, " \
           "lora/seed42, pissa/seed42, rslora/seed42" in err, err
