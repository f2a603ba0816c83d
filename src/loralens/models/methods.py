"""Methods as data: a method is a named entry with a family and, for PEFT methods, its
PEFT config.

Families:

* ``full``: every parameter trains (no adapter);
* ``head``: only the classification head (``score``) trains: the backbone is the base
  model's, so its drift is 0 by construction (the reference every drift figure needs);
* ``peft``: a PEFT adapter around the backbone, the head trained and saved with it
  (``modules_to_save``). ``peft.type`` is ``lora`` (with any rank, alpha, dropout and
  target modules, ``all-linear`` included; rsLoRA ``use_rslora``; DoRA ``use_dora``;
  PiSSA/OLoRA initialisation ``init_lora_weights``; LoRA+ ``lr_ratio``, the B matrices'
  learning rate over the rest's, applied by the training loop) or ``ia3`` (loralens's own
  form, with the ``lora`` section's defaults), or any PEFT method declared the way PEFT
  declares it: ``peft: {peft_type: LOHA, r: 8, ...}`` (the keyword arguments of PEFT's
  config class for that type, ``PEFT_TYPE_TO_CONFIG_MAPPING``), or a path to an
  ``adapter_config.json``; both are built through PEFT's config class, whose errors become
  ``ConfigError``s naming the method and key. A method entry may also be the PEFT config
  itself (``method_defs.mine: {peft_type: LOHA, r: 8}``) or the path alone.

A method whose PEFT tuner needs a call after each optimizer step (AdaLoRA's rank
allocation, ``update_and_allocate``) declares it here (:attr:`Method.step_hook`); the
training step calls it.

Built-in entries are :data:`BUILTIN`; a study adds its own in ``method_defs`` (name ->
``{family, peft: {...}}``), validated here with errors naming the key. Keys a LoRA
method leaves out come from the study's ``lora`` section, so the study's ``lora``
method is exactly ``lora.*`` (rank 8 on q/v by default) and ``lora.r=16`` changes every
LoRA-type method that does not set its own rank.

Which stages serve which families is the stage table's (``Stage.families`` in
:mod:`loralens.study.stages`; a stage refuses the others naming method and stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loralens.core.config import searched_in
from loralens.core.errors import ConfigError

FAMILIES = ("full", "head", "peft")
PEFT_TYPES = ("lora", "ia3")  # loralens's own form (``type:``); ``peft_type:`` takes any of PEFT's
INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "use_rslora", "use_dora",
             "init_lora_weights", "lr_ratio")
IA3_KEYS = ("target_modules", "feedforward_modules")
# PEFT's own defaults for Llama (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING["llama"])
IA3_DEFAULTS = {"target_modules": ["k_proj", "v_proj", "down_proj"],
                "feedforward_modules": ["down_proj"]}
DEF_KEYS = ("family", "peft", "description", "search")
SEARCH_KINDS = {"loguniform": 2, "uniform": 2, "categorical": 1}  # kind -> argument count
SEARCH_TRAIN_KEYS = searched_in("train")  # ("lr", "batch_size", ..., "epochs")
SEARCH_LORA_KEYS = searched_in("lora")  # ("alpha", "dropout"): set through the lora section

BUILTIN: dict[str, dict] = {
    "full": {"family": "full", "description": "full fine-tuning (every parameter)"},
    "head": {"family": "head", "description": "classification head only (zero drift)"},
    "lora": {"family": "peft", "peft": {"type": "lora"},
             "description": "LoRA from the lora section (r=8 on q/v by default)"},
    "rslora": {"family": "peft", "peft": {"type": "lora", "use_rslora": True},
               "description": "rank-stabilised LoRA (alpha / sqrt(r))"},
    "dora": {"family": "peft", "peft": {"type": "lora", "use_dora": True},
             "description": "DoRA (weight-decomposed LoRA)"},
    "lora-all-linear": {"family": "peft",
                        "peft": {"type": "lora", "target_modules": "all-linear"},
                        "description": "LoRA on every linear layer of the blocks"},
    "pissa": {"family": "peft", "peft": {"type": "lora", "init_lora_weights": "pissa"},
              "description": "LoRA with PiSSA initialisation (principal singular vectors)"},
    "olora": {"family": "peft", "peft": {"type": "lora", "init_lora_weights": "olora"},
              "description": "LoRA with OLoRA initialisation (orthonormal)"},
    "loraplus": {"family": "peft", "peft": {"type": "lora", "lr_ratio": 16.0},
                 "description": "LoRA+ (B matrices at 16x the learning rate of A)"},
    "ia3": {"family": "peft", "peft": {"type": "ia3"},
            "description": "IA3 (learned rescaling of k, v and down projections)"},
    # PEFT's own config classes, PEFT's defaults but for the targets (the study's q/v)
    "loha": {"family": "peft", "peft": {"peft_type": "LOHA", "r": 8, "alpha": 8,
                                        "target_modules": ["q_proj", "v_proj"]},
             "description": "LoHa (low-rank Hadamard product, r=8 on q/v)"},
    "lokr": {"family": "peft", "peft": {"peft_type": "LOKR", "r": 8, "alpha": 8,
                                        "target_modules": ["q_proj", "v_proj"]},
             "description": "LoKr (low-rank Kronecker product, r=8 on q/v)"},
    "oft": {"family": "peft", "peft": {"peft_type": "OFT", "oft_block_size": 32,
                                       "target_modules": ["q_proj", "v_proj"]},
            "description": "OFT (orthogonal fine-tuning, 32-wide blocks on q/v)"},
    "vera": {"family": "peft", "peft": {"peft_type": "VERA", "r": 256,
                                        "target_modules": ["q_proj", "v_proj"]},
             "description": "VeRA (shared frozen random matrices, trained scaling vectors, "
                            "r=256 on q/v)"},
    "adalora": {"family": "peft", "peft": {"peft_type": "ADALORA", "init_r": 12,
                                           "target_r": 8, "lora_alpha": 16,
                                           "target_modules": ["q_proj", "v_proj"]},
                "description": "AdaLoRA (SVD-form LoRA whose ranks are reallocated during "
                               "training, 12 -> 8 on average, q/v)"},
}

# Display names of the built-in methods (report tables and figure legends; a method
# without one is shown by its name).
LABELS = {"lora": "LoRA", "full": "full FT", "head": "head only", "dora": "DoRA",
          "rslora": "rsLoRA", "pissa": "PiSSA", "olora": "OLoRA", "loraplus": "LoRA+",
          "ia3": "IA3", "lora-all-linear": "LoRA all-linear", "loha": "LoHa", "lokr": "LoKr",
          "oft": "OFT", "vera": "VeRA", "adalora": "AdaLoRA"}

# The study's two-method design: LoRA as the ``lora`` section defines it against full
# fine-tuning (Tables 3, 4, 7 and 8; the keys of table3.json, table4.json and of the
# paired comparisons are these names). A study of no other method keeps that layout
# (:func:`is_pair_study`); one of more methods compares each with ``reference_method``.
PAIR = ("lora", "full")
STUDY_LORA = PAIR[0]

# The classifier's head (``CausalLMClassifier.score``): trained by every method, kept in a
# PEFT adapter's ``modules_to_save``, the parameters ``train.lr_head`` applies to
# (:func:`is_head_param`).
HEAD_MODULE = "score"

# The training loop's two optimizer kinds (:attr:`Method.optimizer_kind`): every parameter
# trains (``lr_full``, ``train.optimizer_full``, 6N FLOPs per token) or a few do (adapter
# and head methods: ``lr_lora``, torch's AdamW, 4N + 2n FLOPs per token).
FULL_KIND, ADAPTER_KIND = "full", "lora"
OPTIMIZER_KINDS = (ADAPTER_KIND, FULL_KIND)

@dataclass(frozen=True)
class Method:
    """One resolved method: ``peft`` is the full PEFT settings (``{}`` for full/head)."""

    name: str
    family: str
    peft: dict = field(default_factory=dict)
    description: str = ""

    @property
    def is_adapter(self) -> bool:
        """Saved as a PEFT adapter (``adapter/``) rather than a full checkpoint."""
        return self.family == "peft"

    @property
    def lr_ratio(self) -> float | None:
        """LoRA+'s learning-rate ratio of the B matrices (None: one rate)."""
        return self.peft.get("lr_ratio")

    @property
    def trains_all(self) -> bool:
        """Every parameter trains (the ``full`` family): the full learning rate, optimizer
        and search space, the weight matrices only full fine-tuning changes."""
        return self.family == "full"

    @property
    def is_lora_type(self) -> bool:
        """A LoRA-type PEFT method (LoRA, rsLoRA, DoRA, PiSSA, OLoRA, LoRA+; not IA3)."""
        return lora_type(self.family, self.peft)

    @property
    def peft_type(self) -> str | None:
        """PEFT's name of the method's type (``LORA``, ``IA3``, ``LOHA``, ...; None: no
        adapter)."""
        return peft_type_of(self.peft) if self.is_adapter else None

    @property
    def step_hook(self):
        """What the training step calls after each optimizer step, or None:
        ``hook(model, step, total_steps)`` (``step``: optimizer steps taken so far, 0 for
        the first; ``total_steps``: the job's, or None where unknown). AdaLoRA's: its
        rank allocation (``update_and_allocate``) over the job's optimizer steps."""
        return STEP_HOOKS.get(self.peft_type or "")

    @property
    def weight_delta_skip(self) -> str | None:
        """Why the weights stage has no weight delta of this method to analyse, or None
        where it has one (full fine-tuning; the head's zero; a PEFT method whose adapter
        PEFT merges into the base weights: LoRA and its variants, IA3, LoHa, LoKr, OFT,
        VeRA, AdaLoRA, ...). Prompt-learning methods add virtual tokens, no delta (their
        entries are refused today; a method recorded by a run is read as it was)."""
        if not self.is_adapter:
            return None
        from peft import PromptLearningConfig

        cls = _config_class(self.peft_type)
        if cls is not None and issubclass(cls, PromptLearningConfig):
            return (f"{self.peft_type} is prompt learning (virtual tokens): it changes no "
                    "weight matrix, so there is no delta to merge and analyse")
        return None

    @property
    def optimizer_kind(self) -> str:
        """The optimizer/FLOP kind of the training loop: :data:`FULL_KIND` (``full``) or
        :data:`ADAPTER_KIND` (``lora``: adapter and head methods train few parameters,
        torch's AdamW)."""
        return FULL_KIND if self.trains_all else ADAPTER_KIND


def kind_trains_all(kind: str) -> bool:
    """Whether optimizer kind ``kind`` (:attr:`Method.optimizer_kind`; ``lora`` and
    ``full``, the names of :data:`PAIR`, read as their kinds) trains every parameter."""
    return kind == FULL_KIND


def peft_type_of(peft: dict) -> str:
    """PEFT's type name (``LORA``, ``LOHA``, ...) of PEFT settings ``peft`` (loralens's
    ``type: lora`` form or PEFT's ``peft_type``; ``LORA`` where neither says)."""
    return str(peft.get("peft_type") or peft.get("type") or "lora").upper()


def lora_type(family: str, peft: dict) -> bool:
    """Whether a method of ``family`` with PEFT settings ``peft`` (as a job recorded them)
    is LoRA-type (PEFT type ``lora``, the default)."""
    return family == "peft" and peft_type_of(peft) == "LORA"


def is_study_lora(name: str | None) -> bool:
    """Whether ``name`` is the study's own LoRA (:data:`STUDY_LORA`, ``lora``: exactly the
    ``lora`` section). It keeps the names and records of the two-method study: its jobs
    record the ``lora`` section (:func:`job_record`), its adapters are named without the
    method (``sst2_seed42``) and only its adapters are the intruder sweep's and ``serve``'s
    from a run directory; it comes first where a run offers one model of several methods."""
    return name == STUDY_LORA


def is_study_full(name: str | None) -> bool:
    """Whether ``name`` is the study's full fine-tuning (``full``, :data:`PAIR`'s second)."""
    return name == PAIR[1]


def is_pair_study(methods) -> bool:
    """Whether a study of ``methods`` is the two-method design (no method beyond
    :data:`PAIR`): its drift and weights stages and its report keep the two-method tables;
    otherwise each method is compared with the reference method."""
    return set(methods) <= set(PAIR)


def _lora_section(cfg) -> dict:
    lc = getattr(cfg, "lora", None)
    if lc is None:
        return {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    return {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout,
            "target_modules": list(lc.target_modules)}


def _check_peft(name: str, peft: Any, key: str, cfg, trusted: bool = False) -> dict:
    if isinstance(peft, str):
        peft = read_adapter_config(peft, key)
    if not isinstance(peft, dict):
        raise ConfigError(f"{key}: expected a mapping (type: lora|ia3, ... or peft_type: "
                          f"<any PEFT type>, ...) or an adapter_config.json path, got {peft!r}",
                          key)
    if "peft_type" in peft:
        if trusted:
            # built-ins are tested; validating them would import PEFT (and torch) on every
            # config load
            return {"type": str(peft["peft_type"]).lower(), **peft}
        return _check_peft_native(peft, key)
    kind = peft.get("type", "lora")
    if kind not in PEFT_TYPES:
        hint = (f"; PEFT's {str(kind).upper()} is declared as peft_type: {str(kind).upper()} "
                "with its config's keyword arguments" if str(kind).upper() in _peft_types()
                else "")
        raise ConfigError(f"{key}.type: {kind!r} is not one of {list(PEFT_TYPES)}{hint}",
                          f"{key}.type")
    allowed = ("type", *(LORA_KEYS if kind == "lora" else IA3_KEYS))
    for k in peft:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}: unknown key for a {kind} method; known: "
                              f"{', '.join(allowed)}", f"{key}.{k}")
    if kind == "ia3":
        out = {"type": "ia3", **IA3_DEFAULTS, **{k: v for k, v in peft.items() if k != "type"}}
        out["target_modules"] = _modules(out["target_modules"], f"{key}.target_modules")
        out["feedforward_modules"] = _modules(out["feedforward_modules"],
                                              f"{key}.feedforward_modules")
        targets = out["target_modules"]
        extra = [] if targets == "all-linear" or out["feedforward_modules"] == "all-linear" \
            else sorted(set(out["feedforward_modules"]) - set(targets))
        if extra:
            raise ConfigError(f"{key}.feedforward_modules: {extra} are not target modules "
                              f"({out['target_modules']})", f"{key}.feedforward_modules")
        return out
    out = {"type": "lora", **_lora_section(cfg), "use_rslora": False, "use_dora": False,
           "init_lora_weights": True, **{k: v for k, v in peft.items() if k != "type"}}
    if not isinstance(out["r"], int) or isinstance(out["r"], bool) or not 1 <= out["r"] <= 1024:
        raise ConfigError(f"{key}.r: {out['r']!r} is not an integer rank in [1, 1024]",
                          f"{key}.r")
    for k, hi in (("alpha", None), ("dropout", 1.0)):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (hi and v > hi):
            raise ConfigError(f"{key}.{k}: {v!r} is not a number in [0, {hi or 'inf'}]",
                              f"{key}.{k}")
        out[k] = float(v)
    for k in ("use_rslora", "use_dora"):
        if not isinstance(out[k], bool):
            raise ConfigError(f"{key}.{k}: expected true or false, got {out[k]!r}", f"{key}.{k}")
    if out["init_lora_weights"] not in INIT_CHOICES or (
            not isinstance(out["init_lora_weights"], (bool, str))):
        raise ConfigError(f"{key}.init_lora_weights: {out['init_lora_weights']!r} is not one "
                          f"of {list(INIT_CHOICES)}", f"{key}.init_lora_weights")
    out["target_modules"] = _modules(out["target_modules"], f"{key}.target_modules")
    if "lr_ratio" in out:
        v = out["lr_ratio"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"{key}.lr_ratio: {v!r} is not a positive number (LoRA+: the "
                              "B matrices' learning rate over A's, e.g. 16)", f"{key}.lr_ratio")
        out["lr_ratio"] = float(v)
    return out


# --------------------------------------------------------------------------- PEFT's own configs

# Keys of a PEFT config that loralens sets itself (the head in ``modules_to_save``, the task
# type and base at save time): refused in method_defs, dropped from an adapter_config.json.
OWNED_KEYS = ("modules_to_save", "task_type", "base_model_name_or_path", "revision",
              "inference_mode", "auto_mapping", "peft_version")
# Rank-like integers PEFT leaves unchecked (LoHa, LoKr, VeRA accept r=-1): at least 1 (0
# where PEFT's own default is 0: OFT's r, which oft_block_size replaces).
RANK_KEYS = ("r", "init_r", "target_r", "rank")
# AdaLoRA's total_step before the training step knows the job's (its step hook sets it).
TOTAL_STEP_PLACEHOLDER = 10**9


def _peft_types() -> tuple[str, ...]:
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return tuple(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING)


def _config_class(peft_type: str | None):
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(getattr(t, "value", t)): c
            for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items()}.get(str(peft_type or "").upper())


def read_adapter_config(path: str, key: str) -> dict:
    """The PEFT settings of an ``adapter_config.json`` (a file or the directory holding
    one): ``peft_type`` and its keyword arguments, without what loralens sets itself."""
    import json
    from pathlib import Path

    p = Path(path)
    p = p / "adapter_config.json" if p.is_dir() else p
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read the adapter config {path!r}: {e}", key) from e
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ConfigError(f"{key}: {path!r} is not a PEFT adapter_config.json (no peft_type)",
                          key)
    return {k: v for k, v in data.items() if k not in OWNED_KEYS}


def _check_peft_native(peft: dict, key: str) -> dict:
    """``peft_type`` plus its config class's keyword arguments, validated by building the
    class (and the rank-like integers PEFT leaves unchecked); PEFT's errors as
    ``ConfigError`` naming the key. Returns ``{type, peft_type, **kwargs}``."""
    import dataclasses

    ptype = str(peft["peft_type"]).upper()
    cls = _config_class(ptype)
    if cls is None:
        raise ConfigError(f"{key}.peft_type: {peft['peft_type']!r} is not a PEFT type; known: "
                          f"{', '.join(sorted(_peft_types()))}", f"{key}.peft_type")
    from peft import PromptLearningConfig

    if issubclass(cls, PromptLearningConfig):
        raise ConfigError(f"{key}.peft_type: {ptype} is prompt learning (virtual tokens before "
                          "the input), which PEFT wraps per task type around a transformers "
                          "model: loralens's classifier pools the last real token of its own "
                          "input and takes adapters that change the layers (LoRA, LoHa, LoKr, "
                          "OFT, BOFT, VeRA, AdaLoRA, FourierFT, IA3, ...)", f"{key}.peft_type")
    kwargs = {k: v for k, v in peft.items() if k not in ("peft_type", "type")}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in kwargs.items():
        if k in OWNED_KEYS:
            raise ConfigError(f"{key}.{k}: set by loralens (the head is modules_to_save, the "
                              "task type and base are written at save time)", f"{key}.{k}")
        if k not in fields:
            raise ConfigError(f"{key}.{k}: unknown key for a {ptype} method (PEFT's "
                              f"{cls.__name__}); known: "
                              f"{', '.join(f for f in fields if f not in OWNED_KEYS)}",
                              f"{key}.{k}")
        if k in RANK_KEYS:
            low = 0 if fields[k].default == 0 else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{key}.{k}: {v!r} is not an integer >= {low} (a {ptype} "
                                  "rank)", f"{key}.{k}")
    try:
        _build_config(ptype, kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e)
        # the key PEFT's message names first (`k`, "k (value)", " k ")
        hits = [(i, k) for k in kwargs for form in (f"`{k}`", f" {k} ", f"{k} (")
                if (i := f" {msg}".find(form)) >= 0]
        named = min(hits)[1] if hits else None
        where = f"{key}.{named}" if named else key
        raise ConfigError(f"{where}: PEFT's {cls.__name__} refuses it: {msg}", where) from e
    return {"type": ptype.lower(), "peft_type": ptype, **kwargs}


def _build_config(ptype: str, kwargs: dict, total_steps: int | None = None):
    """PEFT's config object of type ``ptype`` with ``kwargs`` (head in ``modules_to_save``);
    AdaLoRA without ``total_step`` gets ``total_steps`` (or a placeholder its step hook
    replaces with the job's)."""
    import warnings

    kw = dict(kwargs)
    if ptype == "ADALORA" and "total_step" not in kw:
        kw["total_step"] = total_steps or TOTAL_STEP_PLACEHOLDER
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _config_class(ptype)(**kw, modules_to_save=[HEAD_MODULE])


def _adalora_step(model, step: int, total_steps: int | None) -> None:
    """AdaLoRA (Zhang et al., 2023): after each optimizer step, before gradients are
    cleared, the rank allocator scores each singular value's importance from
    ``p * p.grad`` and masks the least important to the budget of step ``step``; the budget
    schedule runs over the job's ``total_steps`` (unless the method set ``total_step``)."""
    base = model.base_model  # PEFT's AdaLoraModel (model: the PeftModel)
    cfg = base.peft_config[base.trainable_adapter_name]
    if total_steps and cfg.total_step == TOTAL_STEP_PLACEHOLDER:
        base.rankallocator.set_total_step(int(total_steps))
    base.update_and_allocate(step)


STEP_HOOKS = {"ADALORA": _adalora_step}


def step_hook_of(model):
    """The step hook (:attr:`Method.step_hook`) of a PEFT-wrapped ``model``'s active
    adapter type, or None (no adapter, or a type without one)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    cfg = configs.get(getattr(model, "active_adapter", None)) or next(iter(configs.values()))
    ptype = getattr(cfg, "peft_type", None)
    return STEP_HOOKS.get(str(getattr(ptype, "value", ptype) or "").upper())


def _modules(value: Any, key: str) -> list[str] | str:
    if value == "all-linear":
        return value
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v
                                                          for v in value):
        raise ConfigError(f"{key}: expected 'all-linear' or a non-empty list of module "
                          f"names, got {value!r}", key)
    return list(value)


def method_from_def(name: str, spec: Any, cfg=None, key: str | None = None) -> Method:
    """Validate one definition (``{family, peft, description}``) into a :class:`Method`;
    errors name ``key`` (``method_defs.<name>`` by default)."""
    trusted = key is None and spec is BUILTIN.get(name)  # a built-in, as get_method passes it
    key = key or f"method_defs.{name}"
    spec = _canonical(spec)
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected a mapping with family (one of "
                          f"{', '.join(FAMILIES)}) and, for peft, peft: {{...}}; got {spec!r}",
                          key)
    for k in spec:
        if k not in DEF_KEYS:
            raise ConfigError(f"{key}.{k}: unknown key; known: {', '.join(DEF_KEYS)}",
                              f"{key}.{k}")
    family = spec.get("family")
    if family not in FAMILIES:
        raise ConfigError(f"{key}.family: {family!r} is not one of {list(FAMILIES)}",
                          f"{key}.family")
    if family == "peft":
        if "peft" not in spec:
            raise ConfigError(f"{key}.peft: a peft method needs its PEFT config "
                              "(e.g. {type: lora, r: 16})", f"{key}.peft")
        peft = _check_peft(name, spec["peft"], f"{key}.peft", cfg, trusted)
    elif "peft" in spec:
        raise ConfigError(f"{key}.peft: a {family} method takes no PEFT config", f"{key}.peft")
    else:
        peft = {}
    if "search" in spec:
        _check_search(spec, f"{key}.search")
    return Method(name, family, peft, str(spec.get("description", "")))


def _canonical(spec: Any) -> Any:
    """A method entry in the ``{family, peft, description, search}`` form: an entry that is
    a PEFT config itself (``{peft_type: LOHA, r: 8, description: ...}``) or the path of an
    ``adapter_config.json`` is a ``peft`` method of that config."""
    if isinstance(spec, str):
        return {"family": "peft", "peft": spec}
    if isinstance(spec, dict) and "peft_type" in spec and "family" not in spec:
        own = ("description", "search")
        return {"family": "peft", **{k: spec[k] for k in own if k in spec},
                "peft": {k: v for k, v in spec.items() if k not in own}}
    return spec


def _inherits(spec: dict) -> list[str]:
    spec = _canonical(spec)
    peft = spec.get("peft") or {}
    if not isinstance(peft, dict) or "peft_type" in peft:  # PEFT's own form inherits nothing
        return []
    if not lora_type(spec.get("family"), peft):
        return []
    return [k for k in SEARCH_LORA_KEYS if k not in peft]


def _check_search(spec: dict, key: str) -> None:
    space = spec["search"]
    if not isinstance(space, dict):
        raise ConfigError(f"{key}: expected a mapping name -> [kind, args...], got {space!r}",
                          key)
    allowed = (*SEARCH_TRAIN_KEYS, *_inherits(spec))
    for name, dim in space.items():
        k = f"{key}.{name}"
        if name not in allowed:
            raise ConfigError(f"{k}: not a searchable key of this method; known: "
                              f"{', '.join(allowed)}", k)
        if not isinstance(dim, list) or not dim or dim[0] not in SEARCH_KINDS \
                or len(dim) != 1 + SEARCH_KINDS[dim[0]]:
            raise ConfigError(f"{k}: expected [loguniform|uniform, low, high] or "
                              f"[categorical, [choices]], got {dim!r}", k)
        if dim[0] == "categorical" and not (isinstance(dim[1], list) and dim[1]):
            raise ConfigError(f"{k}: categorical needs a non-empty list of choices", k)
        if dim[0] != "categorical" and not (
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dim[1:])
                and dim[1] <= dim[2] and (dim[0] == "uniform" or dim[1] > 0)):
            raise ConfigError(f"{k}: {dim[0]} needs numbers low <= high"
                              f"{' (low > 0)' if dim[0] == 'loguniform' else ''}", k)


def inherited_lora_keys(name: str, cfg) -> list[str]:
    """LoRA's alpha/dropout where method ``name`` takes them from the ``lora`` section (the
    search varies them there); [] for other methods."""
    return _inherits(registry(getattr(cfg, "method_defs", None))[name])


def space_overrides(name: str, cfg) -> dict[str, tuple]:
    """``method_defs.<name>.search`` as search dimensions ``{name: (kind, *args)}``."""
    space = _canonical(registry(getattr(cfg, "method_defs", None))[name]).get("search") or {}
    return {k: (v[0], v[1]) if v[0] == "categorical" else (v[0], *map(float, v[1:]))
            for k, v in space.items()}


def registry(defs: dict | None = None) -> dict[str, dict]:
    """Every known definition: the built-ins, then ``defs`` (which may not redefine a
    built-in name)."""
    defs = defs or {}
    for name in defs:
        if name in BUILTIN:
            raise ConfigError(f"method_defs.{name}: {name!r} is a built-in method; pick "
                              "another name", f"method_defs.{name}")
    return {**BUILTIN, **defs}


def get_method(name: str, cfg=None) -> Method:
    """The resolved method ``name`` of a study ``cfg`` (its ``method_defs`` and ``lora``
    section); ``ConfigError`` naming the known methods for an unknown name."""
    known = registry(getattr(cfg, "method_defs", None))
    if name not in known:
        raise ConfigError(f"methods: unknown method {name!r}; known: {', '.join(known)} "
                          "(or define it in method_defs)", "methods")
    return method_from_def(name, known[name], cfg,
                           None if name in BUILTIN else f"method_defs.{name}")


def validate_methods(cfg) -> None:
    """Check ``cfg.methods``, every ``method_defs`` entry and ``reference_method``."""
    for name in registry(getattr(cfg, "method_defs", None)):
        get_method(name, cfg)
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError(f"methods: {cfg.methods} names a method twice", "methods")
    for name in cfg.methods:
        get_method(name, cfg)
    ref = getattr(cfg, "reference_method", "full")
    if ref not in registry(getattr(cfg, "method_defs", None)):
        raise ConfigError(f"reference_method: unknown method {ref!r}", "reference_method")


# --------------------------------------------------------------------------- making a model

def peft_config(method: Method):
    """The PEFT config object of a ``peft`` method (head in ``modules_to_save``)."""
    p = method.peft
    if "peft_type" in p:  # PEFT's own form: its config class with its keyword arguments
        return _build_config(p["peft_type"], {k: v for k, v in p.items()
                                              if k not in ("type", "peft_type")})
    if p["type"] == "ia3":
        from peft import IA3Config

        return IA3Config(target_modules=p["target_modules"],
                         feedforward_modules=p["feedforward_modules"],
                         modules_to_save=[HEAD_MODULE])
    from peft import LoraConfig

    extra = {k: p[k] for k in ("use_rslora", "use_dora", "init_lora_weights")
             if p[k] is not LORA_DEFAULTS[k]}
    return LoraConfig(r=p["r"], lora_alpha=p["alpha"], lora_dropout=p["dropout"],
                      target_modules=p["target_modules"], modules_to_save=[HEAD_MODULE],
                      bias="none", **extra)


LORA_DEFAULTS = {"use_rslora": False, "use_dora": False, "init_lora_weights": True}


def make_trainable(model, method: Method):
    """``model`` (a ``CausalLMClassifier``) made trainable for ``method``."""
    if method.family == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method.family == "head":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in getattr(model, HEAD_MODULE).parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(method))


def method_record(method: Method) -> dict:
    """What a job's metrics record of its method (family and PEFT settings)."""
    return {"name": method.name, "family": method.family, "peft": dict(method.peft)}


def job_record(method: Method, cfg) -> dict:
    """What a job's ``metrics.json`` records of its method beside the training settings
    (``hyperparameters``): the two-method study's records are as they were before methods
    were data (the study's LoRA: the ``lora`` section as ``lora``; full fine-tuning:
    nothing); every other method: ``method``, its :func:`method_record`."""
    if is_study_lora(method.name):
        return {"lora": cfg.lora.__dict__}
    if method.name in PAIR:
        return {}
    return {"method": method_record(method)}


def recorded_method(name: str, hyperparameters: dict) -> tuple[str, dict]:
    """``(family, PEFT settings)`` of method ``name`` as its job's ``hyperparameters``
    recorded them (:func:`job_record`; ``("", {})`` when they do not say)."""
    rec = hyperparameters.get("method")
    if isinstance(rec, dict):
        return str(rec.get("family") or ""), dict(rec.get("peft") or {})
    if name in ("full", "head"):  # built-ins with no PEFT settings: the name is the family
        return name, {}
    if is_study_lora(name) and isinstance(hyperparameters.get("lora"), dict):
        return "peft", {"type": "lora", **hyperparameters["lora"]}
    return "", {}


def loraplus_groups(groups: list[dict], names: dict[int, str], lr: float,
                    ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al., 2024): each optimizer group split in two, LoRA's B matrices
    (``lora_B``/``lora_embedding_B`` in the name; ``names``: id(param) -> name) at
    ``ratio * lr``, the rest at ``lr``; empty groups dropped."""
    out = []
    for g in groups:
        b = [p for p in g["params"] if "lora_B" in names.get(id(p), "")
             or "lora_embedding_B" in names.get(id(p), "")]
        ids = {id(p) for p in b}
        rest = [p for p in g["params"] if id(p) not in ids]
        out += [{**g, "params": ps, "lr": v} for ps, v in ((rest, lr), (b, lr * ratio)) if ps]
    return out


def is_head_param(name: str) -> bool:
    """Whether the parameter named ``name`` (in a classifier, PEFT-wrapped or not) is the
    classification head's: ``score.weight``, or in a PEFT model
    ``base_model.model.score.modules_to_save.default.weight``, the trained copy (its frozen
    ``original_module`` matches too; it is never among the trained parameters)."""
    return name.removeprefix("base_model.model.").split(".", 1)[0] == HEAD_MODULE


def head_groups(groups: list[dict], names: dict[int, str], lr: float,
                lr_head: float) -> list[dict]:
    """``train.lr_head``: each optimizer group split in two, the head's parameters
    (:func:`is_head_param`; ``names``: id(param) -> name) at ``lr_head``, the rest at the
    group's own rate (``lr`` where it sets none, LoRA+'s B matrices theirs); empty groups
    dropped. Schedules scale each group's own rate, so the ratio holds through warm-up and
    decay."""
    out = []
    for g in groups:
        head = [p for p in g["params"] if is_head_param(names.get(id(p), ""))]
        ids = {id(p) for p in head}
        rest = [p for p in g["params"] if id(p) not in ids]
        out += [{**g, "params": ps, "lr": v}
                for ps, v in ((rest, g.get("lr", lr)), (head, lr_head)) if ps]
    return out
