"""Training throughput: dynamic, length-grouped padding vs padding every batch to 384.

Both sides train the same LoRA classifier (SmolLM2-135M, float32, CPU) on the SAME
real GLUE training batches (drawn by the length-grouped sampler, so the rows and the
real tokens per batch are identical); only the padding differs. Each side has its own
copy of the model and optimizer; after one untimed warm-up step each, their steps are
interleaved (``loralens.core.timing.time_interleaved``: one step of each side in turn, so a
change of the machine's load hits both alike; the dynamic side, being cheaper, runs
more steps, alone once the padded side's are done). Throughput is real (non-pad)
tokens per second of forward + backward + optimizer step, median over the timed
steps. The first batch's loss is compared between the two paddings to show the
results are the same (tests/integration checks logits and every layer's pooled state).

    python bench/padding.py [--tasks sst2 rte] [--batch-size 8] [--steps 3]

Prints one ratio per task; the last line holds them all.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import numpy as np
import torch

from loralens.training import batches as B
from loralens.core.config import StudyConfig
from loralens.models.classifier import apply_method, build_classifier, load_base
from loralens.core.timing import time_interleaved
from loralens.training.job import prepare_task


def trainer(model, lr=1e-4):
    """One training step on a batch (forward, backward, clipping, AdamW); returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()

    def step(b: B.Batch) -> float:
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


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
    base = load_base(cfg)
    backbone = base.backbone()
    ratios = {}
    steps = {"dynamic": (None, args.dynamic_steps), "pad384": (384, args.steps)}
    for task in args.tasks:
        p = prepare_task(cfg, task, base.tokenizer)
        batches = B.train_batches(p.train.lengths, args.batch_size, seed=0)
        batches = batches[:max(args.steps, args.dynamic_steps) + 1]
        torch.manual_seed(0)
        model = apply_method(build_classifier(copy.deepcopy(backbone), p.task.num_labels, 0),
                             "lora", cfg)
        step, padded, loss0 = {}, {}, {}
        for name, (pad_to, n) in steps.items():
            step[name] = trainer(copy.deepcopy(model))  # same initial weights on each side
            padded[name] = list(B.iter_batches(p.train, batches[:n + 1], p.pad_id, pad_to))
            loss0[name] = step[name](padded[name][0])   # the untimed warm-up step
        timed = time_interleaved(step, {k: v[1:] for k, v in padded.items()})
        res = {}
        for name, (pad_to, n) in steps.items():
            real = [sum(len(p.train.input_ids[i]) for i in b) for b in batches[1:n + 1]]
            tps = [r / t for r, t in zip(real, timed.seconds[name])]
            width = np.mean([max(len(p.train.input_ids[i]) for i in b) for b in batches[1:n + 1]])
            res[name] = statistics.median(tps)
            print(f"{task} {name:8s}: median {res[name]:8.1f} real tokens/s over "
                  f"{len(tps)} steps (batch {args.batch_size}, mean width "
                  f"{width if pad_to is None else 384:.0f}), first-batch loss "
                  f"{loss0[name]:.6f}", flush=True)
        del step, padded, model
        diff = abs(loss0["dynamic"] - loss0["pad384"])
        print(f"{task}: |loss difference| on the first batch {diff:.2e}")
        ratios[task] = res["dynamic"] / res["pad384"]
        print(f"{task}: dynamic/pad384 throughput ratio {ratios[task]:.1f}x", flush=True)
    goals = {"sst2": 10, "rte": 3}
    print("ratio (dynamic length-grouped vs pad to 384, real tokens/s): " + ", ".join(
        f"{t} {r:.1f}x (goal {goals.get(t, '-')}x)" for t, r in ratios.items()))


if __name__ == "__main__":
    sys.exit(main())
