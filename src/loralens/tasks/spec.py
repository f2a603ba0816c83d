"""Task specifications: classification tasks as data.

A task is a small YAML file (lm-evaluation-harness style; the schema is in
:mod:`loralens.tasks.task_file`): where its rows live (the canonical GLUE directory layout
that GLUE's own download script writes, local CSV / TSV / JSON Lines / Parquet files,
or a Hugging Face dataset), which columns hold the text and the label, the label
names, the splits and the metrics. The GLUE classification tasks ship as such files
inside the package (``loralens/tasks/builtin``); a task file of your own is named by its
path wherever a task is accepted. GLUE label conventions are those of
``nyu-mll/glue`` (RTE: entailment = 0), so both sources give identical ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

METRICS = ("accuracy", "f1", "mcc")   # f1: binary (class 1) for 2 classes, else macro


@dataclass(frozen=True)
class Source:
    """One place a task's rows can come from.

    ``kind``: ``glue`` (``<glue_dir>/<location>/<split file>.tsv``), ``files`` (local
    tables) or ``hub`` (``datasets.load_dataset(location, config, revision=...)``).
    Columns and splits default to the task's own; a source may name its own.
    """

    kind: str
    location: str = ""                        # glue: sub-directory; hub: dataset id
    splits: dict[str, str] = field(default_factory=dict)  # our split -> file stem / path /
    #                                           hub split / value of split_column
    text_columns: tuple[str, ...] = ()
    label_column: str = ""
    header: tuple[str, ...] = ()              # column names of files without a header row
    format: str = ""                          # files: csv, tsv, jsonl or parquet
    file: str = ""                            # files: one file holding every split ...
    split_column: str = ""                    # ... told apart by this column
    config: str | None = None                 # hub: dataset configuration
    revision: str | None = None               # hub: branch, tag or commit


@dataclass(frozen=True)
class TaskSpec:
    name: str                      # short name used on the command line and in run dirs
    text_columns: tuple[str, ...]  # one column (single sentence) or two (pair)
    label_column: str
    label_map: dict[str, int]      # raw label (as text) in the data -> class id
    label_names: tuple[str, ...]   # class id -> name
    metric: str                    # selection metric: "accuracy", "f1" or "mcc"
    splits: dict[str, str]         # our split name -> the source's split name
    sources: tuple[Source, ...] = ()  # in order of preference (glue needs a GLUE dir)
    reported: tuple[str, ...] = ()    # metrics reported (the selection metric first)
    carve_validation: dict = field(default_factory=dict)  # {fraction, minimum, seed} when the
    #                                                        task has no validation split
    version: str = "1"
    description: str = ""
    file: str = ""                 # the task file it was read from
    definition: dict = field(default_factory=dict, compare=False)  # the file's content, paths
    #                                                 made absolute: parse_task rebuilds it

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metrics reported for the task (the selection metric first)."""
        return self.reported or (self.metric,)

    def source(self, kind: str) -> Source | None:
        return next((s for s in self.sources if s.kind == kind), None)

    def card_dataset(self) -> dict:
        """The model card's dataset fields (:mod:`loralens.models.cards`): the Hub's name of
        the dataset, its config and its name of the validation split, from the task's
        ``hub`` source (None each when the task has none)."""
        hub = self.source("hub")
        return {"datasets": [hub.location] if hub else None,
                "dataset_config": hub.config if hub else None,
                "dataset_split": (hub.splits.get("validation") if hub else None)
                or "validation"}

    @property
    def glue_dir(self) -> str:
        """The sub-directory of the GLUE root ("" when the task is not in GLUE's layout)."""
        glue = self.source("glue")
        return glue.location if glue else ""


BUILTIN_DIR = "builtin"


def builtin_paths() -> dict[str, Path]:
    """Built-in task name -> its packaged YAML file."""
    root = resources.files("loralens.tasks").joinpath(BUILTIN_DIR)
    return {p.name[:-5]: Path(str(p)) for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}
