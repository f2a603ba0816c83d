"""A lean multi-adapter serving path for LoRA classifiers.

One frozen backbone (the ``CausalLMClassifier`` backbone, e.g. a LlamaModel) is
shared by many adapters. Each adapter has its own LoRA factors for every adapted
projection and its own head (PEFT's ``modules_to_save`` copy of ``score``, with
its own number of labels). Each row of a batch names its adapter.

How a wrapped projection ``W`` (``in -> out``) computes, for input ``x`` [batch, seq, in]:

* base: ``y = x W^T`` once for the whole batch (the frozen weight, never modified);
* one adapter for the whole batch (batch 1 included): ``y += (x A^T) (s B)^T`` as
  two GEMMs on 2-D views, the second accumulating into ``y`` in place (``addmm_``);
  ``A^T`` [in, r] and ``(s B)^T`` [r, out] are stored pre-transposed with the
  scaling ``s = alpha / r`` folded in, so the step is exactly two kernel calls;
* rows of different adapters: the factors are gathered per row from stacks
  [adapters, in, r] and [adapters, r, out] (one ``index_select`` each) and applied
  with one ``bmm`` and one in-place ``baddbmm_`` for the whole batch.

Why batched gathers rather than grouping rows per adapter (index rows, two GEMMs,
``index_add`` back, per group): a batch of 8 requests for 8 adapters costs the
grouped form 8 x 4 small kernels per projection (about 2,000 kernel calls over
SmolLM2's 60 adapted projections, each 5-10 us of dispatch on this CPU), the
gathered form 4 per projection whatever the number of adapters; the extra work is
copying the gathered factors (2 x 8 x 576 x 8 floats per projection, memory-bound
and negligible). FLOPs are identical: each row meets only its own factors.
Measured with SmolLM2 on 2 CPU cores (bench/serving.py): a batch of 8 rows for 8
adapters runs at 0.98x the throughput of one merged model serving the same batch;
PEFT's per-adapter loop (``adapter_names``) at 0.80x.

Heads: one stack [adapters, max labels, hidden]; a single-adapter batch uses its
own [labels, hidden] slice, a mixed batch one gather and one ``bmm``. Logits of a
mixed batch whose adapters have different label counts are padded with ``-inf``
to the largest count among its rows (argmax and softmax stay right).

Logits equal PEFT's (a separate ``PeftModel`` per adapter, or PeftModel's own
``adapter_names`` mixed batches) within float32 rounding: the only differences are
the order of the low-rank products and folding ``s`` into ``B`` (exact when s is a
power of two, as with the default alpha=16, r=8).

Adapters of different ranks or target modules share a module without padding: each
projection keeps one stack per rank present (:class:`LoraLinear`), and an adapter holds
only its own rank's rows in the projections it adapts (its own factor bytes, whatever the
largest rank served). A mixed batch whose rows use one rank in a projection (the common
case) gathers once as above; rows of several ranks run the same per-row arithmetic once
per rank (gather the rank's rows, ``bmm``, ``baddbmm_``, ``index_copy_`` back). A
projection no adapter of a batch touches skips its low-rank step.

Threads: a forward takes, under ``lock``, everything it reads of the adapters (names to
slots, each projection's factors: views of its adapters' rows, or gathered copies for a
mixed batch, and its heads), marks itself ``running`` with its adapters ``busy``, and runs
the backbone without the lock. Adding and removing adapters hold the lock, so another
thread (the adapter store's loader) may change the adapters while a batch runs: a removal
of a ``busy`` adapter is refused, removed rows are only marked free (no stack shrinks), and
an addition must fit rows already free (:meth:`MultiLoraClassifier.in_place_problem`: no
stack grows, no module is replaced); head tensors are replaced, never written in place.
So the running batch's answers never change, and the next batch sees the new adapter.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from loralens.models.families import last_token_index

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_PREFIX = "base_model.model."
_UNSUPPORTED = {  # adapter_config.json keys whose non-default value changes the computation
    "use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "layers_to_transform": None,
    "layer_replication": None, "rank_pattern": {}, "alpha_pattern": {}, "use_qalora": False,
    "alora_invocation_tokens": None, "target_parameters": None, "trainable_token_indices": None,
}


# --------------------------------------------------------------------------- adapters

@dataclass
class LoraAdapter:
    """One task's adapter, independent of any model object.

    ``factors`` maps a module path relative to the classifier (e.g.
    ``backbone.layers.0.self_attn.q_proj``, whether the file says ``model.`` as
    transformers names it or ``backbone.`` as old loralens adapters did) to
    ``(A [r, in], B [out, r], scaling)``;
    ``head_weight`` is [num_labels, hidden], ``head_bias`` [num_labels] or None.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None = None
    source: str = ""

    @property
    def num_labels(self) -> int:
        return self.head_weight.shape[0]

    @classmethod
    def from_dir(cls, path: str | Path) -> "LoraAdapter":
        """Read a PEFT adapter directory: adapter_config.json + adapter_model.safetensors.

        Only safetensors are read (no pickle). The scaling is alpha / r
        (alpha / sqrt(r) with rsLoRA), as PEFT computes it.
        """
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path, st_path = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not cfg_path.is_file() or not st_path.is_file():
            raise FileNotFoundError(f"{path}: not a PEFT adapter directory (needs adapter_config.json "
                                    "and adapter_model.safetensors; .bin files are not read)")
        config = json.loads(cfg_path.read_text())
        return cls.from_state(load_file(str(st_path)), config, source=str(path))

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], config: Mapping,
                   source: str = "") -> "LoraAdapter":
        """From a PEFT adapter state dict (as saved) and its config dict."""
        peft_type = config.get("peft_type", "LORA")
        if str(getattr(peft_type, "value", peft_type)).upper() != "LORA":
            raise ValueError(f"{source}: peft_type {config.get('peft_type')!r} is not LORA: the "
                             "lean runtime serves LoRA only; serve this adapter through PEFT "
                             "(--backend peft) or merged (--backend merged)")
        for key, default in _UNSUPPORTED.items():
            value = config.get(key, default)
            if value not in (default, None, False, {}, []):
                raise NotImplementedError(f"{source}: adapter_config {key}={value!r} is not "
                                          "supported by the serving runtime")
        from loralens.models.serving_paths import rewrites_base

        if rewrites_base(config):  # PiSSA/OLoRA: A, B alone are not the model on the base W
            raise NotImplementedError(
                f"{source}: adapter_config init_lora_weights={config['init_lora_weights']!r} "
                "rewrites the base weights; the serving runtime shares the unchanged base, so "
                "serve it through PEFT or merged weights")
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        ab: dict[str, dict[str, torch.Tensor]] = {}
        head: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            m = _LORA_KEY.match(key)
            if m:
                ab.setdefault(m["module"], {})[m["ab"]] = value
                continue
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            name = re.sub(r"\.modules_to_save\.[^.]+", "", name)
            if name in ("score.weight", "score.bias"):
                head[name.split(".")[-1]] = value
            else:
                raise ValueError(f"{source}: unexpected tensor {key!r} in the adapter")
        if "weight" not in head:
            raise ValueError(f"{source}: the adapter has no head (score.weight); train it with "
                             "modules_to_save=['score']")
        factors = {}
        for module, pair in ab.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{source}: module {module} lacks lora_A or lora_B")
            # standard layout (transformers' names, model.*) and loralens's old one
            # (backbone.*) give one key form: the backbone path behind "backbone."
            key = "backbone." + module[len("model."):] if module.startswith("model.") else module
            factors[key] = (pair["A"], pair["B"], scaling)
        return cls(factors, head["weight"], head.get("bias"), source)

    @classmethod
    def from_peft(cls, model: nn.Module, adapter_name: str = "default") -> "LoraAdapter":
        """From an in-memory PeftModel (any of its loaded adapters)."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        config = model.peft_config[adapter_name].to_dict()
        return cls.from_state(state, config, source=f"PeftModel[{adapter_name}]")


# --------------------------------------------------------------------------- wrapped projection

class _RankStack:
    """The factors of one rank ``r`` in one projection: ``At`` [capacity, in, r] and ``Bt``
    [capacity, r, out] (scaling folded in); ``free`` lists unused rows."""

    __slots__ = ("At", "Bt", "free")

    def __init__(self, At: torch.Tensor, Bt: torch.Tensor):
        self.At, self.Bt, self.free = At, Bt, []

    @property
    def used(self) -> int:
        return self.At.shape[0] - len(self.free)


def _grown(n: int, reserved: int = 0) -> int:
    """Capacity after ``n`` rows: the ``reserved`` rows when more (the runtime was told how
    many adapters of this rank to expect: :meth:`MultiLoraClassifier.reserve`), else exact up
    to 16, then 1/16 more (amortised copies; at most 6.25% of a stack unused, within the
    memory goal of 1.1x the adapters' own bytes)."""
    return max(n + max(1, n // 16), reserved)


class LoraLinear(nn.Module):
    """Stand-in for an ``nn.Linear``: shared frozen weight plus LoRA factors stacked by rank.

    One :class:`_RankStack` per rank present (``stacks[r]``), so an adapter holds its own
    rank's bytes, never the largest rank's; ``where[slot]`` is ``(r, row)`` of the runtime's
    adapter ``slot`` (None: that adapter does not adapt this projection; ``has`` says the
    same as booleans). ``_a``/``_b`` are the factors of the current batch, set by the
    runtime before a forward: [in, r] and [r, out] for one adapter, or gathered per row
    [batch, in, r] and [batch, r, out] when ``_mixed``; ``_segs``, when the batch's rows use
    several ranks here, lists ``(rows, a, b)`` per rank instead; None = base only.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.stacks: dict[int, _RankStack] = {}
        self.reserved: Mapping[int, int] = {}  # rank -> rows to allocate at once (the runtime's)
        self.where: list[tuple[int, int] | None] = []
        self._a: torch.Tensor | None = None
        self._b: torch.Tensor | None = None
        self._mixed = False
        self._segs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        a = self._a
        if a is None:
            return y
        if self._mixed:  # x [batch, seq, in]; a [batch, in, r]; b [batch, r, out]
            segs = self._segs
            if segs is None:
                return y.baddbmm_(torch.bmm(x, a), self._b)
            for rows, a, b in segs:  # one rank's rows: the same per-row arithmetic
                yr = y.index_select(0, rows)
                y.index_copy_(0, rows, yr.baddbmm_(torch.bmm(x.index_select(0, rows), a), b))
            return y
        y.view(-1, self.out_features).addmm_(torch.mm(x.reshape(-1, self.in_features), a), self._b)
        return y

    @property
    def has(self) -> list[bool]:
        return [w is not None for w in self.where]

    @property
    def rank(self) -> int:
        return max(self.stacks, default=0)

    @property
    def At(self) -> torch.Tensor:
        """The largest rank's stack (empty [0, in, 0] when no adapter adapts this)."""
        s = self.stacks.get(self.rank)
        return s.At if s is not None else self.weight.new_zeros(0, self.in_features, 0)

    def factors(self, slot: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Views ``(A^T [in, r], s B^T [r, out])`` of adapter ``slot`` (None, None if absent)."""
        w = self.where[slot]
        if w is None:
            return None, None
        st = self.stacks[w[0]]
        return st.At[w[1]], st.Bt[w[1]]

    # ---- slots (called by the runtime, under no_grad)
    def append(self, factors: tuple[torch.Tensor, torch.Tensor, float] | None) -> None:
        if factors is None:
            self.where.append(None)
            return
        A, B, s = factors
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(f"LoRA factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a "
                             f"{self.in_features} -> {self.out_features} projection")
        w = self.weight
        st = self.stacks.get(r)
        if st is None:
            st = self.stacks[r] = _RankStack(w.new_zeros(0, self.in_features, r),
                                             w.new_zeros(0, r, self.out_features))
        if not st.free:
            n = st.At.shape[0]
            cap = _grown(n, self.reserved.get(r, 0))
            At = w.new_zeros(cap, self.in_features, r)
            Bt = w.new_zeros(cap, r, self.out_features)
            At[:n], Bt[:n] = st.At, st.Bt
            st.At, st.Bt = At, Bt
            st.free = list(range(cap - 1, n - 1, -1))  # lowest row first (pop from the end)
        row = st.free.pop()
        st.At[row] = A.to(w).t()
        st.Bt[row] = (B.to(torch.float64) * s).to(w).t() if s != 1 else B.to(w).t()
        self.where.append((r, row))

    def drop(self, slot: int, shrink: bool = True) -> None:
        """Remove a slot; a rank's stack shrinks when half of it is unused (never below the
        rows reserved for its rank, so a budgeted store's evict-then-load reuses the row),
        and goes when its last adapter does. ``shrink=False`` (a forward is running): the
        row is only marked free, the stack stays as it is (no new tensor)."""
        w = self.where.pop(slot)
        if w is None:
            return
        r, row = w
        st = self.stacks[r]
        st.free.append(row)
        st.free.sort(reverse=True)
        used = st.used
        if not shrink:
            return
        if used == 0:
            del self.stacks[r]
        elif used <= st.At.shape[0] // 2 and st.At.shape[0] > self.reserved.get(r, 0):
            keep = sorted(x[1] for x in self.where if x is not None and x[0] == r)
            new = {old: i for i, old in enumerate(keep)}
            idx = torch.tensor(keep, device=st.At.device)
            st.At, st.Bt = st.At.index_select(0, idx), st.Bt.index_select(0, idx)
            st.free = []
            self.where = [(r, new[x[1]]) if x is not None and x[0] == r else x
                          for x in self.where]

    def route(self, slots: Sequence[int], memo: dict) -> None:
        """Set the factors of a mixed batch whose row ``i`` uses adapter ``slots[i]``."""
        where = [self.where[s] for s in slots]
        ranks = {w[0] for w in where if w is not None}
        self._mixed = True
        if not ranks:
            self._a = self._b = None
            self._segs = None
            return
        dev = self.weight.device
        if len(ranks) == 1 and None not in where:  # the common case: one gather each
            r = next(iter(ranks))
            rows = tuple(w[1] for w in where)
            idx = memo.get(rows)
            if idx is None:
                idx = memo[rows] = torch.tensor(rows, device=dev)
            st = self.stacks[r]
            self._a, self._b, self._segs = st.At.index_select(0, idx), st.Bt.index_select(0, idx), None
            return
        segs = []
        for r in sorted(ranks):
            batch_rows = [i for i, w in enumerate(where) if w is not None and w[0] == r]
            idx = torch.tensor([where[i][1] for i in batch_rows], device=dev)
            st = self.stacks[r]
            segs.append((torch.tensor(batch_rows, device=dev), st.At.index_select(0, idx),
                         st.Bt.index_select(0, idx)))
        self._segs = segs
        self._a, self._b = segs[0][1], segs[0][2]

    def bytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.stacks.values()
                   for t in (s.At, s.Bt))

    def _apply(self, fn, recurse=True):  # .to(dtype/device) moves the stacks as buffers
        out = super()._apply(fn, recurse)
        for st in self.stacks.values():
            st.At, st.Bt = fn(st.At), fn(st.Bt)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={sum(self.has)}, ranks={sorted(self.stacks)}")


# --------------------------------------------------------------------------- the runtime

class MultiLoraClassifier(nn.Module):
    """One frozen classifier backbone serving many LoRA adapters, each with its own head.

    >>> rt = MultiLoraClassifier(backbone)                      # e.g. LlamaModel
    >>> rt.add_adapter("sst2", "runs/x/models/sst2/lora/seed42/adapter")
    >>> rt.add_adapter("rte", LoraAdapter.from_dir(...))
    >>> rt(input_ids, attention_mask, "sst2")                   # [batch, 2] logits
    >>> rt(input_ids, attention_mask, ["sst2", "rte", "sst2"])  # one adapter per row

    The backbone is modified in place once (each adapted ``nn.Linear`` is replaced
    by a :class:`LoraLinear` sharing its weight; the weights are never changed), so
    give it a backbone no other model uses. Inference only (runs under
    ``torch.inference_mode``). Adapters can be added and removed at any time.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        w = next(backbone.parameters())
        self.hidden = backbone.config.hidden_size
        self.register_buffer("heads", w.new_zeros(0, 0, self.hidden), persistent=False)
        self.register_buffer("head_bias", w.new_zeros(0, 0), persistent=False)
        self.names: list[str] = []             # slot -> adapter name
        self.labels: list[int] = []            # slot -> number of labels
        self.sources: list[str] = []
        self.wrapped: dict[str, LoraLinear] = {}  # backbone-relative path -> module
        self._active: int | None = None         # slot of the single-adapter state set
        self._routes: dict[int, tuple] = {}     # slot -> cached views (cleared on any change)
        self._head_w: torch.Tensor | None = None
        self._head_b: torch.Tensor | None = None
        self._reserved: dict[int, int] = {}     # rank -> adapters expected (reserve())
        # Changes to the adapters (add, remove) and a forward's set-up (names -> slots ->
        # factors and heads, taken at once) hold ``lock``; the forward itself does not, so an
        # adapter can be added or removed on another thread while a batch runs (the store's
        # loader thread): ``running`` and ``busy`` (the running batch's adapter names) say
        # what that change must leave alone (:meth:`in_place_problem`).
        self.lock = threading.RLock()
        self.running = False
        self.busy: frozenset[str] = frozenset()

    def reserve(self, ranks: Mapping[int, int]) -> None:
        """Expect ``ranks[r]`` adapters of rank ``r``: a projection's stack of rank ``r`` is
        then allocated with that many rows at once, not grown (and copied) as adapters come.
        Growing leaves the outgrown stacks' memory with the C allocator, which keeps much of
        it from the process (measured: 100 rank-8 SmolLM2 adapters added one by one held
        1.51x their bytes in RSS, 1.04x after ``malloc_trim``). A hint: more adapters than
        reserved still fit (the stack grows), fewer leave rows unused. Reserve for adapters
        that adapt the same projections (the rows are per projection)."""
        for r, n in ranks.items():
            if int(r) < 1 or int(n) < 0:
                raise ValueError(f"reserve: rank {r} with {n} adapters")
        self._reserved.clear()
        self._reserved.update({int(r): int(n) for r, n in ranks.items()})

    # ---- adapters
    def bytes_held(self) -> int:
        """Bytes of the adapters' factor and head stacks (the frozen base excluded)."""
        return (sum(m.bytes_held() for m in self.wrapped.values())
                + self.heads.numel() * self.heads.element_size()
                + self.head_bias.numel() * self.head_bias.element_size())

    @property
    def adapters(self) -> list[str]:
        return list(self.names)

    def num_labels(self, name: str) -> int:
        return self.labels[self._slot(name)]

    def _slot(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no adapter {name!r}; loaded: {self.names}") from None

    def _module_path(self, path: str) -> str:
        path = path[len(_PREFIX):] if path.startswith(_PREFIX) else path
        return path[len("backbone."):] if path.startswith("backbone.") else path

    def _target(self, path: str) -> tuple[nn.Module | None, str, nn.Module | None]:
        """(parent module, attribute name, module) of a backbone-relative path."""
        parent_path, _, child = path.rpartition(".")
        try:
            parent = self.backbone.get_submodule(parent_path) if parent_path else self.backbone
        except AttributeError:
            return None, child, None
        return parent, child, getattr(parent, child, None)

    def _wrap(self, path: str) -> LoraLinear:
        if path in self.wrapped:
            return self.wrapped[path]
        parent, child, base = self._target(path)
        mod = LoraLinear(base)
        mod.reserved = self._reserved
        for _ in self.names:  # earlier adapters do not touch this projection
            mod.append(None)
        setattr(parent, child, mod)
        self.wrapped[path] = mod
        return mod

    def in_place_problem(self, adapter: LoraAdapter, evicting: Sequence[str] = ()) -> str | None:
        """Why ``adapter`` cannot be written into rows its projections' stacks already have
        free (counting the rows of ``evicting``, adapters to be removed first), or None when
        it can: then adding it allocates no new factor stack and rewrites no row in use, so it
        may happen while a forward runs (the forward reads only its own adapters' rows, or
        its own gathered copies, and head tensors it took before it started)."""
        slots = [self._slot(n) for n in evicting]
        for key, (A, _, _) in adapter.factors.items():
            path = self._module_path(key)
            mod = self.wrapped.get(path)
            if mod is None:
                return f"projection {path} is not adapted yet (its module would be replaced)"
            r = A.shape[0]
            st = mod.stacks.get(r)
            freed = sum(1 for s in slots if mod.where[s] is not None and mod.where[s][0] == r)
            if st is None or len(st.free) + freed < 1:
                return f"the rank-{r} stack of {path} is full (it would grow: a new tensor)"
        return None

    @torch.no_grad()
    def add_adapter(self, name: str, adapter: "LoraAdapter | str | Path") -> None:
        """Load an adapter (a PEFT adapter directory or a :class:`LoraAdapter`) as ``name``.
        While a forward runs (another thread) only an adapter that fits rows already free
        (:meth:`in_place_problem`) is added; another raises RuntimeError."""
        if not isinstance(adapter, LoraAdapter):
            adapter = LoraAdapter.from_dir(adapter)
        with self.lock:
            if self.running:
                problem = self.in_place_problem(adapter)
                if problem is not None:
                    raise RuntimeError(f"adapter {name!r} cannot be added while a batch runs: "
                                       f"{problem}")
            self._add_adapter(name, adapter)

    def _add_adapter(self, name: str, adapter: LoraAdapter) -> None:
        if name in self.names:
            raise ValueError(f"adapter {name!r} is already loaded; remove it first")
        if adapter.head_weight.shape[1] != self.hidden:
            raise ValueError(f"{adapter.source}: head of width {adapter.head_weight.shape[1]} on a "
                             f"backbone of hidden size {self.hidden}")
        factors = {self._module_path(k): v for k, v in adapter.factors.items()}
        for path, (A, B, _) in factors.items():  # validate every target before changing anything
            target = self._target(path)[2]
            if not isinstance(target, (nn.Linear, LoraLinear)):
                raise ValueError(f"{adapter.source}: target {path!r} is not an nn.Linear of the "
                                 f"backbone ({type(target).__name__})")
            r = A.shape[0]
            if A.shape != (r, target.in_features) or B.shape != (target.out_features, r):
                raise ValueError(f"{adapter.source}: LoRA factors of {path!r}, A {tuple(A.shape)}"
                                 f" and B {tuple(B.shape)}, do not fit the backbone's "
                                 f"{target.in_features} -> {target.out_features} projection")
        for path in factors:
            self._wrap(path)
        for path, mod in self.wrapped.items():
            mod.append(factors.get(path))
        # heads: [slots, max labels, hidden], zero-padded
        n = adapter.num_labels
        width = max(self.heads.shape[1], n)
        heads = F.pad(self.heads, (0, 0, 0, width - self.heads.shape[1]))
        bias = F.pad(self.head_bias, (0, width - self.head_bias.shape[1]))
        h = heads.new_zeros(1, width, self.hidden)
        h[0, :n] = adapter.head_weight.to(h)
        b = bias.new_zeros(1, width)
        if adapter.head_bias is not None:
            b[0, :n] = adapter.head_bias.to(b)
        self.heads, self.head_bias = torch.cat([heads, h]), torch.cat([bias, b])
        self.names.append(name)
        self.labels.append(n)
        self.sources.append(adapter.source)
        self._active = None
        self._routes.clear()

    @torch.no_grad()
    def remove_adapter(self, name: str) -> None:
        """Unload ``name``. While a forward runs (another thread) the adapter must not be one
        of its own (``busy``: RuntimeError), and its rows are only marked free (no stack
        shrinks or goes: no new tensor under the running batch)."""
        with self.lock:
            if name in self.busy:
                raise RuntimeError(f"adapter {name!r} is in the running batch")
            slot = self._slot(name)
            for mod in self.wrapped.values():
                mod.drop(slot, shrink=not self.running)
            keep = [i for i in range(len(self.names)) if i != slot]
            del self.names[slot], self.labels[slot], self.sources[slot]
            width = max(self.labels, default=0)
            self.heads = self.heads[keep, :width].contiguous()  # new tensors: the running
            self.head_bias = self.head_bias[keep, :width].contiguous()  # batch holds its own
            if self.running:  # its factors stay set: only the cached slot number is stale
                self._active = None
            else:
                self.deactivate()
            self._routes.clear()

    def _apply(self, fn, recurse=True):  # .to(device) etc.: cached views must be rebuilt
        if hasattr(self, "_routes"):
            self.deactivate()
            self._routes.clear()
        return super()._apply(fn, recurse)

    # ---- routing
    def activate(self, name: str) -> None:
        """Point every projection at one adapter's factors (done lazily by forward)."""
        self._activate_slot(self._slot(name))

    def _activate_slot(self, slot: int) -> None:
        if self._active == slot:
            return
        route = self._routes.get(slot)
        if route is None:  # views into the stacks, built once per slot: a switch is then
            n = self.labels[slot]  # plain dict stores (no tensor op, no Module.__setattr__)
            bias = self.head_bias[slot, :n]
            route = self._routes[slot] = (
                [(mod.__dict__, *mod.factors(slot)) for mod in self.wrapped.values()],
                self.heads[slot, :n], bias if bool(bias.any()) else None)
        for d, a, b in route[0]:
            d["_a"], d["_b"], d["_mixed"] = a, b, False
        self._head_w, self._head_b = route[1], route[2]
        self._active = slot

    def deactivate(self) -> None:
        """Route every projection to its frozen base weight only (no adapter)."""
        for mod in self.wrapped.values():
            mod._a = mod._b = None
        self._active = None

    def _release_mixed(self) -> None:
        """Drop a mixed batch's gathered factors (held until the next batch, they took about
        as much memory again as 20 mixed-rank SmolLM2 adapters' own stacks: measured 1.03x
        their file bytes in RSS before a mixed batch of 16, 2.02x after)."""
        for mod in self.wrapped.values():
            mod._a = mod._b = mod._segs = None

    def _route_mixed(self, slots: list[int]) -> torch.Tensor:
        idx = torch.tensor(slots, device=self.heads.device)
        memo: dict = {}  # projections with the same rows share one index tensor
        for mod in self.wrapped.values():
            mod.route(slots, memo)
        self._active = None
        return idx

    # ---- forward
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                adapters: str | Sequence[str]) -> torch.Tensor:
        """Logits [batch, labels] for one adapter name or one name per row: float32, or
        float64 when the backbone is float64 (the identity checks run there).

        Mixed rows whose heads have fewer labels than the widest in the batch are
        padded with -inf.
        """
        with self.lock:  # the batch's adapters, factors and heads, taken at once
            if isinstance(adapters, str):
                busy = {adapters}
                slots = None
                self._activate_slot(self._slot(adapters))
            else:
                if len(adapters) != input_ids.shape[0]:
                    raise ValueError(f"{len(adapters)} adapter names for {input_ids.shape[0]} rows")
                busy = set(adapters)
                slots = [self._slot(a) for a in adapters]
                if len(set(slots)) == 1:
                    self._activate_slot(slots[0])
                    slots = None
                else:
                    idx = self._route_mixed(slots)
            if slots is None:
                head_w, head_b = self._head_w, self._head_b
            else:
                mods = list(self.wrapped.values())
                width = max(self.labels[s] for s in slots)
                head_w = self.heads.index_select(0, idx)[:, :width]            # [batch, width, hidden]
                head_b = self.head_bias.index_select(0, idx)[:, :width]
                n = torch.tensor([self.labels[s] for s in slots], device=self.heads.device)
            self.running, self.busy = True, frozenset(busy)
        try:
            h = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state
        finally:
            if slots is not None:  # the gathered factors are the batch's own copies (rows x
                for mod in mods:  # factor bytes per projection): not kept past it
                    mod._a = mod._b = mod._segs = None
            with self.lock:
                self.running, self.busy = False, frozenset()
        rows = torch.arange(h.shape[0], device=h.device)
        pooled = h[rows, last_token_index(attention_mask)]
        if slots is None:
            return _at_least_float32(F.linear(pooled, head_w, head_b))
        logits = torch.bmm(head_w, pooled.unsqueeze(2)).squeeze(2)         # [batch, width]
        logits = logits + head_b
        pad = torch.arange(width, device=logits.device)[None, :] >= n[:, None]
        return _at_least_float32(logits).masked_fill(pad, float("-inf"))


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32 logits from a bf16/fp16/float32 model; float64 ones stay float64."""
    return x if x.dtype == torch.float64 else x.float()
