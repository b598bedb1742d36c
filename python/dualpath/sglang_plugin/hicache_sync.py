"""HiCache's per-pass readiness counts without tensors when there is nobody to agree with.

SGLang 0.5.17's HiRadixCache makes its ranks agree on how many write-throughs, loads and
storage operations finished with a MIN all-reduce over a small CPU tensor: every scheduling
pass (`_sync_hicache_ready_counts`, from `check_hicache_events`) and, on a decode, once per
request waiting for a restored prefix (`loading_check` from `is_load_back_event_done`). With
one rank the reduction is skipped, but the tensor's creation and `.tolist()`/`.item()` remain.
On 2x H100 (stack samples, 4c4ecf3/a4d1e69) the samples at those lines were 6-8% of the prefill
scheduler thread and 9% of the decode's with dual path on; far more than such calls cost on
their own, so most likely the thread was waiting there to win the GIL back from the storage and
transfer threads.

With one rank in every group involved (no pipeline, TP 1, one-rank attention groups) the hooks
compute the same counts in plain Python; otherwise SGLang's own functions run.
"""

from __future__ import annotations

from dualpath.sglang_plugin.pd_poll import one_rank

ALONE = "_dualpath_alone"


def alone(cache) -> bool:
    """True when the cache's MIN all-reduce has no other rank to agree with; asked once per
    cache (its groups do not change), as this runs every scheduling pass."""
    got = getattr(cache, ALONE, None)
    if got is None:
        got = (getattr(cache, "pp_size", 1) == 1 and getattr(cache, "tp_world_size", 1) == 1
               and all(g is None or one_rank(g)
                       for g in (getattr(cache, "attn_cp_group", None),
                                 getattr(cache, "attn_tp_group", None))))
        setattr(cache, ALONE, got)
    return got


def sync_ready_counts(original, cache):
    """AROUND HiRadixCache._sync_hicache_ready_counts."""
    if not alone(cache):
        return original(cache)
    cc = cache.cache_controller
    sizes = ((cc.prefetch_revoke_queue.qsize(), cc.prefetch_hit_queue.qsize(),
              cc.ack_backup_queue.qsize(), cc.host_mem_release_queue.qsize())
             if cache.enable_storage else ())
    return (cache._count_ready_acks(cc.ack_write_queue),
            cache._count_ready_acks(cc.ack_load_queue), sizes)


def loading_check(original, cache, finish_count=None):
    """AROUND HiRadixCache.loading_check: the finished-load count without the tensor."""
    if finish_count is None and alone(cache):
        finish_count = cache._count_ready_acks(cache.cache_controller.ack_load_queue)
    return original(cache, finish_count=finish_count)
