"""Hand counts and the tiny study of the dry-run planner's tests."""

from tests.helpers.overrides import tiny


def hand_tokens(example, max_length: int) -> int:
    """Tokens of a row under the byte tokenizer: BOS + bytes (+ EOS + bytes), truncated."""
    n = 1 + len(example.texts[0].encode())
    for extra in example.texts[1:]:
        n += 1 + len(extra.encode())
    return min(n, max_length)


# the planner's tiny study: the tests' hand counts are worked out for these overrides
_PLAN = ("tasks=[rte, mrpc]", "methods=[lora, full]", "seeds=[42, 1337]", "data.max_length=64",
         "train.epochs=2", "train.batch_size=4", "train.eval_batch_size=16",
         "train.evals_per_epoch=2", "search.enabled=false", "sanity.examples=4",
         "sanity.epochs=3", "sanity.batch_size=2", "extract.examples=8", "bench.requests=4",
         "bench.warmup=1")
PLAN = tiny(*_PLAN)
