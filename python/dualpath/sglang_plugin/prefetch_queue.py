"""Storage prefetches wait for budget instead of being dropped (SGLang 0.5.17 HiRadixCache).

Stock HiCache starts a request's storage prefetch once, when the request arrives, and only if
fewer than half the host pool's tokens are already being prefetched
(`HiCacheController.prefetch_rate_limited`). A request that arrives while that budget is taken
never prefetches: its stored prefix is recomputed. Under a multi-turn agentic load with the host
pool as a staging buffer, most turns arrive in bursts and are recomputed (measured on 2x H100,
2026-11-27: 48 of 77 later turns with no prefix hit at the prefill; benchmark/results/README.md).
DualPath's premise is that stored prefixes are loaded, with the storage NICs the bottleneck, so
a prefetch that finds the budget taken is queued here and started as soon as the budget frees;
the scheduler keeps the request waiting meanwhile (as it does for a prefetch in progress under
the `wait_complete` policy).

Only prefixes that storage holds are queued: the first page of the would-be prefetch is looked up
(one hash, one `batch_exists` of one key), so new prompts are never delayed. State lives on the
HiRadixCache instance; everything runs on the scheduler thread. With TP > 1 every rank takes the
same decisions (the budget counter is updated identically and storage is shared).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("dualpath.prefetch_queue")
_QUEUED = Counter("dualpath_prefetch_queued", "Storage prefetches queued for budget instead of "
                  "dropped (stock SGLang drops them and recomputes the prefix)")
_WAITING = Gauge("dualpath_prefetch_waiting", "Prefetches queued now")
_WAIT_S = Histogram("dualpath_prefetch_queue_wait_seconds", "Time a prefetch waited for budget",
                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
ATTR = "_dualpath_prefetch_queue"


def _queue(cache) -> OrderedDict:
    q = getattr(cache, ATTR, None)
    if q is None:
        q = OrderedDict()
        setattr(cache, ATTR, q)
    return q


def stored_prefix(cache, node, tokens, last_hash, prefix_keys) -> bool:
    """Does storage hold the first page of `tokens` (chained after `last_hash`)? Hashed as
    stock's prefetch thread hashes the same key (`HiCacheController._storage_hit_query`)."""
    cc = cache.cache_controller
    page = cache.page_size
    if len(tokens) < page:
        return False
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo
    from sglang.srt.mem_cache.radix_cache import RadixKey

    key = RadixKey(tokens, extra_key=node.key.extra_key, is_bigram=cache.is_eagle)
    first = cc.get_hash_str(key[:page], last_hash, page_size=page)
    extra = HiCacheStorageExtraInfo(prefix_keys=list(prefix_keys) if prefix_keys else None)
    try:
        return cc.storage_backend.batch_exists(first[:1], extra) >= 1
    except Exception:  # noqa: BLE001  (a failing lookup: behave as stock)
        log.warning("storage lookup failed; prefetch not queued", exc_info=True)
        return False


def prefetch(original, cache, req_id, last_host_node, new_input_tokens, last_hash=None,
             prefix_keys=None):
    """AROUND HiRadixCache.prefetch_from_storage: queue instead of dropping when rate-limited."""
    cc = cache.cache_controller
    aligned = len(new_input_tokens) - len(new_input_tokens) % cache.page_size
    if (getattr(cache, "enable_storage", False) and aligned >= cache.prefetch_threshold
            and cc.prefetch_rate_limited()
            and stored_prefix(cache, last_host_node, new_input_tokens, last_hash, prefix_keys)):
        last_host_node.protect_host()  # as stock does for a started prefetch
        _queue(cache)[req_id] = (last_host_node, new_input_tokens, last_hash, prefix_keys,
                                 time.monotonic())
        _QUEUED.inc()
        _WAITING.set(len(_queue(cache)))
        log.debug("prefetch of %d tokens for %s queued (budget taken)", aligned, req_id)
        return None
    return original(cache, req_id, last_host_node, new_input_tokens, last_hash, prefix_keys)


def check(original, cache, req_id) -> bool:
    """AROUND HiRadixCache.check_prefetch_progress: a queued prefetch is not done; start it once
    the budget frees (the request then waits for it like any prefetch in progress)."""
    q = getattr(cache, ATTR, None)
    if not q or req_id not in q:
        return original(cache, req_id)
    if cache.cache_controller.prefetch_rate_limited():
        return False
    node, tokens, last_hash, prefix_keys, t0 = q.pop(req_id)
    _WAITING.set(len(q))
    _WAIT_S.observe(time.monotonic() - t0)
    cache.prefetch_from_storage(req_id, node, tokens, last_hash, prefix_keys)
    node.release_host()  # the started prefetch holds its own protection
    return req_id not in cache.ongoing_prefetch


def release(cache, rid) -> None:
    """BEFORE HiRadixCache.release_aborted_request: an aborted request leaves the queue."""
    q = getattr(cache, ATTR, None)
    item = q.pop(rid, None) if q else None
    if item is not None:
        item[0].release_host()
        _WAITING.set(len(q))
