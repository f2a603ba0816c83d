"""GLUE task specifications, as data.

Each task says where its rows live (the canonical GLUE directory layout that
GLUE's own download script writes, and the Hugging Face ``nyu-mll/glue``
configuration), which columns hold the text and the label, how raw labels map
onto class ids, and which metric selects models. Label conventions are those of
``nyu-mll/glue`` (RTE: entailment = 0), so both sources give identical ids.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str                      # short name used on the command line
    glue_dir: str                  # sub-directory of the GLUE root
    hub_config: str                # configuration of nyu-mll/glue
    text_columns: tuple[str, ...]  # one column (single sentence) or two (pair)
    label_column: str
    label_map: dict[str, int]      # raw label string in the TSV -> class id
    label_names: tuple[str, ...]   # class id -> name
    metric: str                    # selection metric: "accuracy" or "f1"
    splits: dict[str, str]         # our split name -> file stem in the GLUE dir
    hub_splits: dict[str, str]     # our split name -> nyu-mll/glue split
    version: str = "glue-1.0"

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metrics reported for the task (the selection metric first)."""
        return ("f1", "accuracy") if self.metric == "f1" else ("accuracy",)


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2",
        glue_dir="SST-2",
        hub_config="sst2",
        text_columns=("sentence",),
        label_column="label",
        label_map={"0": 0, "1": 1},
        label_names=("negative", "positive"),
        metric="accuracy",
        splits={"train": "train", "validation": "dev"},
        hub_splits={"train": "train", "validation": "validation"},
    ),
    "mrpc": TaskSpec(
        name="mrpc",
        glue_dir="MRPC",
        hub_config="mrpc",
        text_columns=("#1 String", "#2 String"),
        label_column="Quality",
        label_map={"0": 0, "1": 1},
        label_names=("not_equivalent", "equivalent"),
        metric="f1",
        splits={"train": "train", "validation": "dev"},
        hub_splits={"train": "train", "validation": "validation"},
    ),
    "rte": TaskSpec(
        name="rte",
        glue_dir="RTE",
        hub_config="rte",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        label_map={"entailment": 0, "not_entailment": 1},
        label_names=("entailment", "not_entailment"),
        metric="accuracy",
        splits={"train": "train", "validation": "dev"},
        hub_splits={"train": "train", "validation": "validation"},
    ),
}

# Column names of nyu-mll/glue for each task (text columns, label column).
HUB_COLUMNS: dict[str, tuple[tuple[str, ...], str]] = {
    "sst2": (("sentence",), "label"),
    "mrpc": (("sentence1", "sentence2"), "label"),
    "rte": (("sentence1", "sentence2"), "label"),
}


def get_task(name: str) -> TaskSpec:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        from .config import ConfigError

        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}", "tasks")
    return TASKS[key]
