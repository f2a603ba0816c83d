"""Typed configuration: defaults -> preset -> YAML file -> key=value overrides.

The dataclasses below are the schema, and they validate themselves where they are
built (``__post_init__``, as PEFT's config classes do): an instance made by hand, by
``dataclasses.replace`` or from YAML / ``key=value`` overrides is valid or raises a
``ConfigError`` that names the key (and, for files, the file); an unknown key gets a
"did you mean".
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from loralens.core.errors import ConfigError


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


class _Validated:
    """Mixin: every field is checked against its type and metadata when built."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            tp, value = hints[f.name], getattr(self, f.name)
            key = f"{self.section}.{f.name}" if self.section else f.name
            if _is_dc(tp):
                if not isinstance(value, tp):
                    raise ConfigError(f"{key}: expected a {tp.__name__}, got {value!r}", key)
                continue
            object.__setattr__(self, f.name, _check(value, tp, key, dict(f.metadata)))
        self.validate()

    def validate(self) -> None:
        """Checks across fields (none by default)."""


def _f(default: Any = dataclasses.MISSING, *, factory: Any = None, lo: float | None = None,
       hi: float | None = None, choices: tuple | None = None, doc: str = ""):
    meta = {"lo": lo, "hi": hi, "choices": choices, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig(_Validated):
    section: ClassVar[str] = "model"
    name: str = _f("smollm2-135m", doc="registry name, hub id or local directory")
    trust_remote_code: bool = _f(False, doc="run model code from the hub (off unless you ask)")
    revision: str | None = _f(None, doc="hub revision (branch, tag or commit)")
    pooling: str = _f("auto", choices=("auto", "last", "cls", "mean"),
                      doc="what the head reads: last real token, cls (first token; encoders "
                          "only) or mean over real tokens; auto = last for causal LMs, cls "
                          "for encoders (BERT/RoBERTa family)")


@dataclass
class DataConfig(_Validated):
    section: ClassVar[str] = "data"
    glue_dir: str | None = _f(None, doc="GLUE root; else $LORALENS_GLUE_DIR; else the hub")
    max_length: int = _f(384, lo=8, hi=32768, doc="truncation length in tokens")
    train_size: int | None = _f(None, lo=1, doc="rows of the training split used (None = all)")
    train_size_per_task: dict[str, int] = _f(factory=dict, lo=1,
                                             doc="per-task training rows, overriding train_size")
    selection: str = _f("train_slice", choices=("train_slice", "validation"),
                        doc="rows that search, pruning and early stopping read: train_slice = "
                            "a stratified slice held out of the training split (the model "
                            "never trains on it); validation = the published protocol "
                            "(optimistic: the reported split is also selected on)")
    selection_fraction: float = _f(0.1, lo=0.0, hi=0.5,
                                   doc="train_slice: fraction of the training split held out")
    selection_min: int = _f(256, lo=1, doc="train_slice: at least this many rows, where the "
                                           "split allows (never more than half of it)")
    early_stop_size: int | None = _f(None, lo=1,
                                     doc="selection rows scored for early stopping (None = all)")
    subset_seed: int = _f(0, doc="seed of the fixed row subsets and of the selection slice "
                                 "(same for every method and seed)")
    group_by_length: bool = _f(True, doc="length-grouped batches (False: plain shuffle)")


@dataclass
class LoraConfig(_Validated):
    section: ClassVar[str] = "lora"
    r: int = _f(8, lo=1, hi=1024, doc="LoRA rank")
    alpha: float = _f(16.0, lo=0.0, doc="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = _f(0.05, lo=0.0, hi=1.0, doc="dropout on the LoRA input")
    target_modules: list[str] = _f(factory=lambda: ["q_proj", "v_proj"],
                                   doc="module names that get adapters")


@dataclass
class TrainConfig(_Validated):
    section: ClassVar[str] = "train"
    lr: float | None = _f(None, lo=0.0, doc="peak learning rate (None = method default)")
    lr_lora: float = _f(5e-4, lo=0.0, doc="default learning rate of LoRA")
    lr_full: float = _f(2e-5, lo=0.0, doc="default learning rate of full fine-tuning")
    lr_head: float | None = _f(None, lo=0.0,
                               doc="learning rate of the classification head, for every "
                                   "method (None = the method's own rate, as published: "
                                   "full fine-tuning's fresh head then trains at its ~1e-5 "
                                   "rate, LoRA's at ~1e-3); the schedule scales it alike")
    epochs: int = _f(3, lo=1, hi=1000, doc="maximum epochs")
    max_steps: int = _f(0, lo=0, doc="stop after this many optimizer steps (0 = no limit)")
    batch_size: int = _f(16, lo=1, doc="examples per micro-batch")
    grad_accum: int = _f(1, lo=1, doc="micro-batches per optimizer step")
    warmup_ratio: float = _f(0.1, lo=0.0, hi=1.0, doc="fraction of steps of linear warm-up")
    weight_decay: float = _f(0.0, lo=0.0, hi=1.0, doc="AdamW weight decay")
    max_grad_norm: float = _f(0.3, lo=0.0, doc="gradient clipping norm (0 = off)")
    patience: int = _f(3, lo=0, doc="early stopping: evaluations without a better val loss")
    eval_every: int = _f(0, lo=0, doc="early stopping: evaluate every N optimizer steps "
                                      "(0 = evals_per_epoch times per epoch)")
    evals_per_epoch: int = _f(4, lo=1, doc="evaluations per epoch when eval_every is 0 (the "
                                           "last step of an epoch is always evaluated)")
    eval_batch_size: int = _f(32, lo=1, doc="examples per evaluation batch")
    precision: str = _f("auto", choices=("auto", "fp32", "bf16"),
                        doc="dtype training computes in: auto = bf16 autocast on a GPU; on "
                            "the CPU bf16 (cast once, float32 trained weights) where this "
                            "CPU's measured bf16 GEMMs beat float32 by 10%, else fp32. "
                            "Reported scores, extraction and serving checks are float32")
    compile: bool = _f(False, doc="torch.compile the training forward (opt-in: on a 2-core "
                                  "CPU it compiled for ~4 min to gain ~5%)")
    gradient_checkpointing: str = _f("auto", choices=("auto", "on", "off"),
                                     doc="auto = on for a GPU")
    threads: int = _f(0, lo=0, doc="torch CPU threads (0 = torch's default)")
    checkpoint_every: int = _f(500, lo=0, doc="write the job's resumable checkpoint every N "
                                              "optimizer steps (0 = never); a killed job "
                                              "resumes from it with the same final weights. "
                                              "500: a paper-preset GPU job loses minutes, "
                                              "not hours; CPU presets' jobs are shorter and "
                                              "write none (docs/run-directory.md)")
    optimizer_full: str = _f("adamw", choices=("adamw", "adamw_8bit_paged", "auto"),
                             doc="full fine-tuning's optimizer: adamw (torch), adamw_8bit_paged "
                                 "(bitsandbytes, state paged to the CPU; needs a GPU) or auto "
                                 "(8-bit paged on a GPU with bitsandbytes, else adamw)")

    def validate(self) -> None:
        if self.lr_head == 0:  # lo=0.0 lets 0 through; a head frozen at random init is a bug
            raise ConfigError("train.lr_head: 0 would leave the randomly initialised head "
                              "untrained; give a positive rate, or null for the method's "
                              "own", "train.lr_head")


@dataclass
class SanityConfig(_Validated):
    section: ClassVar[str] = "sanity"
    examples: int = _f(10, lo=1, doc="training rows to overfit")
    epochs: int = _f(10, lo=1, doc="epochs allowed")
    batch_size: int = _f(2, lo=1, doc="examples per step")
    loss_threshold: float = _f(0.1, lo=0.0, doc="pass when training loss falls below this")
    lr_lora: float = _f(5e-3, lo=0.0, doc="learning rate of LoRA in the check")
    lr_full: float = _f(1e-4, lo=0.0, doc="learning rate of full fine-tuning in the check")


# The dimensions a search varies, by name, and the config keys each one's best trial
# replaces (the first names the section a trial's value goes to: training.search routes
# by it, models.methods checks method_defs search keys against it, core.protocol leaves
# them out of the differences from the paper preset while the search runs). A
# method_defs search key not listed here is a train key of that method's own.
SEARCHED_BY = {"lr": ("train.lr", "train.lr_lora", "train.lr_full"),
               "batch_size": ("train.batch_size",), "warmup_ratio": ("train.warmup_ratio",),
               "weight_decay": ("train.weight_decay",), "epochs": ("train.epochs",),
               "alpha": ("lora.alpha",), "dropout": ("lora.dropout",)}


def searched_in(section: str) -> tuple[str, ...]:
    """The dimensions of :data:`SEARCHED_BY` whose trial values go to ``section``."""
    return tuple(d for d, keys in SEARCHED_BY.items() if keys[0].startswith(section + "."))


@dataclass
class SearchConfig(_Validated):
    section: ClassVar[str] = "search"
    enabled: bool = _f(True, doc="run the search; false = train with the config's values")
    trials: int = _f(15, lo=1, doc="trials per task and method (one persistent study each)")
    startup_trials: int = _f(5, lo=0, doc="random start-up trials before TPE models")
    storage: str | None = _f(None, doc="SQLAlchemy URL (PostgreSQL for several machines); "
                                       "None = $LORALENS_STORAGE, else SQLite in the run "
                                       "directory; stored with its password hidden")
    train_size: int | None = _f(None, lo=1, doc="training rows per trial (None = data's)")
    eval_size: int | None = _f(None, lo=1, doc="selection rows scored per trial (None = all)")
    epochs: list[int] = _f(factory=lambda: [2, 3, 4], lo=1, doc="epoch choices of the space")
    batch_full: list[int] = _f(factory=lambda: [1, 2, 4], lo=1,
                               doc="batch-size choices of full fine-tuning")
    batch_lora: list[int] = _f(factory=lambda: [4, 8, 16], lo=1, doc="batch-size choices of LoRA")
    lr_full: list[float] = _f(factory=lambda: [1e-6, 5e-5], lo=0,
                              doc="[low, high] of full fine-tuning's log-uniform learning rate")
    lr_lora: list[float] = _f(factory=lambda: [5e-5, 5e-3], lo=0,
                              doc="[low, high] of LoRA's log-uniform learning rate")
    seed: int = _f(0, doc="training seed of every trial; never one of the training seeds "
                          "(a trained model would replay a trial)")
    sampler_seed: int = _f(0, doc="mixed with task, method and the trial's position into each "
                                  "trial's own TPE seed (workers and resumes never repeat a "
                                  "draw; a rerun from scratch repeats the whole search)")
    heartbeat_interval: int = _f(60, lo=1, doc="seconds between a running trial's heartbeats")
    grace_period: int = _f(180, lo=1, doc="seconds without heartbeat before a trial is failed")
    max_retry: int = _f(2, lo=0, doc="times a failed (killed) trial's configuration is retried")
    params: list[str] = _f(factory=list,
                           doc="the dimensions searched, by name (lr, batch_size, "
                               "warmup_ratio, weight_decay, epochs, alpha, dropout, or a "
                               "method_defs search key); the others stay at the config's "
                               "values; [] = every dimension of each method's space")
    prune: bool = _f(True, doc="median pruning of hopeless trials at each evaluation, "
                                "against the completed trials at the same fraction of "
                                "their own training")

    def searches(self, *names: str) -> bool:
        """Whether the search runs and varies any of the dimensions ``names`` (every one
        when ``params`` names none; whether a method's space has it: ``training.search``)."""
        return self.enabled and (not self.params or bool(set(names) & set(self.params)))

    def validate(self) -> None:
        if len(set(self.params)) != len(self.params):
            raise ConfigError(f"search.params: a dimension is named twice in {self.params}",
                              "search.params")
        for key in ("lr_full", "lr_lora"):
            r = getattr(self, key)
            if len(r) != 2 or not 0 < r[0] < r[1]:
                raise ConfigError(f"search.{key}: expected [low, high] with 0 < low < high, "
                                  f"got {r}", f"search.{key}")


@dataclass
class ExtractConfig(_Validated):
    section: ClassVar[str] = "extract"
    examples: int = _f(750, lo=4, doc="validation rows per task (the whole split if fewer)")
    seed: int = _f(0, doc="seed of the fixed sample (same rows and order for every model)")
    batch_size: int = _f(32, lo=1, doc="examples per forward pass")


@dataclass
class BenchConfig(_Validated):
    section: ClassVar[str] = "bench"
    batch_sizes: list[int] = _f(factory=lambda: [1], lo=1, doc="request batch sizes")
    warmup: int = _f(10, lo=0, doc="untimed warm-up requests per model")
    requests: int = _f(100, lo=1, doc="validation examples timed per model")
    mixed_batch_size: int = _f(8, lo=1, doc="rows per mixed-adapter batch")
    identity_examples: int = _f(16, lo=1, doc="examples per adapter of the identity checks "
                                              "(float64, then the serving dtype)")
    seeds: list[int] = _f(factory=list, doc="seeds whose models are benchmarked ([] = every "
                                            "trained seed)")


@dataclass
class DriftConfig(_Validated):
    section: ClassVar[str] = "drift"
    layers: str = _f("blocks", doc="hidden states that the mean drift, Table 4, its tests and "
                                   "every figure use: blocks = the outputs of transformer "
                                   "blocks 1..L (the last after the final norm; the embedding "
                                   "output, state 0, left out), all = states 0..L, or explicit "
                                   "state indices such as '1-12' or '4,8,12' (layers.csv keeps "
                                   "every state)")

    def __post_init__(self) -> None:
        # YAML and key=value read "12" as an int and "[4, 8]" as a list: take them as indices
        v = self.layers
        if isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                       for i in v):
            self.layers = ",".join(map(str, v))
        elif isinstance(v, int) and not isinstance(v, bool):
            self.layers = str(v)
        super().__post_init__()

    def validate(self) -> None:
        parse_layers(self.layers)


@dataclass
class WeightsConfig(_Validated):
    section: ClassVar[str] = "weights"
    matrices: list[str] = _f(factory=list, doc="matrices analysed in every model, for every "
                                               "method alike ([] = each method's own target "
                                               "modules; full fine-tuning and head only: "
                                               "their union)")
    full_extra: list[str] = _f(factory=lambda: ["k_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"],
                               doc="full fine-tuning only: further matrices it changes, "
                                   "analysed in extra_layers layers")
    extra_layers: int = _f(3, lo=0, doc="full_extra in this many evenly spaced layers (first "
                                        "and last included; 0 = none): a cheap subset")
    top_k: int = _f(10, lo=1, doc="top singular vectors searched for intruder dimensions")
    forgetting: bool = _f(True, doc="measure forgetting (LM cross-entropy, base LM head)")
    forgetting_text: str | None = _f(None, doc="the general-text corpus, the same for every "
                                               "model: a .txt file (one text per line) or "
                                               ".jsonl ({\"text\": ...} per line); None = the "
                                               "WikiText-2 test split, wikitext-2/test.txt "
                                               "under $LORALENS_TEXT_DIR, else under "
                                               "../shared/text")
    forgetting_examples: int = _f(32, lo=1, doc="text lines of the corpus sampled (non-empty, "
                                                "not a heading; 32 WikiText-2 lines are about "
                                                "4,000 tokens at forgetting_max_length 128)")
    forgetting_max_length: int = _f(128, lo=2, doc="tokens per text (truncated)")
    forgetting_seed: int = _f(0, doc="seed of the text sample (same texts for every model)")
    batch_size: int = _f(16, lo=1, doc="texts per forward pass")
    sweep: bool = _f(False, doc="the intervention sweep: rescale each LoRA model's intruder "
                                "directions (PEFT's mitigation) and, as a matched control, as "
                                "many of its largest non-intruder directions, and re-measure "
                                "accuracy, drift and forgetting (opt-in; on in the paper "
                                "preset)")
    sweep_lambdas: list[float] = _f(factory=lambda: [1.0, 0.75, 0.5, 0.25, 0.0], lo=0,
                                    doc="mitigation_lambda values (1 = unchanged, 0 = intruder "
                                        "directions removed)")
    sweep_seeds: int = _f(0, lo=0, doc="LoRA models swept per task: the first N seeds (0 = "
                                        "all, the default: the intruder-minus-control test "
                                        "is paired across seeds)")
    sweep_epsilon: float = _f(0.5, lo=0, doc="PEFT's threshold_epsilon for the sweep")
    sweep_eval_examples: int | None = _f(None, lo=1, doc="validation rows scored per lambda "
                                                         "(None = the whole split)")


def parse_layers(spec: str) -> str | list[int]:
    """``drift.layers`` as ``"blocks"``, ``"all"`` or sorted unique state indices
    (``"1-3,8"`` -> [1, 2, 3, 8]); the model's state count is checked where it is known."""
    text = spec.strip().lower()
    if text in ("blocks", "all"):
        return text
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
            if a < 0 or b < a:
                raise ValueError(part)
            out.update(range(a, b + 1))
    except ValueError:
        raise ConfigError(f"drift.layers: {spec!r} is not blocks, all, or state indices "
                          "such as '1-12' or '4,8,12' (0 = embedding output)",
                          "drift.layers") from None
    return sorted(out)


@dataclass
class StatsConfig(_Validated):
    section: ClassVar[str] = "stats"
    correction: str = _f("holm", choices=("holm", "bonferroni"),
                         doc="family-wise correction within each declared test family "
                             "(loralens.analysis.families): holm (step-down; the same "
                             "family-wise error rate as bonferroni, never less power) or "
                             "bonferroni (p x m, as the published study)")


# --report-to's names: none, all (every installed one), loralens's own sinks, then accelerate's
# trackers (accelerate.tracking.LOGGER_TYPE_TO_CLASS; loralens.training.tracking runs them)
REPORT_TO = ("none", "all", "tensorboard", "mlflow", "wandb", "aim", "clearml", "comet_ml",
             "dvclive", "trackio", "swanlab")


@dataclass
class TrackingConfig(_Validated):
    section: ClassVar[str] = "tracking"
    report_to: list[str] = _f(factory=lambda: ["none"], choices=REPORT_TO,
                              doc="experiment trackers of the training jobs (loralens.training.tracking): "
                                  "none; all (every one installed); tensorboard, mlflow "
                                  "(loralens's own); wandb, aim, clearml, comet_ml, dvclive, "
                                  "trackio, swanlab (accelerate's trackers) (--report-to)")
    experiment: str | None = _f(None, doc="MLflow experiment (and the project of accelerate's "
                                          "trackers) grouping the study's runs (None = the "
                                          "run directory's name)")


RAY_RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")  # any other key: a custom resource


@dataclass
class RunConfig(_Validated):
    """How this invocation executes the stages' units of work (loralens.study.executors), not
    what the study is: never stored in config.yaml, never a difference between workers."""

    section: ClassVar[str] = "run"
    executor: str = _f("local", choices=("local", "ray"),
                       doc="local: this process (and other workers through the job table); "
                           "ray: each unit of work a Ray task (the ray extra; --executor)")
    ray_address: str | None = _f(None, doc="Ray cluster to join: auto, host:port or "
                                           "ray://host:port (None = $RAY_ADDRESS, else a "
                                           "local one for this run; --ray-address)")
    ray_resources: dict[str, dict[str, float]] = _f(
        factory=lambda: {"default": {"num_cpus": 1.0}}, lo=0.0,
        doc="each Ray task's request, by stage name or default: num_cpus, num_gpus, memory "
            "(bytes) or a custom resource, e.g. {train: {num_cpus: 4, num_gpus: 1}}")
    ray_max_retries: int = _f(3, lo=0, doc="times Ray reruns a task whose worker died")

@dataclass
class StudyConfig(_Validated):
    preset: str | None = _f(None, doc="preset the config was layered on")
    tasks: list[str] = _f(factory=lambda: ["mrpc", "sst2", "rte"],
                          doc="tasks: built-in names (loralens.tasks.spec) or task files (.yaml)")
    task_defs: dict[str, Any] = _f(factory=dict, doc="definitions of the tasks read from task "
                                   "files, by name (filled in from tasks: the run directory "
                                   "keeps them)")
    methods: list[str] = _f(factory=lambda: ["lora", "full"],
                            doc="methods: built-in names (loralens.models.methods: full, head, lora, "
                                "dora, rslora, lora-all-linear, pissa, olora, loraplus, ia3) or "
                                "method_defs names")
    method_defs: dict[str, Any] = _f(factory=dict, doc="user-defined methods, by name: "
                                     "{family: full|head|peft, peft: {type: lora|ia3, ...}}")
    reference_method: str = _f("full", doc="the method every other one is compared with")
    seeds: list[int] = _f(factory=lambda: [42, 1337, 2024], doc="training seeds")
    model: ModelConfig = _f(factory=ModelConfig)
    data: DataConfig = _f(factory=DataConfig)
    lora: LoraConfig = _f(factory=LoraConfig)
    train: TrainConfig = _f(factory=TrainConfig)
    sanity: SanityConfig = _f(factory=SanityConfig)
    search: SearchConfig = _f(factory=SearchConfig)
    extract: ExtractConfig = _f(factory=ExtractConfig)
    bench: BenchConfig = _f(factory=BenchConfig)
    drift: DriftConfig = _f(factory=DriftConfig)
    weights: WeightsConfig = _f(factory=WeightsConfig)
    stats: StatsConfig = _f(factory=StatsConfig)
    tracking: TrackingConfig = _f(factory=TrackingConfig)
    run: RunConfig = _f(factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Checks within the config alone. Checks against the task and method registries
        (names, task files, method definitions) are the study layer's:
        :func:`loralens.study.config.check_config`."""
        if self.search.enabled and self.search.seed in self.seeds:
            raise ConfigError(
                f"search.seed: {self.search.seed} is also a training seed (seeds: {self.seeds}); "
                "the model trained with it would replay a search trial instead of being an "
                "independent seed. Pick a search seed outside the training seeds "
                "(default 0).", "search.seed")



# --------------------------------------------------------------------------- validation

def _is_dc(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check(value: Any, tp: Any, key: str, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], key, meta)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}",
                              key)
        return {_check(k, kt, key, {}): _check(v, vt, f"{key}.{k}", meta)
                for k, v in value.items()}
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}", key)
        return [_check(v, inner, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}", key)
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}", key)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}", key)
        value = float(value)
        if not math.isfinite(value):  # NaN would pass every bound check below
            raise ConfigError(f"{key}: {value!r} is not a finite number", key)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}", key)
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {list(meta['choices'])}", key)
    if meta.get("lo") is not None and value < meta["lo"]:
        raise ConfigError(f"{key}: {value!r} is below the minimum {meta['lo']}", key)
    if meta.get("hi") is not None and value > meta["hi"]:
        raise ConfigError(f"{key}: {value!r} is above the maximum {meta['hi']}", key)
    return value


def merge(cls, base: Any, data: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass ``base`` with ``data`` (a nested dict) layered on;
    the copy validates itself (``__post_init__``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}",
                          prefix.rstrip(".") or None)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    changes = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else \
                f"; known keys: {', '.join(prefix + k for k in fields)}"
            raise ConfigError(f"unknown key {full!r}{hint}", full)
        tp = hints[key]
        changes[key] = merge(tp, getattr(base, key), value, f"{full}.") if _is_dc(tp) else value
    return dataclasses.replace(base, **changes)
