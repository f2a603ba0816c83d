"""Shared fixtures: the real GLUE files, the embedded SmolLM2, tiny random Llama models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LORALENS_CACHE", str(ROOT / ".cache" / "loralens"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    path = Path(os.environ.get("LORALENS_GLUE_DIR") or ROOT.parent / "shared" / "glue")
    assert (path / "SST-2" / "dev.tsv").is_file(), f"GLUE files not found under {path}"
    return path


@pytest.fixture(scope="session")
def smollm2():
    """(resolved model, tokenizer, backbone factory) of the embedded default."""
    from loralens.config import StudyConfig
    from loralens.train import load_base

    return load_base(StudyConfig())


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture
def tiny_backbone():
    """A tiny randomly initialised Llama (2 layers, hidden 32) with SmolLM2's vocabulary."""
    from transformers import AutoModel

    from loralens.models import tiny_llama_config

    torch.manual_seed(0)
    return AutoModel.from_config(tiny_llama_config(), dtype=torch.float32).eval()
