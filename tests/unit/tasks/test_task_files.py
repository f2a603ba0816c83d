"""Tasks as data: the task-file schema, the built-in GLUE task files, every source kind
(GLUE layout, CSV / TSV / JSON Lines / Parquet, the hub through ``datasets``), the carved
validation split, the metrics of multi-class tasks and the errors bad files get.

The end-to-end run of every stage on task files is in ``tests/integration/test_task_files_run.py``.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from loralens.tasks import rows as D
from loralens.tasks import sources as TS
from loralens.core.errors import ConfigError
from loralens.study.config import config_from_dict, load_config
from loralens.training.metrics import f1_binary, f1_macro, matthews
from loralens.tasks.task_file import TaskFileError, load_task_file
from loralens.tasks.sources import carve_validation, read_source
from loralens.tasks.registry import TASKS, get_task

GLUE_TASKS = ("cola", "mnli", "mnli_mismatched", "mrpc", "qnli", "qqp", "rte", "sst2", "wnli")


# --------------------------------------------------------------------------- built-in tasks

def test_builtin_glue_files_say_what_the_python_specs_said():
    """The study's three tasks read from their files as the former hard-coded specs."""
    assert sorted(TASKS) == sorted(GLUE_TASKS)
    want = {
        "sst2": (("sentence",), "label", {"0": 0, "1": 1}, ("negative", "positive"),
                 "accuracy", ("accuracy",), "SST-2"),
        "mrpc": (("#1 String", "#2 String"), "Quality", {"0": 0, "1": 1},
                 ("not_equivalent", "equivalent"), "f1", ("f1", "accuracy"), "MRPC"),
        "rte": (("sentence1", "sentence2"), "label", {"entailment": 0, "not_entailment": 1},
                ("entailment", "not_entailment"), "accuracy", ("accuracy",), "RTE"),
    }
    for name, (texts, label, label_map, names, metric, metrics, glue) in want.items():
        s = get_task(name)
        assert (s.text_columns, s.label_column, s.label_map, s.label_names, s.metric,
                s.metrics, s.glue_dir, s.splits) == (texts, label, label_map, names, metric,
                                                     metrics, glue,
                                                     {"train": "train", "validation": "dev"})
    assert get_task("SST-2") is get_task("sst2")
    assert get_task("cola").metric == "mcc" and get_task("mnli").num_labels == 3


def _independent_read(path, text_cols, label_col, label_map):
    """The GLUE TSV read without loralens: split on tabs, strip, map labels."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    header = lines[0].split("\t")
    rows = [ln.split("\t") for ln in lines[1:]]
    return ([tuple(r[header.index(c)].strip() for c in text_cols) for r in rows],
            [label_map[r[header.index(label_col)].strip()] for r in rows])


@pytest.mark.parametrize("task, split, stem", [("mrpc", "validation", "dev"),
                                                ("rte", "validation", "dev"),
                                                ("rte", "train", "train")])
def test_real_glue_rows_unchanged(glue_dir, task, split, stem):
    spec = get_task(task)
    s = TS.load_split(spec, split, glue_dir)
    path = glue_dir / spec.glue_dir / f"{stem}.tsv"
    texts, labels = _independent_read(path, spec.text_columns, spec.label_column, spec.label_map)
    assert s.source == str(path)
    assert [e.texts for e in s.examples] == texts and s.labels.tolist() == labels
    assert s.ids() == list(range(len(texts)))


# --------------------------------------------------------------------------- GLUE fixtures

def _tsv(path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


MNLI_TRAIN = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
              "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
              "sentence2", "label1", "gold_label"]
MNLI_DEV = MNLI_TRAIN[:11] + ["label2", "label3", "label4", "label5", "gold_label"]


def _mnli_row(i, s1, s2, gold, dev):
    return [i, 1, f"{i}e", "fiction", "(x)", "(y)", "(X)", "(Y)", s1, s2, gold] \
        + ([gold] * 4 if dev else []) + [gold]


@pytest.fixture()
def glue_fixture(tmp_path):
    """The other GLUE classification tasks in the canonical layout, a few rows each."""
    root = tmp_path / "glue"
    cola = [("gj04", 1, "", "The sailors rode the breeze clear of the rocks."),
            ("gj04", 0, "*", "The more we study verbs, the crazier they get get."),
            ("cj99", 1, "", 'They said "hello" twice.')]
    _tsv(root / "CoLA" / "train.tsv", cola)           # no header row, as in GLUE
    _tsv(root / "CoLA" / "dev.tsv", cola[:2])
    _tsv(root / "QNLI" / "train.tsv", [(0, "Who?", "Him.", "entailment"),
                                       (1, "Where?", "Blue.", "not_entailment")],
         ["index", "question", "sentence", "label"])
    _tsv(root / "QNLI" / "dev.tsv", [(0, "When?", "Now.", "entailment")],
         ["index", "question", "sentence", "label"])
    qqp_header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    _tsv(root / "QQP" / "train.tsv", [(5, 1, 2, "How old?", "What age?", 1),
                                      (6, 3, 4, "Why red?", "Where is it?", 0)], qqp_header)
    _tsv(root / "QQP" / "dev.tsv", [(7, 5, 6, "A?", "B?", 0)], qqp_header)
    _tsv(root / "MNLI" / "train.tsv", [_mnli_row(0, "A.", "B.", "neutral", False),
                                       _mnli_row(1, "C.", "D.", "contradiction", False),
                                       _mnli_row(2, "E.", "F.", "entailment", False)],
         MNLI_TRAIN)
    _tsv(root / "MNLI" / "dev_matched.tsv", [_mnli_row(0, "G.", "H.", "contradiction", True)],
         MNLI_DEV)
    _tsv(root / "MNLI" / "dev_mismatched.tsv", [_mnli_row(0, "I.", "J.", "entailment", True),
                                                _mnli_row(1, "K.", "L.", "neutral", True)],
         MNLI_DEV)
    wnli = ["index", "sentence1", "sentence2", "label"]
    _tsv(root / "WNLI" / "train.tsv", [(0, "S1.", "S2.", 1), (1, "S3.", "S4.", 0)], wnli)
    _tsv(root / "WNLI" / "dev.tsv", [(0, "S5.", "S6.", 0)], wnli)
    return root


@pytest.mark.parametrize("task, split, texts, labels", [
    ("cola", "train", [("The sailors rode the breeze clear of the rocks.",),
                       ("The more we study verbs, the crazier they get get.",),
                       ('They said "hello" twice.',)], [1, 0, 1]),
    ("cola", "validation", [("The sailors rode the breeze clear of the rocks.",),
                            ("The more we study verbs, the crazier they get get.",)], [1, 0]),
    ("qnli", "train", [("Who?", "Him."), ("Where?", "Blue.")], [0, 1]),
    ("qqp", "train", [("How old?", "What age?"), ("Why red?", "Where is it?")], [1, 0]),
    ("qqp", "validation", [("A?", "B?")], [0]),
    ("mnli", "train", [("A.", "B."), ("C.", "D."), ("E.", "F.")], [1, 2, 0]),
    ("mnli", "validation", [("G.", "H.")], [2]),
    ("mnli_mismatched", "validation", [("I.", "J."), ("K.", "L.")], [0, 1]),
    ("wnli", "train", [("S1.", "S2."), ("S3.", "S4.")], [1, 0]),
])
def test_other_glue_tasks_from_the_canonical_layout(glue_fixture, task, split, texts, labels):
    s = TS.load_split(get_task(task), split, glue_fixture)
    assert [e.texts for e in s.examples] == texts and s.labels.tolist() == labels
    assert s.ids() == list(range(len(texts)))
    counts = {c: labels.count(c) for c in set(labels)}
    assert s.label_counts == counts


def test_cola_headerless_rows_are_all_data(glue_fixture):
    """CoLA's first line is a row, not a header: a header-reading loader would lose it."""
    s = TS.load_split(get_task("cola"), "train", glue_fixture)
    assert len(s) == 3 and s.source.endswith("CoLA/train.tsv")


# --------------------------------------------------------------------------- local files

def _write_task(tmp_path, text, name="task.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


FOUR = """name: four
text_columns: text
label_column: label
labels: [alpha, beta, gamma, delta]
metrics: [f1, accuracy]
source:
  files: {train: train.csv, validation: dev.csv}
"""


def test_csv_four_class_task(tmp_path):
    _csv(tmp_path / "train.csv", ["label", "text"],
         [("gamma", ' quoted, "comma" text '), ("alpha", "a"), ("delta", "d"), ("beta", "b")])
    _csv(tmp_path / "dev.csv", ["text", "label"], [("x", "delta"), ("y", "alpha")])
    spec = load_task_file(_write_task(tmp_path, FOUR))
    assert spec.num_labels == 4 and spec.metric == "f1" and spec.metrics == ("f1", "accuracy")
    tr = TS.load_split(spec, "train", None)
    assert [e.texts for e in tr.examples] == [('quoted, "comma" text',), ("a",), ("d",), ("b",)]
    assert tr.labels.tolist() == [2, 0, 3, 1] and tr.source == str(tmp_path / "train.csv")
    assert TS.load_split(spec, "validation", None).labels.tolist() == [3, 0]


def test_jsonl_one_file_with_split_column_pair_and_integer_labels(tmp_path):
    rows = [{"q": "Q0", "a": "A0", "y": 1, "part": "train"},
            {"q": "Q1", "a": "A1", "y": 0, "part": "test"},
            {"q": "Q2", "a": "A2", "y": 0, "part": "train"},
            {"q": "Q3", "a": "A3", "y": 1.0, "part": "test"}]
    (tmp_path / "all.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    spec = load_task_file(_write_task(tmp_path, """name: pairs
text_columns: [q, a]
label_column: y
labels: {0: different, 1: same}
splits: {train: train, validation: test}
source:
  files: {file: all.jsonl, split_column: part}
"""))
    assert spec.is_pair
    tr, va = (TS.load_split(spec, s, None) for s in ("train", "validation"))
    assert [e.texts for e in tr.examples] == [("Q0", "A0"), ("Q2", "A2")]
    assert tr.labels.tolist() == [1, 0] and tr.ids() == [0, 1]
    assert [e.texts for e in va.examples] == [("Q1", "A1"), ("Q3", "A3")]
    assert va.labels.tolist() == [0, 1]          # 1.0 is the integer label 1


def test_parquet_and_tsv_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"s": ["p0", "p1", "p2"], "lab": [2, 0, 1]}), tmp_path / "tr.parquet")
    (tmp_path / "va.tsv").write_text('s\tlab\na "b"\t1\n', encoding="utf-8")
    spec = load_task_file(_write_task(tmp_path, """name: three
text_columns: [s]
label_column: lab
labels: {0: low, 1: mid, 2: high}
source:
  files: {train: tr.parquet, validation: va.tsv}
"""))
    assert TS.load_split(spec, "train", None).labels.tolist() == [2, 0, 1]
    va = TS.load_split(spec, "validation", None)
    assert va.examples[0].texts == ('a "b"',) and va.labels.tolist() == [1]
    # a CSV without a header row: the task names its columns; every line is a row
    (tmp_path / "nohead.csv").write_text("x,high\n\"y, z\",low\n", encoding="utf-8")
    spec = load_task_file(_write_task(tmp_path, """name: nohead
text_columns: [s]
label_column: lab
labels: [low, high]
splits: {train: train}
source:
  files: {train: nohead.csv, header: [s, lab]}
"""))
    both = TS.load_split(spec, "train", None).examples + TS.load_split(spec, "validation",
                                                                      None).examples
    assert sorted((e.id, e.texts, e.label) for e in both) == [(0, ("x",), 1),
                                                              (1, ("y, z",), 0)]
    (tmp_path / "nohead.csv").write_text("x,high\n", encoding="utf-8")
    with pytest.raises(D.DataError, match=r"nohead.csv: 1 training row\(s\) of nohead are too "
                                          r"few to carve a validation split from"):
        TS.load_split(spec, "validation", None)


def test_validation_carved_from_train_with_a_recorded_seed_disjoint_from_selection(tmp_path):
    """No validation split: validation, selection slice and training rows come from one
    training file by the same machinery (Split.carve), and never share a row."""
    n = 60
    _csv(tmp_path / "train.csv", ["text", "label"],
         [(f"row {i}", ["a", "b", "c"][i % 3]) for i in range(n)])
    spec = load_task_file(_write_task(tmp_path, """name: carved
text_columns: [text]
label_column: label
labels: [a, b, c]
splits: {train: train}
validation_carve: {fraction: 0.25, seed: 7}
source:
  files: {train: train.csv}
"""))
    assert spec.carve_validation == {"fraction": 0.25, "minimum": 1, "seed": 7}
    val = TS.load_split(spec, "validation", None)
    train = TS.load_split(spec, "train", None)
    assert len(val) == 15 and val.label_counts == {0: 5, 1: 5, 2: 5}    # stratified
    assert "fraction 0.25, seed 7" in val.source
    assert sorted(val.ids() + train.ids()) == list(range(n))             # a partition
    # the same rows every time (seeded), other rows with another seed
    assert TS.load_split(spec, "validation", None).ids() == val.ids()
    reseeded = spec.__class__(**{**spec.__dict__, "carve_validation":
                                 {**spec.carve_validation, "seed": 8}})
    assert TS.load_split(reseeded, "validation", None).ids() != val.ids()
    # the selection slice of train_slice, carved from what is left, then the training rows
    cfg = load_config(overrides={"tasks": [str(tmp_path / "task.yaml")],
                                 "data": {"selection_min": 1, "train_size": 20}})
    sel, rest = train.carve(cfg.data.selection_fraction, cfg.data.selection_min,
                            cfg.data.subset_seed)
    used = rest.subset(cfg.data.train_size, cfg.data.subset_seed)
    parts = [set(val.ids()), set(sel.ids()), set(used.ids())]
    assert all(a.isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    # the carved validation is Split.carve of the whole file with the task's settings
    whole = read_source(spec, spec.source("files"), "train", str(tmp_path / "train.csv"), None)
    held, kept = whole.carve(0.25, 1, 7)
    assert (held.ids(), kept.ids()) == (val.ids(), train.ids())
    assert carve_validation(spec, whole)[0].name == "validation"


# --------------------------------------------------------------------------- the hub

def test_hub_source_reads_a_dataset_and_classlabel_names(tmp_path, monkeypatch):
    """``datasets.load_dataset`` gets the id, config, split and revision; integer labels
    of a ClassLabel column are read through their names (no network: the call is faked)."""
    import datasets

    calls = []

    def fake(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split, revision))
        feats = datasets.Features({"premise": datasets.Value("string"),
                                   "label": datasets.ClassLabel(names=["yes", "no", "maybe"])})
        return datasets.Dataset.from_dict({"premise": ["p0", "p1"], "label": [2, 0]},
                                          features=feats)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    spec = load_task_file(_write_task(tmp_path, """name: hubtask
text_columns: [premise]
label_column: label
labels: [maybe, "yes", "no"]
splits: {train: train, validation: validation}
source:
  hub: {path: someone/data, name: cfg1, revision: abc123, splits: {train: tr, validation: va}}
"""))
    s = TS.load_split(spec, "validation", None)
    assert calls == [("someone/data", "cfg1", "va", "abc123")]
    assert s.labels.tolist() == [0, 1]           # "maybe" -> 0, "yes" -> 1 by name
    assert s.source == "hf://someone/data/cfg1/va@abc123"

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(D.DataError, match=r"hf://someone/data/cfg1/tr@abc123 could not be "
                                          r"loaded .*ConnectionError: no network"):
        TS.load_split(spec, "train", None)


# --------------------------------------------------------------------------- metrics

def test_macro_f1_and_matthews_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 1, 1, 1, 2, 0, 3, 2])
    # per class F1 = 2tp / (2tp + fp + fn): 0: 2/(2+1+1); 1: 4/(4+1+0); 2: 2/(2+1+1); 3: 2/3
    assert f1_macro(pred, labels) == pytest.approx((0.5 + 0.8 + 0.5 + 2 / 3) / 4)
    # Gorodkin: (c s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    # c = 5, s = 8, p = (2, 3, 2, 1), t = (2, 2, 2, 2)
    num = 5 * 8 - (2 * 2 + 3 * 2 + 2 * 2 + 1 * 2)
    den = np.sqrt((64 - (4 + 9 + 4 + 1)) * (64 - 16))
    assert matthews(pred, labels, 4) == pytest.approx(num / den)
    # two classes: the phi coefficient (tp tn - fp fn) / sqrt(...)
    y, p = np.array([1, 1, 1, 0, 0, 0, 0]), np.array([1, 1, 0, 0, 0, 1, 0])
    tp, tn, fp, fn = 2, 3, 1, 1
    phi = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews(p, y, 2) == pytest.approx(phi)
    assert matthews(np.zeros(4, int), np.array([0, 1, 0, 1]), 2) == 0.0   # undefined -> 0
    assert f1_binary(p, y) == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_evaluation_metrics_follow_the_number_of_classes():
    from loralens.training.loop import classification_metrics

    labels = np.array([0, 1, 2, 2])
    logits = np.eye(3, dtype=np.float32)[[0, 2, 2, 1]]
    m = classification_metrics(logits, labels)
    assert m["accuracy"] == 0.5 and m["f1"] == pytest.approx(f1_macro(logits.argmax(1), labels))
    assert m["mcc"] == pytest.approx(matthews(logits.argmax(1), labels, 3))
    two = classification_metrics(np.eye(2, dtype=np.float32)[[1, 1, 0]], np.array([1, 0, 0]))
    assert two["f1"] == pytest.approx(f1_binary(np.array([1, 1, 0]), np.array([1, 0, 0])))


# --------------------------------------------------------------------------- the config

def test_config_takes_task_files_and_keeps_their_definition(tmp_path):
    _csv(tmp_path / "train.csv", ["text", "label"], [("a", "alpha"), ("b", "beta")])
    _csv(tmp_path / "dev.csv", ["text", "label"], [("c", "gamma")])
    path = _write_task(tmp_path, FOUR)
    cfg = load_config(overrides={"tasks": ["sst2", str(path)],
                                 "data": {"train_size_per_task": {"four": 2}}})
    assert cfg.tasks == ["sst2", "four"] and set(cfg.task_defs) == {"four"}
    stored = cfg.to_dict()
    path.unlink()                                   # the run directory keeps the definition
    again = config_from_dict(json.loads(json.dumps(stored)))
    assert again.tasks == ["sst2", "four"] and again.to_dict() == stored
    spec = get_task("four")
    assert spec.label_names == ("alpha", "beta", "gamma", "delta")
    assert spec.source("files").splits["train"] == str(tmp_path / "train.csv")


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("body, message", [
    ("name: x\ntext_colums: [a]\n", r"task.yaml: text_colums: unknown key; did you mean "
                                     r"text_columns\?"),
    ("text_columns: [a]\nlabel_column: y\nlabels: [p, q]\nsource: {files: {train: t.csv}}\n",
     r"task.yaml: name: missing"),
    ("name: sts\ntext_columns: [a, b]\nlabel_column: score\nsource: {files: {train: t.csv}}\n",
     r"task.yaml: labels: loralens trains classifiers.*regression tasks such as STS-B"),
    ("name: x\ntext_columns: [a, b, c]\nlabel_column: y\nlabels: [p, q]\n"
     "source: {files: {train: t.csv}}\n", r"task.yaml: text_columns: expected one or two"),
    ("name: x\ntext_columns: [a]\nlabel_column: y\nlabels: [p, q]\nmetrics: [auc]\n"
     "source: {files: {train: t.csv}}\n", r"task.yaml: metrics: 'auc' is not one of"),
    ("name: x\ntext_columns: [a]\nlabel_column: y\nlabels: [p, q]\nmetrics: [accuracy]\n"
     "selection_metric: f1\nsource: {files: {train: t.csv}}\n",
     r"task.yaml: selection_metric: 'f1' is not one of the task's metrics"),
    ("name: x\ntext_columns: [a]\nlabel_column: y\nlabels: [p, p]\n"
     "source: {files: {train: t.csv}}\n", r"task.yaml: labels: duplicate label\(s\) \['p'\]"),
    ("name: x\ntext_columns: [a]\nlabel_column: y\nlabels: [p, q]\n"
     "source: {files: {train: t.xlsx}}\n", r"task.yaml: source.files: cannot tell the format"),
    ("name: x\ntext_columns: [a]\nlabel_column: y\nlabels: [p, q]\n"
     "source: {hub: {name: c}}\n", r"task.yaml: source.hub.path: missing"),
    ("name: x\ntext_columns: [a]\nlabel_column: y\nlabels: [p, q]\n"
     "source: {files: {train: t.csv}, hbu: {}}\n", r"task.yaml: source.hbu: unknown key; did "
                                                    r"you mean source.hub\?"),
    ("name: x\ntext_columns: [a]\nlabel_column: y\nlabels: [yes, no]\n"
     "source: {files: {train: t.csv}}\n", r"task.yaml: labels: label name True is a YAML "
                                         r"boolean: quote it"),
    ("- just\n- a list\n", r"task.yaml: expected a mapping of keys at the top level"),
    ("name: [unclosed\n", r"task.yaml: not valid YAML"),
])
def test_bad_task_files_name_the_file_and_key(tmp_path, body, message):
    with pytest.raises(TaskFileError, match=message):
        load_task_file(_write_task(tmp_path, body))


def test_builtin_name_is_refused_for_a_task_file(tmp_path):
    path = _write_task(tmp_path, FOUR.replace("name: four", "name: sst2"))
    with pytest.raises(ConfigError, match=r"task.yaml: name: 'sst2' is a built-in task"):
        load_config(overrides={"tasks": [str(path)]})
    with pytest.raises(ConfigError, match=r"task.yaml: name: 'sst2' is a built-in task"):
        get_task(str(path), allow_file=True)
    assert get_task("sst2").file.endswith("tasks/builtin/sst2.yaml")
    from loralens.tasks.spec import builtin_paths

    assert load_config(overrides={"tasks": [str(builtin_paths()["rte"])]}).tasks == ["rte"]
    with pytest.raises(ConfigError, match=r"missing.yaml: task file not found"):
        load_config(overrides={"tasks": [str(tmp_path / "missing.yaml")]})


def _simple(tmp_path, train_name="train.csv"):
    return load_task_file(_write_task(tmp_path, f"""name: simple
text_columns: [text]
label_column: label
labels: [neg, pos]
source:
  files: {{train: {train_name}, validation: {train_name}}}
"""))


def test_missing_column_names_the_columns_that_exist(tmp_path):
    _csv(tmp_path / "train.csv", ["sentence", "label", "extra"], [("a", "neg", 1)])
    with pytest.raises(D.DataError, match=r"train.csv: missing column\(s\) \['text'\] of task "
                                          r"simple .*the columns are \['sentence', 'label', "
                                          r"'extra'\]"):
        TS.load_split(_simple(tmp_path), "train", None)


def test_labels_outside_the_declared_set_name_file_and_row(tmp_path):
    _csv(tmp_path / "train.csv", ["text", "label"], [("a", "neg"), ("b", "pos"), ("c", "meh")])
    with pytest.raises(D.DataError, match=r"train.csv:4: label 'meh' is not one of \['neg', "
                                          r"'pos'\], the labels task simple declares "
                                          r"\(.*task.yaml\)"):
        TS.load_split(_simple(tmp_path), "train", None)
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b", '
                                      '"label": "POS"}\n')
    with pytest.raises(D.DataError, match=r"t.jsonl:2: label 'POS' is not one of"):
        TS.load_split(_simple(tmp_path, "t.jsonl"), "train", None)


def test_parquet_row_and_regression_labels_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": ["neg", "pos", "bad"]}),
                   tmp_path / "t.parquet")
    with pytest.raises(D.DataError, match=r"t.parquet row 2: label 'bad' is not one of"):
        TS.load_split(_simple(tmp_path, "t.parquet"), "train", None)
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0.0, 3.8]}), tmp_path / "s.parquet")
    with pytest.raises(D.DataError, match=r"s.parquet row 0: label 0.0 in column 'label' is a "
                                          r"real number: regression tasks \(such as STS-B\) "
                                          r"are not supported"):
        TS.load_split(_simple(tmp_path, "s.parquet"), "train", None)


def test_empty_text_and_bad_json_name_the_line(tmp_path):
    _csv(tmp_path / "train.csv", ["text", "label"], [("a", "neg"), ("  ", "pos")])
    with pytest.raises(D.DataError, match=r"train.csv:3: empty text in column\(s\) \['text'\]"):
        TS.load_split(_simple(tmp_path), "train", None)
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": "pos"}\n{oops\n')
    with pytest.raises(D.DataError, match=r"t.jsonl:2: not valid JSON"):
        TS.load_split(_simple(tmp_path, "t.jsonl"), "train", None)


def test_task_option_takes_a_file_or_a_name(tmp_path):
    from loralens import cli
    from loralens.core.run_dir import RunDir

    _csv(tmp_path / "train.csv", ["text", "label"], [("a", "alpha"), ("b", "beta")])
    _csv(tmp_path / "dev.csv", ["text", "label"], [("c", "gamma")])
    path = str(_write_task(tmp_path, FOUR))
    parse = cli.build_parser().parse_args
    # run: --task sets the study's tasks
    cfg, _ = cli.resolve(parse(["run", "--preset", "micro", "--task", path, "--task", "rte"]))
    assert cfg.tasks == ["four", "rte"]
    # a stage: a task file joins a fresh config's tasks and is selected by its name
    args = parse(["train", "--preset", "micro", "--task", path, "--run-dir", str(tmp_path / "a")])
    cfg, _ = cli.resolve(args)
    assert cfg.tasks == ["mrpc", "sst2", "rte", "four"] and cli._selected_tasks(args) == ["four"]
    # a run directory's stored config must already have it
    run = RunDir(tmp_path / "b")
    run.bind_config(load_config("micro"))
    with pytest.raises(ConfigError, match=r"--task .*task.yaml: task 'four' is not one of this "
                                          r"run directory's tasks \(mrpc, sst2, rte\)"):
        cli.resolve(parse(["train", "--task", path, "--run-dir", str(run.root)]))


def test_get_task_reads_files_only_when_asked(tmp_path):
    """A task name from an HTTP request (``serve``) must never make the server read a file."""
    path = str(_write_task(tmp_path, FOUR.replace("name: four", "name: four_b")))
    with pytest.raises(ConfigError, match=r"unknown task '.*task.yaml'"):
        get_task(path)
    assert get_task(path, allow_file=True).name == "four_b" and get_task("four_b").is_pair is False


def test_regression_task_refused_on_the_command_line(tmp_path, offline, capsys):
    from loralens import cli

    (tmp_path / "s.csv").write_text("a,b,score\nx,y,3.8\n")
    (tmp_path / "stsb.yaml").write_text("name: stsb_local\ntext_columns: [a, b]\n"
                                        "label_column: score\nsource: {files: {train: s.csv}}\n")
    code = cli.main(["run", "--preset", "micro", "--run-dir", str(tmp_path / "r"),
                     "--task", str(tmp_path / "stsb.yaml"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "stsb.yaml: labels: loralens trains classifiers" in err
    assert "regression tasks such as STS-B" in err


def test_card_dataset_names_the_hub_dataset_or_none(tmp_path):
    """A task's model-card dataset fields come from its hub source (the GLUE files name
    nyu-mll/glue and their config); a task without one names none."""
    from loralens.tasks.registry import get_task

    assert get_task("mrpc").card_dataset() == {
        "datasets": ["nyu-mll/glue"], "dataset_config": "mrpc", "dataset_split": "validation"}
    f = _write_task(tmp_path, """name: local_only
text_columns: [text]
label_column: label
labels: [a, b]
splits: {train: train}
validation_carve: {fraction: 0.25, seed: 7}
source:
  files: {train: train.csv}
""")
    assert load_task_file(f).card_dataset() == {
        "datasets": None, "dataset_config": None, "dataset_split": "validation"}
