"""Model families: what differs between a causal LM and an encoder classifier.

Two families, told apart by the transformers config (:func:`detect_family`):

* ``causal``: the Llama family and any ``AutoModelForCausalLM`` backbone. The head reads
  the last *real* token (found from the attention mask, :func:`last_token_index`); a pair
  is ``s1 <eos> s2`` (:mod:`loralens.tasks.preprocess`) and batches are padded with EOS.
* ``encoder``: the BERT / RoBERTa / DistilBERT family (bidirectional, loaded with
  ``AutoModel``). The head reads the first token (``cls``: [CLS] / ``<s>``) or the mean
  over real tokens (``mean``); a pair goes through the tokenizer's own pair template
  (``tokenizer(text, text_pair)``: ``[CLS] s1 [SEP] s2 [SEP]``), padded with its own pad
  token, and BERT's segment ids are rebuilt from the [SEP] positions
  (:func:`token_type_ids`).

``model.pooling`` (``auto|last|cls|mean``) picks the pooling; ``auto`` is ``last`` for a
causal LM and ``cls`` for an encoder, and ``cls`` is refused for a causal LM (its first
position sees only itself: the same vector for every input).

LoRA target modules on an encoder (:func:`family_targets`): the study's default
``[q_proj, v_proj]`` means "the attention's query and value projections" and becomes the
model type's own names (BERT/RoBERTa ``[query, value]``, DistilBERT ``[q_lin, v_lin]``,
else PEFT's table); any other list (or ``all-linear``) is used as written. IA3's Llama
defaults likewise become PEFT's defaults for the encoder's type. Causal LMs use every
method's settings as written (unchanged).
"""

from __future__ import annotations

from dataclasses import replace

import torch

CAUSAL, ENCODER = "causal", "encoder"
FAMILIES = (CAUSAL, ENCODER)
POOLINGS = ("auto", "last", "cls", "mean")
DEFAULT_POOLING = {CAUSAL: "last", ENCODER: "cls"}
# Encoder model types (bidirectional self-attention; BERT's is in the causal-LM table too,
# as BertLMHeadModel, so these are decided first).
ENCODER_TYPES = frozenset({
    "bert", "roberta", "distilbert", "xlm-roberta", "camembert", "electra", "albert",
    "deberta", "deberta-v2", "mpnet", "modernbert", "ernie", "xlm-roberta-xl", "megatron-bert",
})
POOLING_ATTR = "loralens_pooling"      # on the backbone's config: the classifier's pooling
SEP_ATTR = "loralens_sep_token_id"     # on an encoder backbone's config: for segment ids
PAIRS_ATTR = "loralens_pairs"          # on a tokenizer: "eos" (causal) or "native" (encoder)
LLAMA_QV = ["q_proj", "v_proj"]        # the study's default LoRA targets
QV_MODULES = {"llama": LLAMA_QV, "bert": ["query", "value"], "roberta": ["query", "value"],
              "distilbert": ["q_lin", "v_lin"]}


def detect_family(config) -> str:
    """``causal`` or ``encoder`` from a transformers config, decided in this order:
    ``is_encoder_decoder`` is refused; ``is_decoder`` means causal; an architecture named
    ``*ForCausalLM``/``*LMHeadModel`` means causal, ``*ForMaskedLM``/``*ForPreTraining``
    encoder; then the model type: an encoder type (:data:`ENCODER_TYPES`), else one
    transformers has a causal-LM class for. Anything else is a ``ValueError``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model type {model_type!r} is an encoder-decoder; loralens supports "
                         "causal LMs and encoders (BERT/RoBERTa family)")
    if getattr(config, "is_decoder", False):
        return CAUSAL
    for arch in getattr(config, "architectures", None) or ():
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return CAUSAL
        if arch.endswith(("ForMaskedLM", "ForPreTraining")):
            return ENCODER
    if model_type in ENCODER_TYPES:
        return ENCODER
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return CAUSAL
    raise ValueError(f"cannot tell whether model type {model_type!r} (architectures "
                     f"{getattr(config, 'architectures', None)}) is a causal LM or an "
                     "encoder; loralens supports both families")


def resolve_pooling(family: str, pooling: str | None = "auto") -> str:
    """The pooling a classifier of ``family`` uses: ``pooling``, or the family's default
    for ``auto``/None; ``cls`` on a causal LM is refused."""
    pooling = pooling or "auto"
    if pooling not in POOLINGS:
        raise ValueError(f"model.pooling: {pooling!r} is not one of {list(POOLINGS)}")
    if pooling == "auto":
        return DEFAULT_POOLING[family]
    if pooling == "cls" and family == CAUSAL:
        raise ValueError("model.pooling: cls (the first token) is not a summary in a causal "
                         "LM (it attends to itself only); use last or mean")
    return pooling


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row: [batch] long.

    Taken from the mask (rightmost position with mask 1), so it works for any
    padding side and whatever token ids the sequence holds.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only: [batch, seq, d] x [batch, seq] -> [batch, d].

    Pad positions are excluded (the study's published code averaged them in).
    """
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row, [batch, seq, d] -> [batch, d]: ``last`` real token, ``cls`` (the
    first position) or ``mean`` over real tokens (:func:`masked_mean`)."""
    if pooling == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(attention_mask)]
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        return masked_mean(hidden, attention_mask)
    raise ValueError(f"unknown pooling {pooling!r}; one of last, cls, mean")


def token_type_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   sep_id: int) -> torch.Tensor:
    """BERT's segment ids of right-padded ``[CLS] s1 [SEP] s2 [SEP]`` rows: 1 after the
    first [SEP] (to the last real token), 0 elsewhere and on pads; all 0 for one text."""
    is_sep = (input_ids == sep_id).long()
    before = torch.cumsum(is_sep, dim=1) - is_sep  # [SEP]s strictly before each position
    return (before > 0).long() * attention_mask.long()


def forward_kwargs(family: str, config, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> dict:
    """Extra keyword arguments of the backbone's forward: ``use_cache=False`` for a causal
    LM; segment ids for an encoder with a segment vocabulary and a known [SEP] id."""
    if family == CAUSAL:
        return {"use_cache": False}
    sep = getattr(config, SEP_ATTR, None)
    if sep is not None and getattr(config, "type_vocab_size", 1) > 1:
        return {"token_type_ids": token_type_ids(input_ids, attention_mask, sep)}
    return {}


def drop_pooler(backbone, family: str) -> None:
    """Remove an encoder's pooler (dense + tanh on [CLS], BERT/RoBERTa), in place: the head
    reads the pooled hidden state itself, so the pooler would be dead weight (trained by
    nothing, yet counted, adapted by ``all-linear`` and saved)."""
    if family == ENCODER and isinstance(getattr(backbone, "pooler", None), torch.nn.Module):
        backbone.pooler = None


def prepare_tokenizer(tok, family: str, name: str):
    """Set a tokenizer up for ``family``, in place: causal LMs pad with EOS (the study) and
    join pairs with EOS; encoders keep their own pad token and pair template. Right
    padding for both."""
    if family == CAUSAL:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {name} has no EOS token; "
                             "the pair separator and padding need one")
        tok.pad_token = tok.eos_token  # the study pads with EOS
    elif tok.pad_token_id is None:
        raise ValueError(f"tokenizer of {name} (an encoder) has no pad token")
    tok.padding_side = "right"
    setattr(tok, PAIRS_ATTR, "eos" if family == CAUSAL else "native")
    return tok


def encode_native(tokenizer, texts, max_length: int) -> list[int]:
    """Token ids of one example through the tokenizer's own (pair) template, truncated to
    ``max_length`` (longest segment first, the [SEP]s kept)."""
    pair = texts[1] if len(texts) > 1 else None
    return list(tokenizer(texts[0], pair, truncation=True, max_length=max_length,
                          add_special_tokens=True)["input_ids"])


def family_targets(model_type: str | None, peft: dict) -> dict:
    """An encoder method's PEFT settings for ``model_type`` (the rule in the module
    docstring; causal LMs use the settings as written, see :func:`for_model`)."""
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
                                      as IA3_FF,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3,
                                      TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA)
    from loralens.models.methods import IA3_DEFAULTS

    out = dict(peft)
    if out.get("type") == "ia3":
        if (out["target_modules"] == IA3_DEFAULTS["target_modules"]
                and out["feedforward_modules"] == IA3_DEFAULTS["feedforward_modules"]
                and model_type in IA3):
            out["target_modules"] = list(IA3[model_type])
            out["feedforward_modules"] = list(IA3_FF[model_type])
        return out
    if out.get("target_modules") == LLAMA_QV:
        qv = QV_MODULES.get(model_type) or LORA.get(model_type)
        if qv:
            out["target_modules"] = list(qv)
    return out


def for_model(method, model):
    """``method`` (a :class:`loralens.models.methods.Method`) with its PEFT targets adapted to
    ``model``'s type (:func:`family_targets`)."""
    if method.family != "peft" or getattr(model, "family", CAUSAL) == CAUSAL:
        return method
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return replace(method, peft=family_targets(model_type, method.peft))


def standard_layout(model) -> bool:
    """Whether ``model`` (a classifier, or a PeftModel around one) saves in transformers'
    ``<Arch>ForSequenceClassification`` layout: a causal LM read at the last token. Others
    (encoders, other poolings) are loralens's own layout, read back by loralens."""
    return (getattr(model, "family", CAUSAL) == CAUSAL
            and getattr(model, "pooling", "last") == "last")


def own_layout_card(model) -> dict | None:
    """What a model card says of a classifier in loralens's own layout (None: standard)."""
    if standard_layout(model):
        return None
    family = getattr(model, "family", CAUSAL)
    inputs = ("the tokenizer's own template, `tokenizer(text, text_pair)`, padded with its "
              "pad token" if family == ENCODER else
              "`loralens.tasks.preprocess.format_input` (`sentence1 + EOS + sentence2`), padded "
              "with EOS")
    return {"family": "an encoder" if family == ENCODER else "a causal LM",
            "pooling": getattr(model, "pooling", "last"), "inputs": inputs}


def family_of_path(path: str, **kw) -> str:
    """The family of the model at ``path`` (a model directory or hub id; ``kw`` go to
    ``AutoConfig.from_pretrained``), or of the local base an adapter directory names
    (``base_model_name_or_path``); ``causal`` where neither says (the default before
    encoders)."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        path, kw = (base, {}) if base and Path(base, "config.json").is_file() else (None, kw)
    try:
        return detect_family(AutoConfig.from_pretrained(path, **kw)) if path else CAUSAL
    except (OSError, ValueError):
        return CAUSAL


def require_servable(family: str, pooling: str, where: str) -> None:
    """Refuse, naming ``where``, a model the serving paths would compute wrongly: the lean
    runtime, the merged and the PEFT backends read the last real token of a causal LM."""
    from loralens.core.errors import ConfigError

    if family != CAUSAL or pooling != "last":
        raise ConfigError(f"{where}: serving supports causal LMs with last-token pooling only; "
                         f"this model is a {family} with {pooling} pooling (train, extract, "
                         "drift, weights and report work for it)", "model.name")
