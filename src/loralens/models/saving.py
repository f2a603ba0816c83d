"""Saving and loading a trained job's model: PEFT methods as PEFT's standard adapter
layout, every other method as a standard sequence-classification checkpoint, each with a
model card (:mod:`.artifacts`, :mod:`.cards`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn

from loralens.models import families as F
from loralens.models.artifacts import load_adapter, load_full, write_adapter, write_full
from loralens.models.cards import write_card
from loralens.models.classifier import CausalLMClassifier
from loralens.core.run_dir import RunDir


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_trained(model: nn.Module, method: str, out: Path, tokenizer=None,
                 label_names: Sequence[str] | None = None, card: dict | None = None) -> Path:
    """Save in the ecosystem's standard layouts (:mod:`loralens.models.artifacts`), safetensors
    only, the directory replaced atomically (a kill leaves the old one or the new one).

    LoRA: PEFT's standard sequence-classification adapter; full: a standard
    ``<Arch>ForSequenceClassification`` checkpoint with ``label_names``. With
    ``tokenizer`` the tokenizer is saved beside the weights; a model card (README.md)
    states the preprocessing and what ``card`` says (task, scores, ...).
    """
    from loralens.core.files import atomic_dir

    with atomic_dir(out) as tmp:
        if _is_peft(model):  # any PEFT method: PEFT's adapter layout
            write_adapter(model, tmp, tokenizer)
        else:
            write_full(model, tmp, tokenizer, label_names)
        write_card(tmp, {"method": method, "label_names": label_names, "path": str(out),
                         "adapter": _is_peft(model), "own_layout": F.own_layout_card(model),
                         **(card or {})})
    return Path(out)


def load_trained(job_dir: Path, backbone: nn.Module, num_labels: int) -> nn.Module:
    """Rebuild a trained classifier from a job directory (safetensors only), in eval mode;
    standard and old layouts alike (:mod:`loralens.models.artifacts`)."""
    model = CausalLMClassifier(backbone, num_labels)
    adapter = RunDir.job_adapter_dir(job_dir)
    if adapter.is_dir():
        return load_adapter(model, adapter)
    return load_full(model, RunDir.job_model_dir(job_dir))
