"""The adapter store (``loralens serve --max-loaded N``) and the rank-grouped stacks, on the
tiny random Llama: eviction and reload give the same answers, a budget smaller than one
batch's adapters still answers, a request for a loaded adapter completes while another
adapter loads (the load held by an injected hook, no timing race), one load per adapter
for concurrent requests, memory of mixed ranks is the sum of their own factor bytes."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from loralens.core.errors import ConfigError
from loralens.serving.backends import AdapterInfo, make_backend
from loralens.serving.runtime import MultiLoraClassifier
from loralens.serving.server import AdapterSpec, Service, build_service, create_app
from loralens.serving.store import groups
from loralens.training import batches as B
from tests.helpers.adapters import random_lora


def save_adapter(backbone, path, seed, r=8, alpha=16.0, targets=("q_proj", "v_proj"), labels=2):
    """A PEFT LoRA classifier with random non-zero factors and head, saved to ``path``."""
    return random_lora(backbone, path, seed, r, alpha, targets, labels)


def rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [3, 7, 5, 2, 6, 4, 8, 3][:n]
    return [torch.randint(5, 1000, (k,), generator=g).tolist() for k in lens]


def alone(backend, ids, name):
    """Logits of one row served alone: a batch of that row only, no padding."""
    input_ids, mask = B.collate([ids], pad_id=0)
    return backend.infer(input_ids, mask, [name])[0]


@pytest.fixture
def dirs(tiny_backbone, tmp_path):
    """Four adapters: ranks 8, 4 (q/k/v, 3 labels), 16 (v/o) and 8."""
    kinds = {"a": {}, "b": dict(r=4, alpha=12.0, targets=("q_proj", "k_proj", "v_proj"),
                                 labels=3),
             "c": dict(r=16, targets=("v_proj", "o_proj")), "d": {}}
    return {n: save_adapter(tiny_backbone, tmp_path / n, i + 1, **kw)
            for i, (n, kw) in enumerate(kinds.items())}


def backend64(tiny_backbone, dirs, max_loaded=None):
    be = make_backend("ours", copy.deepcopy(tiny_backbone).to(torch.float64), max_loaded)
    for n, path in dirs.items():
        be.add(AdapterInfo(n, str(path), 0), path)
    return be


def test_groups_split_rows_by_distinct_adapters():
    assert groups(["a", "b", "a"], None) == [[0, 1, 2]]
    assert groups(["a", "b", "a"], 2) == [[0, 1, 2]]
    # a b c a d: first appearances a, b | c, d
    assert groups(["a", "b", "c", "a", "d"], 2) == [[0, 1, 3], [2, 4]]
    assert groups(["x", "y", "z"], 1) == [[0], [1], [2]]


def test_eviction_then_reload_gives_identical_answers(tiny_backbone, dirs):
    be = backend64(tiny_backbone, dirs, max_loaded=1)
    store = be.store
    assert store.loaded == ["a"] and set(be.infos) == set(dirs)  # registered: 4, loaded: 1
    ids, mask = B.collate(rows(4), pad_id=0)
    first = be.infer(ids, mask, ["a"] * 4)
    for n in ("b", "c", "d"):  # each load evicts the one before
        be.infer(ids, mask, [n] * 4)
        assert store.loaded == [n]
    again = be.infer(ids, mask, ["a"] * 4)
    assert torch.equal(first, again)
    assert (store.stats.loads, store.stats.evictions) == (4, 4)
    # and equal to a server holding all four (no budget): float64, the same path
    full = backend64(tiny_backbone, dirs)
    assert torch.equal(full.infer(ids, mask, ["a"] * 4), first)


def test_budget_smaller_than_one_batch_answers_each_row_as_alone(tiny_backbone, dirs):
    be = backend64(tiny_backbone, dirs, max_loaded=2)
    full = backend64(tiny_backbone, dirs)
    r = rows(8, seed=4)
    names = ["a", "b", "c", "a", "d", "b", "c", "d"]  # 4 distinct adapters, budget 2
    ids, mask = B.collate(r, pad_id=0)
    out = be.infer(ids, mask, names)
    assert out.dtype == torch.float64 and out.shape == (8, 3)
    for i, n in enumerate(names):
        ref = alone(full, r[i], n)
        k = ref.shape[0]
        assert (out[i, :k] - ref).abs().max().item() <= 1e-12 * ref.abs().max().item(), (i, n)
        assert torch.isinf(out[i, k:]).all()  # 2-label rows padded with -inf
    assert len(be.store.loaded) <= 2


def test_mixed_ranks_hold_their_own_factor_bytes(tiny_backbone, tmp_path):
    """Ranks 4, 8, 16, 64 on q/v of the tiny Llama (hidden 32; q 32 -> 32, v 32 -> 16 with
    2 of 4 heads for k/v; 2 layers): r x (32 + 32 + 32 + 16) x 2 layers x 4 bytes = 896 r
    bytes per adapter, 896 x (4 + 8 + 16 + 64) = 82,432 bytes in all; padded to rank 64 they
    would take 4 x 896 x 64 = 229,376."""
    rt = MultiLoraClassifier(copy.deepcopy(tiny_backbone))
    for i, r in enumerate((4, 8, 16, 64)):
        rt.add_adapter(f"r{r}", save_adapter(tiny_backbone, tmp_path / f"r{r}", i, r=r))
    factors = sum(m.bytes_held() for m in rt.wrapped.values())
    assert factors == 82_432
    heads = 4 * 2 * 32 * 4 + 4 * 2 * 4  # [4 adapters, 2 labels, 32] weights, [4, 2] bias
    assert rt.bytes_held() == 82_432 + heads
    rt.remove_adapter("r64")
    assert sum(m.bytes_held() for m in rt.wrapped.values()) == 896 * (4 + 8 + 16)


def test_mixed_ranks_in_one_batch_answer_as_alone(tiny_backbone, dirs):
    be = backend64(tiny_backbone, dirs)
    r = rows(6, seed=2)
    names = ["a", "b", "c", "b", "d", "c"]  # ranks 8, 4, 16 in one batch; k/o for some only
    ids, mask = B.collate(r, pad_id=0)
    out = be.infer(ids, mask, names)
    for i, n in enumerate(names):
        ref = alone(be, r[i], n)
        assert (out[i, : ref.shape[0]] - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    # the common one-rank case keeps one gather per projection (no per-rank segments); the
    # route as a forward sets it (a forward drops it after the batch)
    slots = [be.rt.names.index(n) for n in ["a", "d", "a", "d", "a", "d"]]
    be.rt._route_mixed(slots)
    q = be.rt.wrapped["layers.0.self_attn.q_proj"]
    assert q._mixed and q._segs is None and q._a.shape == (6, 32, 8)


def test_backends_without_a_store_refuse_max_loaded(tiny_backbone, tmp_path, capsys):
    for kind in ("peft", "merged"):
        with pytest.raises(ConfigError, match="--max-loaded"):
            make_backend(kind, tiny_backbone, max_loaded=2)
    with pytest.raises(ConfigError, match="--max-loaded must be >= 1"):
        make_backend("ours", tiny_backbone, max_loaded=0)
    from loralens import cli

    path = save_adapter(tiny_backbone, tmp_path / "a", 1)
    assert cli.main(["serve", str(path), "--backend", "merged", "--max-loaded", "2"]) == 2
    assert "--max-loaded" in capsys.readouterr().err


def _service(tiny_base, root, max_loaded, names=("a", "b", "c")):
    for i, n in enumerate(names):
        save_adapter(tiny_base.backbone(), root / n, i + 1)
    specs = [AdapterSpec(n, root / n, "sst2") for n in names]
    return build_service(specs, tiny_base, max_length=32, max_batch=8, max_wait_ms=1,
                         max_texts=8, adapter_root=root, max_loaded=max_loaded)


def scrape(client) -> dict:
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            out[s.name] = s.value
    return out


def test_adapters_listing_and_metrics_count_hits_misses_loads(tiny_base, tmp_path):
    service = _service(tiny_base, tmp_path, max_loaded=1)
    with TestClient(create_app(service)) as client:
        listed = client.get("/v1/adapters").json()
        assert (listed["known"], listed["loaded"], listed["max_loaded"]) == (3, 1, 1)
        assert {a["name"]: a["loaded"] for a in listed["adapters"]} == \
            {"a": True, "b": False, "c": False}
        answers = {}
        for n in ("a", "b", "a"):  # hit; miss (load b, evict a); miss (load a, evict b)
            r = client.post("/v1/classify", json={"adapter": n, "texts": ["good", "bad x"]})
            assert r.status_code == 200, r.text
            answers.setdefault(n, []).append(r.json()["probabilities"])
        assert answers["a"][0] == answers["a"][1]  # evicted and reloaded: the same answer
        m = scrape(client)
        assert (m["loralens_adapter_store_hits_total"], m["loralens_adapter_store_misses_total"],
                m["loralens_adapter_store_loads_total"],
                m["loralens_adapter_store_evictions_total"]) == (1, 2, 2, 2)
        assert m["loralens_adapter_store_load_seconds_count"] == 2
        assert (m["loralens_adapters_loaded"], m["loralens_adapters_known"]) == (1, 3)
        # one rank-8 q/v adapter: 896 x 8 factor bytes, a 2 x 32 head and its 2 biases
        assert m["loralens_adapter_store_bytes"] == 896 * 8 + 2 * 32 * 4 + 2 * 4
        listed = client.get("/v1/adapters").json()
        assert {a["name"]: a["loaded"] for a in listed["adapters"]} == \
            {"a": True, "b": False, "c": False}


def test_a_loaded_adapters_request_is_not_blocked_by_another_load(tiny_base, tmp_path):
    """'slow' is held on the loader thread by the hook until the loaded adapter's request
    has been answered; two concurrent requests for 'slow' cause one load."""
    service = _service(tiny_base, tmp_path, max_loaded=1, names=("fast", "slow"))
    store = service.store
    started, release = threading.Event(), threading.Event()
    reads = []

    def hook(name):
        reads.append(name)
        if name == "slow":
            started.set()
            assert release.wait(30), "the test never released the load"

    store.load_hook = hook

    async def scenario():
        await service.start()
        try:
            slow = [asyncio.ensure_future(service.classify("slow", ["x y"], None))
                    for _ in range(2)]
            assert await asyncio.to_thread(started.wait, 30)
            fast = await asyncio.wait_for(service.classify("fast", ["z"], None), 30)
            assert not any(t.done() for t in slow)  # still loading: fast went past it
            release.set()
            done = await asyncio.wait_for(asyncio.gather(*slow), 30)
            return fast, done
        finally:
            release.set()
            await service.stop()

    fast, done = asyncio.run(scenario())
    assert fast["adapter"] == "fast" and [d["adapter"] for d in done] == ["slow", "slow"]
    assert done[0]["probabilities"] == done[1]["probabilities"]
    assert reads == ["slow"]  # one read for two requests; "fast" was loaded at start
    assert (store.stats.hits, store.stats.misses, store.stats.loads) == (1, 2, 1)
    assert store.loaded == ["slow"]


def test_a_load_finishing_after_its_name_moved_to_another_directory_is_dropped(
        tiny_backbone, dirs):
    """A read started for 'x' (directory a) that ends after 'x' was removed and added again
    from directory c is not installed: the batch then loads c's factors."""
    be = backend64(tiny_backbone, {"d": dirs["d"]}, max_loaded=1)
    store = be.store
    be.add(AdapterInfo("x", str(dirs["a"]), 0), dirs["a"])  # registered, not loaded (budget 1)
    stale = store.prepare("x")
    be.remove("x")
    be.add(AdapterInfo("x", str(dirs["c"]), 0), dirs["c"])
    assert store.install("x", stale) is False and not store.is_loaded("x")
    ids, mask = B.collate(rows(3), pad_id=0)
    got = be.infer(ids, mask, ["x"] * 3)
    want = backend64(tiny_backbone, {"x": dirs["c"]}).infer(ids, mask, ["x"] * 3)
    assert torch.equal(got, want)


def _q_stack(be, r=8):
    return be.rt.wrapped["layers.0.self_attn.q_proj"].stacks[r]


def test_reserved_stacks_hold_exactly_the_adapters_bytes_and_never_reallocate(tiny_backbone,
                                                                              tmp_path):
    """Reserved from the directories (ranks 8, 8, 4, 16 on q/v): each rank's stack is
    allocated once at its count, so filling it moves nothing (same data_ptr) and the bytes
    held are the adapters' own: 896 x (8 + 8 + 4 + 16) factor bytes (896 r per adapter, see
    above) plus 4 heads of 2 x 32 weights and 2 biases. Grown one by one instead, the rank-8
    stack would be copied at its second adapter (capacity 1 -> 2)."""
    ranks = {"a": 8, "b": 8, "c": 4, "d": 16}
    paths = {n: save_adapter(tiny_backbone, tmp_path / n, i, r=r)
             for i, (n, r) in enumerate(ranks.items())}
    be = make_backend("ours", copy.deepcopy(tiny_backbone))
    be.reserve(list(paths.values()))
    be.add(AdapterInfo("a", str(paths["a"]), 0), paths["a"])
    ptr = _q_stack(be).At.data_ptr(), _q_stack(be).Bt.data_ptr()
    for n in ("b", "c", "d"):
        be.add(AdapterInfo(n, str(paths[n]), 0), paths[n])
    assert (_q_stack(be).At.data_ptr(), _q_stack(be).Bt.data_ptr()) == ptr
    heads = 4 * (2 * 32 * 4 + 2 * 4)
    assert be.rt.bytes_held() == 896 * 36 + heads == 32_256 + 1_056
    be.remove("c")
    assert be.rt.bytes_held() == 896 * 32 + 3 * (2 * 32 * 4 + 2 * 4)


def test_a_budgeted_store_reserves_the_budget_and_reloads_into_freed_rows(tiny_backbone,
                                                                          tmp_path):
    """Three rank-8 adapters under --max-loaded 2: the stacks hold 2 rows from the start;
    loading the third evicts the least recently used one into its row (no reallocation),
    and the bytes held stay 2 adapters' worth: 2 x (896 x 8 + 2 x 32 x 4 + 2 x 4)."""
    paths = {n: save_adapter(tiny_backbone, tmp_path / n, i) for i, n in enumerate("xyz")}
    be = make_backend("ours", copy.deepcopy(tiny_backbone), max_loaded=2)
    be.reserve(list(paths.values()))
    assert be.rt._reserved == {8: 2}
    for n, p in paths.items():
        be.add(AdapterInfo(n, str(p), 0), p)
    assert be.store.loaded == ["x", "y"]
    ptr = _q_stack(be).At.data_ptr()
    one = 896 * 8 + 2 * 32 * 4 + 2 * 4
    assert be.rt.bytes_held() == 2 * one == 14_864
    be.store.ensure(["z"])
    assert be.store.loaded == ["y", "z"] and be.store.stats.evictions == 1
    assert _q_stack(be).At.data_ptr() == ptr
    assert be.rt.bytes_held() == 2 * one


def test_reserve_with_several_ranks_under_a_budget_reserves_nothing(tiny_backbone, tmp_path):
    """Which ranks a budget will hold is not known: the stacks grow as adapters come."""
    paths = [save_adapter(tiny_backbone, tmp_path / f"r{r}", r, r=r) for r in (4, 8)]
    be = make_backend("ours", copy.deepcopy(tiny_backbone), max_loaded=1)
    be.reserve(paths + [tmp_path / "missing"])  # unreadable: skipped, reported when added
    assert be.rt._reserved == {}
    unbudgeted = make_backend("ours", copy.deepcopy(tiny_backbone))
    unbudgeted.reserve(paths + [tmp_path / "missing"])
    assert unbudgeted.rt._reserved == {4: 1, 8: 1}


def test_a_mixed_batch_keeps_no_gathered_factors_after_it(tiny_backbone, dirs):
    """A mixed batch gathers each row's factors (its own copies, rows x factor bytes per
    projection); none stay referenced after the forward, and the next single-adapter and
    mixed batches still answer as the rows alone."""
    be = backend64(tiny_backbone, dirs)
    r = rows(4, seed=3)
    names = ["a", "b", "c", "a"]  # ranks 8, 4, 16: the per-rank segments too
    ids, mask = B.collate(r, pad_id=0)
    out = be.infer(ids, mask, names)
    assert all(m._a is None and m._b is None and m._segs is None
               for m in be.rt.wrapped.values())
    for i, n in enumerate(names):
        ref = alone(be, r[i], n)
        assert (out[i, : ref.shape[0]] - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    assert torch.equal(be.infer(ids, mask, names), out)


# --------------------------------------------------------------------------- installs while a
# batch runs: the batch is held mid-way (a pre-hook on the backbone's second layer waits on an
# Event), so "while" is a fact of the test, not a timing race

def _hold(be):
    """(entered, release): a forward reaching layer 1 sets ``entered`` and waits for
    ``release``; once released, forwards pass."""
    entered, release = threading.Event(), threading.Event()

    def hook(module, args):
        if not release.is_set():
            entered.set()
            assert release.wait(30), "the test never released the forward"

    be.rt.backbone.layers[1].register_forward_pre_hook(hook)
    return entered, release


def _wait_until(cond, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def _budgeted(tiny_base, root, names, max_loaded, reserve=True, ranks=None):
    ranks = ranks or {}
    for i, n in enumerate(names):
        if not (root / n).exists():
            save_adapter(tiny_base.backbone(), root / n, i + 1, r=ranks.get(n, 8))
    be = make_backend("ours", tiny_base.backbone().to(torch.float64), max_loaded)
    if reserve:
        be.reserve([root / n for n in names])
    for n in names:
        be.add(AdapterInfo(n, str(root / n), 0, "sst2", ("negative", "positive")), root / n)
    return be


def test_a_cold_load_completes_while_a_batch_runs_and_the_next_batch_uses_it(tiny_base,
                                                                             tmp_path):
    """Budget 2 (a, b loaded in 2 reserved rows; c known). While a batch for 'a' is held
    mid-forward, a request for 'c' misses: c is read and written into b's row (b evicted: no
    request names it) and published before the batch ends (its load latency observed, the
    stack not reallocated). Then the held batch answers exactly as a server holding all
    three does, and c's request, the next batch, too (float64, bit for bit). Before installs
    ran on the loader thread, c's install waited for the held batch: c was not loaded."""
    names = ("a", "b", "c")
    be, full = (_budgeted(tiny_base, tmp_path, names, m) for m in (2, None))
    store = be.store
    service = Service(be, tiny_base.tokenizer, 32, max_batch=8, max_wait_ms=1, max_texts=8)
    loads = []
    store.on_load = loads.append
    entered, release = _hold(be)
    ptr = _q_stack(be).At.data_ptr()
    ids = service.encode(be.infos["a"], ["a good film", "bad", "not so bad at all"], None)

    async def scenario():
        await service.start()
        try:
            held = asyncio.ensure_future(service._queued(be.infos["a"], ids))
            assert await asyncio.to_thread(entered.wait, 30)
            cold = asyncio.ensure_future(service._queued(be.infos["c"], ids))
            loaded = await asyncio.to_thread(_wait_until, lambda: store.is_loaded("c"))
            during = {"loaded": loaded, "held_done": held.done(), "loads": len(loads),
                      "lru": store.loaded, "ptr": _q_stack(be).At.data_ptr()}
            release.set()
            return await asyncio.wait_for(held, 30), await asyncio.wait_for(cold, 30), during
        finally:
            release.set()
            await service.stop()

    got_a, got_c, during = asyncio.run(scenario())
    assert during == {"loaded": True, "held_done": False, "loads": 1, "lru": ["a", "c"],
                      "ptr": ptr}
    assert store.stats.evictions == 1 and loads[0] < 30
    input_ids, mask = B.collate(ids, pad_id=service.pad_id)
    assert torch.equal(got_a, full.infer(input_ids, mask, ["a"] * 3).float())
    assert torch.equal(got_c, full.infer(input_ids, mask, ["c"] * 3).float())


def test_an_install_under_a_held_mixed_batch_leaves_its_answers_unchanged(tiny_base, tmp_path):
    """A mixed batch (a, d: gathered factors) held mid-forward; c goes into b's row
    meanwhile (install_now True). Reading b back then evicts c, the most recently used:
    a and d, least recent and pinned by no request, are the running batch's (the runtime's
    busy set). With every loaded adapter the batch's, nothing can go: None. The batch
    answers as a server holding all four, and so does c in the next one."""
    names = ("a", "b", "d", "c")
    be, full = (_budgeted(tiny_base, tmp_path, names, m) for m in (3, None))
    store = be.store
    assert store.loaded == ["a", "b", "d"]
    entered, release = _hold(be)
    ids, mask = B.collate([[5, 9, 70, 3], [44, 8], [9, 9, 120]], pad_id=2)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("x", be.infer(ids, mask, ["a", "d", "a"])))
    worker.start()
    try:
        assert entered.wait(30)
        assert store.install_now("c", store.prepare("c")) is True
        assert store.loaded == ["a", "d", "c"] and worker.is_alive()  # b was least recent
        assert store.install_now("b", store.prepare("b")) is True
        assert store.loaded == ["a", "d", "b"] and store.stats.evictions == 2
        store.max_loaded = 2  # a and d fill it: c would have to evict one of them
        assert store.install_now("c", store.prepare("c")) is None
        assert store.loaded == ["a", "d", "b"] and store.stats.evictions == 2
    finally:
        release.set()
        worker.join(30)
    assert torch.equal(out["x"], full.infer(ids, mask, ["a", "d", "a"]))
    assert torch.equal(be.infer(ids, mask, ["c", "a", "c"]), full.infer(ids, mask, ["c", "a", "c"]))


def test_a_full_rank_stack_falls_back_to_installing_between_batches(tiny_base, tmp_path,
                                                                     caplog):
    """Budget 2 over ranks 8 (a, c) and 4 (b): nothing reserved, so the rank-8 stacks hold
    one row (a's). While a batch for 'a' is held, c (rank 8) would need the rank-8 stacks to
    grow (b's freed row is rank 4): install_now declines (None, a debug line says why),
    nothing is evicted and no stack is reallocated under the batch (same data_ptr). The
    worker's install between batches then loads it, and it answers as alone."""
    names = ("a", "b", "c")
    ranks = {"b": 4}
    be = _budgeted(tiny_base, tmp_path, names, 2, ranks=ranks)
    full = _budgeted(tiny_base, tmp_path, names, None, ranks=ranks)
    store = be.store
    assert be.rt._reserved == {} and _q_stack(be).At.shape[0] == 1
    entered, release = _hold(be)
    ptrs = (_q_stack(be).At.data_ptr(), _q_stack(be).Bt.data_ptr())
    ids, mask = B.collate([[5, 9, 70, 3], [44, 8]], pad_id=2)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("x", be.infer(ids, mask, ["a", "a"])))
    worker.start()
    adapter = store.prepare("c")
    try:
        assert entered.wait(30)
        with caplog.at_level(logging.DEBUG, logger="loralens.serving.store"):
            assert store.install_now("c", adapter) is None
        assert "rank-8 stack" in caplog.text and "between batches" in caplog.text
        assert (_q_stack(be).At.data_ptr(), _q_stack(be).Bt.data_ptr()) == ptrs
        assert set(store.loaded) == {"a", "b"} and store.stats.evictions == 0
    finally:
        release.set()
        worker.join(30)
    assert torch.equal(out["x"], full.infer(ids, mask, ["a", "a"]))
    assert store.install("c", adapter) is True and set(store.loaded) == {"a", "c"}
    assert torch.equal(be.infer(ids, mask, ["c", "c"]), full.infer(ids, mask, ["c", "c"]))
