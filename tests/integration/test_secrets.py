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


def test_a_sqlite_url_with_a_password_is_refused_and_the_password_written_nowhere(tmp_path,
                                                                                 glue_dir):
    """A SQLite URL with ``uri=true`` and a secret once made a database file whose name held
    the password: it is refused before anything is written, with the safe form named, and
    the password shows up in no file, file name or output. (A password-bearing PostgreSQL
    URL is redacted in the stored config: tests/unit/core/test_redaction.py.)"""
    db = tmp_path / "db" / "study.db"
    db.parent.mkdir()
    url = f"sqlite:///file:{db}?uri=true&password={PW}"
    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--glue-dir", str(glue_dir)]
    first = loralens(["run", "--preset", "micro", "--storage", url, *common, *SMALL])
    assert first.returncode == 2, first.stderr[-3000:]
    assert "sqlite:////absolute/path/study.db" in first.stderr
    env_run = loralens(["run", "--preset", "micro", *common, *SMALL],
                       env={"LORALENS_STORAGE": url})
    assert env_run.returncode == 2, env_run.stderr[-3000:]
    assert list(db.parent.iterdir()) == []  # no database, under any name
    outputs = [p.stdout + p.stderr for p in (first, env_run)]
    assert leaks(tmp_path, outputs) == []
