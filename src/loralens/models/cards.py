"""Model cards (README.md) for saved artifacts: what the model is, how to feed it, how to load it.

A card states what the artifact directory and ``info`` say: the task and its labels, the
method, the base model (and its provenance note), the hyperparameters, the scores with the
split they were measured on, the loralens version and commit, and always the input
preprocessing (:mod:`loralens.tasks.preprocess`) with a loading snippet that uses transformers
and PEFT only. Unknown facts are left out, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

from loralens import __version__
from loralens.models.methods import is_study_full, is_study_lora

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
    kind = info.get("kind") or (
        ("LoRA adapter" if is_study_lora(method) else f"PEFT adapter ({method})") if adapter
        else "full fine-tuned model" if method is None or is_study_full(method)
        else f"fine-tuned model ({method}, full checkpoint)")
    title = f"loralens {kind}" + (f" for GLUE {info['task']}" if info.get("task") else "")
    lines = [f"# {title}", ""]
    facts = [("method", info.get("method")), ("task", info.get("task")),
             ("labels", _labels(info.get("label_names"))),
             ("base model", info.get("base")), ("base model files", info.get("base_path")),
             ("base model note", info.get("base_note")),
             ("loralens", f"{info.get('version') or __version__}"
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
    (out / "README.md").write_text(render_card(info))
    return out / "README.md"
