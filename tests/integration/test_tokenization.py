"""SmolLM2's own tokenizer: what the unit tests check on tiny-random's byte tokenizer."""


from loralens.training import batches as B


def test_smollm2_pair_encoding_uses_eos_separator_and_truncates(tokenizer):
    ids = B.encode_texts(tokenizer, ("the cat sat", "a dog ran"), max_length=384)
    a = tokenizer("the cat sat")["input_ids"]
    b = tokenizer("a dog ran", add_special_tokens=False)["input_ids"]
    assert ids == a + [tokenizer.eos_token_id] + b
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # pad == EOS == separator
    assert B.encode_texts(tokenizer, ("the cat sat", "a dog ran"), max_length=3) == ids[:3]
