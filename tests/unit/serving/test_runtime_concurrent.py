"""The lean runtime changed on another thread while a forward runs (the adapter store's
loader thread installs and evicts while the worker's batch runs): the running forward keeps
the adapters, factors and heads it set up with, so its answers do not change; what it reads
is never removed or rewritten. The forward is held mid-way by a pre-hook on the backbone's
second layer (an Event), so "while" is a fact of the test, not a timing race."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from loralens.serving.runtime import MultiLoraClassifier
from loralens.training import batches as B
from tests.helpers.adapters import random_lora


def _rt(backbone, paths, names, reserve=None):
    rt = MultiLoraClassifier(copy.deepcopy(backbone).to(torch.float64))
    if reserve:
        rt.reserve(reserve)
    for n in names:
        rt.add_adapter(n, paths[n])
    return rt


def _held(rt, ids, mask, adapters):
    """Start a forward on a thread, held at layer 1; returns (entered, release, thread, out)."""
    entered, release, out = threading.Event(), threading.Event(), {}

    def hook(module, args):
        if not release.is_set():
            entered.set()
            assert release.wait(30), "the test never released the forward"

    rt.backbone.layers[1].register_forward_pre_hook(hook)
    t = threading.Thread(target=lambda: out.setdefault("logits", rt(ids, mask, adapters)))
    t.start()
    assert entered.wait(30)
    return release, t, out


@pytest.mark.parametrize("batch", ["a", ["a", "d", "a"]], ids=["one adapter", "mixed"])
def test_an_adapter_swapped_while_a_forward_runs_leaves_its_answers_unchanged(
        tiny_backbone, tmp_path, batch):
    """Rank-8 stacks reserved for 3 rows (a, b, d). While a batch for a (one adapter: views
    of a's rows; mixed a/d: gathered copies) is held, b is removed and c written into b's
    row: the batch answers as a runtime that only ever held a, d and c (float64, bit for bit);
    the stacks were not reallocated; c then answers in the next batch. Removing one of the
    running batch's own adapters, or adding one that needs a new stack, is refused while it
    runs (RuntimeError) and changes nothing. Before, a removal under a running forward reset
    every projection's factors (the rest of the held batch ran without its adapter)."""
    paths = {n: random_lora(tiny_backbone, tmp_path / n, i + 1)
             for i, n in enumerate("abcd")}
    paths["r4"] = random_lora(tiny_backbone, tmp_path / "r4", 9, r=4)
    rt = _rt(tiny_backbone, paths, "abd", reserve={8: 3})
    ref = _rt(tiny_backbone, paths, "adc")
    q = rt.wrapped["layers.0.self_attn.q_proj"].stacks[8]
    ptrs = (q.At.data_ptr(), q.Bt.data_ptr())
    ids, mask = B.collate([[5, 9, 70, 3], [44, 8], [9, 9, 120]], pad_id=2)
    release, t, out = _held(rt, ids, mask, batch)
    try:
        rt.remove_adapter("b")
        rt.add_adapter("c", paths["c"])
        with pytest.raises(RuntimeError, match="running batch"):
            rt.remove_adapter("a")
        with pytest.raises(RuntimeError, match="rank-4 stack"):
            rt.add_adapter("r4", paths["r4"])
        assert rt.names == ["a", "d", "c"] and t.is_alive()
        assert (q.At.data_ptr(), q.Bt.data_ptr()) == ptrs and q.At.shape[0] == 3
    finally:
        release.set()
        t.join(30)
    assert torch.equal(out["logits"], ref(ids, mask, batch))
    assert not rt.running and rt.busy == frozenset()
    for nxt in ("c", ["c", "a", "d"]):
        assert torch.equal(rt(ids, mask, nxt), ref(ids, mask, nxt))
