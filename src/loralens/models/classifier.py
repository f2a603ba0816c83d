"""The causal-LM classifier: a backbone, pooling over real tokens and a linear head
(:class:`CausalLMClassifier`), the base model of a study (:func:`load_base`) and a method
applied to it (:func:`apply_method`, behaviour from the method registry).
"""

from __future__ import annotations

from loralens.models.registry import (ResolvedModel, load_backbone, load_model_config,
                                      load_tokenizer, resolve_model)
from dataclasses import dataclass
from typing import Any
import torch
from torch import nn
from loralens.models import families as F



@dataclass
class ClassifierOutput:
    logits: torch.Tensor                       # [batch, num_labels]
    loss: torch.Tensor | None = None           # mean cross-entropy, when labels are given
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + every layer


class CausalLMClassifier(nn.Module):
    """A backbone with a linear head (``score``) on one pooled vector per input: a causal
    LM's last real token, an encoder's first token or mean (:mod:`loralens.models.families`;
    ``pooling`` None: the config's ``loralens_pooling``, else the family's default).

    The backbone is the submodule ``model`` (alias ``backbone``): a causal LM's parameter
    names are those of transformers' ``<Arch>ForSequenceClassification`` (``model.layers``,
    ``score.weight``), so its adapters and checkpoints load into that class as they are.
    Old state dicts (``backbone.*``) are renamed on load (:func:`_rename_old_keys`).
    """

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str | None = None):
        super().__init__()
        self.family = F.detect_family(backbone.config)
        self.pooling = F.resolve_pooling(
            self.family, pooling or getattr(backbone.config, F.POOLING_ATTR, None))
        F.drop_pooler(backbone, self.family)
        self.model = backbone
        self.register_load_state_dict_pre_hook(_rename_old_keys)
        self.config = backbone.config  # PEFT and generic tooling look for .config
        hidden = backbone.config.hidden_size
        self.score = nn.Linear(hidden, num_labels, bias=False)
        std = getattr(backbone.config, "initializer_range", 0.02)
        nn.init.normal_(self.score.weight, std=std)
        self.score.to(next(backbone.parameters()).dtype)

    @property
    def backbone(self) -> nn.Module:
        return self.model

    @property
    def num_labels(self) -> int:
        return self.score.out_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, output_hidden_states: bool = False,
                **_: object) -> ClassifierOutput:
        extra = F.forward_kwargs(self.family, self.config, input_ids, attention_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=output_hidden_states, **extra)
        pooled = F.pool(out.last_hidden_state, attention_mask, self.pooling)
        logits = self.score(pooled.to(self.score.weight.dtype)).float()
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(logits, loss, out.hidden_states if output_hidden_states else None)


OLD_PREFIX, NEW_PREFIX = "backbone.", "model."


def _rename_old_keys(module, state_dict, prefix, *_):
    """Load-time rename of loralens's old parameter names (``backbone.*``, before the
    backbone became ``model``) in a state dict, in place: old full checkpoints and old PEFT
    adapters (``base_model.model.backbone.*``) load into the current classifier."""
    old = prefix + OLD_PREFIX
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + NEW_PREFIX + key[len(old):]] = state_dict.pop(key)


def build_classifier(backbone: nn.Module, num_labels: int, seed: int) -> CausalLMClassifier:
    """Attach a freshly initialised head; the head's initialisation depends on ``seed`` only."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return CausalLMClassifier(backbone, num_labels)
    finally:
        torch.random.set_rng_state(gen_state)


# --------------------------------------------------------------------------- the base model

@dataclass
class Base:
    """The base model of a study: where it comes from, its tokenizer, and fresh weights on
    demand (each call of :meth:`backbone` loads a new copy: training modifies weights)."""

    resolved: ResolvedModel
    tokenizer: Any
    trust_remote_code: bool = False
    revision: str | None = None
    family: str = F.CAUSAL        # model_families.detect_family of the config
    pooling: str = "last"         # resolved model.pooling (never auto)

    @property
    def name(self) -> str:
        return self.resolved.name

    @property
    def note(self) -> str:
        return self.resolved.note

    def backbone(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A fresh backbone; its config carries the pooling (and an encoder's [SEP] id)."""
        bb = load_backbone(self.resolved, trust_remote_code=self.trust_remote_code,
                           revision=self.revision, dtype=dtype)
        setattr(bb.config, F.POOLING_ATTR, self.pooling)
        if self.family == F.ENCODER and getattr(self.tokenizer, "sep_token_id", None) is not None:
            setattr(bb.config, F.SEP_ATTR, self.tokenizer.sep_token_id)
        return bb


def load_base(model_cfg) -> Base:
    """The base model named by a ``ModelConfig`` (name, revision, trust_remote_code), or
    by a ``StudyConfig`` (its ``model`` section)."""
    mc = getattr(model_cfg, "model", model_cfg)
    resolved = resolve_model(mc.name)
    family = F.detect_family(load_model_config(resolved, mc.trust_remote_code, mc.revision))
    pooling = F.resolve_pooling(family, getattr(mc, "pooling", "auto"))
    tokenizer = load_tokenizer(resolved, trust_remote_code=mc.trust_remote_code,
                               revision=mc.revision, family=family)
    return Base(resolved, tokenizer, mc.trust_remote_code, mc.revision, family, pooling)


# --------------------------------------------------------------------------- methods, save, load

def apply_method(model: CausalLMClassifier, method: str, cfg) -> nn.Module:
    """Make ``model`` trainable for ``method``: the only place methods differ.

    ``method`` is a name of the method registry (:mod:`loralens.models.methods`: built-ins and
    ``cfg.method_defs``). ``full`` trains every parameter; ``head`` only the head;
    a PEFT method (``lora``: from ``cfg.lora``) wraps the classifier with its adapter
    (head trained and saved with it, as ``modules_to_save``); on an encoder the default
    targets become its own names (:func:`model_families.for_model`).
    """
    from loralens.models.methods import get_method, make_trainable

    return make_trainable(model, F.for_model(get_method(method, cfg), model))
