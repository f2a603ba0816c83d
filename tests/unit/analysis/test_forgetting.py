"""The forgetting corpus: one fixed general text (WikiText-2's test split, or a user's file)
for every model, its text lines numbered in the file, a seeded sample of them, the file's
sha256 recorded and checked against SHA256SUMS, and a missing corpus named with its key.
No model: the cross-entropy itself is tested in test_weights.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from loralens.analysis.weights import forgetting as F
from loralens.core.config_load import load_config
from loralens.tasks.rows import DataError

# 9 lines: blanks (1, 3, 8: one of spaces only) and WikiText headings (2, 6) are not texts
FAKE = ("\n"
        " = Title = \n"
        " \n"
        " Alpha text .\n"
        " Beta text .\n"
        " = = Section = = \n"
        " Gamma .\n"
        "   \n"
        " Delta .\n")


def wc(*overrides: str):
    return load_config(overrides=list(overrides)).weights


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv(F.TEXT_ENV, raising=False)
    path = tmp_path / "corpus.txt"
    path.write_text(FAKE, encoding="utf-8")
    return path


def test_text_lines_are_the_non_empty_non_heading_lines_numbered_from_1(fake):
    s = F.corpus_sample(wc(f"weights.forgetting_text={fake}", "weights.forgetting_examples=10"))
    assert s.record["line_numbers"] == [4, 5, 7, 9]  # fewer than asked: all of them
    assert s.texts == ["Alpha text .", "Beta text .", "Gamma .", "Delta ."]
    assert s.record["text_lines"] == 4 and s.record["seed"] == 0


def test_the_sample_is_fixed_by_the_seed_and_the_same_for_every_call_and_task(fake):
    cfg = wc(f"weights.forgetting_text={fake}", "weights.forgetting_examples=2")
    first = F.corpus_sample(cfg)
    assert first.record["line_numbers"] == [7, 9]  # seed 0 (numpy's PCG64), pinned
    assert first.texts == ["Gamma .", "Delta ."]
    again = [F.corpus_sample(cfg), F.text_sample("rte", cfg, None), F.text_sample("sst2", cfg)]
    assert all(s.texts == first.texts and s.record == first.record for s in again)
    other = F.corpus_sample(wc(f"weights.forgetting_text={fake}", "weights.forgetting_examples=2",
                               "weights.forgetting_seed=1"))
    assert other.record["line_numbers"] == [5, 7]
    # the draw is over the text lines alone: blanks and headings never come up
    assert F.sample_line_numbers(list(range(10, 30)), 5, 0) == [15, 16, 19, 20, 23]


def test_the_files_sha256_is_recorded_and_shown(fake):
    s = F.corpus_sample(wc(f"weights.forgetting_text={fake}"))
    want = hashlib.sha256(FAKE.encode("utf-8")).hexdigest()
    assert s.record["sha256"] == want and want in s.source
    assert s.record["corpus"] == str(fake.resolve())
    assert s.record["sha256_checked_against"] is None  # no SHA256SUMS beside it


def test_a_sha256sums_in_the_shared_layout_checks_the_file(tmp_path, monkeypatch):
    """The shared folder's layout: text/wikitext-2/SHA256SUMS lists wikitext-2/test.txt
    (relative to text/), found through $LORALENS_TEXT_DIR."""
    folder = tmp_path / "text" / "wikitext-2"
    folder.mkdir(parents=True)
    (folder / "test.txt").write_text(FAKE, encoding="utf-8")
    good = hashlib.sha256(FAKE.encode("utf-8")).hexdigest()
    (folder / "SHA256SUMS").write_text(f"{good}  wikitext-2/test.txt\n{'0' * 64}  x.txt\n")
    monkeypatch.setenv(F.TEXT_ENV, str(tmp_path / "text"))
    s = F.corpus_sample(wc())
    assert s.record["sha256_checked_against"] == str(folder / "SHA256SUMS")
    assert s.record["origin"] == "$LORALENS_TEXT_DIR"
    assert s.record["line_numbers"] == [4, 5, 7, 9]

    bad = "ab" * 32
    (folder / "SHA256SUMS").write_text(f"{bad}  wikitext-2/test.txt\n")
    with pytest.raises(DataError) as e:
        F.corpus_sample(wc())
    assert str(e.value) == (f"{folder / 'test.txt'}: sha256 {good} differs from {bad} listed "
                            f"in {folder / 'SHA256SUMS'} (a changed or partial copy: fetch it "
                            "again)")


def test_a_missing_corpus_names_the_path_and_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv(F.TEXT_ENV, str(tmp_path))
    reason = F.skip_reason(wc())
    want = tmp_path / "wikitext-2" / "test.txt"
    assert reason is not None and reason.startswith(
        f"forgetting skipped: its corpus {want} ($LORALENS_TEXT_DIR) not found; set "
        "weights.forgetting_text to a local .txt or .jsonl file, or $LORALENS_TEXT_DIR")
    with pytest.raises(F.CorpusMissing, match="weights.forgetting_text"):
        F.corpus_sample(wc())
    nope = tmp_path / "nope.txt"
    assert f"{nope} (weights.forgetting_text) not found" in F.skip_reason(
        wc(f"weights.forgetting_text={nope}"))
    (tmp_path / "wikitext-2").mkdir()
    want.write_text(FAKE)
    assert F.skip_reason(wc()) is None


def test_jsonl_lines_keep_their_line_numbers(tmp_path, monkeypatch):
    monkeypatch.delenv(F.TEXT_ENV, raising=False)
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": " = Head = "}\n{"text": "two"}\n')
    s = F.corpus_sample(wc(f"weights.forgetting_text={path}"))
    assert s.record["line_numbers"] == [1, 4] and s.texts == ["one", "two"]


def test_the_shared_wikitext2_test_split(monkeypatch):
    """The real file where this checkout has it: 4,358 lines, 2,185 of them text (the
    first at line 4, after a blank, the article's title and a blank)."""
    path = Path(__file__).resolve().parents[4] / "shared" / "text" / "wikitext-2" / "test.txt"
    if not path.is_file():
        pytest.skip(f"{path} not on this disk")
    monkeypatch.setenv(F.TEXT_ENV, str(path.parents[1]))
    s = F.corpus_sample(wc())
    assert s.record["sha256"] == F.WIKITEXT2_TEST_SHA256
    assert s.record["text_lines"] == 2185 and len(s.texts) == 32
    assert F.text_line_numbers(path.read_text(encoding="utf-8").split("\n")[:6]) == [4, 5]
    assert s.source.startswith("WikiText-2 test split (wikitext-2-v1, tokenized): 32 of 2185 "
                               "text lines (seed 0), sha256 d790b833")
