"""Training throughput: dynamic, length-grouped padding vs padding every batch to 384.

Both sides train the same LoRA classifier (SmolLM2-135M, float32, CPU) on the SAME
real GLUE training batches (drawn by the length-grouped sampler, so the rows and the
real tokens per batch are identical); only the padding differs. Throughput is real
(non-pad) tokens per second of forward + backward + optimizer step, median over
timed steps after one warm-up step. The first batch's loss is compared between the
two paddings to show the results are the same (tests/integration checks logits and
every layer's pooled state).

    python bench/padding.py [--tasks sst2 rte] [--batch-size 8] [--steps 3]

Prints one ratio per task; the last line holds them all.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from loralens import data as D
from loralens.config import StudyConfig
from loralens.models import build_classifier
from loralens.train import apply_method, load_base, prepare_task


def time_steps(model, enc, batches, pad_id, pad_to, lr=1e-4):
    """Per-step seconds (after one warm-up step) and the first batch's loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    times, first_loss = [], None
    for i, b in enumerate(D.iter_batches(enc, batches, pad_id, pad_to)):
        t0 = time.perf_counter()
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i == 0:
            first_loss = float(out.loss.detach())
        else:
            times.append(dt)
    return times, first_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "rte"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps padded to 384")
    ap.add_argument("--dynamic-steps", type=int, default=12, help="timed steps, dynamic")
    ap.add_argument("--glue-dir", default=os.environ.get("LORALENS_GLUE_DIR", "../shared/glue"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = StudyConfig()
    cfg.data.glue_dir = args.glue_dir
    cfg.data.train_size = 2000
    _, tok, make_backbone = load_base(cfg)
    backbone = make_backbone()
    ratios = {}
    for task in args.tasks:
        p = prepare_task(cfg, task, tok)
        batches = D.train_batches(p.train.lengths, args.batch_size, seed=0)
        n = max(args.steps, args.dynamic_steps) + 1
        batches = batches[:n]
        torch.manual_seed(0)
        base = apply_method(build_classifier(copy.deepcopy(backbone), p.task.num_labels, 0),
                            "lora", replace(cfg))
        init = copy.deepcopy(base.state_dict())
        res = {}
        for name, pad_to, steps in (("dynamic", None, args.dynamic_steps),
                                    ("pad384", 384, args.steps)):
            base.load_state_dict(init)
            bs = batches[: steps + 1]
            times, loss0 = time_steps(base, p.train, bs, p.pad_id, pad_to)
            real = [sum(len(p.train.input_ids[i]) for i in b) for b in bs[1:]]
            tps = [r / t for r, t in zip(real, times)]
            res[name] = (statistics.median(tps), loss0,
                         np.mean([max(len(p.train.input_ids[i]) for i in b) for b in bs[1:]]))
            print(f"{task} {name:8s}: median {res[name][0]:8.1f} real tokens/s over "
                  f"{len(times)} steps (batch {args.batch_size}, mean width "
                  f"{res[name][2] if pad_to is None else 384:.0f}), first-batch loss "
                  f"{loss0:.6f}", flush=True)
        diff = abs(res["dynamic"][1] - res["pad384"][1])
        print(f"{task}: |loss difference| on the first batch {diff:.2e}")
        ratios[task] = res["dynamic"][0] / res["pad384"][0]
        print(f"{task}: dynamic/pad384 throughput ratio {ratios[task]:.1f}x", flush=True)
    goals = {"sst2": 10, "rte": 3}
    print("ratio (dynamic length-grouped vs pad to 384, real tokens/s): " + ", ".join(
        f"{t} {r:.1f}x (goal {goals.get(t, '-')}x)" for t, r in ratios.items()))


if __name__ == "__main__":
    sys.exit(main())
