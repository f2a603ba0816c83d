"""Train a tiny random Llama classifier; run alone or under `accelerate launch` (2 CPU ranks)."""

import json
import sys
from dataclasses import replace

import numpy as np
import torch
from transformers import AutoModel

from loralens.training import batches as B
from loralens.core.config import StudyConfig
from loralens.models.classifier import apply_method, build_classifier
from loralens.models.tiny import tiny_llama_config
from loralens.training.loop import dist_info, end_together, evaluate, fit, init_distributed

init_distributed()
torch.set_num_threads(1)
rng = np.random.default_rng(0)
ids = [[int(t) for t in rng.integers(10, 4000, size=rng.integers(3, 20))] for _ in range(32)]
enc = B.Encoded(ids, np.array([sum(x) % 2 for x in ids]), np.arange(32))
torch.manual_seed(0)
backbone = AutoModel.from_config(tiny_llama_config(), dtype=torch.float32)
cfg = StudyConfig()
cfg.lora.dropout = 0.0
model = apply_method(build_classifier(backbone, 2, seed=1), sys.argv[2], cfg)
tc = replace(cfg.train, epochs=2, batch_size=8, grad_accum=2, warmup_ratio=0.25)
res = fit(model, enc, enc, 2, tc, lr=5e-3, seed=0, progress=False)
rank, world = dist_info()
if rank == 0:
    out = {"world": world, "final_train_loss": res.final_train_loss, "steps": res.steps,
           "val_losses": [h["val_loss"] for h in res.history],
           "logits": evaluate(model, enc, 2)["logits"].tolist()}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
end_together()  # the ranks leave together, as a study's job ends (training/loop.py)
