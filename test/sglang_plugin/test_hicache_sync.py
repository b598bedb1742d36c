"""HiCache's ready counts without tensors when one rank (sglang_plugin/hicache_sync.py): the
same answers and effects as SGLang 0.5.17's own functions, with a real one-rank gloo group;
SGLang's functions unchanged when a group has more ranks."""

import queue
import types

import pytest

hrc = pytest.importorskip("sglang.srt.mem_cache.hiradix_cache")
dist = pytest.importorskip("torch.distributed")

from dualpath.sglang_plugin import hicache_sync  # noqa: E402

HRC = hrc.HiRadixCache


class Event:
    def __init__(self, done):
        self.done = done

    def query(self):
        return self.done

    def synchronize(self):
        pass


def ack(done, node_ids=()):
    return types.SimpleNamespace(finish_event=Event(done), node_ids=list(node_ids),
                                 num_tokens=64, timing_enabled=False)


def filled(n):
    q = queue.Queue()
    for i in range(n):
        q.put(i)
    return q


def cache(group, storage=True):
    cc = types.SimpleNamespace(
        ack_write_queue=[ack(True), ack(True), ack(False), ack(True)],
        ack_load_queue=[ack(True, ["a"]), ack(False, ["b"])],
        prefetch_revoke_queue=filled(1), prefetch_hit_queue=filled(2),
        ack_backup_queue=filled(3), host_mem_release_queue=filled(4))
    c = types.SimpleNamespace(cache_controller=cc, enable_storage=storage, pp_rank=0,
                              pp_size=1, tp_world_size=1, tp_group=group,
                              attn_cp_group=group, attn_tp_group=group, metrics_collector=None,
                              ongoing_load_back={"a": "node-a", "b": "node-b"}, unlocked=[])
    for name in ("_count_ready_acks", "_all_reduce", "_all_reduce_attn_groups", "_pp_sync",
                 "_sync_hicache_ready_counts"):
        setattr(c, name, types.MethodType(getattr(HRC, name), c))
    c.dec_lock_ref = c.unlocked.append
    return c


@pytest.mark.parametrize("storage", [True, False])
def test_same_counts_as_sglang(group, storage):
    c = cache(group, storage)
    stock = HRC._sync_hicache_ready_counts(c)
    ours = hicache_sync.sync_ready_counts(
        lambda x: pytest.fail("one rank: stock must not run"), c)
    assert ours == stock == (2, 1, (1, 2, 3, 4) if storage else ())


def test_loading_check_pops_what_sglangs_does(group):
    a, b = cache(group), cache(group)
    HRC.loading_check(a)
    hicache_sync.loading_check(HRC.loading_check, b)
    assert a.unlocked == b.unlocked == ["node-a"]
    assert len(a.cache_controller.ack_load_queue) == len(b.cache_controller.ack_load_queue) == 1
    assert list(a.ongoing_load_back) == list(b.ongoing_load_back) == ["b"]
    given = []
    hicache_sync.loading_check(lambda c, finish_count: given.append(finish_count), b, 0)
    assert given == [0], "a count the caller gives is passed through"


def test_more_ranks_or_a_pipeline_call_sglangs_own(group, monkeypatch):
    for change in ({"tp_world_size": 2}, {"pp_size": 2}):
        c = cache(group)
        vars(c).update(change)
        assert hicache_sync.sync_ready_counts(lambda x: "stock", c) == "stock"
        got: list = []
        hicache_sync.loading_check(lambda x, finish_count, got=got: got.append(finish_count), c)
        assert got == [None]
    monkeypatch.setattr(hicache_sync, "one_rank", lambda g: False)  # a 2-rank attention group
    assert hicache_sync.sync_ready_counts(lambda x: "stock", cache(group)) == "stock"
