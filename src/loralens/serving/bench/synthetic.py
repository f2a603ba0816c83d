"""Generated LoRA adapters and request traffic for load tests at scale (issue 29).

Adapters: the study's LoRA method (``lora``: rank 8 on q_proj/v_proj, alpha 16; its PEFT
config from :func:`loralens.models.methods.peft_config`, rank overridable) with random
factors at the scale of trained ones, each with its own random head, saved in PEFT's
layout (adapter_config.json + adapter_model.safetensors, transformers' parameter names) so
that PEFT, vLLM and our runtime read them. The values do not change the cost of serving
(shapes do), but they are drawn at the trained scale so that logits stay in a realistic
range:

* A ~ U(-1/sqrt(in), 1/sqrt(in)): PEFT's own initialisation (kaiming-uniform with
  a = sqrt(5)), per-element std 1/sqrt(3 in) = 0.024 on SmolLM2 (hidden 576); trained
  A stay there (0.024-0.029 measured on trained SmolLM2 adapters);
* B ~ N(0, ``b_std``), default 0.015: B starts at zero and grows with training; the
  smoke preset's trained SmolLM2 SST-2 adapter has per-element std 0.0153 (alpha 8),
  its RTE adapter 0.0057 (alpha 32);
* head ~ N(0, 0.02) (trained heads: 0.019-0.024).

Traffic: adapter indices drawn independently per request, uniform or Zipf (p_i
proportional to 1 / i^s), and the hit rate an LRU cache of C adapters reaches on such
traffic: Che's approximation (Che, Tung and Wang, "Hierarchical Web caching systems:
modeling, design and experimental results", IEEE JSAC 2002; Fricker, Robert and Roberts,
"A versatile and accurate approximation for LRU cache performance", ITC 2012), with an
exact simulation of LRU on a given sequence to check it against.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from loralens.core.run_dir import RunDir
from loralens.models.methods import HEAD_MODULE, STUDY_LORA, get_method, peft_config

B_STD = 0.015      # a trained SmolLM2 SST-2 adapter's B (smoke preset): 0.0153
HEAD_STD = 0.02    # trained heads: 0.019-0.024
PREFIX = "base_model.model."  # PEFT's prefix of the classifier's parameters in the file


def projection_shapes(backbone: nn.Module, targets: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{module path in the backbone: (in_features, out_features)}`` of the ``nn.Linear``
    modules whose last name is in ``targets`` (e.g. ``layers.0.self_attn.q_proj``)."""
    targets = set(targets)
    return {name: (m.in_features, m.out_features) for name, m in backbone.named_modules()
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets}


def adapter_file_bytes(shapes: dict[str, tuple[int, int]], rank: int, hidden: int,
                       labels: int = 2, dtype_bytes: int = 4) -> int:
    """Bytes of the tensors of one adapter (A [r, in] + B [out, r] per projection, head
    [labels, hidden]): its safetensors file without the header."""
    n = sum(rank * (i + o) for i, o in shapes.values()) + labels * hidden
    return n * dtype_bytes


def adapter_state(shapes: dict[str, tuple[int, int]], rank: int, hidden: int, labels: int,
                  generator: torch.Generator, b_std: float = B_STD,
                  head_std: float = HEAD_STD, backbone_attr: str = "model"
                  ) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's saved names (float32)."""
    state: dict[str, torch.Tensor] = {}
    for path, (fan_in, fan_out) in shapes.items():
        key = f"{PREFIX}{backbone_attr}.{path}"
        bound = 1 / math.sqrt(fan_in)
        state[f"{key}.lora_A.weight"] = (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound
        state[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * b_std
    state[f"{PREFIX}{HEAD_MODULE}.weight"] = torch.randn(labels, hidden, generator=generator) * head_std
    return state


def lora_config(rank: int, base_model: str | None):
    """PEFT's LoraConfig of the study's ``lora`` method at ``rank`` (alpha, dropout and
    targets as the study trains them), for a sequence classifier with the head in
    ``modules_to_save``."""
    pc = peft_config(get_method(STUDY_LORA))
    pc.r = rank
    pc.task_type = "SEQ_CLS"
    pc.inference_mode = True
    pc.base_model_name_or_path = base_model
    return pc


def study_targets() -> list[str]:
    """The target modules of the study's ``lora`` method (q_proj, v_proj by default)."""
    return sorted(lora_config(8, None).target_modules)


def write_adapter(path: Path, shapes: dict[str, tuple[int, int]], rank: int, hidden: int,
                  labels: int, seed: int, base_model: str | None, b_std: float = B_STD) -> Path:
    """Write one random adapter in PEFT's layout to ``path``; returns ``path``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    state = adapter_state(shapes, rank, hidden, labels, g, b_std)
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora_config(rank, base_model).save_pretrained(str(path))
    return path


def generate_adapters(root: Path, ranks: Sequence[int], shapes: dict[str, tuple[int, int]],
                      hidden: int, task: str = "sst2", labels: int = 2,
                      base_model: str | None = None, seed: int = 0,
                      b_std: float = B_STD) -> list[tuple[str, Path]]:
    """``len(ranks)`` adapters (adapter i of rank ``ranks[i]``) under ``root`` laid out as a
    run directory's jobs (``models/<task>/lora/seed<i>/adapter``, so that the server knows
    their task); returns ``[(name, directory)]``, names ``syn<i>-r<rank>``. An adapter
    already there with the same config is kept (files are deterministic in ``seed``, i)."""
    run = RunDir(root)
    out = []
    for i, r in enumerate(ranks):
        d = run.weights_dir(task, STUDY_LORA, i, adapter=True)
        cfg = d / "adapter_config.json"
        done = (d / "adapter_model.safetensors").is_file() and cfg.is_file() and \
            json.loads(cfg.read_text()).get("r") == r
        if not done:
            write_adapter(d, shapes, r, hidden, labels, seed * 1_000_003 + i, base_model, b_std)
        out.append((f"syn{i}-r{r}", d))
    return out


def file_bytes(dirs: Iterable[Path]) -> int:
    """Summed size of the adapters' adapter_model.safetensors files."""
    return sum((Path(d) / "adapter_model.safetensors").stat().st_size for d in dirs)


# --------------------------------------------------------------------------- traffic

def zipf_probabilities(n: int, s: float) -> np.ndarray:
    """p_i proportional to 1 / i^s over ranks i = 1..n (index 0 the most popular)."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return w / w.sum()


def traffic(n: int, count: int, kind: str = "uniform", s: float = 1.1,
            seed: int = 0) -> np.ndarray:
    """``count`` adapter indices in [0, n), independent draws: ``uniform`` or ``zipf``
    (exponent ``s``). Zipf ranks are shuffled over the indices (with the same seed) so that
    popularity is not tied to the order adapters were loaded in."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.integers(0, n, size=count)
    if kind != "zipf":
        raise ValueError(f"traffic {kind!r}: choose uniform or zipf")
    perm = rng.permutation(n)
    return perm[rng.choice(n, size=count, p=zipf_probabilities(n, s))]


def che_hit_rate(p: np.ndarray, capacity: int) -> float:
    """Hit rate of an LRU cache of ``capacity`` items under independent requests with
    popularities ``p`` (Che's approximation): the characteristic time T solves
    sum_i (1 - exp(-p_i T)) = capacity, and the hit rate is sum_i p_i (1 - exp(-p_i T))."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0] / p.sum()
    if capacity >= len(p):
        return 1.0
    if capacity <= 0:
        return 0.0

    def filled(t: float) -> float:
        return float(np.sum(-np.expm1(-p * t)))

    lo, hi = 0.0, 1.0
    while filled(hi) < capacity:
        hi *= 2
    for _ in range(200):  # bisection: filled() is increasing in t
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if filled(mid) < capacity else (lo, mid)
    t = (lo + hi) / 2
    return float(np.sum(p * -np.expm1(-p * t)))


def lru_hit_rate(requests: Sequence[int], capacity: int, warmup: int = 0) -> float:
    """Exact hit rate of an LRU cache of ``capacity`` items on ``requests``, counting
    requests after the first ``warmup`` (the cache is filled by them)."""
    cache: OrderedDict = OrderedDict()
    hits = counted = 0
    for k, x in enumerate(requests):
        hit = x in cache
        if hit:
            cache.move_to_end(x)
        else:
            cache[x] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
        if k >= warmup:
            counted += 1
            hits += hit
    return hits / counted if counted else float("nan")
