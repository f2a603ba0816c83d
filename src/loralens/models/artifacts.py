"""Trained models as artifacts the ecosystem loads as they are, and loralens reads back.

* LoRA: PEFT's standard adapter layout. The classifier's parameter names are those of
  transformers' ``<Arch>ForSequenceClassification`` (``model.layers...``, head ``score``),
  so the keys are ``base_model.model.model.layers...``; ``adapter_config.json`` says
  ``task_type: SEQ_CLS``, records the base (``base_model_name_or_path``: the local
  directory of the converted base, or a hub id) and keeps the head in
  ``modules_to_save: ["score"]``. ``PeftModel.from_pretrained(
  AutoModelForSequenceClassification.from_pretrained(base, num_labels=n), adapter_dir)``
  and ``AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)`` load it.
* Full fine-tuning (and a merged adapter): a standard sequence-classification checkpoint
  (``config.json`` with the architecture, ``num_labels``, ``id2label``/``label2id`` from
  the task's label names and ``pad_token_id``; ``model.safetensors``), which
  ``AutoModelForSequenceClassification`` and ``pipeline("text-classification")`` load.

Every artifact carries the tokenizer (pad token = EOS, right padding) and a model card
(``README.md``) stating the input preprocessing (:mod:`loralens.tasks.preprocess`).

Old layouts stay readable: adapters keyed ``base_model.model.backbone.*`` are renamed on
load (:func:`load_adapter`); old full checkpoints (``backbone.*``) by the classifier's
load-time hook (``models._rename_old_keys``). Only the standard layouts are written.

An encoder classifier (BERT/RoBERTa family) or a pooling other than ``last`` has no
transformers class that computes it (``BertForSequenceClassification`` puts its own
pooler and ``classifier`` on [CLS]): it is written in the same files, readable by
loralens (``models.load_trained``), but claims no transformers class (no
``architectures``; an adapter without ``task_type``) and its card says so.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from loralens.models.families import standard_layout
from loralens.models.classifier import NEW_PREFIX, OLD_PREFIX

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class ArtifactError(ValueError):
    """A directory that is not a readable adapter or model checkpoint."""


# --------------------------------------------------------------------------- writing

def base_name_or_path(model: nn.Module) -> str | None:
    """Where the backbone was loaded from (``config._name_or_path``): a local model
    directory (the converted cache of a packaged model) or a hub id."""
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def seq_cls_architecture(model_type: str | None) -> str | None:
    """transformers' sequence-classification class for a ``model_type`` (``llama``:
    ``LlamaForSequenceClassification``), or None when transformers has none."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as NAMES)

    return NAMES.get(model_type)


def save_tokenizer(tokenizer, out: Path) -> None:
    """The tokenizer as training used it: pad token = EOS, right padding."""
    tok = copy.copy(tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    tok.save_pretrained(str(out))


def write_adapter(model: nn.Module, out: Path, tokenizer=None, base: str | None = None) -> None:
    """A PeftModel's adapter in PEFT's standard sequence-classification layout, into ``out``."""
    cfg = model.peft_config[model.active_adapter]
    saved = (cfg.task_type, cfg.base_model_name_or_path, getattr(cfg, "auto_mapping", None))
    # SEQ_CLS also keeps PEFT from writing an auto_mapping to loralens; loralens's own
    # layout (an encoder, a pooling other than last) claims no transformers class.
    cfg.task_type = "SEQ_CLS" if standard_layout(model) else None
    cfg.auto_mapping = None    # (an old adapter read back carries one)
    cfg.base_model_name_or_path = base or saved[1] or base_name_or_path(model)
    try:
        model.save_pretrained(str(out), safe_serialization=True,
                              selected_adapters=[model.active_adapter])
    finally:
        cfg.task_type, cfg.base_model_name_or_path, cfg.auto_mapping = saved
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)


def write_full(model: nn.Module, out: Path, tokenizer=None,
               label_names: Sequence[str] | None = None) -> None:
    """A ``CausalLMClassifier`` as a standard sequence-classification checkpoint in ``out``."""
    from safetensors.torch import save_file

    n = model.num_labels
    names = list(label_names) if label_names else [f"LABEL_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} label names for a head of {n} labels")
    config = copy.deepcopy(model.config)
    arch = (seq_cls_architecture(getattr(config, "model_type", None))
            if standard_layout(model) else None)  # loralens's own layout: no class claimed
    config.architectures = [arch] if arch else None
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    pad = pad if pad is not None else config.pad_token_id
    config.pad_token_id = pad if pad is not None else _first(config.eos_token_id)
    config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def merged(model: nn.Module) -> nn.Module:
    """A copy of a LoRA PeftModel with the adapter merged: a plain classifier."""
    return copy.deepcopy(model).merge_and_unload()


# --------------------------------------------------------------------------- reading

def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_state(path: Path) -> dict[str, torch.Tensor]:
    """An adapter's tensors under the current names (old ``backbone.`` keys renamed)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_adapter_dir(path) or not (path / ADAPTER_WEIGHTS).is_file():
        raise ArtifactError(f"{path}: not a PEFT adapter directory (needs {ADAPTER_CONFIG} and "
                            f"{ADAPTER_WEIGHTS}; .bin files are not read)")
    old = PEFT_PREFIX + OLD_PREFIX
    return {(PEFT_PREFIX + NEW_PREFIX + k[len(old):] if k.startswith(old) else k): v
            for k, v in load_file(str(path / ADAPTER_WEIGHTS)).items()}


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load the adapter in ``path`` (standard or old layout) onto ``model`` (a
    ``CausalLMClassifier``, or a ``PeftModel`` around one to add another adapter) for
    inference; returns the ``PeftModel`` in eval mode.

    Like ``PeftModel.from_pretrained``/``load_adapter``, but a key of the file that
    lands nowhere, or an adapter weight of the model that the file lacks, is an error
    (PEFT only warns, and the adapter then silently does nothing).
    """
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    path = Path(path)
    state = adapter_state(path)
    cfg = PeftConfig.from_pretrained(str(path))
    # loralens runs its own classifier under a plain PeftModel (the class training used);
    # task_type only picks PEFT's wrapper class, the computation is the same.
    cfg.task_type, cfg.inference_mode = None, True
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, cfg)
    else:
        model = PeftModel(model, cfg, adapter_name)
    result = set_peft_model_state_dict(model, state, adapter_name)
    missing = [k for k in result.missing_keys if f".{adapter_name}." in k]
    if missing or result.unexpected_keys:
        raise ArtifactError(f"{path}: adapter does not fit the model: missing {missing[:3]}"
                            f"{'...' if len(missing) > 3 else ''}, unexpected "
                            f"{result.unexpected_keys[:3]}")
    return model.eval()


def load_full(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a full checkpoint (standard or old layout) into a ``CausalLMClassifier``."""
    from safetensors.torch import load_file

    st = Path(path) / "model.safetensors"
    if not st.is_file():
        raise ArtifactError(f"{path}: no model.safetensors (full checkpoints are read from "
                            "safetensors only)")
    model.load_state_dict(load_file(str(st)))
    return model.eval()


def label_names(path: str | Path) -> list[str] | None:
    """A standard checkpoint's label names in id order (None for other directories)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    id2label = json.loads(cfg.read_text()).get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] if id2label else None
