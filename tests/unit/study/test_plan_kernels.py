"""The dry run prices the weights and drift stages by their own kernels (issue 27 point 2:
the weights stage was estimated at 100.7 s and took 4.2 min, drift was "seconds" and took
87 s): the calls counted by hand, seconds added and scaled for another machine."""

import math

import pytest

from loralens.study.config import load_config
from loralens.study.plan import dry_run as plan
from loralens.study.plan import kernels as K
from loralens.study.plan import work as plan_work
from loralens.study.plan.measure import Throughput

from tests.helpers.plan import PLAN

# two blocks of a small Llama: name -> (out, in)
SHAPES = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32),
          "gate_proj": (64, 32), "up_proj": (64, 32), "down_proj": (32, 64)}
LINEAR = {f"layers.{i}.{'mlp' if m in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}"
          f".{m}": s for i in range(2) for m, s in SHAPES.items()}


def test_weights_counts_each_methods_matrices_per_model_and_each_base_svd_once():
    cfg = load_config(overrides=PLAN + ["weights.extra_layers=1"])  # lora q/v; full + extras
    calls = K.count_weights(cfg, LINEAR)
    models = len(cfg.seeds) * len(cfg.tasks)                        # 2 seeds x 2 tasks
    # lora: q and v in both layers. full: the union (q, v) in both layers, and its extra
    # matrices (k, o, gate, up, down) in 1 evenly spaced layer (the first)
    assert calls == {
        ("matrix", (32, 32)): models * (2 + 2 + 1),       # q x2 (lora), q x2 + o x1 (full)
        ("matrix", (16, 32)): models * (2 + 2 + 1),       # v x2 (lora), v x2 + k x1 (full)
        ("matrix", (64, 32)): models * 2,                 # gate, up (full, layer 0)
        ("matrix", (32, 64)): models * 1,                 # down (full, layer 0)
        ("base_svd", (32, 32)): 3, ("base_svd", (16, 32)): 3,   # every matrix analysed, once
        ("base_svd", (64, 32)): 2, ("base_svd", (32, 64)): 1}


def test_weights_matrices_follow_the_methods_own_targets():
    cfg = load_config(overrides=PLAN + ["methods=[lora-all-linear]", "seeds=[1]",
                                        "tasks=[rte]"])
    calls = K.count_weights(cfg, LINEAR)
    assert calls[("matrix", (64, 32))] == 4 and calls[("matrix", (32, 64))] == 2
    assert sum(v for (name, _), v in calls.items() if name == "matrix") == len(LINEAR)


def test_drift_counts_every_model_and_state_and_the_seed_pairs():
    cfg = load_config(overrides=PLAN + ["methods=[lora, full, head]", "seeds=[1, 2, 3]",
                                        "drift.layers=blocks"])
    calls = K.count_drift(cfg, n_examples=40, n_states=5, hidden=32)
    # 9 models + the base's variance profile, at 5 states; lora's and full's 3 seed pairs
    # each at the 4 tested states (blocks 1..4: the embedding output left out)
    assert calls == {("drift_state", (40, 32)): 10 * 5, ("drift_pair", (40, 32)): 6 * 4}


def fake_throughput(**kw) -> Throughput:
    return Throughput("m", "cpu", 2, "rte", {"train": 1, "batched": 1, "batch1": 1},
                      forward_flops_s={"batched": 200e9}, forward_fpt=500_000, load_s=2.0,
                      kernel_s={("matrix", (4, 4)): 0.25, ("drift_state", (8, 4)): 0.01}, **kw)


def test_kernel_seconds_add_to_the_estimate_and_scale_for_another_machine():
    w = plan_work.StageWork("weights", jobs=1, loads=3,
                            kernels={("matrix", (4, 4)): 8, ("drift_state", (8, 4)): 100})
    tp = fake_throughput(peak_here=200e9)
    (here,) = plan.estimate([w], tp)
    assert here.seconds == pytest.approx(3 * 2.0 + 8 * 0.25 + 100 * 0.01)   # 9 s
    (there,) = plan.estimate([w], plan.for_machine(tp, 100e9))   # half the peak
    assert there.seconds == pytest.approx(3 * 2.0 + 2 * (8 * 0.25 + 100 * 0.01))   # 12 s


def test_kernels_add_and_scale_with_the_work():
    a = plan_work.StageWork("drift", kernels={("drift_state", (8, 4)): 3})
    a.add(plan_work.StageWork("drift", kernels={("drift_state", (8, 4)): 2,
                                                ("drift_pair", (8, 4)): 1}))
    assert a.kernels == {("drift_state", (8, 4)): 5, ("drift_pair", (8, 4)): 1}
    assert a.scaled(3).kernels == {("drift_state", (8, 4)): 15, ("drift_pair", (8, 4)): 3}


@pytest.mark.parametrize("key", [("matrix", (24, 16)), ("base_svd", (16, 24)),
                                 ("drift_state", (12, 8)), ("drift_pair", (12, 8))])
def test_each_kernel_is_timed(key):
    s = K.time_kernel(key)
    assert math.isfinite(s) and 0 < s < 5
    assert key[0] in K.KERNEL_WORDS and "x".join(map(str, key[1])) in K.kernel_text(key)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown kernel 'svd'"):
        K.time_kernel(("svd", (2, 2)))


def test_without_the_models_shapes_drift_has_no_estimate():
    cfg = load_config(overrides=PLAN)
    w = plan_work.drift(cfg, None, {}, None)
    assert w.cheap and not w.kernels
