"""Benchmark: extraction throughput with dynamic padding vs padding every batch to 384.

On SST-2 validation rows with the embedded SmolLM2 (float32, CPU or GPU), runs
``loralens.analysis.extract.pooled_hidden_states`` twice in one process:

(a) dynamic, length-grouped batches: rows sorted by length, each batch padded to
    its longest member (what ``loralens extract`` does);
(b) every batch padded to 384 tokens (the study's published code).

Same model, same batch size (32), runs of (a) and (b) interleaved
(``loralens.core.timing.time_interleaved``). SST-2's
validation sentences average 23 SmolLM2 tokens (max 59), so (b) spends about 94%
of its compute on pad positions (and attention grows with the square of the
width). (b) is timed on a subset (its cost per example does not depend on which
rows; throughput is compared in examples/s). The script checks that the pooled
arrays of the shared rows agree (per layer: max |diff| <= max(1e-4, 1e-6 x the
layer's largest magnitude); SmolLM2 has pooled activations near 3000, where one
float32 ulp is 2.4e-4 and GEMMs of different shapes round differently), then
prints the throughput ratio as its last line (goal: at least 10x). It also prints
the ratio per CPU second, which other jobs on the cores disturb less.

    flock /tmp/loralens-bench.lock python bench/extract.py           # about 2 minutes on 2 cores
    flock /tmp/loralens-bench.lock python bench/extract.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.core.config import StudyConfig
from loralens.analysis.extract import pooled_hidden_states, sample_split
from loralens.models.classifier import build_classifier, load_base
from loralens.tasks.registry import get_task
from loralens.core.timing import time_interleaved

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (1 repeat)")
    p.add_argument("--glue-dir", default=os.environ.get("LORALENS_GLUE_DIR")
                   or str(ROOT.parent / "shared" / "glue"))
    p.add_argument("--dynamic-rows", type=int, help="rows for (a) (default: all 872)")
    p.add_argument("--padded-rows", type=int, help="rows for (b) (default 32)")
    p.add_argument("--repeats", type=int, help="timed repeats, median reported (default 3)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    n_dyn = args.dynamic_rows or (128 if args.quick else None)
    n_pad = args.padded_rows or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    os.environ.setdefault("LORALENS_CACHE", str(ROOT / ".cache" / "loralens"))

    base = load_base(StudyConfig())
    tokenizer = base.tokenizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_classifier(base.backbone(), 2, seed=0).to(device).eval()
    split = TS.load_split(get_task("sst2"), "validation", args.glue_dir)
    dyn_split = sample_split(split, n_dyn, 0)
    enc = B.encode_split(tokenizer, dyn_split, 384)
    # (b) runs on a subset of (a)'s rows, so the arrays can be compared row by row.
    pick = np.sort(np.random.default_rng(1).choice(len(enc), size=min(n_pad, len(enc)),
                                                   replace=False))
    enc_pad = B.Encoded([enc.input_ids[i] for i in pick], enc.labels[pick], enc.ids[pick])
    pad_id = tokenizer.pad_token_id
    print(f"model {base.name} ({base.note}); device {device}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}, {repeats} repeat(s)")
    print(f"SST-2 validation: dynamic {len(enc)} rows (mean {enc.lengths.mean():.1f} tokens, "
          f"max {enc.lengths.max()}), padded-to-384 {len(enc_pad)} rows")

    pooled_hidden_states(model, enc_pad, pad_id, 4)  # warm-up (allocator, kernels)
    timed = time_interleaved({
        "dynamic": lambda: pooled_hidden_states(model, enc, pad_id, args.batch_size),
        "padded": lambda: pooled_hidden_states(model, enc_pad, pad_id, args.batch_size,
                                               pad_to=384)}, repeats=repeats, device=device,
        keep="last")
    dyn, pad = timed.results["dynamic"][0], timed.results["padded"][0]
    t_dyn, t_pad = timed.median("dynamic"), timed.median("padded")

    a = dyn[pick]
    worst = 0.0
    for layer in range(a.shape[1]):
        diff = float(np.abs(a[:, layer] - pad[:, layer]).max())
        tol = max(1e-4, 1e-6 * float(np.abs(a[:, layer]).max()))
        assert diff <= tol, f"layer {layer}: max |diff| {diff:.3g} > tolerance {tol:.3g}"
        worst = max(worst, diff / tol)
    print(f"arrays agree on {len(pick)} shared rows x {a.shape[1]} layers x {a.shape[2]}: "
          f"largest diff is {worst:.2f} of its tolerance")
    dyn_rate, pad_rate = len(enc) / t_dyn, len(enc_pad) / t_pad
    print(f"dynamic length-grouped padding: {dyn_rate:8.1f} examples/s "
          f"(median {t_dyn:.2f} s for {len(enc)})")
    print(f"padding to 384:                 {pad_rate:8.1f} examples/s "
          f"(median {t_pad:.2f} s for {len(enc_pad)})")
    cpu_ratio = ((len(enc) / timed.median_cpu("dynamic"))
                 / (len(enc_pad) / timed.median_cpu("padded")))
    print(f"per CPU second (less sensitive to other jobs on the cores): {cpu_ratio:.1f}x")
    print(f"extraction throughput ratio (dynamic / padded to 384): {dyn_rate / pad_rate:.1f}x")


if __name__ == "__main__":
    main()
