"""The provenance table's hardware row names the CPU model (env.json's cpu_model, read
from /proc/cpuinfo when the run was recorded), not the architecture."""

from __future__ import annotations

import platform

from loralens.core.run_dir import RunDir, cpu_model
from loralens.report.provenance_tables import table_provenance
from loralens.report.run_data import RunData

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme avx2

processor\t: 1
model name\t: AMD EPYC 7B13
"""


def test_cpu_model_from_cpuinfo_and_its_fallbacks(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert cpu_model(info) == "AMD EPYC 7B13"
    # an ARM cpuinfo names no model: platform.processor(), else the architecture
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu_model(info) == "aarch64"
    assert cpu_model(tmp_path / "missing") == "aarch64"


def hardware_row(tmp_path, hw: dict) -> str:
    env = {"run": {"python": "3.11.2", "git_commit": "0123abcd", "hardware": hw}}
    t = table_provenance(RunData(run=RunDir(tmp_path), config={"tasks": ["sst2"]}, env=env))
    return dict((r[0], r[1]) for r in t.rows)["Hardware"]


def test_hardware_row_shows_the_cpu_model(tmp_path):
    hw = {"platform": "Linux-6.1-x86_64", "processor": "x86_64", "cpu_count": 2,
          "torch_threads": 2, "cuda": False}
    assert hardware_row(tmp_path, hw | {"cpu_model": "AMD EPYC 7B13"}) == (
        "Linux-6.1-x86_64; processor AMD EPYC 7B13; 2 CPUs, 2 torch threads; CUDA no")
    # env.json written before cpu_model was recorded: what it has
    assert hardware_row(tmp_path, hw) == ("Linux-6.1-x86_64; processor x86_64; 2 CPUs, "
                                          "2 torch threads; CUDA no")


def test_environment_records_the_cpu_model(monkeypatch):
    from loralens.core import run_dir

    monkeypatch.setattr(run_dir, "cpu_model", lambda: "AMD EPYC 7B13")
    monkeypatch.setattr(run_dir, "git_commit", lambda: None)  # no git process
    assert run_dir.environment()["hardware"]["cpu_model"] == "AMD EPYC 7B13"


def test_constraints_row_shows_the_recorded_hashes(tmp_path):
    """env.json's constraints record (file -> sha256) appears in the provenance table, cut
    to 12 hex digits; a record without files says so; an older env.json without the key
    gets no row."""
    def rows(record: dict) -> dict:
        env = {"run": {"python": "3.11.2", "git_commit": "0123abcd", **record}}
        t = table_provenance(RunData(run=RunDir(tmp_path), config={"tasks": ["sst2"]}, env=env))
        return dict((r[0], r[1]) for r in t.rows)

    sha = "0f" * 32
    got = rows({"constraints": {"constraints.txt": sha, "constraints-test.txt": "ab" * 32}})
    assert got["Constraints"] == ("constraints.txt sha256 0f0f0f0f0f0f, "
                                  "constraints-test.txt sha256 abababababab")
    assert rows({"constraints": {}})["Constraints"] == (
        "none found (installed without loralens's constraints files)")
    assert "Constraints" not in rows({})
