"""Which path serves each method in the serving benchmark, decided by one rule
(:func:`lean_inexact`).

* ``full`` and ``head`` models are whole models (``head``: the base backbone with its
  trained head), served as they are: path ``whole model``.
* Every PEFT method is served through PEFT (the separate adapter on a fresh base) and
  merged into the base weights (``merge_and_unload``: LoRA, DoRA and IA3 all merge).
* The lean multi-adapter runtime (:mod:`.runtime`: ``W x + s B A x`` with the frozen base
  ``W``) serves, in addition, the PEFT methods it computes exactly: LoRA with any rank,
  alpha and target modules (``all-linear`` included), rsLoRA's ``s = alpha / sqrt(r)``,
  Gaussian or zero initialisation, LoRA+ (a training-time learning rate only).

Not exact in the lean runtime (served by PEFT and merged weights only):

* DoRA: each adapted weight's columns are rescaled by a learned magnitude over
  ``||W + s B A||``, which is not ``W x + s B A x``;
* IA3: learned rescaling of activations, no low-rank factors;
* PiSSA, OLoRA (and PEFT's other base-rewriting initialisations): the initialisation
  rewrites the base weights to ``W - s B0 A0`` and the saved adapter holds only the trained
  ``A, B``; against the unchanged base the runtime shares (``W``), the adapter is not the
  trained model (on the tiny test model: logits off by about 0.15). PEFT redoes the
  deterministic initialisation (SVD, QR) when it loads such an adapter, so the PEFT and
  merged paths are the trained model.

Each served kind is named ``<method>`` (whole models) or ``<method>_<path>`` with path
``separate`` / ``merged`` / ``runtime``: the study's two methods keep their names
(``full``, ``lora_separate``, ``lora_merged``, ``lora_runtime``).
"""

from __future__ import annotations

from loralens.models.methods import Method, is_study_lora

LEAN, PEFT, MERGED, WHOLE = "lean runtime", "PEFT", "merged", "whole model"
SUFFIX = {PEFT: "separate", MERGED: "merged", LEAN: "runtime"}
# init_lora_weights values whose initialisation rewrites the base weights (PEFT: pissa,
# pissa_niter_<k>, olora, corda; loftq quantizes them)
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def rewrites_base(peft: dict) -> bool:
    """Whether a PEFT method's initialisation changes the base weights (PiSSA, OLoRA, ...):
    its saved adapter is exact only on the base PEFT rebuilds when it loads it."""
    init = peft.get("init_lora_weights", True)
    return isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS)


def lean_inexact(method: Method) -> str | None:
    """Why the lean runtime cannot serve ``method`` exactly, or None when it can (the one
    rule: the benchmark, its identity checks and the dry-run planner ask it)."""
    if not method.is_adapter:
        return f"a {method.family} model has no adapter: served as a whole model"
    p = method.peft
    if not method.is_lora_type:
        how = ("it rescales activations" if method.peft_type == "IA3" else
               "the lean runtime computes W x + s B A x only (served through PEFT and merged)")
        return f"{method.peft_type} is not LoRA: {how}"
    if p.get("use_dora"):
        return ("DoRA rescales each weight column by a learned magnitude over ||W + s B A||, "
                "not W x + s B A x")
    if rewrites_base(p):
        return (f"{p['init_lora_weights']} initialisation rewrites the base weights "
                "(W - s B0 A0); the saved adapter is exact only on the base PEFT rebuilds")
    return None


def serving_kinds(method: Method) -> dict[str, str]:
    """The benchmark's served kinds of ``method``: kind name -> path (served_by)."""
    if not method.is_adapter:
        return {method.name: WHOLE}
    paths = [MERGED, PEFT] + ([LEAN] if lean_inexact(method) is None else [])
    return {f"{method.name}_{SUFFIX[p]}": p for p in paths}


def split_kind(kind: str, method: str | None = None) -> tuple[str, str]:
    """(method, path) of a served kind, the inverse of :func:`serving_kinds`'s names:
    ``dora_separate`` -> (dora, PEFT), ``lora_runtime`` -> (lora, lean runtime), ``full``
    -> (full, whole model). ``method``, where the benchmark recorded it, wins over the name
    (a whole model's method may itself hold an underscore)."""
    head, _, tail = kind.rpartition("_")
    path = next((p for p, s in SUFFIX.items() if s == tail), None) if head else None
    if path is None:
        return method or kind, WHOLE
    return method or head, path


def merged_kind(method_name: str) -> str:
    """The merged kind of a PEFT method (the baseline of its other paths' overhead)."""
    return f"{method_name}_{SUFFIX[MERGED]}"


def adapter_name(task: str, method: str, seed: int) -> str:
    """The runtime's (and PEFT's) name of one trained adapter: ``sst2_seed42`` for the
    study's ``lora`` (as before), ``sst2_rslora_seed42`` for another method."""
    return f"{task}_seed{seed}" if is_study_lora(method) else f"{task}_{method}_seed{seed}"
