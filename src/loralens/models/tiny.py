"""The tiny random Llama model and byte-level tokenizer the unit tests and the micro
preset use (registry name ``tiny-random``): built once from a fixed seed into the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loralens.models.cache import build_cached, cache_root

if TYPE_CHECKING:
    from loralens.models.registry import ModelEntry
import hashlib
import json
from pathlib import Path
import torch



def tiny_llama_config(**overrides):
    """A tiny random Llama config for unit tests (vocab of the SmolLM2 tokenizer)."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              pad_token_id=2, eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)
    kw.update(overrides)
    return LlamaConfig(**kw)


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
