"""Shared fixtures: the real GLUE files, the embedded SmolLM2 (integration tests only), and
the tiny random models of the unit tests (the registry's ``tiny-random``, built in code)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LORALENS_CACHE", str(ROOT / ".cache" / "loralens"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The hub is unreachable here and in CI: fail fast instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Under pytest-xdist (`make test`: two workers on two cores) each worker, and every process
# its tests start (they inherit the environment), computes on one thread: two workers of
# two threads each oversubscribed the cores and ran the smoke preset's sanity and search
# stages 4x slower than one process alone.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if XDIST_WORKERS > 1:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

# Fixtures that load the real SmolLM2: a test that uses them belongs to a tier that says so.
SMOLLM2_FIXTURES = {"smollm2", "tokenizer"}
SMOLLM2_TIERS = ("integration", "e2e")


# The tier of a test is its folder: everything under tests/integration/ is marked
# integration and everything under tests/e2e/ e2e (``-m`` then selects by folder); other marks
# (slow, gpu) stay on the tests themselves.
TIER_FOLDERS = {"integration": ROOT / "tests" / "integration", "e2e": ROOT / "tests" / "e2e"}


# `make test` runs the suite on two pytest-xdist workers with ``--dist loadgroup``. Each test
# file is one group (its module fixtures, e.g. the drills' uninterrupted reference study, are
# built once, on one worker); files that start a local Ray instance share a group, so two Ray
# clusters never start side by side.
XDIST_SHARED_GROUPS = {"ray": ("tests/integration/test_ray.py",
                               "tests/integration/test_ray_serve.py")}


def xdist_group_of(relpath: str) -> str:
    """The pytest-xdist group of the tests in ``relpath`` (a path relative to the repository)."""
    for group, files in XDIST_SHARED_GROUPS.items():
        if relpath in files:
            return group
    return relpath


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker, and before xdist groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.path))
        for mark, folder in TIER_FOLDERS.items():
            if path.is_relative_to(folder):
                item.add_marker(getattr(pytest.mark, mark))
        if item.get_closest_marker("xdist_group") is None and path.is_relative_to(ROOT):
            item.add_marker(pytest.mark.xdist_group(xdist_group_of(
                path.relative_to(ROOT).as_posix())))


def pytest_runtest_setup(item):
    uses = SMOLLM2_FIXTURES & set(getattr(item, "fixturenames", ()))
    if uses and not any(item.get_closest_marker(m) for m in SMOLLM2_TIERS):
        pytest.fail(f"{item.nodeid} uses the SmolLM2 fixture(s) {sorted(uses)} but is not "
                    "marked integration or e2e: unit tests use tiny_base / tiny_tokenizer",
                    pytrace=False)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    path = Path(os.environ.get("LORALENS_GLUE_DIR") or ROOT.parent / "shared" / "glue")
    assert (path / "SST-2" / "dev.tsv").is_file(), f"GLUE files not found under {path}"
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default as a ``models.Base`` (integration tests only)."""
    from loralens.core.config import StudyConfig
    from loralens.models.classifier import load_base

    return load_base(StudyConfig())


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    """SmolLM2's tokenizer (integration tests only; unit tests use ``tiny_tokenizer``)."""
    return smollm2.tokenizer


@pytest.fixture(scope="session")
def tiny_base():
    """The registry's ``tiny-random`` model as a ``models.Base``: a 2-layer, hidden-32
    random Llama and a byte-level tokenizer (byte b = id 3 + b, BOS 1, EOS = pad 2), built
    in code into the cache on first use. ``backbone()`` loads the same weights every call."""
    from loralens.core.config import ModelConfig
    from loralens.models.classifier import load_base

    return load_base(ModelConfig(name="tiny-random"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    return tiny_base.tokenizer


@pytest.fixture
def tiny_backbone():
    """A tiny randomly initialised Llama (2 layers, hidden 32) with SmolLM2's vocabulary size
    (token ids up to 49151; no tokenizer), seeded: the same weights in every test."""
    from transformers import AutoModel

    from loralens.models.tiny import tiny_llama_config

    torch.manual_seed(0)
    return AutoModel.from_config(tiny_llama_config(), dtype=torch.float32).eval()


@pytest.fixture()
def offline(monkeypatch):
    """The hub unreachable for this test even where the environment allows it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def adapter_dir(tiny_base, tmp_path):
    """A served adapter root: one random LoRA adapter of the tiny model in ``ROOT/a``."""
    from tests.helpers.adapters import random_adapter

    root = tmp_path / "adapters"
    random_adapter(tiny_base.backbone(), 0, root / "a")
    return root
