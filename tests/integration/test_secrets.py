"""A study run with a password-bearing storage URL writes the password nowhere: not in any
file of the run directory (nor its name), not in what the commands print; resuming with
the same URL (flag or $LORALENS_STORAGE) works, resuming without it says how to give it."""

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote


PW = "Zq7s3cr3tPW"
SMALL = ["tasks=[rte]"]  # every stage, one task: the micro preset's fastest full study


def loralens(args, env=None):
    exe = os.path.join(os.path.dirname(sys.executable), "loralens")
    full = {k: v for k, v in os.environ.items() if k != "LORALENS_STORAGE"}
    return subprocess.run([exe, *args], capture_output=True, text=True,
                          env={**full, **(env or {})}, timeout=600)


def leaks(root: Path, outputs: list[str]) -> list[str]:
    """Every place the password shows up (raw or percent-encoded)."""
    needles = {PW, quote(PW, safe="")}
    found = [f"output {i}" for i, text in enumerate(outputs) if any(n in text for n in needles)]
    for path in root.rglob("*"):
        if any(n in str(path) for n in needles):
            found.append(f"name {path}")
        if path.is_file():
            data = path.read_bytes()
            found += [f"file {path}" for n in needles if n.encode() in data]
    return found


def test_password_in_storage_url_is_written_nowhere_and_resume_works(tmp_path, glue_dir):
    db = tmp_path / "db" / "study.db"
    db.parent.mkdir()
    # a URL SQLAlchemy and SQLite accept with a secret in it (SQLite ignores the unknown
    # URI parameter); PostgreSQL's user:password@ form takes the same path (unit tests)
    url = f"sqlite:///file:{db}?uri=true&password={PW}"
    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--glue-dir", str(glue_dir)]
    first = loralens(["run", "--preset", "micro", "--storage", url, *common, *SMALL])
    assert first.returncode == 0, first.stderr[-3000:]
    assert db.is_file(), "the study did not use the given storage"
    assert not (run / "search.db").exists() and not (run / "jobs.db").exists()
    assert "search:\n" in (run / "config.yaml").read_text()
    assert "password=***" in (run / "config.yaml").read_text()

    # resume: the same settings and URL (the stored URL is redacted: no "other settings")
    again = loralens(["run", "--preset", "micro", "--storage", url, *common, *SMALL])
    assert again.returncode == 0, again.stderr[-3000:]
    # resume from the stored config, the URL from the environment
    env_run = loralens(["run", "--run-dir", str(run), "--stages", "search,train"],
                       env={"LORALENS_STORAGE": url})
    assert env_run.returncode == 0, env_run.stderr[-3000:]
    # without the secret the run cannot connect, and says how to give it
    bare = loralens(["run", "--run-dir", str(run), "--stages", "search"])
    assert bare.returncode == 2
    assert "stored with its secrets hidden" in bare.stderr and "LORALENS_STORAGE" in bare.stderr

    outputs = [p.stdout + p.stderr for p in (first, again, env_run, bare)]
    assert leaks(run, outputs) == []
    assert (run / "report" / "report.md").is_file()
