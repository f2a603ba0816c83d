"""Forgetting: how much worse a fine-tuned backbone predicts general text than the base.

The measure of PEFT's method comparison: the language-modelling cross-entropy (nats per
predicted token) of the backbone's final hidden states (after the final norm) through
the *base* model's LM head (its input embedding where the model ties them), on a fixed
general-text sample, for the fine-tuned model minus the base model. A classifier has
no LM head of its own: using the base's keeps the readout fixed, so the difference is
the backbone's change alone. The untouched base has a forgetting of exactly 0.

The sample: a local ``.txt`` file (one text per non-empty line) or ``.jsonl`` file
(``{"text": ...}`` per line), ``weights.forgetting_examples`` texts drawn with a fixed
seed; by default (offline) validation sentences of the built-in GLUE tasks the model
was *not* trained on whose files can be loaded (each sentence of a pair is a text of its
own; the report lists the tasks used), the same texts for every model of a task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from loralens.tasks import rows as D
from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.tasks.registry import TASKS, get_task

CHUNK = 256  # positions per LM-head product: [CHUNK, vocab] logits at a time


@dataclass
class TextSample:
    texts: list[str]
    source: str        # what the texts are, shown in the report


def read_text_file(path: str | Path) -> list[str]:
    """Texts of a ``.txt`` (one per non-empty line) or ``.jsonl`` (``"text"`` per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights.forgetting_text: {path} not found")
    if path.suffix != ".jsonl":
        texts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                 if ln.strip()]
    else:
        from loralens.tasks.sources import read_jsonl

        texts = []
        for where, row in read_jsonl(path)[1]:
            if not isinstance(row.get("text"), str):
                raise D.DataError(f"{where}: expected a string \"text\"")
            texts.append(row["text"])
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def _draw(texts: Sequence[str], n: int, seed: int) -> list[str]:
    unique = sorted(set(t for t in texts if t.strip()))
    if len(unique) <= n:
        return unique
    idx = np.random.default_rng(seed).choice(len(unique), size=n, replace=False)
    return [unique[i] for i in sorted(idx)]


def text_sample(task: str, wc, glue_dir: str | None) -> TextSample:
    """The general-text sample of models trained on ``task`` (``wc``: the weights config)."""
    if wc.forgetting_text:
        texts = _draw(read_text_file(wc.forgetting_text), wc.forgetting_examples,
                      wc.forgetting_seed)
        return TextSample(texts, f"{len(texts)} texts of {wc.forgetting_text}")
    texts, used = [], []
    for other in sorted(TASKS):
        if other == get_task(task).name:
            continue
        try:
            split = TS.load_split(TASKS[other], "validation", glue_dir)
        except (D.DataError, OSError):  # not on this disk (offline): the others are used
            continue
        drawn = _draw([t for e in split.examples for t in e.texts], wc.forgetting_examples,
                      wc.forgetting_seed)
        texts += drawn
        used.append(f"{other} ({len(drawn)})")
    if not texts:
        raise D.DataError(f"no GLUE task besides {task} could be loaded for the forgetting "
                          "sample; set weights.forgetting_text to a local .txt or .jsonl file")
    return TextSample(texts, "GLUE validation sentences of the tasks not trained on: "
                             + ", ".join(used))


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (the tokenizer's own special tokens, e.g. a BOS), truncated;
    texts shorter than 2 tokens predict nothing and are dropped."""
    out = [list(tokenizer(t, add_special_tokens=True)["input_ids"])[:max_length] for t in texts]
    return [ids for ids in out if len(ids) >= 2]


def base_lm_head(base) -> torch.Tensor:
    """The base model's LM-head weight [vocab, hidden] (float32): its output embedding,
    which is the input embedding where the model ties them."""
    from transformers import AutoModelForCausalLM

    if getattr(base, "family", "causal") != "causal":
        raise ValueError(f"forgetting (next-token cross-entropy) needs a causal LM; "
                         f"{base.name} is an encoder: set weights.forgetting=false")

    lm = AutoModelForCausalLM.from_pretrained(base.resolved.path, dtype=torch.float32,
                                              use_safetensors=True,
                                              trust_remote_code=base.trust_remote_code,
                                              revision=base.revision)
    return lm.get_output_embeddings().weight.detach().clone()


@torch.no_grad()
def lm_cross_entropy(backbone: nn.Module, head: torch.Tensor, input_ids: Sequence[Sequence[int]],
                     pad_id: int, batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats per predicted token) and the token count.

    ``backbone`` returns ``last_hidden_state`` (after the final norm); logits are
    ``hidden @ head.T``; only real next tokens count (the attention mask). Batches are
    fixed (sorted by length), so the same backbone gives the same value bit for bit.
    """
    backbone.eval()
    lengths = np.array([len(x) for x in input_ids], dtype=np.int64)
    total, count = 0.0, 0
    for idx in B.eval_batches(lengths, batch_size):
        ids, mask = B.collate([input_ids[i] for i in idx], pad_id)
        h = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        keep = (mask[:, :-1] * mask[:, 1:]).bool()
        states, targets = h[:, :-1][keep], ids[:, 1:][keep]
        for i in range(0, len(targets), CHUNK):
            logits = states[i:i + CHUNK].float() @ head.T
            total += float(nn.functional.cross_entropy(logits, targets[i:i + CHUNK],
                                                       reduction="sum").double())
        count += int(len(targets))
    if not count:
        raise ValueError("the forgetting sample has no token to predict")
    return total / count, count
