"""RTE dev rows read straight from the TSV and the logits plain transformers gives for them:
the reference an exported model is checked against."""

from __future__ import annotations

import csv

import numpy as np
import torch

from loralens.tasks.preprocess import format_input

MAX_LENGTH = 32


def dev_rows(glue_dir, n=None):
    with open(glue_dir / "RTE" / "dev.tsv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[:n]


def plain_logits(model, tok, rows) -> np.ndarray:
    texts = [format_input(r["sentence1"], r["sentence2"], sep=tok.eos_token) for r in rows]
    batch = tok(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float().numpy()
