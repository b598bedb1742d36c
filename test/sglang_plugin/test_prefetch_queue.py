"""Queued storage prefetches (sglang_plugin/prefetch_queue.py) around SGLang 0.5.17's own
HiRadixCache.prefetch_from_storage / check_prefetch_progress / release_aborted_request and
HiCacheController.prefetch_rate_limited / _storage_hit_query, run on a stand-in cache object
(a real HiRadixCache needs GPU memory pools). Needs SGLang importable, as CI installs it."""

import types

import pytest
import torch

hrc = pytest.importorskip("sglang.srt.mem_cache.hiradix_cache")
ccm = pytest.importorskip("sglang.srt.managers.cache_controller")

from prefetch_fakes import (  # noqa: E402
    HCC,
    HRC,
    PAGE,
    Node,
    _real_tree,
    _reread_config,
    make_cache,
)

from dualpath.sglang_plugin import prefetch_queue as pq  # noqa: E402


def test_free_budget_is_stock():
    cache, node = make_cache(stored_tokens=range(1024)), Node()
    cache.prefetch_from_storage("a", node, list(range(1024)), None, None)
    assert "a" in cache.ongoing_prefetch and node.protected == 1
    assert cache.cache_controller.started == [("a", 1024)]
    assert cache.check("a") is False  # stock: in progress
    assert not getattr(cache, pq.ATTR, None)


def test_taken_budget_queues_a_stored_prefix_and_starts_it_when_free():
    tokens = list(range(2048))
    cache, node = make_cache(stored_tokens=tokens, capacity=1000), Node()
    cc = cache.cache_controller
    cc.prefetch_tokens_occupied = 1000  # another request's prefetch holds the budget
    cache.prefetch_from_storage("b", node, tokens, None, None)
    assert "b" not in cache.ongoing_prefetch and cc.started == []  # stock would drop it here
    assert "b" in getattr(cache, pq.ATTR) and node.protected == 1
    assert cache.check("b") is False and cc.started == []  # still no budget: keeps waiting
    cc.prefetch_tokens_occupied = 0  # the other prefetch finished
    assert cache.check("b") is False  # started now; the request waits for it
    assert cc.started == [("b", 2048)] and "b" in cache.ongoing_prefetch
    assert node.protected == 1 and not getattr(cache, pq.ATTR)
    assert cc.prefetch_tokens_occupied == 2048


def test_unstored_or_short_prompts_are_never_delayed():
    cache, node = make_cache(stored_tokens=range(64, 2048), capacity=10), Node()
    cache.cache_controller.prefetch_tokens_occupied = 10
    cache.prefetch_from_storage("new", node, list(range(2048)), None, None)  # not in storage
    cache.prefetch_from_storage("short", node, list(range(32)), None, None)  # below threshold
    assert not getattr(cache, pq.ATTR, None) and not cache.ongoing_prefetch
    assert cache.check("new") is True and cache.check("short") is True  # schedulable: stock
    assert node.protected == 0


def test_an_aborted_request_leaves_the_queue():
    tokens = list(range(512))
    cache, node = make_cache(stored_tokens=tokens, capacity=1), Node()
    cache.cache_controller.prefetch_tokens_occupied = 1
    cache.prefetch_from_storage("c", node, tokens, None, None)
    assert node.protected == 1
    pq.release(cache, "c")
    HRC.release_aborted_request(cache, "c")  # stock part: nothing ongoing
    assert node.protected == 0 and not getattr(cache, pq.ATTR)
    assert cache.check("c") is True


def test_lookup_key_is_the_one_stock_queries_first():
    tokens, last = list(range(1000, 1300)), "ab" * 32
    cache, node = make_cache(), Node()
    pq.stored_prefix(cache, node, tokens, last, None)
    ours = cache.cache_controller.storage_backend.asked[-1]
    key = hrc.RadixKey(tokens, extra_key=None, is_bigram=False).page_aligned(PAGE)
    op = types.SimpleNamespace(last_hash=last, token_ids=key, prefix_keys=None)
    HCC._storage_hit_query(cache.cache_controller, op)
    stock = cache.cache_controller.storage_backend.asked[-1]
    assert len(ours) == 1 and ours[0] == stock[0]


def test_first_in_first_out_and_no_overtaking():
    tokens = list(range(2048))
    cache = make_cache(stored_tokens=tokens, capacity=3000)
    cc = cache.cache_controller
    cc.prefetch_tokens_occupied = 3000
    n1, n2, n3 = Node(), Node(), Node()
    cache.prefetch_from_storage("r1", n1, tokens, None, None)
    cc.prefetch_tokens_occupied = 0  # budget frees before the next arrival
    cache.prefetch_from_storage("r2", n2, tokens, None, None)  # behind r1, not ahead of it
    assert list(getattr(cache, pq.ATTR)) == ["r1", "r2"] and cc.started == []
    assert cache.check("r2") is False  # r1 starts first (2048 tokens), then r2 fits too
    assert [r for r, _ in cc.started] == ["r1", "r2"]
    cache.prefetch_from_storage("r3", n3, tokens, None, None)  # r1 + r2 hold the budget
    assert cc.prefetch_tokens_occupied >= 3000 and "r3" in getattr(cache, pq.ATTR)
    assert n1.protected == n2.protected == n3.protected == 1


def test_entries_expire_and_reset_empties_the_queue(monkeypatch):
    tokens = list(range(512))
    cache, node = make_cache(stored_tokens=tokens, capacity=1), Node()
    cache.cache_controller.prefetch_tokens_occupied = 1
    cache.prefetch_from_storage("old", node, tokens, None, None)
    t = pq.time.monotonic()
    monkeypatch.setattr(pq.time, "monotonic", lambda: t + pq.QUEUE_TTL_S + 1)
    pq.drain(cache)
    assert not getattr(cache, pq.ATTR) and node.protected == 0
    monkeypatch.undo()
    cache.prefetch_from_storage("x", node, tokens, None, None)
    assert pq.reset("r", cache) == "r" and not getattr(cache, pq.ATTR)


@pytest.mark.parametrize("why", ["decode", "tp2"])
def test_decode_servers_and_tp_above_one_stay_stock(monkeypatch, why):
    tokens = list(range(1024))
    cache, node = make_cache(stored_tokens=tokens, capacity=1), Node()
    cache.cache_controller.prefetch_tokens_occupied = 1
    if why == "decode":
        monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"role": "decode"}')
    else:
        cache.tp_world_size = 2
    cache.prefetch_from_storage("d", node, tokens, None, None)
    assert not getattr(cache, pq.ATTR, None) and node.protected == 0  # dropped, as stock


class HostPool:
    def __init__(self, free):
        self.free = free

    def available_size(self):
        return self.free


class Leaf:  # hashable, as TreeNode is
    def __init__(self, tokens, evicted=True, held=0):
        self.host_value, self.evicted, self.host_ref_counter = list(range(tokens)), evicted, held


_leaf = Leaf


def test_no_host_room_queues_until_room_frees():
    tokens = list(range(1024))
    cache = make_cache(stored_tokens=tokens, capacity=100_000)
    cc = cache.cache_controller
    cc.mem_pool_host = HostPool(free=600)
    cache.evictable_host_leaves = {_leaf(128, held=1), _leaf(128, evicted=False)}  # not freeable
    cache.prefetch_from_storage("x", Node(), tokens[:512], None, None)  # room: starts
    assert [r for r, _ in cc.started] == ["x"]
    before = dict(pq.STATS)
    # 600 free - 512 that x has yet to allocate: 1024 more do not fit; stock would start it
    # and then revoke it (or shorten it) when the host allocation fails
    node = Node()
    cache.prefetch_from_storage("y", node, tokens, None, None)
    assert "y" in getattr(cache, pq.ATTR) and node.protected == 1
    assert pq.STATS["pf_queued"] == before["pf_queued"] + 1
    assert pq.STATS["pf_waited_host"] == before["pf_waited_host"] + 1
    assert cache.check("y") is False and [r for r, _ in cc.started] == ["x"]
    cache.evictable_host_leaves.add(_leaf(1024))  # a host-only copy evict_host can free
    assert pq.host_room(cache) == 600 - 512 + 1024
    assert cache.check("y") is False and [r for r, _ in cc.started] == ["x", "y"]
    assert node.protected == 1 and not getattr(cache, pq.ATTR)


def test_without_prefetches_in_flight_the_head_starts_anyway():
    tokens = list(range(1024))
    cache = make_cache(stored_tokens=tokens, capacity=100_000)
    cache.cache_controller.mem_pool_host = HostPool(free=0)
    cache.prefetch_from_storage("z", Node(), tokens, None, None)  # as stock: cannot stall
    assert [r for r, _ in cache.cache_controller.started] == ["z"]


def test_revoked_prefetches_are_counted():
    tokens = list(range(1024))
    cache = make_cache(stored_tokens=tokens, capacity=100_000)
    before = dict(pq.STATS)
    cache.prefetch_from_storage("r", Node(), tokens, None, None)
    assert pq.STATS["pf_started"] == before["pf_started"] + 1
    assert pq.STATS["pf_asked_tokens"] == before["pf_asked_tokens"] + 1024
    HRC._revoke_pending_prefetch(cache, "r")  # what stock does when the host alloc fails
    assert cache.check("r") is True
    assert pq.STATS["pf_empty"] == before["pf_empty"] + 1
    assert pq.STATS["pf_loaded_tokens"] == before["pf_loaded_tokens"]


def test_host_hits_the_gpu_could_not_load_are_counted():
    import torch

    root = types.SimpleNamespace(evicted=False, parent=None, host_value=None)
    mid = types.SimpleNamespace(evicted=True, parent=root, host_value=torch.zeros(128))
    leaf = types.SimpleNamespace(evicted=True, parent=mid, host_value=torch.zeros(64))
    params = types.SimpleNamespace(best_match_node=leaf, mem_quota=None)
    before = dict(pq.STATS)
    empty = torch.empty(0, dtype=torch.int64)
    assert pq.count_load_back(lambda c, p: (empty, root), None, params)[1] is root
    assert pq.STATS["pf_loadback_failed"] == before["pf_loadback_failed"] + 1
    assert pq.STATS["pf_loadback_failed_tokens"] == before["pf_loadback_failed_tokens"] + 192
    loaded = torch.arange(192)
    pq.count_load_back(lambda c, p: (loaded, leaf), None, params)  # loaded: not counted
    assert pq.STATS["pf_loadback_failed"] == before["pf_loadback_failed"] + 1


def fresh(cache):
    return types.SimpleNamespace(**{k: v for k, v in vars(cache).items()
                                    if not k.startswith("_dualpath")})


def test_host_cache_budget_evicts_host_only_pages_beyond_it(monkeypatch):
    cache = make_cache(capacity=100_000)
    pool = HostPool(free=0)
    cache.cache_controller.mem_pool_host = pool
    cache.evictable_host_leaves = {Leaf(1000), Leaf(1000), Leaf(1000), Leaf(500, held=1)}
    asked = []

    def evict_host(n):
        asked.append(n)
        pool.free += n

    cache.evict_host = evict_host
    assert pq.trim(cache) == 0  # no budget configured: stock
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"host_cache_tokens": 1000}')
    cache = fresh(cache)  # a fresh cache reads the config again
    before = pq.STATS["pf_trimmed_tokens"]
    assert pq.trim(cache) == 2000 and asked == [2000]  # the held leaf is not evictable
    assert pq.STATS["pf_trimmed_tokens"] == before + 2000
    assert pq.trim(cache) == 0 and asked == [2000]  # at most every TRIM_EVERY_S
    cache._dualpath_trimmed_at = -1e9
    cache.evictable_host_leaves = {Leaf(800)}
    assert pq.trim(cache) == 0 and asked == [2000]  # within the budget
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"host_cache_tokens": 0, "role": "decode"}')
    dec = fresh(cache)
    assert pq.trim(dec) == 0  # decode servers: never
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"host_cache_tokens": 0}')
    tp = fresh(cache)
    tp.tp_world_size = 2
    assert pq.trim(tp) == 0 and asked == [2000]  # TP ranks could evict differently


def _tree_after_prefetch(rid, tokens):
    """A stand-in cache whose stock `check_prefetch_progress` completes rid's prefetch the way
    stock does: the fetched pages become host-only nodes under the request's last host node,
    and stock's own protection of that node is released."""
    from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

    cache = make_cache(stored_tokens=tokens)
    root = TreeNode()
    root.key = RadixKey([])
    root.value = root.host_value = types.SimpleNamespace()  # resident: not host-only
    key = RadixKey(list(tokens))
    root.protect_host()  # what stock's prefetch_from_storage did
    cache.ongoing_prefetch[rid] = (root, key, types.SimpleNamespace(host_indices=[0]))

    def complete(c, req_id):
        if req_id not in c.ongoing_prefetch:
            return True
        parent = root
        for a, b in ((0, 2 * PAGE), (2 * PAGE, len(tokens))):  # two nodes, as after a split
            n = TreeNode()
            n.parent, n.key, n.value = parent, key[a:b], None
            n.host_value = list(range(a, b))
            parent.children[key[a:b].child_key(PAGE)] = n
            parent = n
        root.release_host()
        del c.ongoing_prefetch[req_id]
        c.prefetch_loaded_tokens_by_reqid[req_id] = len(tokens)
        return True

    cache.check = lambda r: pq.check(complete, cache, r)
    return cache, root


def _held(rid, tokens):
    """A cache right after rid's prefetch completed and was held; (cache, the held node)."""
    cache, root = _tree_after_prefetch(rid, tokens)
    cache.check(rid)
    node = next(iter(next(iter(root.children.values())).children.values()))
    assert node.host_ref_counter == 1
    return cache, node


def test_a_completed_prefetch_is_held_until_its_request_runs():
    import time

    tokens = list(range(4 * PAGE))
    cache, root = _tree_after_prefetch("r", tokens)
    setattr(cache, pq.STARTED, {"r": time.monotonic() - 0.5})  # started half a second ago
    before = dict(pq.STATS)
    assert cache.check("r") is True
    assert pq.STATS["pf_read_tokens_total"] == before["pf_read_tokens_total"] + 4 * PAGE
    assert 0.5 <= pq.STATS["pf_read_s_total"] - before["pf_read_s_total"] < 5
    # every completed prefetch's read time, and (below) its wait for the request's batch
    assert pq.STATS["pf_done_count"] == before["pf_done_count"] + 1
    assert 0.5 <= pq.STATS["pf_read_all_s_total"] - before["pf_read_all_s_total"] < 5
    leaf = root.children[next(iter(root.children))].children
    leaf = leaf[next(iter(leaf))]
    assert leaf.host_ref_counter == 1 and root.host_ref_counter == 0
    assert pq.STATS["pf_held"] == before["pf_held"] + 1
    cache.evictable_host_leaves = {leaf}
    assert pq.evictable_host_tokens(cache) == 0, "held pages are not room for others"
    assert cache.check("r") is True and leaf.host_ref_counter == 1  # held once
    # the scheduler loads it (init_load_back), but may still turn the request away for this
    # batch: the hold stays until the request has run
    params = types.SimpleNamespace(best_match_node=leaf, req=types.SimpleNamespace(rid="r"))
    pq.count_load_back(lambda c, p: ([1], leaf), cache, params)
    assert leaf.host_ref_counter == 1
    pq.cached(None, cache, types.SimpleNamespace(rid="r"))
    assert leaf.host_ref_counter == 0
    assert pq.evictable_host_tokens(cache) == 2 * PAGE
    assert pq.STATS["pf_ran_count"] == before["pf_ran_count"] + 1
    assert 0 <= pq.STATS["pf_to_run_s_total"] - before["pf_to_run_s_total"] < 5
    pq.cached(None, cache, types.SimpleNamespace(rid="r"))  # a later chunk: metered once
    assert pq.STATS["pf_ran_count"] == before["pf_ran_count"] + 1


def test_the_wait_from_arrival_to_the_reads_start_is_metered():
    """A prefetch queued on arrival (budget taken) is metered from SGLang's first call to its
    start; one that starts at once counts ~0; a refused one (too short) is not counted."""
    import time

    tokens = list(range(2048))
    cache = make_cache(stored_tokens=tokens)
    cc, node = cache.cache_controller, Node()
    before = dict(pq.STATS)
    cc.prefetch_tokens_occupied = 1000
    cache.prefetch_from_storage("q", node, tokens, None, None)
    getattr(cache, pq.ARRIVED)["q"] -= 0.25  # arrived a quarter of a second ago
    assert pq.STATS["pf_to_start_count"] == before["pf_to_start_count"]
    cc.prefetch_tokens_occupied = 0
    cache.check("q")
    assert pq.STATS["pf_to_start_count"] == before["pf_to_start_count"] + 1
    assert 0.25 <= pq.STATS["pf_to_start_s_total"] - before["pf_to_start_s_total"] < 5
    t0 = time.monotonic()
    cache.prefetch_from_storage("short", Node(), list(range(32)), None, None)
    assert pq.STATS["pf_to_start_count"] == before["pf_to_start_count"] + 1
    assert "short" not in getattr(cache, pq.ARRIVED)
    cc.prefetch_tokens_occupied = 0
    cache.prefetch_from_storage("now", Node(), list(range(4096, 4096 + 1024)), None, None)
    assert pq.STATS["pf_to_start_count"] == before["pf_to_start_count"] + 2
    assert pq.STATS["pf_to_start_s_total"] - before["pf_to_start_s_total"] < 5 + (
        time.monotonic() - t0)
    pq.release(cache, "now")
    assert "now" not in getattr(cache, pq.STARTED)


def test_a_held_prefix_is_released_on_abort_and_after_the_ttl(monkeypatch):
    tokens = list(range(3 * PAGE))
    cache, node = _held("x", tokens)
    pq.release(cache, "x")
    assert node.host_ref_counter == 0
    cache, node = _held("y", tokens)
    expired = pq.STATS["pf_hold_expired"]
    t = pq.time.monotonic()
    monkeypatch.setattr(pq.time, "monotonic", lambda: t + pq.HOLD_TTL_S + 1)
    cache.check("other")
    assert node.host_ref_counter == 0 and pq.STATS["pf_hold_expired"] == expired + 1


def test_stock_host_eviction_skips_a_held_prefetch_and_frees_it_once_released():
    """SGLang's own HiRadixCache.evict_host on a tree where a completed prefetch left host-only
    pages: without the hold it frees them first (the request then recomputes its prefix);
    held, they stay until the request has loaded them."""
    from sglang.srt.mem_cache.evict_policy import LRUStrategy

    tokens = list(range(4 * PAGE))
    cache, root = _tree_after_prefetch("h", tokens)
    freed = []
    cache.cache_controller.evict_host = lambda host_value: freed.append(len(host_value)) or len(
        host_value)
    cache.root_node = root
    cache.eviction_strategy = LRUStrategy()
    cache._record_remove_event = lambda node, medium=None: None
    cache._update_host_leaf_status = types.MethodType(HRC._update_host_leaf_status, cache)
    cache.evict_host = types.MethodType(HRC.evict_host, cache)
    cache.check("h")
    mid = next(iter(root.children.values()))
    leaf = next(iter(mid.children.values()))
    cache.evictable_host_leaves = {leaf}
    cache.evict_host(10 * PAGE)
    assert freed == [] and leaf.host_ref_counter == 1, "held: stock eviction passes it by"
    pq.unhold(cache, "h")  # its request loaded it (or gave up)
    cache.evict_host(10 * PAGE)
    assert freed == [2 * PAGE, 2 * PAGE], "released: both nodes of the prefix go"


def test_a_hold_ends_when_its_request_ran_and_lasts_while_it_is_checked(monkeypatch):
    tokens = list(range(3 * PAGE))
    cache, node = _held("c", tokens)
    # the prefix reached the GPU through another request: no init_load_back for this one,
    # but caching its KV after the forward releases the hold
    assert pq.cached("ret", cache, types.SimpleNamespace(rid="c")) == "ret"
    assert node.host_ref_counter == 0
    t = [pq.time.monotonic()]
    monkeypatch.setattr(pq.time, "monotonic", lambda: t[0])
    cache, node = _held("w", tokens)
    for _ in range(3):  # waiting for a batch, checked by the scheduler now and then
        t[0] += 0.6 * pq.HOLD_TTL_S
        cache.check("w")
        assert node.host_ref_counter == 1
    t[0] += pq.HOLD_TTL_S + 1  # no longer checked: released
    cache.check("other")
    assert node.host_ref_counter == 0


def test_hold_finds_the_leaf_sglangs_own_insert_makes_after_a_split():
    """With SGLang's own `_insert_helper_host` (which splits a node where keys diverge), the
    hold lands on the new leaf that ends the fetched prefix, and SGLang's `evict_host` passes
    it by while freeing an unrelated host-only leaf."""
    import torch
    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache = make_cache(stored_tokens=range(4 * PAGE))
    root, freed = _real_tree(cache)
    # an earlier request left pages 0-2 of another prompt host-only; ours shares page 0
    other = list(range(PAGE)) + [10_000 + i for i in range(2 * PAGE)]
    cache._insert_helper_host(root, RadixKey(other), torch.arange(3 * PAGE), ["a", "b", "c"])
    ours = list(range(4 * PAGE))
    key = RadixKey(ours)
    root.protect_host()
    cache.ongoing_prefetch["q"] = (root, key, types.SimpleNamespace(host_indices=[0]))

    def complete(c, rid):
        if rid not in c.ongoing_prefetch:
            return True
        c._insert_helper_host(root, key, torch.arange(100, 100 + 4 * PAGE),
                              ["a", "d", "e", "f"])
        root.release_host()
        del c.ongoing_prefetch[rid]
        c.prefetch_loaded_tokens_by_reqid[rid] = 3 * PAGE
        return True

    assert pq.check(complete, cache, "q") is True
    shared = root.children[key.child_key(PAGE)]
    assert len(shared.key) == PAGE, "SGLang split the earlier node at the shared page"
    leaf = shared.children[key[PAGE:].child_key(PAGE)]
    assert list(leaf.key.token_ids) == ours[PAGE:] and leaf.host_ref_counter == 1
    cache.evict_host(100 * PAGE)
    assert freed == [2 * PAGE], "only the other prompt's own pages went"
    assert leaf.host_value is not None and shared.parent is root


def test_refused_prefetches_say_why_and_the_budget_is_sampled():
    """A call that starts nothing is counted with its reason: SGLang's budget taken while
    storage holds nothing to queue for, or fewer new tokens than the threshold."""
    cache = make_cache(stored_tokens=None, capacity=1000)
    before = dict(pq.STATS)
    cache.cache_controller.prefetch_tokens_occupied = 1000  # budget taken
    cache.prefetch_from_storage("b", Node(), list(range(1024)), None, None)
    cache.cache_controller.prefetch_tokens_occupied = 0
    cache.prefetch_from_storage("s", Node(), list(range(PAGE - 1)), None, None)
    assert not cache.ongoing_prefetch and not getattr(cache, pq.ATTR, None)
    assert pq.STATS["pf_calls"] == before["pf_calls"] + 2
    assert pq.STATS["pf_refused_budget"] == before["pf_refused_budget"] + 1
    assert pq.STATS["pf_refused_short"] == before["pf_refused_short"] + 1
    assert pq.STATS["pf_started"] == before["pf_started"]
    cache.prefetch_from_storage("c", Node(), list(range(1024)), None, None)
    assert "c" in cache.ongoing_prefetch
    cache.cache_controller.mem_pool_host = HostPool(free=4096)
    cache.evictable_host_leaves = set()
    cache.check("c")
    snap = pq.snapshot()
    assert snap["pf_budget_used_tokens_now"] == 1024 and snap["pf_budget_tokens_now"] == 1000
    assert snap["pf_in_flight_now"] == 1 and snap["pf_host_free_tokens_now"] == 4096


def test_a_prefix_matched_on_arrival_is_held_until_its_request_runs():
    """The arrival match found the whole prompt but the last page in the host pool (fewer new
    tokens than the threshold: stock starts no prefetch and protects nothing). SGLang's own
    `evict_host` (what trim and host-room eviction call) must pass the matched pages by while
    the request queues, and free them once its KV is cached."""
    import torch
    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache = make_cache(stored_tokens=None)
    root, freed = _real_tree(cache)
    prev = list(range(3 * PAGE))  # the previous turn's prompt, now host-only
    cache._insert_helper_host(root, RadixKey(prev), torch.arange(3 * PAGE), ["a", "b", "c"])
    node = root.children[RadixKey(prev).child_key(PAGE)]
    before = dict(pq.STATS)
    # the next turn: the previous prompt + a few new tokens; the match reached `node`
    cache.prefetch_from_storage("t", node, list(range(10_000, 10_000 + PAGE // 2)), None, None)
    assert not cache.ongoing_prefetch and pq.STATS["pf_refused_short"] == before[
        "pf_refused_short"] + 1
    assert node.host_ref_counter == 1
    assert pq.STATS["pf_held_matched"] == before["pf_held_matched"] + 1
    cache.evict_host(100 * PAGE)  # trim / room for others while the request queues
    assert freed == [] and node.host_value is not None
    assert cache.check("t") is True and node.host_ref_counter == 1  # still waiting: kept
    pq.cached(None, cache, types.SimpleNamespace(rid="t"))  # it ran: the GPU has the prefix
    assert node.host_ref_counter == 0
    cache.evict_host(100 * PAGE)
    assert freed == [3 * PAGE]
    # the root (nothing matched) is never held
    cache.prefetch_from_storage("u", root, list(range(PAGE // 2)), None, None)
    assert root.host_ref_counter == 0 and not getattr(cache, pq.HELD).get("u")


def test_write_through_without_host_room_is_counted():
    """Stock write_backup returns 0 when it skips a node (parent not backed up yet) and when
    the host pool has no room: only the second is a failure."""
    import torch

    root = types.SimpleNamespace(backuped=True)
    cache = types.SimpleNamespace(root_node=root)
    before = dict(pq.STATS)
    full = types.SimpleNamespace(parent=root, host_value=None, value=torch.arange(128))
    assert pq.count_write_backup(0, cache, full) == 0
    pending = types.SimpleNamespace(backuped=False)
    skipped = types.SimpleNamespace(parent=pending, host_value=None, value=torch.arange(64))
    pq.count_write_backup(0, cache, skipped)
    done = types.SimpleNamespace(parent=root, host_value=torch.arange(64), value=torch.arange(64))
    pq.count_write_backup(64, cache, done)
    assert pq.STATS["pf_write_through_failed"] == before["pf_write_through_failed"] + 1
    assert pq.STATS["pf_write_through_failed_tokens"] == before[
        "pf_write_through_failed_tokens"] + 128


def test_arrival_match_holds_leave_half_the_host_pool_free():
    """Holds of arrival matches stop at MATCHED_HOLD_SHARE of the host pool (then a match is
    left unprotected, as stock leaves it), so write-through and prefetches keep room; a
    released hold frees its share."""
    import torch
    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache = make_cache(stored_tokens=None)
    root, _ = _real_tree(cache)
    pool = HostPool(free=0)
    pool.size = 8 * PAGE  # holds may cover 4 pages
    cache.cache_controller.mem_pool_host = pool
    nodes = []
    for i in range(3):  # three prompts of 2 pages each, host-only
        toks = [1000 * (i + 1) + t for t in range(2 * PAGE)]
        cache._insert_helper_host(root, RadixKey(toks), torch.arange(2 * PAGE), ["h"] * 2)
        nodes.append(root.children[RadixKey(toks).child_key(PAGE)])
    before = dict(pq.STATS)
    for i, n in enumerate(nodes):
        cache.prefetch_from_storage(f"r{i}", n, list(range(PAGE // 2)), None, None)
    assert [n.host_ref_counter for n in nodes] == [1, 1, 0]
    assert pq.STATS["pf_held_matched"] == before["pf_held_matched"] + 2
    assert pq.STATS["pf_hold_skipped_room"] == before["pf_hold_skipped_room"] + 1
    pq.cached(None, cache, types.SimpleNamespace(rid="r0"))  # r0 ran: its share is free
    cache.prefetch_from_storage("r3", nodes[2], list(range(PAGE // 2)), None, None)
    assert [n.host_ref_counter for n in nodes] == [0, 1, 1]


def test_a_prefetch_that_loaded_nothing_holds_pages_another_request_brought():
    """Revoked (nothing loaded for this request), but the prefix's pages are in the tree (here
    the stand-in's completion inserts them, as another request's prefetch would): the hold
    lands on the deepest node of the prefix, not on the arrival node."""
    tokens = list(range(4 * PAGE))
    cache, root = _tree_after_prefetch("z", tokens)

    class NothingLoaded(dict):
        def get(self, key, default=None):
            return 0

    cache.prefetch_loaded_tokens_by_reqid = NothingLoaded()
    assert cache.check("z") is True
    mid = next(iter(root.children.values()))
    leaf = next(iter(mid.children.values()))
    assert leaf.host_ref_counter == 1 and root.host_ref_counter == 0


def test_trim_frees_whole_host_only_chains_in_one_call(monkeypatch):
    """An agent's context is a chain of one host node per turn; only the last turn is a leaf.
    With a budget of 0, one trim must free the whole chain through SGLang's own `evict_host`
    (counting leaves only freed one turn per call), leave a held chain alone, and with a
    budget keep that many tokens."""
    import torch
    from sglang.srt.mem_cache.radix_cache import RadixKey

    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"host_cache_tokens": 0}')
    cache = fresh(make_cache(stored_tokens=None))
    root, freed = _real_tree(cache)
    pool = cache.cache_controller.mem_pool_host = HostPool(free=0)
    cache.cache_controller.evict_host = lambda hv: freed.append(len(hv)) or setattr(
        pool, "free", pool.free + len(hv)) or len(hv)

    def chain(base, turns):  # turn t's prompt extends turn t-1's by 2 pages
        toks = []
        for _ in range(turns):
            toks += [base + len(toks) + i for i in range(2 * PAGE)]
            cache._insert_helper_host(root, RadixKey(list(toks)), torch.arange(len(toks)),
                                      [f"{base}-{i}" for i in range(len(toks) // PAGE)])
        return toks

    a, b = chain(0, 4), chain(100_000, 3)
    assert len(cache.evictable_host_leaves) == 2, "one leaf per chain: its last turn"
    assert pq.evictable_host_tokens(cache) == 4 * PAGE
    b_leaf = root.children[RadixKey(b).child_key(PAGE)]
    while b_leaf.children:
        b_leaf = next(iter(b_leaf.children.values()))
    b_leaf.protect_host()  # b's next turn matched it and holds it
    assert pq.trimmable_host_tokens(cache) == len(a)
    assert pq.trim(cache) == len(a) and sorted(freed) == [2 * PAGE] * 4
    assert list(root.children) == [RadixKey(b).child_key(PAGE)], "the held chain stays"
    b_leaf.release_host()
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", f'{{"host_cache_tokens": {4 * PAGE}}}')
    keep = fresh(cache)
    keep.cache_controller.evict_host = cache.cache_controller.evict_host
    freed.clear()
    assert pq.trim(keep) == 2 * PAGE and freed == [2 * PAGE], "LRU first, down to the budget"


def test_arrival_match_and_gpu_eviction_are_counted():
    """Each arrival adds the tokens its match found (the tree path to SGLang's last host
    node) and those left; a queued prefetch started later is not counted twice. SGLang's GPU
    eviction adds what it freed."""
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import EvictResult
    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache = make_cache(stored_tokens=None)
    root, _ = _real_tree(cache)
    prev = list(range(3 * PAGE))
    cache._insert_helper_host(root, RadixKey(prev), torch.arange(3 * PAGE), ["a", "b", "c"])
    node = root.children[RadixKey(prev).child_key(PAGE)]
    before = dict(pq.STATS)
    cache.prefetch_from_storage("t", node, list(range(10_000, 10_000 + PAGE // 2)), None, None)
    assert pq.STATS["pf_arrival_matched_tokens"] == before["pf_arrival_matched_tokens"] + 3 * PAGE
    assert pq.STATS["pf_arrival_new_tokens"] == before["pf_arrival_new_tokens"] + PAGE // 2
    cache.prefetch_from_storage("u", root, list(range(PAGE // 2)), None, None)
    assert pq.STATS["pf_arrival_matched_tokens"] == before["pf_arrival_matched_tokens"] + 3 * PAGE
    assert pq.STATS["pf_arrival_gpu_tokens"] == before["pf_arrival_gpu_tokens"], "host only"
    assert pq.STATS["pf_arrival_pinned"] == before["pf_arrival_pinned"]
    node.value = torch.arange(3 * PAGE)  # back on the GPU, and its storage write in flight
    node.protect_host()
    cache.ongoing_backup = {7: node}
    cache.prefetch_from_storage("v", node, list(range(20_000, 20_000 + PAGE // 2)), None, None)
    assert pq.STATS["pf_arrival_gpu_tokens"] == before["pf_arrival_gpu_tokens"] + 3 * PAGE
    assert pq.STATS["pf_arrival_pinned"] == before["pf_arrival_pinned"] + 1
    assert pq.STATS["pf_arrival_backup_pending"] == before["pf_arrival_backup_pending"] + 1
    r = EvictResult(num_tokens_evicted=5 * PAGE)
    assert pq.evicted(r, cache, None) is r
    assert pq.STATS["pf_gpu_evicted_tokens"] == before["pf_gpu_evicted_tokens"] + 5 * PAGE


def test_a_prefetch_still_loading_is_answered_without_stock_and_the_same():
    """Under wait_complete with one rank, a prefetch neither complete nor terminated is not
    ready: the hook says so without stock's per-call tensor and group checks, and agrees with
    SGLang's own can_terminate_prefetch in every state; other states go to stock."""
    from sglang.srt.managers.cache_controller import PrefetchOperation

    cache = make_cache()
    cache.prefetch_stop_policy, cache.tp_world_size = "wait_complete", 1
    cache.attn_cp_group = cache.attn_tp_group = None
    cache.can_terminate_prefetch = types.MethodType(HRC.can_terminate_prefetch, cache)
    cache._all_reduce_attn_groups = types.MethodType(HRC._all_reduce_attn_groups, cache)
    from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

    op = PrefetchOperation("r", list(range(2 * PAGE)))
    root = TreeNode()
    root.key = RadixKey([])
    cache.ongoing_prefetch["r"] = (root, RadixKey(list(range(2 * PAGE))), op)

    def stock_must_not_run(c, rid):
        raise AssertionError("stock was asked")
    states = [([], 0, False), (["a", "b"], PAGE, False), (["a", "b"], 2 * PAGE, False),
              (["a", "b"], PAGE, True)]
    for hashes, done, terminated in states:
        op.hash_value, op.completed_tokens, op._terminated_flag = hashes, done, terminated
        stock_ready = HRC.can_terminate_prefetch(cache, op)
        asked = []
        got = pq.check(lambda c, rid, asked=asked: asked.append(rid) or True, cache, "r")
        assert asked == ([] if not stock_ready else ["r"]), (hashes, done, terminated)
        assert got == stock_ready
    op.hash_value, op.completed_tokens, op._terminated_flag = ["a"], 0, False
    assert pq.check(stock_must_not_run, cache, "r") is False
    cache.prefetch_stop_policy = "timeout"  # stock decides
    assert pq.check(lambda c, rid: True, cache, "r") is True


def test_trim_counts_an_ancestor_only_when_all_its_children_go(monkeypatch):
    """Two chains share a host-only first turn; one chain's leaf is held. The shared node
    stays (SGLang's evict_host never frees a parent with a child left), so it is not counted,
    and with a budget nothing beyond the budget is freed."""
    import torch
    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache = make_cache(stored_tokens=None)
    root, freed = _real_tree(cache)
    base = list(range(2 * PAGE))
    a = base + [10_000 + i for i in range(2 * PAGE)]
    b = base + [20_000 + i for i in range(2 * PAGE)]
    for toks in (base, a, b):
        cache._insert_helper_host(root, RadixKey(toks), torch.arange(len(toks)),
                                  [f"h{i}" for i in range(len(toks) // PAGE)])
    shared = root.children[RadixKey(base).child_key(PAGE)]
    assert len(shared.children) == 2
    b_leaf = shared.children[RadixKey(b[2 * PAGE:]).child_key(PAGE)]
    assert pq.trimmable_host_tokens(cache) == 6 * PAGE
    b_leaf.protect_host()
    assert pq.trimmable_host_tokens(cache) == 2 * PAGE, "a's own turn only"
    cache.evict_host(2 * PAGE)
    assert freed == [2 * PAGE] and shared.host_value is not None


def test_device_budget_demotes_unlocked_gpu_pages_through_sglangs_eviction(monkeypatch):
    """--dualpath-device-cache-tokens 0: after a scheduling pass, SGLang's own demotion
    (`_evict_backuped`) moves every unlocked GPU page with a host copy to the host pool (whole
    chains, parents after their children); a node whose write-through is still in flight
    (locked) stays, and so does one that never got a host copy (SGLang's `evict` would drop
    it: recomputed next turn); the host budget then frees the demoted pages in the same pass.
    Without a budget: stock."""
    import torch
    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache = make_cache(stored_tokens=None)
    root, freed = _real_tree(cache)
    root.lock_ref = 1  # as SGLang's root
    for name in ("evict", "_evict_write_through", "_make_eviction_heap", "_promote_parent",
                 "_evict_backuped", "_detach_backuped", "update_eviction_metrics",
                 "evictable_size"):
        setattr(cache, name, types.MethodType(getattr(HRC, name), cache))
    cache.metrics_collector, cache.evictable_size_ = None, 0
    cc = cache.cache_controller
    cc.write_policy, device_freed = "write_through", []
    cc.evict_device = lambda v: pytest.fail("free() syncs the GPU per node: free_segment")
    cc.mem_pool_device_allocator = types.SimpleNamespace(
        free_segment=lambda v, start_pos: device_freed.append((len(v), start_pos)))
    pool = cc.mem_pool_host = HostPool(free=0)
    cc.evict_host = lambda hv: freed.append(len(hv)) or setattr(
        pool, "free", pool.free + len(hv)) or len(hv)

    def on_gpu(base, turns, locked=False):  # a context cached on the GPU, written through
        toks = []
        for _ in range(turns):
            toks += [base + len(toks) + i for i in range(2 * PAGE)]
            cache._insert_helper_host(root, RadixKey(list(toks)), torch.arange(len(toks)),
                                      [f"{base}-{i}" for i in range(len(toks) // PAGE)])
        node, chain = root, []
        while node.children:
            node = next(c for k, c in node.children.items() if c.key.token_ids[0] >= base
                        and c.key.token_ids[0] < base + 100_000)
            chain.append(node)
        for n in chain:
            n.value = torch.arange(len(n.key))
            cache.evictable_size_ += len(n.key)
            cache._update_host_leaf_status(n)
        if locked:  # its write-through is in flight: SGLang locks it until acknowledged
            chain[-1].lock_ref = 1
            cache.evictable_size_ -= len(chain[-1].key)
        for n in chain:
            cache._update_leaf_status(n)
        return chain

    a, b = on_gpu(0, 2), on_gpu(100_000, 1, locked=True)
    c = on_gpu(200_000, 1)
    c[0].host_value = None  # its write-through found no host room: no copy anywhere else
    cache.evictable_host_leaves.discard(c[0])
    assert pq.after_events("r", cache) == "r" and device_freed == [], "no budget: stock"
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG",
                       '{"device_cache_tokens": 0, "host_cache_tokens": 0}')
    _reread_config(cache)  # (not `fresh`: SGLang's methods above are bound to this object)
    before = dict(pq.STATS)
    assert pq.after_events("r", cache) == "r"
    assert device_freed == [(2 * PAGE, 0), (2 * PAGE, 0)], "a's two turns, leaf then parent"
    assert all(n.evicted for n in a) and not b[0].evicted, "the locked write stays on the GPU"
    assert not c[0].evicted and c[0].parent is root, "no host copy: kept, not dropped"
    assert cache.evictable_size_ == 2 * PAGE  # c's
    assert pq.STATS["pf_device_trimmed_tokens"] == before["pf_device_trimmed_tokens"] + 4 * PAGE
    assert sorted(freed) == [2 * PAGE, 2 * PAGE], "the demoted chain left the host pool too"
    assert sorted(root.children) == sorted([b[0].key.child_key(PAGE), c[0].key.child_key(PAGE)])
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"device_cache_tokens": 0, "role": "decode"}')
    b[0].lock_ref, cache.evictable_size_ = 0, 4 * PAGE
    cache._update_leaf_status(b[0])
    _reread_config(cache)
    assert pq.trim_device(cache) == 0 and not b[0].evicted, "decode servers: never"


def test_a_nodes_pages_freed_without_unique_are_the_pages_free_releases():
    """trim_device frees a demoted node's pages with SGLang's free_segment (no torch.unique, so
    no GPU sync per node): on SGLang's own paged allocator it releases exactly the pages its
    free() does, for a node of whole pages anywhere in a request's row."""
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

    def allocator():
        return PagedTokenToKVPoolAllocator(64 * PAGE, PAGE, torch.bfloat16, "cpu",
                                           types.SimpleNamespace(), need_sort=False)

    a, b = allocator(), allocator()
    rows = a.alloc(7 * PAGE), b.alloc(7 * PAGE)
    assert torch.equal(*rows)
    a.free(rows[0][2 * PAGE:5 * PAGE])
    b.free_segment(rows[1][2 * PAGE:5 * PAGE], start_pos=0)
    assert a.available_size() == b.available_size()
    assert sorted(a.free_pages.tolist()) == sorted(b.free_pages.tolist())
