"""Data-parallel training (gloo, 2 CPU processes) equals one process.

The processes are started with torchrun, which sets the same environment protocol
(RANK, WORLD_SIZE, MASTER_ADDR) that ``accelerate launch --multi_gpu`` sets on GPUs;
accelerate's ``launch --cpu`` starts a single process, so it cannot test this here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "dp_fit.py"
# Stated tolerance: the two runs differ only in float32 summation order (per-rank
# partial sums of the loss gradients, then an all-reduce), so results agree to ~1e-6.
TOL = 1e-5


def free_port() -> int:
    """A port nobody listens on now (a fixed one collides with a concurrent run)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_process_data_parallel_matches_single_process(tmp_path, method):
    single, dp = tmp_path / "single.json", tmp_path / "dp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), str(single), method], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), str(SCRIPT), str(dp),
                        method],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(dp.read_text())
    assert a["world"] == 1 and b["world"] == 2
    assert a["steps"] == b["steps"] == 4
    assert abs(a["final_train_loss"] - b["final_train_loss"]) < TOL
    np.testing.assert_allclose(a["val_losses"], b["val_losses"], atol=TOL)
    np.testing.assert_allclose(a["logits"], b["logits"], atol=TOL)
