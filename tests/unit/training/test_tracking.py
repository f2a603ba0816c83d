"""Experiment tracking (``--report-to tensorboard mlflow``): one micro training job on the
tiny model, read back with each tracker's own reader (TensorBoard's EventAccumulator,
MLflow's client) and compared with the job's metrics.json; the tracking URI never lands in
the run directory."""

from __future__ import annotations

import math

import pytest

from loralens.cli import build_parser, _flag_overrides
from loralens.core.errors import ConfigError
from loralens.study.config import load_config
from loralens.core.run_dir import RunDir
from loralens.core.files import read_json
from loralens.training.tracking import REPORT_TO, URI_ENV, open_job, reporters

STEPS = 8  # 16 rows, batch 4, 2 epochs


@pytest.fixture(scope="module")
def tracked(tiny_base, glue_dir, tmp_path_factory):
    """One LoRA job on sst2 logged to both trackers; (run dir, metrics.json)."""
    from loralens.training.job import train_job

    mp = pytest.MonkeyPatch()
    mp.delenv(URI_ENV, raising=False)
    cfg = load_config("micro", None, [f"data.glue_dir={glue_dir}", "tasks=[sst2]",
                                      "train.batch_size=4", "train.epochs=2",
                                      "train.evals_per_epoch=2", "train.patience=0",
                                      "tracking.report_to=[tensorboard,mlflow]",
                                      "tracking.experiment=micro-study"])
    run = RunDir(tmp_path_factory.mktemp("tracked") / "run")
    run.bind_config(cfg)
    metrics = train_job(cfg, run, "sst2", "lora", 42, base=tiny_base, progress=False)
    from loralens.training.search import run_search

    run_search(cfg, run, "sst2", "lora", tiny_base, progress=False)  # micro: 2 trials
    mp.undo()
    assert metrics["fit"]["steps"] == STEPS
    return run.root, read_json(run.metrics_path("sst2", "lora", 42))


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)


def test_tensorboard_holds_the_job(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, metrics = tracked
    ea = EventAccumulator(str(root / "tensorboard" / "sst2-lora-seed42"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    assert all(math.isfinite(e.value) for e in loss)
    assert len(ea.Scalars("train/lr")) == STEPS
    history = metrics["fit"]["history"]
    assert len(history) >= 2
    for key in ("val_loss", "val_accuracy", "val_f1"):
        got = [(e.step, e.value) for e in ea.Scalars(f"selection/{key}")]
        assert [s for s, _ in got] == [h["step"] for h in history]
        assert all(_close(v, h[key]) for (_, v), h in zip(got, history)), key
    for key in ("accuracy", "f1", "loss"):
        [e] = ea.Scalars(f"validation/{key}")
        assert e.step == STEPS and _close(e.value, metrics["validation"][key])
    fit = metrics["fit"]
    [e] = ea.Scalars("fit/tokens_per_s")
    assert _close(e.value, fit["real_tokens"] / fit["step_seconds"])
    [e] = ea.Scalars("fit/final_train_loss")
    assert _close(e.value, fit["final_train_loss"])
    assert {"fit/mfu", "fit/train_seconds", "fit/best_step"} <= tags
    assert "hyperparameters/text_summary" in ea.Tags()["tensors"]


def test_mlflow_holds_the_job(tracked):
    from mlflow import MlflowClient

    root, metrics = tracked
    client = MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("micro-study")
    [run] = client.search_runs([exp.experiment_id], "tags.kind = 'train'")
    assert run.info.run_name == "sst2/lora/seed42" and run.info.status == "FINISHED"
    assert run.data.tags["task"] == "sst2" and run.data.tags["seed"] == "42"
    hp = metrics["hyperparameters"]
    assert float(run.data.params["hyperparameters.lr"]) == hp["lr"]
    assert run.data.params["hyperparameters.lora.r"] == str(hp["lora"]["r"])
    assert int(run.data.params["hyperparameters.batch_size"]) == 4
    rid = run.info.run_id
    loss = client.get_metric_history(rid, "train/loss")
    assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))
    history = metrics["fit"]["history"]
    got = sorted((m.step, m.value) for m in client.get_metric_history(rid, "selection/val_loss"))
    assert [s for s, _ in got] == [h["step"] for h in history]
    assert all(_close(v, h["val_loss"]) for (_, v), h in zip(got, history))
    for key in ("accuracy", "f1", "mcc", "loss"):
        assert _close(run.data.metrics[f"validation/{key}"], metrics["validation"][key])
    fit = metrics["fit"]
    assert _close(run.data.metrics["fit/tokens_per_s"], fit["real_tokens"] / fit["step_seconds"])
    assert run.data.metrics["fit/best_step"] == fit["best_step"]
    # the same loss curve as TensorBoard's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(root / "tensorboard" / "sst2-lora-seed42"))
    ea.Reload()
    tb = [e.value for e in ea.Scalars("train/loss")]
    ml = [m.value for m in sorted(loss, key=lambda m: m.step)]
    assert all(_close(a, b) for a, b in zip(tb, ml))
    assert not (root.parent / "mlruns").exists()  # artifacts stay under the run directory


def test_report_to_flags_and_config(tmp_path):
    p = build_parser()
    args = p.parse_args(["train", "--report-to", "tensorboard,mlflow", "--report-to", "none"])
    assert "tracking.report_to=[tensorboard,mlflow,none]" in _flag_overrides(args)
    with pytest.raises(ConfigError, match="'none' together with"):
        reporters(["tensorboard", "none"])
    assert reporters(["none"]) == [] and reporters(["mlflow", "mlflow"]) == ["mlflow"]
    with pytest.raises(ConfigError, match=r"tracking.report_to\[0\]: 'wandbx' is not one of"):
        load_config("micro", None, ["tracking.report_to=wandbx"])
    assert load_config().tracking.report_to == ["none"] and "none" in REPORT_TO
    assert open_job(load_config("micro"), tmp_path, "sst2", "lora", 1) is None
    assert not list(tmp_path.iterdir())  # nothing written, nothing imported for "none"


def test_a_tracking_uri_with_a_password_is_never_written(tmp_path, monkeypatch):
    secret = "hunter2-secret-pw"
    monkeypatch.setenv(URI_ENV, f"http://user:{secret}@127.0.0.1:9/")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = load_config("micro", None, ["tracking.report_to=mlflow"])
    with pytest.raises(RuntimeError) as e:
        open_job(cfg, tmp_path / "run", "sst2", "lora", 1)
    assert "MLflow tracking at http://user:***@127.0.0.1:9/" in str(e.value)
    assert secret not in str(e.value)
    for f in tmp_path.rglob("*"):
        assert not f.is_file() or secret.encode() not in f.read_bytes()


def test_search_trials_are_tracked(tracked):
    import optuna
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loralens.training.search import study_name

    root, _ = tracked
    study = optuna.load_study(study_name=study_name("sst2", "lora"),
                              storage=RunDir(root).sqlite_url("search"))
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    trials = [t for t in study.trials if t.state in done]
    assert len(trials) == 2
    client = MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("micro-study")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id],
                                                           "tags.kind = 'search'")}
    assert set(runs) == {f"search/sst2/lora/trial{t.number}" for t in trials}
    for t in trials:
        r = runs[f"search/sst2/lora/trial{t.number}"]
        assert r.data.tags["trial"] == str(t.number) and r.info.status == "FINISHED"
        assert {k: float(r.data.params[f"params.{k}"]) for k in t.params} == t.params
        ea = EventAccumulator(str(root / "tensorboard" / f"search-sst2-lora-trial{t.number}"))
        ea.Reload()
        if t.state == optuna.trial.TrialState.PRUNED:
            assert r.data.params["pruned"] == "True"
            assert "search/objective" not in r.data.metrics
        else:
            assert _close(r.data.metrics["search/objective"], t.value)
            [e] = ea.Scalars("search/objective")
            assert _close(e.value, t.value)
        # the pruning curve: what the trial reported to Optuna, per evaluation
        reported = [v for _, v in sorted(t.intermediate_values.items())]
        curve = [e.value for e in ea.Scalars("selection/val_accuracy")]
        assert len(curve) == len(reported) and all(map(_close, curve, reported))


# --------------------------------------------------------------------------- the study run

@pytest.fixture(scope="module")
def tracked_study(tmp_path_factory):
    """A complete model-free run directory (tests/helpers/report_run.py), its report built
    by ``loralens report --report-to tensorboard,mlflow``; (run dir, report's output)."""
    from loralens.cli import main
    from tests.helpers.report_run import synthetic_run

    run = synthetic_run(tmp_path_factory.mktemp("study") / "run")
    mp = pytest.MonkeyPatch()
    mp.delenv(URI_ENV, raising=False)
    try:
        assert main(["report", "--run-dir", str(run.root), "--no-progress",
                     "--report-to", "tensorboard,mlflow", "tracking.experiment=study-x"]) == 0
    finally:
        mp.undo()
    return run


def _study_run(root):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("study-x")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'study'",
                              order_by=["attributes.start_time DESC"])
    return client, runs


def _expected_headline(run) -> dict:
    """A few headline numbers per table, read straight from the JSON files."""
    t3, t4 = read_json(run.drift_path("table3.json")), read_json(run.drift_path("table4.json"))
    want = {}
    for e in t3["tasks"]:
        c = e["metrics"][e["selection_metric"]]
        for m in ("lora", "full"):
            want[f"table3/{e['task']}/{e['selection_metric']}/{m}/mean"] = c[m]["mean"]
        want[f"table3/{e['task']}/{e['selection_metric']}/p"] = c["p"]
        want[f"table3/{e['task']}/majority/accuracy"] = e["majority_baseline"]["accuracy"]
    for e in t4["tasks"]:
        for measure, c in e["measures"].items():
            for m in ("lora", "full"):
                want[f"table4/{e['task']}/{measure}/{m}/mean"] = c[m]["mean"]
            want[f"table4/{e['task']}/{measure}/delta_percent"] = c["delta_percent"]
    for r in read_json(run.serving_path)["comparison"]:
        key = f"serving/{r['task']}/batch{r['batch_size']}/{r['kind']}"
        want[f"{key}/mean_ms"] = r["mean_ms"]
        if r["kind"] != "full":
            want[f"{key}/overhead_vs_full_pct"] = r["overhead_vs_full_pct"]
    return want


def test_the_study_run_holds_the_headline_numbers(tracked_study):
    import hashlib

    run = tracked_study
    client, runs = _study_run(run.root)
    [r] = runs
    assert r.info.run_name == "study" and r.info.status == "FINISHED"
    assert r.data.tags["run_dir"] == str(run.root.resolve())
    assert r.data.tags["config_sha256"] == hashlib.sha256(
        run.config_path.read_bytes()).hexdigest()
    want = _expected_headline(run)
    assert len(want) > 40
    for k, v in want.items():
        assert _close(r.data.metrics[k], v), k
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run.root / "tensorboard" / "study"), size_guidance={"scalars": 0})
    ea.Reload()
    tb = {t: ea.Scalars(t) for t in ea.Tags()["scalars"]}
    assert set(tb) == set(r.data.metrics)  # the same numbers in both trackers
    for k, [e] in tb.items():
        assert e.step == 0 and _close(e.value, r.data.metrics[k]), k
    [text] = ea.Tensors("report/text_summary")
    assert text.tensor_proto.string_val[0].decode() == (run.report_dir / "report.md").read_text()


def test_the_study_run_holds_the_report_files(tracked_study, tmp_path):
    run = tracked_study
    client, [r] = _study_run(run.root)
    rid = r.info.run_id

    def listing(path):
        out = {}
        for a in client.list_artifacts(rid, path):
            out.update(listing(a.path) if a.is_dir else {a.path: a.file_size})
        return out

    on_disk = {f"report/{p.relative_to(run.report_dir).as_posix()}": p.stat().st_size
               for p in run.report_dir.rglob("*") if p.is_file()}
    assert {"report/report.md", "report/report.html"} <= set(on_disk)
    assert any(p.startswith("report/figures/") for p in on_disk)
    assert listing("report") == on_disk
    got = client.download_artifacts(rid, "report/report.html", str(tmp_path))
    assert open(got, "rb").read() == (run.report_dir / "report.html").read_bytes()
    assert (run.root / "mlartifacts").is_dir()  # artifacts stay in the run directory


def test_a_report_without_tracking_logs_nothing(tracked_study, tmp_path):
    import shutil

    from loralens.cli import main

    root = tmp_path / "run"
    shutil.copytree(tracked_study.root, root,
                    ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "tensorboard"))
    assert main(["report", "--run-dir", str(root), "--no-progress",
                 "tracking.report_to=[none]"]) == 0
    assert (root / "report" / "report.html").is_file()
    assert not (root / "mlflow.db").exists() and not (root / "tensorboard").exists()
