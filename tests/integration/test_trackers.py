"""accelerate's trackers through ``--report-to`` (issue 28 point 4): a micro-preset training
job and its search trials logged to wandb in offline mode (no network, no account), read
back from what wandb wrote and compared with the job's metrics.json; the API key from the
environment lands in no file.

wandb's offline runs keep everything in the run's transaction log (``run-ID.wandb``, the
records ``wandb sync`` uploads); wandb 0.31 writes ``files/config.yaml`` and
``files/wandb-summary.json`` only when it syncs (wandb/wandb#9646), so the test decodes the
log's records (wandb's own protobuf messages) and also compares those two files where a
wandb version writes them."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

pytest.importorskip("wandb")

SECRET = "wandb-test-key-0123456789abcdef0123456789abcdef"  # 40+ characters like a real key


def wandb_records(path: Path):
    """The records of a wandb transaction log: LevelDB's log format (32 KiB blocks of chunks
    with a 7-byte header: CRC32, length, type full/first/middle/last) after wandb's 7-byte
    file header (``:W&B``, magic 0xBEE1, version 0)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + n > len(data):  # the end, or a chunk still being written
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # full, last
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            yield r


def _key(item) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def read_run(run_dir: Path) -> dict:
    """One offline run: its name, project, config, summary and history, as wandb logged
    them."""
    [log] = run_dir.glob("run-*.wandb")
    out = {"name": None, "config": {}, "summary": {}, "history": [], "exit": None}
    for r in wandb_records(log):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["project"] = r.run.display_name, r.run.project
            out["config"].update({_key(u): json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            out["config"].update({_key(u): json.loads(u.value_json) for u in r.config.update})
        elif kind == "summary":
            out["summary"].update({_key(u): json.loads(u.value_json) for u in r.summary.update})
            for u in r.summary.remove:
                out["summary"].pop(_key(u), None)
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "exit":
            out["exit"] = r.exit.exit_code
    return out


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)


def _offline(tmp: Path) -> pytest.MonkeyPatch:
    """wandb offline, every folder of its under ``tmp``, an API key in the environment."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)  # wandb must write nothing in the current directory
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_API_KEY", SECRET)
    mp.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_NAME"):
        mp.delenv(var, raising=False)
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")):
        mp.setenv(var, str(tmp / "home" / sub))
    return mp


def _runs(run_root: Path, timeout: float = 60.0) -> dict:
    """Every offline run under ``run_root``, by name. wandb's ``finish()`` can return before
    its service has flushed the transaction log (seen here: a log of its 7-byte header alone
    right after ``finish()``, complete a moment later), so each log is read until it holds
    its exit record."""
    import time

    runs = {}
    for d in sorted((run_root / "trackers" / "wandb" / "wandb").glob("offline-run-*")):
        deadline = time.monotonic() + timeout
        while True:
            r = read_run(d)
            if r["exit"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        r["dir"] = d
        runs[r["name"]] = r
    return runs


@pytest.fixture(scope="module")
def wandb_run(glue_dir, tmp_path_factory):
    """``loralens search`` then ``train --preset micro --report-to wandb`` (sst2, LoRA: 2
    trials, seed 42); (tmp folder, {wandb run name: read_run(...)}, metrics.json)."""
    from loralens.cli import main
    from loralens.core.files import read_json
    from loralens.core.run_dir import RunDir

    tmp = tmp_path_factory.mktemp("wandb")
    mp = _offline(tmp)
    run = tmp / "run"
    try:
        common = ["--preset", "micro", "--run-dir", str(run), "--glue-dir", str(glue_dir),
                  "--task", "sst2", "--method", "lora", "--no-progress", "--report-to",
                  "wandb", "tracking.experiment=micro-wandb"]
        assert main(["search", *common]) == 0
        assert main(["train", *common, "--seed", "42"]) == 0
    finally:
        mp.undo()
    return tmp, _runs(run), read_json(RunDir(run).metrics_path("sst2", "lora", 42))


def test_the_job_run_holds_metrics_json(wandb_run):
    _, runs, metrics = wandb_run
    r = runs["sst2/lora/seed42"]
    assert r["project"] == "micro-wandb" and r["exit"] == 0
    c = r["config"]
    hp = metrics["hyperparameters"]
    assert c["hyperparameters.lr"] == hp["lr"]
    assert c["hyperparameters.lora.r"] == hp["lora"]["r"]
    assert c["hyperparameters.batch_size"] == hp["batch_size"]

    def leaves(d, prefix):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]

    for key, v in leaves(hp, "hyperparameters."):  # every hyperparameter, as metrics.json has it
        assert c[key] == (v if isinstance(v, (int, float, str, bool)) else str(v)), key
    assert (c["task"], c["method"], c["seed"]) == ("sst2", "lora", 42)
    assert (c["tag.kind"], c["tag.seed"]) == ("train", "42")
    s = r["summary"]
    for key in ("accuracy", "f1", "mcc", "loss"):
        assert _close(s[f"validation/{key}"], metrics["validation"][key]), key
    fit = metrics["fit"]
    assert _close(s["fit/tokens_per_s"], fit["real_tokens"] / fit["step_seconds"])
    assert _close(s["fit/final_train_loss"], fit["final_train_loss"])
    assert s["fit/best_step"] == fit["best_step"]
    assert _close(s["fit/train_seconds"], fit["train_seconds"])
    # the per-step curve and the early-stopping evaluations, at their steps
    steps = [h["_step"] for h in r["history"] if "train/loss" in h]
    assert steps == list(range(1, fit["steps"] + 1))
    evals = [(h["_step"], h["selection/val_loss"]) for h in r["history"]
             if "selection/val_loss" in h]
    assert [s for s, _ in evals] == [h["step"] for h in fit["history"]]
    assert all(_close(v, h["val_loss"]) for (_, v), h in zip(evals, fit["history"]))
    # where a wandb version writes the run's files, they say the same
    files = r["dir"] / "files"
    if (files / "wandb-summary.json").is_file():
        on_disk = json.loads((files / "wandb-summary.json").read_text())
        assert _close(on_disk["validation/accuracy"], metrics["validation"]["accuracy"])
    if (files / "config.yaml").is_file():
        import yaml

        on_disk = yaml.safe_load((files / "config.yaml").read_text())
        assert on_disk["hyperparameters.lr"]["value"] == hp["lr"]


def test_search_trials_are_runs(wandb_run):
    tmp, runs, _ = wandb_run
    import optuna

    from loralens.core.run_dir import RunDir
    from loralens.training.search import study_name

    study = optuna.load_study(study_name=study_name("sst2", "lora"),
                              storage=RunDir(tmp / "run").sqlite_url("search"))
    trials = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                     optuna.trial.TrialState.PRUNED)]
    assert len(trials) == 2
    assert set(runs) == {"sst2/lora/seed42"} | {f"search/sst2/lora/trial{t.number}"
                                                 for t in trials}
    for t in trials:
        r = runs[f"search/sst2/lora/trial{t.number}"]
        assert r["config"]["tag.kind"] == "search" and r["exit"] == 0
        assert {k: r["config"][f"params.{k}"] for k in t.params} == t.params
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert _close(r["summary"]["search/objective"], t.value)


def test_the_api_key_is_written_nowhere(wandb_run):
    tmp, runs, _ = wandb_run
    assert runs
    files = [f for f in tmp.rglob("*") if f.is_file()]
    assert len(files) > 10
    assert not [f for f in files if SECRET.encode() in f.read_bytes()]
    assert not (tmp / "wandb").exists()  # nothing in the current directory


def test_the_study_run_holds_the_headline_numbers(tmp_path):
    """``loralens report --report-to wandb`` on a model-free run directory: the study run's
    summary holds the headline tables' numbers, read here from the JSON files themselves."""
    from loralens.cli import main
    from tests.helpers.report_run import synthetic_run
    from tests.unit.training.test_tracking import _expected_headline

    run = synthetic_run(tmp_path / "run")
    mp = _offline(tmp_path)
    try:
        assert main(["report", "--run-dir", str(run.root), "--no-progress",
                     "--report-to", "wandb", "tracking.experiment=study-w"]) == 0
    finally:
        mp.undo()
    [r] = _runs(run.root).values()
    assert r["name"] == "study" and r["project"] == "study-w" and r["exit"] == 0
    assert r["config"]["run_dir"] == str(run.root.resolve())
    want = _expected_headline(run)
    assert len(want) > 40
    for k, v in want.items():
        assert _close(r["summary"][k], v), k
