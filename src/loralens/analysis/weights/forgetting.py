"""Forgetting: how much worse a fine-tuned backbone predicts general text than the base.

The measure of PEFT's method comparison: the language-modelling cross-entropy (nats per
predicted token) of the backbone's final hidden states (after the final norm) through
the *base* model's LM head (its input embedding where the model ties them), on a fixed
general-text sample, for the fine-tuned model minus the base model. A classifier has
no LM head of its own: using the base's keeps the readout fixed, so the difference is
the backbone's change alone. The untouched base has a forgetting of exactly 0.

The sample: one fixed general corpus for every model of every task (a text that differs
per task would make the tasks' forgetting incomparable). By default the WikiText-2 test
split, tokenized release (``wikitext-2/test.txt`` under ``$LORALENS_TEXT_DIR``, else under
``../shared/text`` from the working directory (as the Makefile's GLUE default) or from the
source checkout; on the hub:
``Salesforce/wikitext``, config ``wikitext-2-v1``, split ``test``), or a user's file
(``weights.forgetting_text``: a ``.txt``, one text per line, or a ``.jsonl`` with a
``"text"`` per line). Its text lines (non-empty, not a WikiText heading such as
`` = = Career = = ``) are numbered by their line in the file (1-based) and
``weights.forgetting_examples`` of them are drawn with ``weights.forgetting_seed``: the same
lines for every model. The file's sha256 is recorded with the line numbers, and checked
against a ``SHA256SUMS`` beside the file (or one folder up) that lists it. A missing corpus
is a :class:`CorpusMissing` whose message names the path and the key; :func:`skip_reason`
says so before any model is loaded, for a stage that skips forgetting instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from loralens.tasks import rows as D
from loralens.training import batches as B

CHUNK = 256  # positions per LM-head product: [CHUNK, vocab] logits at a time

TEXT_ENV = "LORALENS_TEXT_DIR"
CORPUS_IN_TEXT_DIR = Path("wikitext-2") / "test.txt"
SHARED_TEXT_DIR = Path("..") / "shared" / "text"  # the project's machines and CI (relative)
_SRC = Path(__file__).resolve().parents[3]  # src/ of a source checkout (an editable install)
WIKITEXT2_TEST_SHA256 = "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"
HUB_HINT = ("the test split of Salesforce/wikitext, config wikitext-2-v1, one line per row, "
            "saved as wikitext-2/test.txt")


class CorpusMissing(FileNotFoundError):
    """The forgetting corpus is not on this disk; the message names the path and the key."""


@dataclass
class TextSample:
    texts: list[str]
    source: str        # what the texts are, shown in the report
    record: dict = field(default_factory=dict)  # corpus, its sha256, seed, line numbers


def corpus_path(wc) -> tuple[Path, str]:
    """(the corpus file, what chose it) for the weights config ``wc``:
    ``weights.forgetting_text``, else ``$LORALENS_TEXT_DIR/wikitext-2/test.txt``, else
    ``../shared/text/wikitext-2/test.txt`` relative to the working directory, else relative
    to a source checkout's root (where the package runs from one)."""
    if wc.forgetting_text:
        return Path(wc.forgetting_text).expanduser(), "weights.forgetting_text"
    env = os.environ.get(TEXT_ENV)
    if env:
        return Path(env).expanduser() / CORPUS_IN_TEXT_DIR, f"${TEXT_ENV}"
    default = SHARED_TEXT_DIR / CORPUS_IN_TEXT_DIR
    beside = _SRC.parent / default  # a command run elsewhere from a checkout (the docs' test)
    if not default.is_file() and _SRC.name == "src" and beside.is_file():
        return beside, f"the default beside the checkout (no ${TEXT_ENV})"
    return default, f"the default (no ${TEXT_ENV})"


def skip_reason(wc) -> str | None:
    """Why forgetting cannot be measured here (the corpus file is missing), else None."""
    path, origin = corpus_path(wc)
    if path.is_file():
        return None
    return (f"forgetting skipped: its corpus {path.absolute()} ({origin}) not found; set "
            f"weights.forgetting_text to a local .txt or .jsonl file, or ${TEXT_ENV} to a "
            f"folder holding {CORPUS_IN_TEXT_DIR} ({HUB_HINT})")


def listed_sha256(path: Path) -> tuple[str, Path] | None:
    """(expected sha256, the SHA256SUMS file) where a ``SHA256SUMS`` (``sha256sum``'s format)
    in the file's folder or the folder above lists it, else None. An entry's path is taken
    relative to the SHA256SUMS's folder or the one above it (``wikitext-2/SHA256SUMS``
    lists ``wikitext-2/test.txt``: ``sha256sum -c`` run from the folder above)."""
    path = path.resolve()
    for folder in (path.parent, path.parent.parent):
        sums = folder / "SHA256SUMS"
        if not sums.is_file():
            continue
        for line in sums.read_text(encoding="utf-8").splitlines():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                continue
            name = parts[1].strip().lstrip("*")
            if path in ((folder / name).resolve(), (folder.parent / name).resolve()):
                return parts[0].lower(), sums
    return None


def _file_texts(path: Path) -> list[str]:
    """The text of each line of a ``.txt`` (the line) or ``.jsonl`` (its ``"text"``; ""
    for an empty line), index i = line i + 1. Lines are split at newlines only."""
    raw = path.read_text(encoding="utf-8")
    lines = [ln.rstrip("\r") for ln in raw.split("\n")]
    if raw.endswith("\n"):
        lines.pop()
    if path.suffix != ".jsonl":
        return lines
    out = []
    for no, ln in enumerate(lines, start=1):
        if not ln.strip():
            out.append("")
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            raise D.DataError(f"{path}:{no}: not valid JSON: {e.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise D.DataError(f"{path}:{no}: expected a string \"text\"")
        out.append(row["text"])
    return out


def read_text_file(path: str | Path) -> list[str]:
    """Texts of a ``.txt`` (one per non-empty line) or ``.jsonl`` (``"text"`` per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorpusMissing(f"weights.forgetting_text: {path} not found")
    texts = [t.strip() for t in _file_texts(path) if t.strip()]
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def is_heading(text: str) -> bool:
    """A WikiText heading: `` = Title = ``, `` = = Section = = `` (not a text to predict)."""
    s = text.strip()
    return len(s) >= 2 and s[0] == "=" and s[-1] == "="


def text_line_numbers(texts: Sequence[str]) -> list[int]:
    """Line numbers (1-based) of the non-empty, non-heading lines."""
    return [i + 1 for i, t in enumerate(texts) if t.strip() and not is_heading(t)]


def sample_line_numbers(eligible: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` of ``eligible`` drawn without replacement with ``seed`` (all when fewer),
    in file order: a function of its arguments alone, so every model gets the same lines."""
    if len(eligible) <= n:
        return list(eligible)
    idx = np.random.default_rng(seed).choice(len(eligible), size=n, replace=False)
    return sorted(int(eligible[i]) for i in idx)


def corpus_sample(wc) -> TextSample:
    """The forgetting sample of the weights config ``wc`` (the same for every model and
    task). Raises :class:`CorpusMissing` (path and key named) when the file is missing and
    ``DataError`` when its sha256 differs from the ``SHA256SUMS`` that lists it."""
    path, origin = corpus_path(wc)
    reason = skip_reason(wc)
    if reason:
        raise CorpusMissing(reason)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    listed = listed_sha256(path)
    if listed and listed[0] != sha:
        raise D.DataError(f"{path.resolve()}: sha256 {sha} differs from {listed[0]} listed "
                          f"in {listed[1]} (a changed or partial copy: fetch it again)")
    texts = _file_texts(path)
    eligible = text_line_numbers(texts)
    if not eligible:
        raise D.DataError(f"{path.resolve()}: no text line (non-empty, not a heading)")
    chosen = sample_line_numbers(eligible, wc.forgetting_examples, wc.forgetting_seed)
    name = ("WikiText-2 test split (wikitext-2-v1, tokenized)" if sha == WIKITEXT2_TEST_SHA256
            else str(path))
    record = {"corpus": str(path.resolve()), "origin": origin, "sha256": sha,
              "sha256_checked_against": str(listed[1]) if listed else None,
              "seed": wc.forgetting_seed, "text_lines": len(eligible),
              "line_numbers": chosen}
    return TextSample([texts[k - 1].strip() for k in chosen],
                      f"{name}: {len(chosen)} of {len(eligible)} text lines (seed "
                      f"{wc.forgetting_seed}), sha256 {sha}", record)


def text_sample(task: str | None, wc, glue_dir=None) -> TextSample:
    """The general-text sample of models trained on ``task``: :func:`corpus_sample`, the
    same for every task (``task`` and ``glue_dir`` are not used: kept for callers)."""
    return corpus_sample(wc)


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
