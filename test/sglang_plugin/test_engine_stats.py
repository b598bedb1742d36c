"""Load numbers for the router, read from a stand-in SGLang scheduler."""

from types import SimpleNamespace

from dualpath.sglang_plugin.engine_stats import scheduler_load


def req(n):
    return SimpleNamespace(origin_input_ids=list(range(n)))


def test_decode_load_counts_queues_and_room_includes_evictable_cache():
    """Free KV for the router is what a new request can get: free slots plus what the radix
    cache would evict. With free slots alone a decode whose pool holds finished requests' KV
    reports no room, and the router admits nothing more."""
    s = SimpleNamespace(
        waiting_queue=[req(10)], running_batch=SimpleNamespace(reqs=[req(20)]),
        disagg_decode_prealloc_queue=SimpleNamespace(queue=[SimpleNamespace(req=req(30))]),
        disagg_decode_transfer_queue=SimpleNamespace(queue=[]),
        token_to_kv_pool_allocator=SimpleNamespace(available_size=lambda: 500),
        tree_cache=SimpleNamespace(evictable_size=lambda: 150_000))
    load = scheduler_load(s, "decode")
    assert (load.seq, load.tok) == (3, 60) and load.free_kv_tokens == 150_500
    # SGLang reserves decode steps for its active requests (prealloc queue)
    s.disagg_decode_prealloc_queue._active_reserved_tokens = lambda: 3 * 512
    assert scheduler_load(s, "decode").free_kv_tokens == 150_500 - 1536
    assert scheduler_load(s, "prefill").free_kv_tokens == 150_500, "decode only"
    del s.tree_cache
    assert scheduler_load(s, "decode").free_kv_tokens == 0, "never below zero"
    assert scheduler_load(None, "decode").free_kv_tokens == 0


def test_the_sglang_internals_read_exist_in_the_pinned_release():
    """scheduler_load reads these (no hook: read only); a new SGLang must still have them."""
    import pytest

    decode = pytest.importorskip("sglang.srt.disaggregation.decode")
    radix = pytest.importorskip("sglang.srt.mem_cache.radix_cache")
    assert callable(decode.DecodePreallocQueue._active_reserved_tokens)
    assert callable(radix.RadixCache.evictable_size)
