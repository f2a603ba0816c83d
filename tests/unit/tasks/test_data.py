import numpy as np
import pytest

from loralens.tasks import rows as D
from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.tasks.registry import get_task

SST2 = get_task("sst2")
RTE = get_task("rte")


def _write(tmp_path, text, name="dev.tsv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_reads_quotes_literally_and_bom(tmp_path):
    p = _write(tmp_path, '\ufeffsentence\tlabel\na "quoted" word \t1\nbad\t0\n')
    s = D.read_glue_tsv(p, SST2, "validation")
    assert [e.texts for e in s.examples] == [('a "quoted" word',), ("bad",)]
    assert list(s.labels) == [1, 0] and s.label_counts == {1: 1, 0: 1}


def test_rte_label_convention(tmp_path):
    p = _write(tmp_path, "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n"
                         "1\tC.\tD.\tnot_entailment\n")
    s = D.read_glue_tsv(p, RTE, "validation")
    assert list(s.labels) == [0, 1]  # nyu-mll/glue: entailment = 0


@pytest.mark.parametrize("text, message", [
    ("sentence\tlabel\nok\t1\nbroken line without tab\n", r"dev.tsv:3: expected 2 tab-separated fields, found 1"),
    ("sentence\tlabel\nok\t1\nnope\t7\n", r"dev.tsv:3: label '7' is not one of \['0', '1'\]"),
    ("text\tlabel\nok\t1\n", r"dev.tsv:1: missing column\(s\) \['sentence'\]"),
    ("sentence\tlabel\n", r"dev.tsv: no data rows"),
    ("", r"dev.tsv:1: empty file"),
    ("sentence\tlabel\n \t1\n", r"dev.tsv:2: empty text"),
])
def test_malformed_rows_name_file_and_line(tmp_path, text, message):
    p = _write(tmp_path, text)
    with pytest.raises(D.DataError, match=message):
        D.read_glue_tsv(p, SST2, "validation")


def test_missing_file_and_dir(tmp_path):
    with pytest.raises(D.DataError, match=r"SST-2/dev.tsv: file not found"):
        TS.load_split(SST2, "validation", tmp_path)
    with pytest.raises(D.DataError, match=r"does not exist"):
        TS.load_split(SST2, "validation", tmp_path / "nowhere")


def test_subset_is_fixed_and_ordered(tmp_path):
    rows = "".join(f"s{i}\t{i % 2}\n" for i in range(100))
    s = D.read_glue_tsv(_write(tmp_path, "sentence\tlabel\n" + rows), SST2, "train")
    a, b = s.subset(10, seed=3), s.subset(10, seed=3)
    assert [e.id for e in a.examples] == [e.id for e in b.examples]
    assert [e.id for e in a.examples] == sorted(e.id for e in a.examples)
    assert s.subset(None) is s and s.subset(1000) is s


def test_train_batches_cover_each_row_once_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=1000)
    batches = B.train_batches(lengths, 16, seed=1, group_by_length=True)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    # grouping: padding waste far below that of a plain shuffle
    def waste(bs):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in bs)
    plain = B.train_batches(lengths, 16, seed=1, group_by_length=False)
    assert waste(batches) < 0.1 * waste(plain)
    # deterministic per seed, different across seeds
    again = B.train_batches(lengths, 16, seed=1)
    assert all((x == y).all() for x, y in zip(batches, again))
    other = B.train_batches(lengths, 16, seed=2)
    assert not all(len(x) == len(y) and (x == y).all() for x, y in zip(batches, other))


def test_eval_batches_sorted_and_complete():
    lengths = np.array([5, 1, 9, 3, 7])
    b = B.eval_batches(lengths, 2)
    assert [x.tolist() for x in b] == [[1, 3], [0, 4], [2]]


def test_collate_right_pads_with_given_id():
    ids, mask = B.collate([[5, 6, 7], [8]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [8, 2, 2]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = B.collate([[5]], pad_id=2, pad_to=4)
    assert ids.shape == (1, 4) and mask.sum() == 1
    with pytest.raises(ValueError, match="does not fit"):
        B.collate([[1, 2, 3]], pad_id=2, pad_to=2)


def test_pair_encoding_uses_eos_separator_and_truncates(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = B.encode_texts(tok, ("the cat sat", "a dog ran"), max_length=384)
    a = tok("the cat sat")["input_ids"]
    b = tok("a dog ran", add_special_tokens=False)["input_ids"]
    assert ids == a + [tok.eos_token_id] + b
    assert tok.pad_token_id == tok.eos_token_id  # pad == EOS == separator
    # By hand (tiny-random's tokenizer: BOS = 1, EOS = 2, byte b = 3 + b): the first
    # sentence gets the BOS, the separator is EOS, the second sentence no BOS.
    assert ids == ([1] + [3 + c for c in b"the cat sat"] + [2]
                   + [3 + c for c in b"a dog ran"])
    assert B.encode_texts(tok, ("the cat sat", "a dog ran"), max_length=3) == ids[:3]
    # Truncation cuts sentence 2 first: 1 BOS + 11 bytes + EOS + 2 bytes of sentence 2.
    assert B.encode_texts(tok, ("the cat sat", "a dog ran"), max_length=15) == ids[:15] \
        == [1] + [3 + c for c in b"the cat sat"] + [2, 3 + ord("a"), 3 + ord(" ")]
