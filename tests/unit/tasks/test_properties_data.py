"""Property-based tests (Hypothesis) of the GLUE TSV reader, through the public
``load_split``: random bytes, wrong encodings, stray tabs, quotes and carriage returns,
NUL bytes, huge lines and empty files give rows or a DataError naming the file (and the
line where there is one), never another exception."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loralens.tasks.rows import DataError
from loralens.tasks.sources import load_split
from loralens.tasks.registry import get_task
from tests.helpers.properties import examples

FAST = settings(max_examples=examples(200), deadline=3000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

HEADER = "index\tsentence1\tsentence2\tlabel"
junk = st.text(st.sampled_from(list("ab \t\"'\r\n\\\x00é€\u2028\ufeff")), max_size=12)
field = st.one_of(st.text(max_size=10), junk, st.sampled_from(["entailment",
                                                              "not_entailment", ""]))
row = st.lists(field, min_size=0, max_size=6).map("\t".join)
tsv_text = st.lists(row, max_size=6).map(lambda rows: "\n".join([HEADER, *rows]) + "\n")
encodings = st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252"])


def read(root, data: bytes):
    path = root / "RTE" / "train.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    try:
        split = load_split(get_task("rte"), "train", root)
    except DataError as e:
        msg = str(e)
        assert msg.startswith(str(path)), msg          # names the file ...
        assert re.match(rf"{re.escape(str(path))}(:\d+:|: no data rows)", msg), msg  # ... and line
        return None
    assert len(split) >= 1 and all(len(e.texts) == 2 and all(e.texts) for e in split.examples)
    return split


@FAST
@given(data=st.binary(max_size=300))
@example(data=b"")
@example(data=b"\xef\xbb\xbf")                                      # a BOM and nothing else
@example(data=HEADER.encode() + b"\n0\tA \xff\xfe\tB\tentailment\n")  # not UTF-8 on line 2
@example(data=HEADER.encode() + b"\n0\tA\x00\tB\tentailment\n")      # a NUL byte
def test_random_bytes_give_rows_or_a_data_error(tmp_path_factory, data):
    read(tmp_path_factory.mktemp("glue"), data)


@FAST
@given(text=tsv_text, encoding=encodings)
@example(text=HEADER + "\n0\ta\rb\tc\tentailment\n", encoding="utf-8")  # a stray CR
@example(text=HEADER + '\n0\t"a\tb"\tc\tentailment\n', encoding="utf-8")  # quotes don't quote
@example(text=HEADER + "\n0\tsé\tc\tentailment\n", encoding="latin-1")
def test_stray_tabs_quotes_and_encodings_give_rows_or_a_data_error(tmp_path_factory, text,
                                                                  encoding):
    read(tmp_path_factory.mktemp("glue"), text.encode(encoding, errors="replace"))


def test_huge_line_is_a_data_error_naming_file_and_line(tmp_path):
    """Found by the properties: a field over csv's 131072-character limit raised
    ``_csv.Error: field larger than field limit`` with a traceback."""
    huge = "x" * 200_000
    data = f"{HEADER}\n0\ta\tb\tentailment\n1\t{huge}\tb\tentailment\n".encode()
    with pytest.raises(DataError, match=r"RTE/train\.tsv:3: .*field larger than field limit"):
        read_strict(tmp_path, data)


def test_wrong_encoding_is_a_data_error_naming_file_and_line(tmp_path):
    """Found by the properties: a Latin-1 file raised UnicodeDecodeError with a
    traceback. The line is found even past the decoder's first 8 KiB chunk."""
    rows = "".join(f"{i}\tsentence {i}\tother\tentailment\n" for i in range(1000))
    data = (HEADER + "\n" + rows).encode() + "1000\tcafé\tb\tentailment\n".encode("latin-1")
    with pytest.raises(DataError, match=r"RTE/train\.tsv:1002: not UTF-8 text"):
        read_strict(tmp_path, data)


@pytest.mark.parametrize("data, line", [
    (HEADER.encode() + b"\n0\ta\x00b\tc\tentailment\n", 2),          # NUL
    (HEADER.encode() + b"\n0\ta\rb\tc\tentailment\n", 2),            # lone CR mid-field
])
def test_control_characters_give_rows_or_an_error_naming_the_line(tmp_path, data, line):
    try:
        split = read_strict(tmp_path, data)
    except DataError as e:
        assert f"train.tsv:{line}:" in str(e)
    else:
        assert len(split) == 1


def read_strict(root, data: bytes):
    path = root / "RTE" / "train.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return load_split(get_task("rte"), "train", root)
