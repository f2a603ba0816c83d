"""The one tiny-model configuration of the unit tests, as ``key=value`` overrides.

``TINY``: the registry's ``tiny-random`` model (a 2-layer, hidden-32 random Llama with a
byte tokenizer, built in code), RTE, one seed, 8 training rows of at most 32 tokens, one
epoch in one batch. ``tiny(*extra)`` appends a test's own overrides; a later ``key=value``
wins over an earlier one (``core.config_load.merge_overrides``)."""

from __future__ import annotations

TINY_MODEL = "model.name=tiny-random"
TINY = (TINY_MODEL, "tasks=[rte]", "seeds=[42]", "data.train_size=8", "data.early_stop_size=8",
        "data.max_length=32", "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=128")


def tiny(*extra: str) -> list[str]:
    """``TINY`` followed by ``extra`` (which overrides it key by key)."""
    return [*TINY, *extra]


# the weights stage's tests (test_weights, test_intruder_sweep): two seeds to pair, no search
WEIGHTS = tiny("seeds=[42, 1337]", "search.enabled=false", "weights.forgetting_examples=4",
               "train.lr_lora=0.05", "train.lr_full=0.01")
