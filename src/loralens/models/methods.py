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
  learning rate over the rest's, applied by the training loop) or ``ia3``.

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

from loralens.core.errors import ConfigError

FAMILIES = ("full", "head", "peft")
PEFT_TYPES = ("lora", "ia3")
INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "use_rslora", "use_dora",
             "init_lora_weights", "lr_ratio")
IA3_KEYS = ("target_modules", "feedforward_modules")
# PEFT's own defaults for Llama (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING["llama"])
IA3_DEFAULTS = {"target_modules": ["k_proj", "v_proj", "down_proj"],
                "feedforward_modules": ["down_proj"]}
DEF_KEYS = ("family", "peft", "description", "search")
SEARCH_KINDS = {"loguniform": 2, "uniform": 2, "categorical": 1}  # kind -> argument count
SEARCH_TRAIN_KEYS = ("lr", "batch_size", "warmup_ratio", "weight_decay", "epochs")
SEARCH_LORA_KEYS = ("alpha", "dropout")  # set through the lora section

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
}

# Display names of the built-in methods (report tables and figure legends; a method
# without one is shown by its name).
LABELS = {"lora": "LoRA", "full": "full FT", "head": "head only", "dora": "DoRA",
          "rslora": "rsLoRA", "pissa": "PiSSA", "olora": "OLoRA", "loraplus": "LoRA+",
          "ia3": "IA3", "lora-all-linear": "LoRA all-linear"}

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
    def optimizer_kind(self) -> str:
        """The optimizer/FLOP kind of the training loop: :data:`FULL_KIND` (``full``) or
        :data:`ADAPTER_KIND` (``lora``: adapter and head methods train few parameters,
        torch's AdamW)."""
        return FULL_KIND if self.trains_all else ADAPTER_KIND


def kind_trains_all(kind: str) -> bool:
    """Whether optimizer kind ``kind`` (:attr:`Method.optimizer_kind`; ``lora`` and
    ``full``, the names of :data:`PAIR`, read as their kinds) trains every parameter."""
    return kind == FULL_KIND


def lora_type(family: str, peft: dict) -> bool:
    """Whether a method of ``family`` with PEFT settings ``peft`` (as a job recorded them)
    is LoRA-type (PEFT type ``lora``, the default)."""
    return family == "peft" and peft.get("type", "lora") == "lora"


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


def _check_peft(name: str, peft: Any, key: str, cfg) -> dict:
    if not isinstance(peft, dict):
        raise ConfigError(f"{key}: expected a mapping (type: lora|ia3, ...), got {peft!r}", key)
    kind = peft.get("type", "lora")
    if kind not in PEFT_TYPES:
        raise ConfigError(f"{key}.type: {kind!r} is not one of {list(PEFT_TYPES)}",
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
    key = key or f"method_defs.{name}"
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
        peft = _check_peft(name, spec["peft"], f"{key}.peft", cfg)
    elif "peft" in spec:
        raise ConfigError(f"{key}.peft: a {family} method takes no PEFT config", f"{key}.peft")
    else:
        peft = {}
    if "search" in spec:
        _check_search(spec, f"{key}.search")
    return Method(name, family, peft, str(spec.get("description", "")))


def _inherits(spec: dict) -> list[str]:
    peft = spec.get("peft") or {}
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
    space = registry(getattr(cfg, "method_defs", None))[name].get("search") or {}
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
