"""The basics a command is expected to have: ``loralens --version``, ``python -m loralens``
and a shell completion script (``loralens completion bash``)."""

from __future__ import annotations

import runpy
import sys
import tomllib
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

import loralens
from loralens import cli

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def test_version_prints_the_declared_version(capsys):
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"loralens {declared}\n"
    assert loralens.__version__ == declared  # the source tree's string (core/version.py) too


def test_version_without_an_installed_distribution_is_the_source_trees(monkeypatch, capsys):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.version", missing)
    monkeypatch.setattr("loralens.core.version.__version__", "9.8.7")
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out == "loralens 9.8.7\n"


def test_python_dash_m_runs_the_command_line(monkeypatch):
    """``python -m loralens ARGS`` runs cli.main and exits with its status (run in this
    process through runpy: no process is started)."""
    calls = []

    def fake_main(argv=None):
        calls.append(list(sys.argv))
        return 3

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(sys, "argv", ["loralens", "presets"])
    monkeypatch.delitem(sys.modules, "loralens.__main__", raising=False)
    with pytest.raises(SystemExit) as e:
        runpy.run_module("loralens", run_name="__main__")
    assert e.value.code == 3
    assert calls == [["loralens", "presets"]]


def test_bash_completion_lists_commands_then_their_options(capsys):
    assert cli.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert script.rstrip().endswith("complete -o default -F _loralens loralens")
    top = next(line for line in script.splitlines() if "compgen -W" in line and "run" in line)
    words = top.split('compgen -W "')[1].split('"')[0].split()
    for word in ("run", "train", "serve", "report", "completion", "--version", "--quiet"):
        assert word in words, word
    run_case = next(line.strip() for line in script.splitlines()
                    if line.strip().startswith("run)"))
    for option in ("--dry-run", "--stages", "--executor", "--preset", "--run-dir"):
        assert f" {option} " in run_case, option
    serve_case = next(line.strip() for line in script.splitlines()
                      if line.strip().startswith("serve)"))
    assert " --api-key-file " in serve_case and "--dry-run" not in serve_case


def test_completion_refuses_an_unknown_shell(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["completion", "fish"])
    assert e.value.code == 2
    assert "invalid choice: 'fish'" in capsys.readouterr().err
