"""Three ways to serve many LoRA classifiers from one process, behind one interface.

Every backend answers ``infer(input_ids, attention_mask, adapters)`` with float32
logits ``[rows, width]`` for one adapter name per row (rows of adapters with
fewer labels than ``width`` are padded with ``-inf``), and supports adding and
removing adapters at run time. The server (:mod:`loralens.serving.server`) and
the load test (:mod:`loralens.serving.loadtest`) use them interchangeably:

``ours``
    :class:`~loralens.serving.runtime.MultiLoraClassifier`: one frozen base; a
    batch whose rows name different adapters runs as ONE forward pass.
``peft``
    One ``PeftModel`` holding every adapter (separate, unmerged): a batch of one
    adapter runs after ``set_adapter``; a mixed batch uses PEFT's own
    mixed-batch inference (``adapter_names=[...]``), which loops over the
    batch's adapters inside every adapted layer. PEFT keeps one head shape, so
    every adapter must have the same number of labels.
``merged``
    One merged model per adapter (``W + s B A`` folded into q/v, own head). A
    mixed batch is split by adapter: one forward per adapter present. The copies
    share every tensor LoRA does not change (embeddings, MLPs, norms, k/o
    projections), so 16 adapters cost 16 x (q, v, head) of memory rather than
    16 full models; the arithmetic per forward is exactly a standalone merged
    model's.

Every backend is used from one thread at a time (the server runs inference and
adapter changes on a single worker thread).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from loralens.core.errors import ConfigError
from loralens.models.classifier import CausalLMClassifier
from loralens.serving.cli_args import BACKENDS
from loralens.serving.runtime import LoraAdapter, MultiLoraClassifier
from loralens.serving.store import AdapterStore, groups, trim_heap



class AdapterError(ValueError):
    """An adapter cannot be added (bad directory, duplicate name, incompatible head)."""


@dataclass
class AdapterInfo:
    name: str
    source: str
    num_labels: int
    task: str | None = None
    label_names: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "num_labels": self.num_labels,
                "task": self.task, "label_names": list(self.label_names) if self.label_names
                else None}


class Backend:
    """Base class: adapter bookkeeping; subclasses implement _add, _remove, infer."""

    kind = ""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.infos: dict[str, AdapterInfo] = {}

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def add(self, info: AdapterInfo, path: str | Path) -> AdapterInfo:
        if info.name in self.infos:
            raise AdapterError(f"adapter {info.name!r} is already loaded; remove it first")
        try:
            adapter = LoraAdapter.from_dir(path)
        except (FileNotFoundError, NotImplementedError, ValueError, KeyError) as e:
            raise AdapterError(str(e)) from e
        if info.label_names and len(info.label_names) != adapter.num_labels:
            raise AdapterError(f"{path}: head has {adapter.num_labels} labels but task "
                               f"{info.task!r} has {len(info.label_names)}")
        info.num_labels = adapter.num_labels
        try:
            self._add(info.name, Path(path), adapter)
        except ValueError as e:  # shapes that do not fit this backbone (e.g. another base's)
            raise AdapterError(str(e)) from e
        self.infos[info.name] = info
        return info

    def remove(self, name: str) -> None:
        if name not in self.infos:
            raise KeyError(name)
        self._remove(name)
        del self.infos[name]

    def reserve(self, paths: Sequence[str | Path]) -> None:
        """Before adding the adapters at ``paths`` in bulk: size memory for them (a no-op
        unless the backend can use it)."""

    def settle(self) -> None:
        """After adding adapters in bulk: give memory freed meanwhile back (a no-op unless
        the backend can)."""

    def _add(self, name: str, path: Path, adapter: LoraAdapter) -> None:
        raise NotImplementedError

    def _remove(self, name: str) -> None:
        raise NotImplementedError

    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              adapters: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class OursBackend(Backend):
    """``infos`` are the adapters known; ``store`` says which are loaded (all of them without
    a budget; at most ``max_loaded`` with one, the others read from disk when used)."""

    kind = "ours"

    def __init__(self, backbone: nn.Module, max_loaded: int | None = None):
        super().__init__(backbone)
        self.rt = MultiLoraClassifier(self.backbone)
        self.store = AdapterStore(self.rt, max_loaded)

    def reserve(self, paths):
        self.store.reserve(paths)

    def settle(self):
        trim_heap()

    def _add(self, name, path, adapter):
        self.store.register(name, path, adapter)

    def _remove(self, name):
        self.store.forget(name)

    @torch.inference_mode()
    def infer(self, input_ids, attention_mask, adapters):
        names = list(adapters)
        parts = groups(names, self.store.max_loaded)
        if len(parts) == 1:
            self.store.ensure(names)
            return self.rt(input_ids, attention_mask, names[0] if len(set(names)) == 1 else names)
        # more distinct adapters than the budget: one forward per group of at most
        # max_loaded adapters, each group loaded first (its rows trimmed to their own padding)
        width = max(self.infos[n].num_labels for n in names)
        out = None
        for rows in parts:
            sub = [names[i] for i in rows]
            self.store.ensure(sub)
            idx = torch.tensor(rows)
            mask = attention_mask[idx]
            cols = int(mask.sum(1).max())
            logits = self.rt(input_ids[idx][:, :cols], mask[:, :cols],
                             sub[0] if len(set(sub)) == 1 else sub)
            if out is None:
                out = logits.new_full((len(names), width), float("-inf"))
            out[idx, : logits.shape[1]] = logits
        return out


class PeftBackend(Backend):
    kind = "peft"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.model = None  # the PeftModel, created with the first adapter
        self.active: str | None = None
        self.labels: int | None = None

    def _add(self, name, path, adapter):
        from loralens.models.artifacts import load_adapter

        if self.labels is not None and adapter.num_labels != self.labels:
            raise AdapterError(f"{path}: {adapter.num_labels} labels; the PEFT backend holds "
                               f"heads of {self.labels} labels (one PeftModel, one head shape)")
        if self.model is None:
            base = CausalLMClassifier(self.backbone, adapter.num_labels)
            self.model = load_adapter(base, path, adapter_name=name)
            self.labels = adapter.num_labels
        else:
            load_adapter(self.model, path, adapter_name=name)
        self.active = self.model.active_adapter

    def _remove(self, name):
        if len(self.infos) == 1:  # PEFT cannot hold zero adapters: start over on the next add
            self.backbone = self.model.unload() if hasattr(self.model, "unload") else self.backbone
            self.backbone = getattr(self.backbone, "backbone", self.backbone)
            self.model, self.active, self.labels = None, None, None
            return
        if self.active == name:
            other = next(n for n in self.infos if n != name)
            self.model.set_adapter(other)
            self.active = other
        self.model.delete_adapter(name)

    @torch.inference_mode()
    def infer(self, input_ids, attention_mask, adapters):
        names = list(adapters)
        if len(set(names)) == 1:
            if self.active != names[0]:
                self.model.set_adapter(names[0])
                self.active = names[0]
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          adapter_names=names).logits


class MergedBackend(Backend):
    kind = "merged"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.models: dict[str, CausalLMClassifier] = {}

    def _add(self, name, path, adapter):
        # A copy whose untouched tensors ARE the base's (deepcopy's memo maps them to
        # themselves); the adapted projections get their own merged weight.
        targets = {k.removeprefix("backbone.") for k in adapter.factors}
        memo = {}
        for mod_name, mod in self.backbone.named_modules():
            if mod_name in targets:
                continue
            for p in mod.parameters(recurse=False):
                memo[id(p)] = p
            for b in mod.buffers(recurse=False):
                memo[id(b)] = b
        backbone = copy.deepcopy(self.backbone, memo)
        with torch.no_grad():
            for key, (A, B, s) in adapter.factors.items():
                lin = backbone.get_submodule(key.removeprefix("backbone."))
                if not isinstance(lin, nn.Linear):
                    raise AdapterError(f"{path}: target {key!r} is not an nn.Linear")
                lin.weight = nn.Parameter(
                    lin.weight + s * (B.to(lin.weight) @ A.to(lin.weight)), requires_grad=False)
            model = CausalLMClassifier(backbone, adapter.num_labels)
            model.score.weight.copy_(adapter.head_weight)
            if adapter.head_bias is not None:
                model.score.bias = nn.Parameter(adapter.head_bias.clone(), requires_grad=False)
        self.models[name] = model.eval()

    def _remove(self, name):
        del self.models[name]

    @torch.inference_mode()
    def infer(self, input_ids, attention_mask, adapters):
        names = list(adapters)
        if len(set(names)) == 1:
            return self.models[names[0]](input_ids, attention_mask).logits
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n, []).append(i)
        width = max(self.infos[n].num_labels for n in groups)
        out = torch.full((len(names), width), float("-inf"))
        for n, rows in groups.items():
            idx = torch.tensor(rows)
            ids, mask = input_ids[idx], attention_mask[idx]
            width_ids = int(mask.sum(1).max())  # this group's own padding
            logits = self.models[n](ids[:, :width_ids], mask[:, :width_ids]).logits
            out[idx, : logits.shape[1]] = logits
        return out


def make_backend(kind: str, backbone: nn.Module, max_loaded: int | None = None) -> Backend:
    """A backend of ``kind``; ``max_loaded`` (the adapter store's budget, ``--max-loaded``)
    only for ``ours``: the other backends hold every adapter they serve."""
    try:
        cls = {"ours": OursBackend, "peft": PeftBackend, "merged": MergedBackend}[kind]
    except KeyError:
        raise ValueError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}") from None
    if max_loaded is not None:
        check_max_loaded(kind, max_loaded)
        return cls(backbone, max_loaded)
    return cls(backbone)


def check_max_loaded(kind: str, max_loaded: int | None) -> None:
    """:class:`ConfigError` naming ``--max-loaded`` when a budget is given to a backend without a
    store (peft, merged) or is below 1."""
    if max_loaded is None:
        return
    if kind != OursBackend.kind:
        raise ConfigError(f"--max-loaded: the {kind} backend loads every adapter it serves; "
                         f"an adapter budget needs --backend {OursBackend.kind}")
    if max_loaded < 1:
        raise ConfigError(f"--max-loaded must be >= 1 (got {max_loaded})")
