"""Identity checks of the adapter serving paths, run where identity is exact: float64.

Every LoRA serving path computes one function: the separate adapter (PEFT:
``W x + s B A x``), the merged model (``(W + s B A) x``), our runtime (one adapter, or
one per row) and PEFT's multi-adapter paths (``set_adapter``, ``adapter_names``). In
float32 their logits differ by rounding (summation order, where ``s = alpha / r`` is
applied), and the rounding grows with depth: on SmolLM2 (30 layers) max |Δ logit|
reached 1.1e-5 to 1.5e-5, more than the study's old absolute tolerance of 1e-5, with the
same predictions everywhere. A real fault (a row served with another adapter, the
scaling dropped, another adapter's head) changes logits by about their own size. In
float64 the verdict has room between the two: the base weights (loaded in float64 from
the checkpoint), the adapters (float32 files, exact in float64) and every path are
float64 copies made for the check only; the timed models keep the serving dtype.

How close float64 paths come depends on the model. On the tiny test Llama they agree to
~1e-15; on SmolLM2 most checks agree to ~1e-15 too, but where a different summation
order meets the cancellation inside its massive-activation MLPs (from about block 16:
intermediate sums far larger than their result) float64 rounding of ~1e-16 grows to up
to ~1e-7 in the logits (measured: 1.3e-7 at max |logit| 2.0, merged vs separate, MRPC,
batches of 4; 3.6e-8 for our runtime at batch 1 and in mixed batches), so an absolute
1e-9 would fail correct paths. A check passes when max |Δ logit| <= :data:`IDENTITY_TOL`
x max(1, max |logit|) (:func:`passes`): 15x above the worst float64 difference measured
on SmolLM2, and 4-5 orders of magnitude below a fault.

The same workloads run once more in the serving dtype, as information: the differences
the served models show, relative to the logits' scale (max |Δ| / max |logit|).

Reference: each adapter's separate ``PeftModel`` on a fresh base, one example at a time
(batch 1, no padding). Workloads (:func:`run_identity`):

* ``single``: our runtime (holding every adapter of the benchmark it serves exactly:
  :func:`loralens.models.serving_paths.lean_inexact`) and the merged model (every PEFT method:
  LoRA, DoRA, IA3, ...), at each benchmarked batch size (right-padded batches of
  consecutive examples);
* ``stream``: round-robin batch-1 requests (request j: adapter j mod k, example j div k),
  every request switching adapter: our runtime and one ``PeftModel`` holding the
  adapters (``set_adapter``);
* ``mixed``: batches of ``mixed_batch_size`` rows, row r for adapter r mod k: our
  runtime and PEFT's ``adapter_names``.

A workload is a list of batches, each a list of (adapter, example) pairs; a path is
``serve(input_ids, attention_mask, adapters) -> logits`` with one adapter index per
row; :func:`compare` serves every batch and compares each row with its reference.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from loralens.training import batches as B
from loralens.models.classifier import CausalLMClassifier
from loralens.models.saving import load_trained

IDENTITY_DTYPE = torch.float64
IDENTITY_TOL = 1e-6  # max |Δ logit| / max(1, max |logit|) between equivalent float64 paths
TOLERANCE_RULE = "max |Δ logit| <= {tol:g} × max(1, max |logit|)"

Batch = list[tuple[int, int]]                                 # (adapter index, example index)
Serve = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


@dataclass
class Adapter:
    """One LoRA adapter of the benchmark and the examples it is checked on."""

    name: str                   # e.g. "sst2_seed42" (the runtime's name for it)
    job_dir: Path               # the job directory (``load_trained`` reads it)
    weights_dir: Path           # the PEFT adapter directory
    num_labels: int
    rows: list[list[int]]       # token ids of its examples (no padding)
    lean: bool = True           # served by our runtime (exact there: paths.lean_inexact)
    rewrites_base: bool = False  # PiSSA/OLoRA: PEFT rebuilds the base on load (float32 only)


def load_reference(a: Adapter, backbone: nn.Module) -> nn.Module:
    """The separate PeftModel of ``a`` on ``backbone``. PEFT redoes a base-rewriting
    initialisation (PiSSA's SVD, OLoRA's QR) on load and refuses float64 there: such an
    adapter loads on a float32 copy, then the whole model becomes the backbone's dtype."""
    dtype = next(backbone.parameters()).dtype
    if a.rewrites_base and dtype == torch.float64:
        return load_trained(a.job_dir, backbone.float(), a.num_labels).to(dtype)
    return load_trained(a.job_dir, backbone, a.num_labels)


def head_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
    """Logits of a :class:`CausalLMClassifier` (or a ``PeftModel`` around one) in the
    model's own dtype: read at the head (``score``), before the classifier's cast to
    float32, which would round float64 logits to float32."""
    head = min((n for n, _ in model.named_modules() if n.split(".")[-1] == "score"), key=len)
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(head).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        model(input_ids=ids, attention_mask=mask, **kw)
    finally:
        hook.remove()
    return seen[-1]


def agreement(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """(candidate row, reference row) pairs of logits -> max |Δ|, the reference's max
    |logit| (the scale), their ratio, and whether every argmax agrees."""
    diff = scale = 0.0
    same = True
    for y, ref in pairs:
        y, ref = y.double().cpu(), ref.double().cpu()
        diff = max(diff, float((y - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        same &= bool(y.argmax() == ref.argmax())
    return {"rows": len(pairs), "max_abs_diff": diff, "max_abs_logit": scale,
            "relative_diff": diff / scale if scale > 0 else None, "same_predictions": same}


def passes(agreement: dict, tol: float = IDENTITY_TOL) -> bool:
    """The verdict of one float64 check: max |Δ| <= ``tol`` x max(1, max |logit|) (the
    logits' scale; 1 for logits smaller than 1)."""
    return agreement["max_abs_diff"] <= tol * max(1.0, agreement["max_abs_logit"])


def compare(serve: Serve, batches: Sequence[Batch], adapters: Sequence[Adapter],
            refs: Sequence[torch.Tensor], pad_id: int, device: torch.device) -> dict:
    """Serve every batch; row (a, i) against ``refs[a][i]`` (:func:`agreement`). Extra
    columns of a row (a mixed batch pads narrower heads with -inf) are cut off."""
    pairs = []
    with torch.inference_mode():
        for batch in batches:
            ids, mask = B.collate([adapters[a].rows[i] for a, i in batch], pad_id)
            out = serve(ids.to(device), mask.to(device), [a for a, _ in batch])
            for row, (a, i) in enumerate(batch):
                ref = refs[a][i]
                pairs.append((out[row, :len(ref)], ref))
    return agreement(pairs)


def single_batches(adapter: int, n: int, batch_size: int) -> list[Batch]:
    """Consecutive examples 0..n-1 of one adapter in batches of ``batch_size``."""
    return [[(adapter, i) for i in range(s, min(s + batch_size, n))]
            for s in range(0, n, batch_size)]


def stream_batches(adapters: Sequence[int], n: int) -> list[Batch]:
    """Batch-1 requests round robin: request j is example j div k of adapter j mod k."""
    k = len(adapters)
    return [[(adapters[j % k], j // k)] for j in range(n * k)]


def mixed_batches(adapters: Sequence[int], n: int, batch_size: int) -> list[Batch]:
    """Rows r = 0..n*k-1 (adapter r mod k, example r div k) in batches of ``batch_size``."""
    k = len(adapters)
    rows = [(adapters[r % k], r // k) for r in range(n * k)]
    return [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]


def runtime_serve(runtime, names: Sequence[str]) -> Serve:
    """Our runtime: one adapter name per row (one name for the batch takes the single path)."""
    return lambda ids, mask, ads: runtime(ids, mask, [names[a] for a in ads])


def classifier_serve(model: nn.Module) -> Serve:
    """A classifier serving one adapter (merged or separate): the rows' adapter is its own."""
    return lambda ids, mask, ads: head_logits(model, ids, mask)


def peft_set_adapter_serve(peft: nn.Module, names: Sequence[str]) -> Serve:
    """One PeftModel holding several adapters, switched with ``set_adapter`` (batch 1)."""
    def serve(ids, mask, ads):
        peft.set_adapter(names[ads[0]])
        return head_logits(peft, ids, mask)
    return serve


def peft_adapter_names_serve(peft: nn.Module, names: Sequence[str]) -> Serve:
    """One PeftModel holding several adapters, one per row through ``adapter_names``."""
    return lambda ids, mask, ads: head_logits(peft, ids, mask,
                                              adapter_names=[names[a] for a in ads])


def reference_logits(model: nn.Module, rows: Sequence[Sequence[int]], device: torch.device
                     ) -> list[torch.Tensor]:
    """Per example, batch 1 and unpadded: the logits row of ``model``."""
    out = []
    with torch.inference_mode():
        for x in rows:
            ids = torch.tensor([list(x)], device=device)
            out.append(head_logits(model, ids, torch.ones_like(ids))[0].detach().cpu())
    return out


def run_identity(backbone: nn.Module, adapters: Sequence[Adapter], batch_sizes: Sequence[int],
                 multi: Sequence[int], mixed_batch_size: int, pad_id: int,
                 device: torch.device, runtime_cls=None) -> list[dict]:
    """Every identity check on copies of ``backbone`` (in its dtype), one dict per check:
    name, workload, path, adapters, batch_size and :func:`agreement`'s fields.

    ``multi``: indices of the adapters of the multi-adapter checks (none when fewer than 2).
    Models are built one at a time and freed (float64 copies of SmolLM2 are 1 GB each).
    """
    if runtime_cls is None:
        from loralens.serving.runtime import MultiLoraClassifier as runtime_cls

    def fresh() -> nn.Module:
        return copy.deepcopy(backbone)

    names = [a.name for a in adapters]
    runtime = runtime_cls(fresh().to(device))
    for a in adapters:
        if a.lean:
            runtime.add_adapter(a.name, a.weights_dir)
    serve_rt = runtime_serve(runtime, names)
    refs: list[list[torch.Tensor]] = []
    out: list[dict] = []
    for k, a in enumerate(adapters):
        # reference: the separate PeftModel; then the same model merged (merge_and_unload)
        model = load_reference(a, fresh()).to(device).eval()
        refs.append(reference_logits(model, a.rows, device))
        merged = model.merge_and_unload().eval()
        n = len(a.rows)
        for b in batch_sizes:
            batches = single_batches(k, n, b)
            for path, serve in ((("runtime", serve_rt),) if a.lean else ()) + (
                    ("merged", classifier_serve(merged)),):
                out.append({"name": f"{a.name.replace('_seed', '/seed')}/batch{b}: "
                                    f"{path} == separate",
                            "workload": "single", "path": path, "adapters": [a.name],
                            "batch_size": b,
                            **compare(serve, batches, adapters, refs, pad_id, device)})
        del model, merged
        gc.collect()
    if len(multi) >= 2:
        out += _multi_checks(fresh, adapters, refs, list(multi), serve_rt, mixed_batch_size,
                             pad_id, device)
    del runtime
    gc.collect()
    return out


def _multi_checks(fresh, adapters: Sequence[Adapter], refs, multi: list[int], serve_rt: Serve,
                  mixed_batch_size: int, pad_id: int, device: torch.device) -> list[dict]:
    """Several adapters on one base: our runtime and (heads of one shape) one PeftModel."""
    from loralens.models.artifacts import load_adapter

    chosen = [adapters[i] for i in multi]
    n = min(len(a.rows) for a in chosen)
    workloads = {"stream": stream_batches(multi, n),
                 "mixed": mixed_batches(multi, n, mixed_batch_size)}
    paths: dict[str, dict[str, Serve]] = {"stream": {"runtime": serve_rt},
                                          "mixed": {"runtime": serve_rt}}
    peft = None
    if len({a.num_labels for a in chosen}) == 1:  # PEFT's head copies must share one shape
        peft = load_adapter(CausalLMClassifier(fresh(), chosen[0].num_labels),
                            chosen[0].weights_dir, adapter_name=chosen[0].name)
        for a in chosen[1:]:
            load_adapter(peft, a.weights_dir, adapter_name=a.name)
        peft = peft.to(device).eval()
        names = [a.name for a in adapters]
        paths["stream"]["peft"] = peft_set_adapter_serve(peft, names)
        paths["mixed"]["peft_adapter_names"] = peft_adapter_names_serve(peft, names)
    out = []
    label = {"stream": "multi stream", "mixed": "multi mixed batch"}
    for workload, batches in workloads.items():
        for path, serve in paths[workload].items():
            out.append({"name": f"{label[workload]}: {path} == single adapter",
                        "workload": workload, "path": path, "adapters": [a.name for a in chosen],
                        "batch_size": 1 if workload == "stream" else mixed_batch_size,
                        **compare(serve, batches, adapters, refs, pad_id, device)})
    del peft, paths
    gc.collect()
    return out


AGREEMENT_KEYS = ("rows", "max_abs_diff", "max_abs_logit", "relative_diff", "same_predictions")


def combine(exact: list[dict], served: list[dict] | None, tol: float = IDENTITY_TOL) -> list[dict]:
    """One record per check: its float64 agreement (the verdict: ``passed``, :func:`passes`)
    and, where run, the serving dtype's (information)."""
    by_name = {c["name"]: c for c in served or []}
    out = []
    for c in exact:
        rec = {k: v for k, v in c.items() if k not in AGREEMENT_KEYS}
        rec["rows"] = c["rows"]
        rec["float64"] = {k: c[k] for k in AGREEMENT_KEYS if k != "rows"}
        s = by_name.get(c["name"])
        rec["serving_dtype"] = {k: s[k] for k in AGREEMENT_KEYS if k != "rows"} if s else None
        rec["passed"] = passes(c, tol)
        out.append(rec)
    return out
