"""Tokenization and batching: a split's texts encoded with the model's own pair format
(:func:`encode_split`), batches grouped by length with a seeded order
(:func:`train_batches`, :func:`eval_batches`) and padded tensors (:func:`iter_batches`).
"""

from __future__ import annotations

from loralens.tasks.rows import Split
from dataclasses import dataclass
from typing import Iterator, Sequence
import numpy as np
import torch



# --------------------------------------------------------------------------- tokenization

@dataclass
class Encoded:
    """A tokenized split: token ids per example, labels and ids, in split order."""

    input_ids: list[list[int]]
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[int]:
    """Token ids of one example: ``s1`` or ``s1 <eos> s2``, truncated to max_length.

    The first segment gets the tokenizer's own special tokens (e.g. a BOS), the
    second none; the separator is the EOS token, as in the study. An encoder's tokenizer
    (marked by :func:`model_families.prepare_tokenizer`) uses its own pair template
    instead (``[CLS] s1 [SEP] s2 [SEP]``).
    """
    from loralens.models.families import PAIRS_ATTR, encode_native

    if getattr(tokenizer, PAIRS_ATTR, None) == "native":
        return encode_native(tokenizer, texts, max_length)
    ids = list(tokenizer(texts[0], add_special_tokens=True)["input_ids"])
    for extra in texts[1:]:
        ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(extra, add_special_tokens=False)["input_ids"])
    return ids[:max_length]


def encode_split(tokenizer, split: Split, max_length: int) -> Encoded:
    return Encoded(
        input_ids=[encode_texts(tokenizer, e.texts, max_length) for e in split.examples],
        labels=split.labels,
        ids=np.array([e.id for e in split.examples], dtype=np.int64),
    )


def collate(input_ids: Sequence[Sequence[int]], pad_id: int, pad_to: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest member (or to ``pad_to``): (input_ids, attention_mask)."""
    width = max(len(x) for x in input_ids) if pad_to is None else pad_to
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, x in enumerate(input_ids):
        if len(x) > width:
            raise ValueError(f"example of {len(x)} tokens does not fit pad_to={width}")
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


@dataclass
class Batch:
    input_ids: torch.Tensor       # [batch, width] long
    attention_mask: torch.Tensor  # [batch, width] long, 1 = real token
    labels: torch.Tensor          # [batch] long
    index: np.ndarray             # positions of the rows in the Encoded split

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def train_batches(lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool = True,
                  mega_factor: int = 50) -> list[np.ndarray]:
    """One epoch's batches of row positions, shuffled with ``seed``.

    With ``group_by_length`` the shuffled rows are cut into mega-batches of
    ``batch_size * mega_factor`` rows, each sorted by length, so a batch holds rows
    of similar length (little padding) while the epoch stays random (the scheme of
    transformers' LengthGroupedSampler). Batch order is shuffled again.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    if group_by_length:
        mega = batch_size * mega_factor
        chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def eval_batches(lengths: np.ndarray, batch_size: int, group_by_length: bool = True
                 ) -> list[np.ndarray]:
    """Deterministic evaluation batches (sorted by length when grouping)."""
    order = np.argsort(lengths, kind="stable") if group_by_length else np.arange(len(lengths))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def iter_batches(enc: Encoded, batches: Sequence[np.ndarray], pad_id: int,
                 pad_to: int | None = None) -> Iterator[Batch]:
    for idx in batches:
        ids, mask = collate([enc.input_ids[i] for i in idx], pad_id, pad_to)
        yield Batch(ids, mask, torch.as_tensor(enc.labels[idx]), np.asarray(idx))
