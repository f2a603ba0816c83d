"""The poison test of selection (issue 12, part 1), through ``loralens run --stages
search,train`` four times on the tiny model: permuted validation labels change nothing that
selects or trains (the slices themselves: tests/unit/training/test_selection.py)."""

import json
import shutil

import numpy as np

from loralens import cli
from loralens.core.run_dir import RunDir
from loralens.tasks.registry import get_task
from loralens.tasks.sources import load_split
from tests.helpers.overrides import tiny

POISON = tiny("methods=[lora,full]", "seeds=[1]", "data.train_size=24",
              "data.early_stop_size=16", "data.selection_min=32", "search.trials=2",
              "search.startup_trials=1", "search.train_size=16", "search.eval_size=16",
              "search.epochs=[1]", "search.batch_lora=[4]", "search.batch_full=[4]",
              "search.prune=true", "train.epochs=3", "train.eval_batch_size=64",
              "train.batch_size=4", "train.evals_per_epoch=2")


def glue_copy(src, dst, permute_dev: bool):
    (dst / "RTE").mkdir(parents=True)
    shutil.copy(src / "RTE" / "train.tsv", dst / "RTE" / "train.tsv")
    lines = (src / "RTE" / "dev.tsv").read_text().splitlines()
    header, rows = lines[0], [line.split("\t") for line in lines[1:]]
    if permute_dev:
        perm = np.random.default_rng(123).permutation(len(rows))
        labels = [rows[i][-1] for i in perm]
        rows = [r[:-1] + [lab] for r, lab in zip(rows, labels)]
    (dst / "RTE" / "dev.tsv").write_text("\n".join([header, *("\t".join(r) for r in rows)])
                                         + "\n")
    return dst


def run_study(tmp_path, name, glue, extra=()):
    run = tmp_path / name
    assert cli.main(["run", "--stages", "search,train", "--run-dir", str(run),
                     "--glue-dir", str(glue), "--no-progress", *POISON, *extra]) == 0
    return RunDir(run)


def selected(run: RunDir) -> dict:
    """Everything that selection and training produced, minus wall-clock fields."""
    out = {}
    for m in ("lora", "full"):
        s = json.loads(run.search_path("rte", m).read_text())
        out[f"search/{m}"] = [(t["number"], t["state"], t["value"], t["params"])
                              for t in s["trials"]]
        fit_ = json.loads(run.metrics_path("rte", m, 1).read_text())["fit"]
        out[f"fit/{m}"] = (fit_["best_step"], fit_["steps"], fit_["stopped_step"],
                           [{k: v for k, v in h.items()} for h in fit_["history"]])
        wdir = run.weights_dir("rte", m, 1)
        out[f"weights/{m}"] = {f.name: f.read_bytes() for f in sorted(wdir.iterdir())
                               if f.suffix == ".safetensors"}
        assert out[f"weights/{m}"], f"no weights in {wdir}"
    return out


def test_poisoned_validation_labels_change_nothing_that_selects_or_trains(tmp_path, glue_dir,
                                                                          tiny_base):
    clean = glue_copy(glue_dir, tmp_path / "glue-clean", permute_dev=False)
    poisoned = glue_copy(glue_dir, tmp_path / "glue-poisoned", permute_dev=True)
    a = run_study(tmp_path, "clean", clean)
    b = run_study(tmp_path, "poisoned", poisoned)
    assert selected(a) == selected(b)   # search, best steps, histories, weights: byte-identical
    # the poison did reach the reported split: same logits, other labels
    ma = json.loads(a.metrics_path("rte", "lora", 1).read_text())
    mb = json.loads(b.metrics_path("rte", "lora", 1).read_text())
    assert np.array_equal(np.load(a.val_logits_path("rte", "lora", 1)),
                          np.load(b.val_logits_path("rte", "lora", 1)))
    assert (load_split(get_task("rte"), "validation", clean).labels
            != load_split(get_task("rte"), "validation", poisoned).labels).sum() > 100
    assert ma["validation"]["n"] == mb["validation"]["n"] == 277

    # the published protocol selects on validation: the same poison changes the search
    va = run_study(tmp_path, "clean-v", clean, ["data.selection=validation"])
    vb = run_study(tmp_path, "poisoned-v", poisoned, ["data.selection=validation"])
    sa, sb = selected(va), selected(vb)
    assert sa["search/lora"] != sb["search/lora"]
    assert sa["fit/lora"][3] != sb["fit/lora"][3]
