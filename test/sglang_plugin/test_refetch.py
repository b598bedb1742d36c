"""--dualpath-refetch-host-hits through the prefetch queue (sglang_plugin/prefetch_queue.py and
write_wait.py): a host-only match read from storage again, and a read that waits for the
storage write of its pages, on the stand-in cache of prefetch_fakes.py. Needs SGLang importable,
as CI installs it."""

import types
from array import array

from prefetch_fakes import HRC, PAGE, Node, _real_tree, make_cache, pq


def test_refetch_reads_a_host_only_match_from_storage_again(monkeypatch):
    """--dualpath-refetch-host-hits: the previous turn's prompt is in the host pool only (its
    first turn still on the GPU). SGLang's own prefetch_from_storage is asked, from the
    deepest GPU node, for the host-only tokens plus the new ones, with that node's hash chain;
    the read protects that node (stock), and the host-only pages below it are free to go (the
    completed read inserts its own). Off: stock's call."""
    import torch
    from sglang.srt.mem_cache.radix_cache import RadixKey

    def setup():
        cache = make_cache(stored_tokens=None)
        root, _ = _real_tree(cache)
        cache.hicache_storage_pass_prefix_keys = True
        cache.get_prefix_hash_values = types.MethodType(HRC.get_prefix_hash_values, cache)
        # token ids as SGLang keeps them (its RadixKey.match asserts equal types)
        turn1, turn2 = array("q", range(2 * PAGE)), array("q", range(2 * PAGE, 4 * PAGE))
        cache._insert_helper_host(root, RadixKey(turn1), torch.arange(2 * PAGE), ["h1", "h2"])
        gpu = root.children[RadixKey(turn1).child_key(PAGE)]
        gpu.value = torch.arange(2 * PAGE)  # turn 1's pages are still on the GPU
        cache._insert_helper_host(root, RadixKey(turn1 + turn2), torch.arange(4 * PAGE),
                                  ["h1", "h2", "h3", "h4"])
        host = gpu.children[RadixKey(turn2).child_key(PAGE)]
        return cache, gpu, host, turn2

    new = array("q", range(10_000, 10_000 + 2 * PAGE))
    cache, gpu, host, _ = setup()
    cache.prefetch_from_storage("off", host, new, "h4", ["h1", "h2", "h3"])
    assert cache.cache_controller.started == [("off", 2 * PAGE)]
    assert cache.ongoing_prefetch["off"][0] is host

    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"refetch_host_hits": true}')
    cache, gpu, host, turn2 = setup()
    seen = {}
    cc = cache.cache_controller

    def prefetch(req_id, key, last_hash, prefix_keys):
        seen.update(key=list(key.token_ids), last_hash=last_hash, prefix_keys=prefix_keys)
        cc.started.append((req_id, len(key)))
        return types.SimpleNamespace(request_id=req_id)
    cc.prefetch = prefetch
    before = pq.STATS["pf_refetched_tokens"]
    cache.prefetch_from_storage("r", host, new, "h4", ["h1", "h2", "h3"])
    assert cc.started == [("r", 4 * PAGE)], "turn 2's host-only pages and the new ones"
    # what SGLang's _prefetch_kvcache passes for a match that ended at the GPU node
    assert seen == {"key": list(turn2 + new), "last_hash": "h2",
                    "prefix_keys": cache.get_prefix_hash_values(gpu)}
    # completion, as SGLang's check_prefetch_progress inserts it: turn 2's pages are found
    # (dropped as duplicates), the new ones added; the hold then finds the deepest node
    key = cache.ongoing_prefetch["r"][1]
    assert isinstance(key.token_ids, array)
    assert cache._insert_helper_host(gpu, key, torch.arange(4 * PAGE),
                                     ["h3", "h4", "h5", "h6"]) == 2 * PAGE
    deepest = pq._deepest(cache, gpu, key)
    assert deepest.parent is host and len(deepest.key) == 2 * PAGE
    assert cache.ongoing_prefetch["r"][0] is gpu
    assert gpu.host_ref_counter == 1 and host.host_ref_counter == 0
    assert pq.STATS["pf_refetched_tokens"] == before + 2 * PAGE
    # a salted request (extra_key) whose whole match is host-only keeps its host hit: a read
    # anchored at the root (no extra_key) would land in another namespace
    cache3, gpu3, host3, _ = setup()
    gpu3.value = None
    host3.key.extra_key = gpu3.key.extra_key = "salt"
    cache3.prefetch_from_storage("s", host3, new, "h4", ["h1", "h2", "h3"])
    assert cache3.cache_controller.started == [("s", 2 * PAGE)]
    # all on the GPU: nothing to read again
    cache2, gpu2, host2, _ = setup()
    host2.value = torch.arange(2 * PAGE)
    cache2.prefetch_from_storage("g", host2, new, "h4", ["h1", "h2", "h3"])
    assert cache2.cache_controller.started == [("g", 2 * PAGE)]


def test_a_refetch_waits_for_the_storage_write_of_its_pages(monkeypatch):
    """--dualpath-refetch-host-hits: turn 2's prompt is host-only and its storage write (queued
    by SGLang's write_backup_storage) is still in flight when turn 3 arrives. Stock would read
    only the stored part and keep the rest as a free host hit; here the refetch is queued until
    the write is acked (SGLang drops it from ongoing_backup), then reads the whole chain. A
    request behind it whose prefix is stored is not held back."""
    import torch
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from dualpath.sglang_plugin import write_wait

    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"refetch_host_hits": true}')
    other = array("q", range(50_000, 50_000 + 2 * PAGE))
    cache = make_cache(stored_tokens=list(other))
    root, _ = _real_tree(cache)
    cache.ongoing_backup = {}
    turn1, turn2 = array("q", range(2 * PAGE)), array("q", range(2 * PAGE, 4 * PAGE))
    cache._insert_helper_host(root, RadixKey(turn1), torch.arange(2 * PAGE), ["h1", "h2"])
    gpu = root.children[RadixKey(turn1).child_key(PAGE)]
    gpu.value = torch.arange(2 * PAGE)
    cache._insert_helper_host(root, RadixKey(turn1 + turn2), torch.arange(4 * PAGE),
                              ["h1", "h2", "h3", "h4"])
    host = gpu.children[RadixKey(turn2).child_key(PAGE)]
    # SGLang's write_backup_storage queues op 7 for turn 2's node (AFTER hook: its hashes)
    cache.ongoing_backup[7] = host
    assert write_wait.noted_backup(None, cache, host) is None
    assert write_wait.writing(cache, ("h4",)) and not write_wait.writing(cache, ("h2",))

    cc = cache.cache_controller
    waited = pq.STATS["pf_waited_write"]
    new = array("q", range(10_000, 10_000 + 2 * PAGE))
    cache.prefetch_from_storage("r", host, new, "h4", None)
    assert cc.started == [] and "r" in getattr(cache, pq.ATTR)
    assert pq.STATS["pf_waited_write"] == waited + 1
    assert gpu.host_ref_counter == 1, "the anchor is protected while it waits"
    assert cache.check("r") is False, "its request waits with it"
    cache.prefetch_from_storage("t", Node(), other, None, None)  # stored, budget free
    assert cc.started == [("t", 2 * PAGE)], "not behind a refetch that waits for a write"
    del cache.ongoing_backup[7]  # acked
    cache.check("r")
    assert cc.started[-1] == ("r", 4 * PAGE), "the whole host-only chain, read after the write"
    assert not getattr(cache, pq.ATTR) and not write_wait.writing(cache, ("h3", "h4"))
    assert gpu.host_ref_counter == 1, "the started prefetch holds the anchor, the queue let go"
    # no write in flight: the refetch starts at once (the existing refetch test's path)
    cc.started.clear()
    cache2 = make_cache(stored_tokens=None)
    cache2.prefetch_from_storage("u", Node(), list(range(2 * PAGE)), None, None)
    assert cache2.cache_controller.started == [("u", 2 * PAGE)]


def test_sglangs_own_write_backup_storage_is_noted_and_a_reset_forgets_its_writes(
        monkeypatch):
    """The op id SGLang 0.5.17's write_backup_storage registers is the one noted (AFTER hook
    over the real method). A flush (HiRadixCache.reset) drops the acks of writes in flight but
    keeps them in ongoing_backup: after pq.reset the same prompt's refetch does not wait for
    them (it would until the queue's 300 s TTL)."""
    import torch
    from sglang.srt.managers.cache_controller import StorageOperation
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from dualpath.sglang_plugin import write_wait

    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"refetch_host_hits": true}')
    cache = make_cache(stored_tokens=None)
    cache.ongoing_backup, cache.hicache_storage_pass_prefix_keys = {}, False
    cache.cache_controller.write_storage = lambda hv, key, hash_value, prefix_keys, **kw: (
        StorageOperation(hv, key, hash_value=hash_value).id)
    turn1, turn2 = array("q", range(2 * PAGE)), array("q", range(2 * PAGE, 4 * PAGE))
    new = array("q", range(10_000, 10_000 + 2 * PAGE))

    def tree():
        root, _ = _real_tree(cache)
        cache._insert_helper_host(root, RadixKey(turn1), torch.arange(2 * PAGE), ["h1", "h2"])
        gpu = root.children[RadixKey(turn1).child_key(PAGE)]
        gpu.value = torch.arange(2 * PAGE)
        cache._insert_helper_host(root, RadixKey(turn1 + turn2), torch.arange(4 * PAGE),
                                  ["h1", "h2", "h3", "h4"])
        return gpu.children[RadixKey(turn2).child_key(PAGE)]
    host = tree()
    write_wait.noted_backup(HRC.write_backup_storage(cache, host), cache, host)
    (op,) = cache.ongoing_backup
    assert getattr(cache, write_wait.PENDING) == {op: ("h3", "h4")}
    cache.prefetch_from_storage("r", host, new, "h4", None)
    assert "r" in getattr(cache, pq.ATTR) and cache.check("r") is False
    pq.reset(None, cache)  # the flush; ongoing_backup keeps op (SGLang never acks it now)
    assert op in cache.ongoing_backup and not getattr(cache, pq.ATTR)
    host = tree()
    cache.prefetch_from_storage("r2", host, new, "h4", None)
    assert "r2" in cache.ongoing_prefetch, "the same prompt again: read at once"


def test_pending_write_hashes_follow_sglangs_split_chain():
    """An op queued for a node that was split before its write-through finished covers the
    chain of backup_len tokens ending at it (SGLang's _concat_split_chain); the op leaves
    once SGLang has dropped it, also when the same page hash is in two ops."""
    from dualpath.sglang_plugin import write_wait
    from dualpath.sglang_plugin.prefetch_meters import Settings

    def node(parent, n, hashes):
        return types.SimpleNamespace(parent=parent, key=[0] * n, hash_value=hashes)
    root = types.SimpleNamespace(parent=None, key=[], hash_value=[])
    top = node(root, 2 * PAGE, ["a", "b"])
    mid = node(top, PAGE, ["c"])
    leaf = node(mid, PAGE, ["d"])
    assert write_wait._chain_hashes(leaf, 2 * PAGE) == ["c", "d"]
    assert write_wait._chain_hashes(leaf, None) == ["d"]
    assert write_wait._chain_hashes(leaf, 10 * PAGE) == ["a", "b", "c", "d"]
    assert write_wait.suffix_hashes(leaf, top) == ("c", "d")
    cache = types.SimpleNamespace(ongoing_backup={},
                                  _dualpath_settings=Settings(
                                      True, -1, -1, True))
    cache.ongoing_backup[1] = leaf
    write_wait.noted_backup(None, cache, leaf, 2 * PAGE)
    cache.ongoing_backup[2] = mid
    write_wait.noted_backup(None, cache, mid)
    assert write_wait.writing(cache, ("x", "c"))
    del cache.ongoing_backup[1]  # acked (SGLang's _drain_backup)
    write_wait.prune(cache)
    assert write_wait.writing(cache, ("c",)) and not write_wait.writing(cache, ("d",))
    cache.ongoing_backup.clear()
    write_wait.prune(cache)
    assert not write_wait.writing(cache, ("c",)) and not cache._dualpath_pending_hashes
    # off (no refetch): nothing recorded
    off = types.SimpleNamespace(ongoing_backup={3: leaf}, _dualpath_settings=(
        Settings(True, -1, -1, False)))
    write_wait.noted_backup(None, off, leaf)
    assert not write_wait.writing(off, ("d",))
