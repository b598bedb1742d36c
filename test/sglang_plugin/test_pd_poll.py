"""PD polls without one-rank collectives: the same answers as SGLang's own functions, with a
real one-rank gloo group, and SGLang's functions unchanged when a group has more ranks."""

import random
from types import SimpleNamespace

import pytest

utils = pytest.importorskip("sglang.srt.disaggregation.utils")
dist = pytest.importorskip("torch.distributed")

from dualpath.sglang_plugin import pd_poll  # noqa: E402


class Poller:
    def __init__(self, v):
        self.v = v

    def poll(self):
        return self.v


def test_same_polls_as_sglang_without_the_all_reduce(group, monkeypatch):
    rng = random.Random(3)
    pollers = [Poller(rng.randrange(5)) for _ in range(37)]  # KVPoll: Failed 0 .. Success 4
    ours = pd_poll.poll_and_all_reduce(None, pollers, group)
    assert ours == utils.poll_and_all_reduce(pollers, group)
    assert ours == pd_poll.poll_and_all_reduce_attn_cp_tp_group(None, pollers, group, group)
    assert ours == utils.poll_and_all_reduce_attn_cp_tp_group(pollers, group, group)
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(1))
    pd_poll.poll_and_all_reduce_attn_cp_tp_group(None, pollers, group, group)
    assert calls == [], "no collective with one rank"


def test_the_metadata_gate_still_applies(group):
    """A decode request whose metadata has not landed stays Transferring."""
    import torch

    ok = int(utils.KVPoll.Success)
    bufs = SimpleNamespace(bootstrap_room=torch.tensor([[0], [7]]))
    reqs = [SimpleNamespace(req=SimpleNamespace(bootstrap_host="10.0.0.1"),
                            metadata_buffer_index=i) for i in range(2)]
    args = SimpleNamespace(disaggregation_transfer_backend="nixl")
    pollers = [Poller(ok), Poller(ok)]
    ours = pd_poll.poll_and_all_reduce(None, pollers, group, reqs, bufs, args)
    assert ours == [int(utils.KVPoll.Transferring), ok]
    assert ours == utils.poll_and_all_reduce(pollers, group, reqs, bufs, args)


def test_more_ranks_call_sglangs_own(monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    seen = []
    out = pd_poll.poll_and_all_reduce(lambda *a: seen.append(a) or ["x"], [Poller(4)], "g")
    assert out == ["x"] and seen[0][1] == "g"
    out = pd_poll.poll_and_all_reduce_attn_cp_tp_group(lambda *a: ["y"], [], "cp", "tp")
    assert out == ["y"]
