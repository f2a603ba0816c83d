"""Scale-out on a real PostgreSQL server: two worker processes share one study and one
job grid. .ci/run starts the server and sets LORALENS_TEST_PG_URL.

The workers run the ``micro`` preset (the tiny random model): what is tested is the
coordination through PostgreSQL, which does not depend on the model; the real SmolLM2
made each test take minutes (223 s and 100 s in CI), the tiny model takes seconds."""

import os
import uuid

import optuna
import pytest
import sqlalchemy as sa

from tests.helpers.drills import loralens


@pytest.fixture
def pg_url():
    url = os.environ.get("LORALENS_TEST_PG_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("LORALENS_TEST_PG_URL is not set: .ci/run must start PostgreSQL")
        pytest.skip("no PostgreSQL server (set LORALENS_TEST_PG_URL)")
    name = f"loralens_test_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    yield url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as c:
        c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def test_two_workers_complete_exactly_n_trials(tmp_path, glue_dir, pg_url):
    args = ["hpo", "--preset", "micro", "--task", "rte", "--method", "full", "--trials", "4",
            "--storage", pg_url]
    procs = [loralens(args, tmp_path / "run", glue_dir) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    study = optuna.load_study(study_name="loralens-rte-full", storage=pg_url)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 4 and len(states) == 4, states
    # both workers ran trials of the same study
    ran = [o.count("search rte/full trial") for o in outs]
    assert sum(ran) == 4


def test_two_workers_run_each_job_of_a_grid_once(tmp_path, glue_dir, pg_url):
    args = ["run", "--preset", "micro", "--stages", "train", "--storage", pg_url,
            "search.enabled=false",
            "tasks=[rte]", "methods=[lora]", "seeds=[1,2,3,4]"]
    procs = [loralens(args, tmp_path / "run", glue_dir) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    with sa.create_engine(pg_url).connect() as c:
        rows = c.execute(sa.text("SELECT key, status, attempts, worker FROM loralens_jobs "
                                 "WHERE stage = 'train' ORDER BY key")).all()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (f"rte/lora/seed{s}", "done", 1) for s in (1, 2, 3, 4)]
    trained = [line for o in outs for line in o.splitlines() if line.startswith("rte/lora/seed")]
    assert sorted(line.split(":")[0] for line in trained) == [f"rte/lora/seed{s}" for s in (1, 2, 3, 4)]
    assert len(list((tmp_path / "run").glob("models/rte/lora/seed*/metrics.json"))) == 4
