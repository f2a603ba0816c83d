"""The constraints files' sha256 in the environment record (env.json), and the CI check
(.ci/check_constraints.py) that fails, naming the package, where an installed version
differs from its pin."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from loralens.core import constraints, run_dir
from loralens.core.constraints import constraints_record, sha256_file

ROOT = Path(__file__).resolve().parents[3]
# sha256 of the 14 bytes "torch==2.13.0\n" (sha256sum), and of the empty file
TORCH_PIN_SHA = "ca8985f47f1aec0618a8f6e2b1d69151cfc9a7f513f779d799836452ce9f369c"
EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_sha256_of_a_given_file(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"torch==2.13.0\n")
    (tmp_path / "e.txt").write_bytes(b"")
    assert sha256_file(tmp_path / "c.txt") == TORCH_PIN_SHA
    assert sha256_file(tmp_path / "e.txt") == EMPTY_SHA


def test_the_environment_record_holds_the_constraints_files_hashes(tmp_path, monkeypatch):
    (tmp_path / "constraints.txt").write_bytes(b"torch==2.13.0\n")
    assert constraints_record(tmp_path) == {"constraints.txt": TORCH_PIN_SHA}
    (tmp_path / "constraints-test.txt").write_bytes(b"")
    monkeypatch.setenv(constraints.ENV_DIR, str(tmp_path))
    assert run_dir.environment()["constraints"] == {"constraints.txt": TORCH_PIN_SHA,
                                                    "constraints-test.txt": EMPTY_SHA}
    # no files (an install from a wheel, no directory named): an empty record, no error
    monkeypatch.setenv(constraints.ENV_DIR, str(tmp_path / "none"))
    assert run_dir.environment()["constraints"] == {}


def test_a_source_checkout_finds_its_own_constraints_file(monkeypatch):
    monkeypatch.delenv(constraints.ENV_DIR, raising=False)
    assert constraints.constraints_dir() == ROOT
    assert len(constraints_record()["constraints.txt"]) == 64


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_constraints",
                                                  ROOT / ".ci" / "check_constraints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_check_names_each_package_whose_installed_version_differs(check):
    pins = check.read_pins("# header\n\nTorch==2.13.0\nnumpy==2.4.6  # why\nPyYAML==6.0.4\n"
                           "bitsandbytes==0.49.0\n")
    assert pins == {"torch": "2.13.0", "numpy": "2.4.6", "pyyaml": "6.0.4",
                    "bitsandbytes": "0.49.0"}
    have = {"torch": "2.13.0+cpu", "numpy": "2.4.5", "pyyaml": "6.0.4"}.get
    # a local label matches its pin (as pip matches it); a package not installed is no
    # error; numpy at another version is named with both versions
    assert check.differences(pins, have) == ["numpy: installed 2.4.5, pinned 2.4.6"]
    assert check.differences(pins, {"torch": "2.12.0", "numpy": "2.4.6"}.get) == [
        "torch: installed 2.12.0, pinned 2.13.0"]
    with pytest.raises(ValueError, match="line 2: not an exact pin"):
        check.read_pins("torch==2.13.0\nnumpy>=2\n")


def test_the_check_exits_1_naming_the_package(check, tmp_path, capsys):
    f = tmp_path / "constraints.txt"
    f.write_text("pytest==0.0.1\n")  # pytest is installed, at a real version
    assert check.main([str(f)]) == 1
    assert "pytest: installed " in capsys.readouterr().err
    f.write_text("not-an-installed-package-x==1.0\n")
    assert check.main([str(f)]) == 0
