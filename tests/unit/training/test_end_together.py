"""A data-parallel job's ranks leave together (training/loop.end_together): rank 0 still
writes the job's files when the others are done, and a rank leaving early made a rank abort
at exit now and then (docs/architecture.md, test_data_parallel)."""
import torch.distributed as dist

from loralens.training import loop


def _fake_group(monkeypatch, world):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: world is not None)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    return calls


def test_ranks_of_a_group_meet_at_a_barrier(monkeypatch):
    calls = _fake_group(monkeypatch, 2)
    loop.end_together()
    assert calls == ["barrier"]


def test_one_process_or_a_group_of_one_waits_for_nobody(monkeypatch):
    for world in (None, 1):
        calls = _fake_group(monkeypatch, world)
        loop.end_together()
        assert calls == []
