"""Training throughput: the default path (``train.precision=auto``) against float32.

Both sides run loralens' own training loop (``loop.fit``) from the same initial weights
on the SAME real GLUE training batches (same rows, same length-grouped order, same
seed), for LoRA and full fine-tuning, on SST-2 (short rows) and RTE (long rows). A
repeat is one short fit per side, the sides interleaved (fp32, default, bf16, fp32, ...)
so that a change of the machine's load hits them alike; each fit's rate is real tokens
per second of training steps (forward, backward, optimizer; ``fit.step_seconds``), and
the table shows the median over repeats.

MFU is printed against two peaks measured in this process (``loralens.training.flops``): a large
square GEMM, and the model's own GEMM shapes (tokens per batch x 576 x 576/192/1536) in
the dtype the side computes in. FLOPs: 6N per real token (full), 4N + 2n (LoRA).

    python bench/train_throughput.py [--tasks sst2 rte] [--methods lora full]
                                     [--steps 8] [--repeats 3] [--batch-size 16]

The last line holds the ratios default / float32 (goals: LoRA >= 2x, full >= 1.5x;
``auto`` trains in float32 where this CPU's bfloat16 GEMMs do not pay, and then the
ratio is ~1 by construction: the bf16 column says what bf16 would have given).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from loralens.training import flops
from loralens.core.config import StudyConfig, TrainConfig
from loralens.models.classifier import apply_method, build_classifier, load_base
from loralens.training.loop import fit
from loralens.training.job import prepare_task, seed_everything

SIDES = ("fp32", "auto", "bf16")


def one_fit(base, cfg, p, method, precision, args):
    seed_everything(0)
    model = apply_method(build_classifier(base.backbone(), p.task.num_labels, 0), method, cfg)
    tc = TrainConfig(**{**cfg.train.__dict__, "precision": precision, "max_steps": args.steps,
                        "epochs": 1, "batch_size": args.batch_size, "patience": 0})
    lr = 1e-3 if method == "lora" else 2e-5
    res = fit(model, p.train, None, p.pad_id, tc, lr, 0, progress=False, method=method)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "rte"])
    ap.add_argument("--methods", nargs="+", default=["lora", "full"])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per timed fit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--glue-dir", default=os.environ.get("LORALENS_GLUE_DIR", "../shared/glue"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = StudyConfig()
    cfg.data.glue_dir = args.glue_dir
    cfg.data.max_length = args.max_length
    cfg.data.train_size = args.steps * args.batch_size
    base = load_base(cfg)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"peaks (square {flops.SQUARE}^2 GEMM): fp32 {flops.gemm_peak(torch.float32) / 1e9:.0f}"
          f" GFLOP/s, bf16 {flops.gemm_peak(torch.bfloat16) / 1e9:.0f} GFLOP/s", flush=True)
    print(f"{'task':5s} {'method':6s} {'side':5s} {'dtype':5s} {'tok/s':>7s} {'GFLOP/s':>8s} "
          f"{'MFU sq':>7s} {'MFU model':>9s} {'loss':>7s}", flush=True)
    ratios = {}
    for task in args.tasks:
        p = prepare_task(cfg, task, base.tokenizer)
        for method in args.methods:
            rates = {s: [] for s in SIDES}
            last = {}
            for _ in range(args.repeats):
                for side in SIDES:
                    r = one_fit(base, cfg, p, method, side, args)
                    rates[side].append(r.real_tokens / r.step_seconds)
                    last[side] = r
            for side in SIDES:
                r, tok_s = last[side], statistics.median(rates[side])
                achieved = tok_s * r.flops_per_token
                print(f"{task:5s} {method:6s} {side:5s} {r.precision:5s} {tok_s:7.0f} "
                      f"{achieved / 1e9:8.1f} {100 * achieved / r.peak_flops_per_s:6.1f}% "
                      f"{100 * achieved / r.peak_model_flops_per_s:8.1f}% "
                      f"{r.final_train_loss:7.4f}", flush=True)
            ratios[f"{task}/{method}"] = (statistics.median(rates["auto"])
                                          / statistics.median(rates["fp32"]))
            print(f"  {task}/{method}: default ({last['auto'].precision}) / fp32 = "
                  f"{ratios[f'{task}/{method}']:.2f}x; bf16 / fp32 = "
                  f"{statistics.median(rates['bf16']) / statistics.median(rates['fp32']):.2f}x"
                  f"; {last['auto'].precision_note}", flush=True)
    print("ratio default/fp32 (real tokens/s, median of "
          f"{args.repeats}): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    sys.exit(main())
