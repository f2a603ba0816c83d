"""Model cards (README.md) for saved artifacts: what the model is, how to feed it, how to load it.

A card states what the artifact directory and ``info`` say: the task and its labels, the
method, the base model (and its provenance note), the hyperparameters, the scores with the
split they were measured on, the loralens version and commit, and always the input
preprocessing (:mod:`loralens.tasks.preprocess`) with a loading snippet that uses transformers
and PEFT only. Unknown facts are left out, never guessed.

The card is ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard`: a YAML metadata block
(:class:`~huggingface_hub.ModelCardData`) the Hub reads (``library_name``, ``base_model``,
``pipeline_tag: text-classification``, ``datasets``, ``metrics``, the validation scores as
``model-index`` results naming their split) above the human text. Its ``loralens`` key is the
machine-readable record loralens itself reads back (:func:`read_record`): task, method, seed,
label names, the training ``max_length`` (``predict`` uses it) and the base model
(:func:`base_record`: the hub id the weights came from, its revision, and how they differ from
the hub's, e.g. the packaged SmolLM2's Q4_1 quantization).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from loralens.core.version import package_version
from loralens.models.methods import is_study_full, is_study_lora

log = logging.getLogger(__name__)

RECORD_KEY = "loralens"  # the card metadata's machine-readable block
# loralens's metric names -> the Hub's metric ids (model-index results, ``metrics``)
HUB_METRICS = {"accuracy": "accuracy", "f1": "f1", "mcc": "matthews_correlation"}

PREPROCESSING = """\
## Input preprocessing (match it, or the logits differ)

Each text field is stripped of surrounding whitespace; a pair is fed as one string,
`sentence1 + EOS + sentence2`, where EOS is the tokenizer's `eos_token` (here `{sep}`).
`loralens.preprocess.format_input` does exactly this:

```python
from loralens.preprocess import format_input
text = format_input(sentence1, sentence2, sep=tokenizer.eos_token)  # or format_input(sentence, sep=...)
```

Batches are right-padded with the pad token (= EOS). The head reads the last real token;
transformers' `{arch}` reads the rightmost non-pad token, the same token unless an input
itself ends in the EOS/pad token (never the case for this preprocessing). Training
truncated inputs at `max_length` tokens{max_length}.
"""

ADAPTER_USAGE = """\
## Loading (transformers + PEFT only)

```python
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{path}")
base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={n})
base.config.pad_token_id = tokenizer.pad_token_id
model = PeftModel.from_pretrained(base, "{path}").eval()
```

or `AutoPeftModelForSequenceClassification.from_pretrained("{path}")` when the base
recorded in `adapter_config.json` (`base_model_name_or_path`) is reachable.
"""

FULL_USAGE = """\
## Loading (transformers only)

```python
from transformers import pipeline
classify = pipeline("text-classification", model="{path}")
classify(text)  # text prepared as above
```
"""

OWN_LAYOUT = """\
## Input and loading (loralens only)

A {family} classifier whose head reads the `{pooling}` pooling of the last hidden state
(`cls`: the first token; `mean`: the mean over real tokens; `last`: the last real token).
No transformers class computes this head, so the files claim none: load them with
`loralens.models.load_trained`. Inputs: {inputs}.
"""


def render_card(info: dict) -> str:
    """The card's markdown from ``info`` (keys: kind, method, task, label_names, base,
    base_path, base_note, sep, arch, path, hyperparameters, scores, score_split, version,
    commit, max_length); missing keys leave their lines out."""
    method = info.get("method")
    adapter = info.get("adapter", is_study_lora(method))  # any PEFT method's adapter
    lines = [f"# {_title(info)}", ""]
    facts = [("method", info.get("method")), ("task", info.get("task")),
             ("labels", _labels(info.get("label_names"))),
             ("base model", info.get("base")), ("base model files", info.get("base_path")),
             ("base model note", info.get("base_note")),
             ("base model on the hub", _hub_line(base_record(info),
                                                 adapter and not info.get("merged"))),
             ("loralens", f"{info.get('version') or package_version()}"
                          + (f" (commit {info['commit']})" if info.get("commit") else ""))]
    lines += [f"- {k}: {v}" for k, v in facts if v] + [""]
    if info.get("scores"):
        lines += [f"## Scores (measured on: {info.get('score_split') or 'the validation split'})",
                  ""]
        lines += [f"- {k}: {v}" for k, v in info["scores"].items()] + [""]
    ml = info.get("max_length")
    if info.get("own_layout"):  # an encoder or another pooling: loralens's layout only
        lines.append(OWN_LAYOUT.format(**info["own_layout"]))
    else:
        lines.append(PREPROCESSING.format(
            sep=info.get("sep") or "EOS", arch=info.get("arch") or "ForSequenceClassification "
            "class", max_length=f" ({ml} here)" if ml else ""))
        usage = ADAPTER_USAGE if adapter and not info.get("merged") else FULL_USAGE
        n = len(info.get("label_names") or ()) or 2
        lines.append(usage.format(path=info.get("path") or ".",
                                  base=info.get("base_path") or "BASE", n=n))
    if info.get("hyperparameters"):
        lines += ["## Hyperparameters", "", "```json",
                  json.dumps(info["hyperparameters"], indent=2, sort_keys=True, default=str),
                  "```", ""]
    return "\n".join(lines)


def _title(info: dict) -> str:
    method = info.get("method")
    adapter = info.get("adapter", is_study_lora(method))  # any PEFT method's adapter
    kind = info.get("kind") or (
        ("LoRA adapter" if is_study_lora(method) else f"PEFT adapter ({method})") if adapter
        else "full fine-tuned model" if method is None or is_study_full(method)
        else f"fine-tuned model ({method}, full checkpoint)")
    return f"loralens {kind}" + (f" for GLUE {info['task']}" if info.get("task") else "")


def _labels(names) -> str | None:
    return ", ".join(f"{i} = {n}" for i, n in enumerate(names)) if names else None


def write_card(out: Path, info: dict) -> Path:
    """Write ``out/README.md``, filling what the directory itself says (base, EOS,
    architecture) into ``info``; replaces PEFT's template card."""
    out = Path(out)
    info = dict(info)
    adapter_cfg = out / "adapter_config.json"
    if adapter_cfg.is_file():
        info.setdefault("base_path", json.loads(adapter_cfg.read_text()).get(
            "base_model_name_or_path"))
    config = out / "config.json"
    if not config.is_file() and info.get("base_path"):  # an adapter: its base's config
        config = Path(info["base_path"]) / "config.json"
    if config.is_file():
        from loralens.models.artifacts import seq_cls_architecture

        info.setdefault("arch", seq_cls_architecture(json.loads(config.read_text()).get(
            "model_type")))
    tok = out / "tokenizer_config.json"
    if tok.is_file():
        info.setdefault("sep", json.loads(tok.read_text()).get("eos_token"))
    info.setdefault("path", str(out))
    card = build_card(info)
    card.save(out / "README.md")
    return out / "README.md"


# --------------------------------------------------------------------------- metadata

def base_record(info: dict) -> dict | None:
    """What the card records of the base model: ``name`` (as training named it: a registry
    name, a local directory or a hub id), ``path`` (``base_model_name_or_path``), ``hub_id``
    and ``revision`` (the hub model the weights come from), ``quantization`` (how the weights
    differ from that hub model's: the packaged SmolLM2 is a dequantized Q4_1 file) and, for a
    packaged file, its ``source`` and ``sha256``; None when nothing is known."""
    from loralens.models.registry import REGISTRY

    name, path = info.get("base"), info.get("base_path")
    if not name and not path:
        return None
    entry = REGISTRY.get(name) if name else None
    hub_id = entry.hub_id if entry else next(
        (r for r in (name, path) if r and is_hub_id(r)), None)
    record = {"name": name or path, "path": path, "hub_id": hub_id,
              "revision": info.get("base_revision"),
              "quantization": entry.quantization if entry else None}
    if entry is not None and entry.sha256:
        record.update(source=entry.ref, sha256=entry.sha256)
    return record


def is_hub_id(ref: str) -> bool:
    """``org/name`` that is not a local path (what ``resolve_model`` takes as a hub id)."""
    return (ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
            and not Path(ref).expanduser().exists())


def _hub_line(base: dict | None, adapter: bool) -> str | None:
    if not base or not base.get("hub_id"):
        return None
    line = base["hub_id"] + (f" (revision {base['revision']})" if base.get("revision") else "")
    if base.get("quantization"):
        line += f"; the weights trained on: {base['quantization']}"
        if adapter:
            line += (". Load the adapter onto those same weights (loralens finds them from "
                     "this card), not the hub's, or its outputs differ")
    return line


def card_data(info: dict):
    """The card's metadata (:class:`huggingface_hub.ModelCardData`) from ``info``."""
    from huggingface_hub import EvalResult, ModelCardData

    method = info.get("method")
    adapter = bool(info.get("adapter", is_study_lora(method))) and not info.get("merged")
    standard = not info.get("own_layout")  # a transformers class computes it
    base = base_record(info)
    task = info.get("task")
    datasets = list(info.get("datasets") or ())
    scores = {k: v for k, v in (info.get("scores") or {}).items() if k in HUB_METRICS}
    title = _title(info)
    results = [EvalResult(
        task_type="text-classification", task_name="Text Classification",
        dataset_type=datasets[0] if datasets else (task or "unknown"),
        dataset_name=f"GLUE {task.upper()}" if task and datasets[:1] == ["nyu-mll/glue"]
        else (task or "unknown"),
        dataset_config=info.get("dataset_config"),
        dataset_split=info.get("dataset_split") or "validation",
        metric_type=HUB_METRICS[k], metric_name=k, metric_value=float(v))
        for k, v in scores.items()]
    tags = ["loralens", "text-classification"] + (["peft"] if adapter else []) + (
        [str(method)] if method else []) + ([str(task)] if task else [])
    record = {k: v for k, v in {
        "task": task, "method": method, "seed": info.get("seed"),
        "label_names": list(info["label_names"]) if info.get("label_names") else None,
        "max_length": info.get("max_length"), "adapter": adapter,
        "base": base, "version": info.get("version") or package_version(),
        "commit": info.get("commit")}.items() if v is not None}
    return ModelCardData(
        library_name=("peft" if adapter else "transformers") if standard else None,
        base_model=base.get("hub_id") if base else None,
        base_model_relation=("adapter" if adapter else "finetune")
        if base and base.get("hub_id") else None,
        pipeline_tag="text-classification" if standard else None,
        datasets=datasets or None, metrics=[HUB_METRICS[k] for k in scores] or None,
        tags=tags, model_name=title if results else None, eval_results=results or None,
        **{RECORD_KEY: record})


def build_card(info: dict):
    """The whole card: metadata block and the human text of :func:`render_card`."""
    from huggingface_hub import ModelCard

    data = card_data(info)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{render_card(info)}")


def read_record(directory: str | Path) -> dict:
    """The card's machine-readable ``loralens`` block of an artifact directory ({} when it
    has no card, or a card written before cards carried one). Reads the local file only
    (``ModelCard.load`` of a missing path would ask the hub)."""
    from huggingface_hub import ModelCard

    readme = Path(directory) / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    try:
        data = ModelCard(text).data.to_dict()
    except ValueError as e:  # a hand-edited card with broken YAML
        log.warning(f"{readme}: unreadable card metadata ({e}); ignored")
        return {}
    record = data.get(RECORD_KEY)
    return record if isinstance(record, dict) else {}
