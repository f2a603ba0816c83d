"""The input preprocessing every loralens model was trained with, as one function users import.

loralens strips each text field (SST-2's dev sentences end in a space) and feeds a pair as
``sentence1 <eos> sentence2``: the first field with the tokenizer's own special tokens
(e.g. a BOS), then the EOS token as separator, then the second field. Tokenizing the
string :func:`format_input` returns gives exactly those ids (special tokens in the text
are matched as such, so each field is tokenized on its own):

    >>> from transformers import AutoTokenizer
    >>> from loralens.tasks.preprocess import format_input
    >>> tok = AutoTokenizer.from_pretrained(model_dir)
    >>> tok(format_input("A man is eating.", "Someone eats.", sep=tok.eos_token))

Feeding the raw, unstripped text or transformers' ``text_pair`` (whose pair template
differs per tokenizer) gives other token ids and other logits. Training truncated each
example at ``data.max_length`` tokens (after joining); pass ``truncation=True,
max_length=...`` to get the same for longer inputs.
"""

from __future__ import annotations

from typing import Sequence


def format_input(text: str, text_pair: str | None = None, *, sep: str) -> str:
    """The text to tokenize for one example: ``text.strip()``, or for a pair
    ``text.strip() + sep + text_pair.strip()``, where ``sep`` is the tokenizer's EOS token
    (``tokenizer.eos_token``, e.g. ``"<|im_end|>"`` for SmolLM2-Instruct)."""
    if not isinstance(text, str) or (text_pair is not None and not isinstance(text_pair, str)):
        raise TypeError("format_input takes strings: text and, for a pair task, text_pair")
    if not sep:
        raise ValueError("format_input needs sep=tokenizer.eos_token (the pair separator)")
    if text_pair is None:
        return text.strip()
    return f"{text.strip()}{sep}{text_pair.strip()}"


def format_fields(fields: Sequence[str], sep: str) -> str:
    """:func:`format_input` for a task's text columns in order (one or two fields)."""
    if len(fields) not in (1, 2):
        raise ValueError(f"an example has one or two text fields, not {len(fields)}")
    return format_input(fields[0], fields[1] if len(fields) == 2 else None, sep=sep)
