"""Storage prefetches wait for budget instead of being dropped (SGLang 0.5.17 HiRadixCache).

Stock HiCache starts a request's storage prefetch once, when the request arrives, and only if
fewer than half the host pool's tokens are already being prefetched
(`HiCacheController.prefetch_rate_limited`). A request that arrives while that budget is taken
never prefetches: its stored prefix is recomputed. Under a multi-turn agentic load with the host
pool as a staging buffer, most turns arrive in bursts and are recomputed (measured on 2x H100,
2026-11-27: 48 of 77 later turns with no prefix hit at the prefill; benchmark/results/README.md).
DualPath's premise is that stored prefixes are loaded, with the storage NICs the bottleneck, so
here such a prefetch is queued, first in first out, and started as soon as the budget frees;
the scheduler keeps the request waiting meanwhile (as it does for a prefetch in progress under
the `wait_complete` policy).

- A prefetch also waits while the host pool has no room for it. Stock reserves host memory only
  after the storage lookup and, when the pool is full of pages it cannot evict (copies of
  device-resident nodes under write-through, other prefetches, backups in flight), shortens the
  prefetch or revokes it: the prefix is recomputed (measured on 2x H100, 2026-11-27, with the
  queue above: still 80 of 133 later turns without a prefix hit). Room = free pages + host-only
  leaves nobody holds (what `evict_host` can free) - the tokens started prefetches have yet to
  allocate. With no prefetch in flight the head of the queue starts anyway, as stock would, so
  the queue cannot stall.
- Only prefixes that storage holds are queued: the first page of the would-be prefetch is
  looked up (one hash, one `batch_exists` of one key), so new prompts are never delayed.
- Once anything is queued, later arrivals queue behind it (no overtaking); every
  `check_prefetch_progress` call starts queued prefetches in order while the budget allows.
- Prefill servers (and non-PD servers) only: a decode's HiCache prefetch bookkeeping
  (`decode_hicache_mixin`) assumes a started prefetch. TP = 1 only: with TP > 1 ranks could
  disagree on the lookup (it is not all-reduced), so there the hooks behave as stock.
- An entry left behind by a request that is never checked again (rejected before scheduling)
  is dropped after `QUEUE_TTL_S`, and `reset()` empties the queue.
- A completed prefetch's pages are held (`protect_host` on the deepest node it filled) until
  its request has run (its KV cached: `cache_unfinished_req` / `cache_finished_req`; not at
  `init_load_back`, after which the scheduler may still turn the request away for this
  batch), is aborted, or goes `HOLD_TTL_S` without the scheduler checking it (a request
  rejected before scheduling; also one that waits longer than that in the PD bootstrap queue,
  which is not checked).
  Stock releases them when the prefetch completes, while the request may still wait for a
  batch; host-pool eviction (room for the next prefetch, write-through, `trim`) then frees them
  first, as they are host-only leaves, and the prefix is recomputed (measured on 2x H100,
  2026-11-27: the prefill loaded 804k prefix tokens from storage but reused 503k).
- A prefix the request found in the host pool (or on the GPU, backed up there by write-through)
  when it arrived is held the same way (`protect_host` on the `last_host_node` its arrival
  match reached), with the same release conditions. Stock protects nothing between the arrival
  match and the batch that runs the request: GPU eviction turns the matched nodes into
  host-only leaves and `trim` (or any host eviction) frees them while the request queues, so
  no prefetch was started (few new tokens) and the whole prompt is recomputed (measured on
  2x H100, 2026-11-27, 16 agents x 20 turns, 4-8K-token prompts: 265 of 291 arrivals matched
  all but < 1 page, yet 97% of later prompt tokens were recomputed). Such holds cover at most
  MATCHED_HOLD_SHARE of the host pool; beyond it a match is left as stock leaves it, so
  write-through and prefetches keep room when many agents queue at once.
- The host-pool side (room, holds, `trim` for --dualpath-host-cache-tokens: host-only pages
  beyond a budget are evicted, so the pool stages rather than caches) is in host_holds.py; the
  meters (`STATS`, the agent's `pf_*`) and the launcher settings are in prefetch_meters.py.
State lives on the HiRadixCache instance; everything runs on the scheduler thread.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from prometheus_client import Counter, Gauge, Histogram

# re-exported: the hooks and the tests name them through this module
from dualpath.sglang_plugin import host_holds
from dualpath.sglang_plugin.host_holds import (  # noqa: F401
    HELD,
    HOLD_TTL_S,
    MATCHED,
    _deepest,
    _expire_holds,
    _hold_matched,
    _hold_node,
    _no_room,
    count_arrival,
    evictable_host_tokens,
    host_only_suffix,
    host_room,
    join_tokens,
    trim,
    trim_device,
    trimmable_host_tokens,
    unhold,
)
from dualpath.sglang_plugin.pd_poll import one_rank
from dualpath.sglang_plugin.prefetch_meters import (  # noqa: F401
    ARRIVED,
    DONE,
    STATS,
    _settings,
    _since,
    _stamp,
    count_load_back,
    count_write_backup,
    evicted,
    snapshot,
)
from dualpath.sglang_plugin.write_wait import forget, prune, suffix_hashes, writing

log = logging.getLogger("dualpath.prefetch_queue")
_QUEUED = Counter("dualpath_prefetch_queued", "Storage prefetches queued for budget instead of "
                  "dropped (stock SGLang drops them and recomputes the prefix)")
_WAITING = Gauge("dualpath_prefetch_waiting", "Prefetches queued now")
_WAIT_S = Histogram("dualpath_prefetch_queue_wait_seconds", "Time a prefetch waited for budget",
                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
ATTR = "_dualpath_prefetch_queue"
DRAINING = "_dualpath_prefetch_draining"
QUEUE_TTL_S = 300.0
STARTED = "_dualpath_prefetch_started"
def _limited(cache, tokens: int) -> bool:
    return cache.cache_controller.prefetch_rate_limited() or _no_room(cache, tokens)


def _ahead(cache, q: OrderedDict) -> bool:
    """Does a queued prefetch that could start wait ahead (first in, first out)? Those waiting
    for storage writes (write_wait) do not hold the others back."""
    return any(not item[5] or not writing(cache, item[5]) for item in q.values())


def _started(cache, req_id, tokens: int) -> None:
    STATS["pf_calls"] += 1
    if req_id not in cache.ongoing_prefetch:
        if tokens < getattr(cache, "prefetch_threshold", 0):
            STATS["pf_refused_short"] += 1
        elif cache.cache_controller.prefetch_rate_limited():
            STATS["pf_refused_budget"] += 1
        _since(cache, ARRIVED, req_id)  # nothing started: nothing to meter
        return
    started = getattr(cache, STARTED, None)
    if started is None:
        started = {}
        setattr(cache, STARTED, started)
    started[req_id] = time.monotonic()
    STATS["pf_started"] += 1
    waited = _since(cache, ARRIVED, req_id)
    if waited is not None:
        STATS["pf_to_start_s_total"] += waited
        STATS["pf_to_start_count"] += 1
    STATS["pf_asked_tokens"] += tokens


def _queue(cache) -> OrderedDict:
    q = getattr(cache, ATTR, None)
    if q is None:
        q = OrderedDict()
        setattr(cache, ATTR, q)
    return q


def _enabled(cache) -> bool:
    return getattr(cache, "tp_world_size", 1) <= 1 and _settings(cache).queue


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


def _expire(cache, q: OrderedDict) -> None:
    now = time.monotonic()
    while q:
        rid, item = next(iter(q.items()))
        if now - item[4] < QUEUE_TTL_S:
            break
        q.popitem(last=False)
        item[0].release_host()
        _since(cache, ARRIVED, rid)
        log.warning("queued prefetch of %s dropped after %.0f s (request gone?)", rid,
                    now - item[4])
    _WAITING.set(len(q))


def prefetch(original, cache, req_id, last_host_node, new_input_tokens, last_hash=None,
             prefix_keys=None):
    """AROUND HiRadixCache.prefetch_from_storage: queue instead of dropping when the budget is
    taken or others already wait."""
    matched = last_host_node
    wait = ()  # page hashes whose storage writes this refetch waits for
    if not getattr(cache, DRAINING, False):  # a queued one was counted when it arrived
        count_arrival(cache, last_host_node, len(new_input_tokens))
        _stamp(cache, ARRIVED, req_id)
        # --dualpath-refetch-host-hits (not for EAGLE's bigram keys, whose node keys overlap)
        if _enabled(cache) and _settings(cache).refetch and not getattr(cache, "is_eagle", False):
            prune(cache)  # acked writes (also for the queue's order below)
            anchor, again = host_only_suffix(last_host_node)
            # the root's key has no extra_key (LoRA, cache salt): a read anchored there would
            # land in the wrong namespace, so such a request keeps its host hit
            salted = (getattr(anchor, "parent", None) is None
                      and getattr(last_host_node.key, "extra_key", None) is not None)
            if len(again) and not salted:
                STATS["pf_refetched_tokens"] += len(again)
                wait = suffix_hashes(last_host_node, anchor)
                wait = wait if writing(cache, wait) else ()
                last_host_node = anchor
                new_input_tokens = join_tokens(again, new_input_tokens)
                last_hash = (anchor.get_last_hash_value()
                             if getattr(anchor, "hash_value", None) else None)
                prefix_keys = (cache.get_prefix_hash_values(anchor)
                               if getattr(cache, "hicache_storage_pass_prefix_keys", False)
                               else None)
    aligned = len(new_input_tokens) - len(new_input_tokens) % cache.page_size
    if getattr(cache, DRAINING, False) or not _enabled(cache):
        result = original(cache, req_id, last_host_node, new_input_tokens, last_hash,
                          prefix_keys)
        _started(cache, req_id, aligned)
        if _enabled(cache):
            _hold_matched(cache, req_id, last_host_node)
        return result
    cc = cache.cache_controller
    q = _queue(cache)
    _expire(cache, q)
    if wait or (getattr(cache, "enable_storage", False) and aligned >= cache.prefetch_threshold
                and (_ahead(cache, q) or _limited(cache, aligned))
                and stored_prefix(cache, last_host_node, new_input_tokens, last_hash,
                                  prefix_keys)):
        last_host_node.protect_host()  # as stock does for a started prefetch
        q[req_id] = (last_host_node, new_input_tokens, last_hash, prefix_keys, time.monotonic(),
                     wait)
        _QUEUED.inc()
        _WAITING.set(len(q))
        STATS["pf_queued"] += 1
        if wait:
            STATS["pf_waited_write"] += 1
        elif not cc.prefetch_rate_limited():
            STATS["pf_waited_host"] += 1
        log.debug("prefetch of %d tokens for %s queued (budget or host room taken)", aligned,
                  req_id)
        return None
    result = original(cache, req_id, last_host_node, new_input_tokens, last_hash, prefix_keys)
    _started(cache, req_id, aligned)
    # `matched`, not the anchor: a re-anchored read protects the anchor, and the host-only
    # pages below it may go meanwhile (its completed read inserts its own copies)
    _hold_matched(cache, req_id, matched)
    return result


def after_events(result, cache, *args, **kwargs):
    """AFTER HiRadixCache.check_hicache_events (every scheduling pass, once finished
    write-throughs are acknowledged and their nodes unlocked): apply the device-cache budget,
    then the host-cache budget to what it demoted."""
    if trim_device(cache):
        cache._dualpath_trimmed_at = -1e9  # trim the demoted pages now, not 50 ms later
    trim(cache)
    return result


def drain(cache) -> None:
    """Start queued prefetches, oldest first, while the budget allows."""
    q = getattr(cache, ATTR, None)
    if not q:
        return
    _expire(cache, q)
    if _settings(cache).refetch:
        prune(cache)  # acked writes: their waiters may go
    setattr(cache, DRAINING, True)
    try:
        for rid in list(q):
            node, tokens, last_hash, prefix_keys, t0, wait = q[rid]
            if wait and writing(cache, wait):
                continue  # its pages are not all stored yet: the ones behind it may go
            if _limited(cache, len(tokens) - len(tokens) % cache.page_size):
                break
            del q[rid]
            waited = time.monotonic() - t0
            _WAIT_S.observe(waited)
            if wait:
                STATS["pf_write_wait_s_total"] += waited
            cache.prefetch_from_storage(rid, node, tokens, last_hash, prefix_keys)
            node.release_host()  # the started prefetch holds its own protection
    finally:
        setattr(cache, DRAINING, False)
        _WAITING.set(len(q))


def check(original, cache, req_id) -> bool:
    """AROUND HiRadixCache.check_prefetch_progress: start what the budget allows, in order; a
    request whose prefetch is still queued is not ready."""
    _expire_holds(cache)
    trim(cache)
    drain(cache)
    q = getattr(cache, ATTR, None)
    if q and req_id in q:
        return False
    held = getattr(cache, HELD, None)
    if held and req_id in held:  # still waiting for its batch: keep holding
        held[req_id] = (held[req_id][0], time.monotonic())
    pending = cache.ongoing_prefetch.get(req_id)
    if pending is not None and _still_loading(cache, pending[2]):
        return False  # stock's answer, without its per-call tensors and collectives
    done = original(cache, req_id)
    if done:
        started = getattr(cache, STARTED, None)
        loaded = cache.prefetch_loaded_tokens_by_reqid.get(req_id, 0)
        if started and req_id in started:
            t0 = started.pop(req_id)
            STATS["pf_read_all_s_total"] += time.monotonic() - t0
            STATS["pf_done_count"] += 1
            _stamp(cache, DONE, req_id)
            STATS["pf_loaded_tokens"] += loaded
            if loaded == 0:  # revoked: too few pages stored, or no host memory
                STATS["pf_empty"] += 1
            else:  # start to completion as the scheduler saw it: one request's read rate
                STATS["pf_read_s_total"] += time.monotonic() - t0
                STATS["pf_read_tokens_total"] += loaded
        if pending is not None and _enabled(cache):
            deepest = _deepest(cache, pending[0], pending[1])
            if deepest is not pending[0]:  # loaded, or inserted meanwhile by another request
                _hold_node(cache, req_id, deepest)  # until the request runs
            else:  # revoked with nothing new: what the arrival match found is still worth it
                _hold_matched(cache, req_id, pending[0])
        drain(cache)  # this request's prefetch may have freed budget
    return done


def _still_loading(cache, op) -> bool:
    """What stock's `can_terminate_prefetch` answers False to, decided without it: under
    `wait_complete` with one rank, a prefetch neither complete nor terminated. Stock builds a
    tensor and consults the TP groups for it on every call, and the scheduler calls it for every
    waiting request on every loop (6% of the prefill scheduler thread on 2x H100, 17ce76c)."""
    if (getattr(cache, "prefetch_stop_policy", None) != "wait_complete" or not _enabled(cache)
            or op.is_terminated()):
        return False
    for g in (getattr(cache, "attn_cp_group", None), getattr(cache, "attn_tp_group", None)):
        if g is not None and not one_rank(g):
            return False
    n = len(op.hash_value or ())
    return n == 0 or op.completed_tokens != n * cache.page_size


def cached(result, cache, req, *args, **kwargs):
    """AFTER RadixCache.cache_unfinished_req / cache_finished_req: the request ran; its hold
    ends (host_holds.cached) and the wait from its prefetch's completion to its batch is
    metered."""
    rid = getattr(req, "rid", None)
    waited = _since(cache, DONE, rid)
    if waited is not None:
        STATS["pf_to_run_s_total"] += waited
        STATS["pf_ran_count"] += 1
    return host_holds.cached(result, cache, req, *args, **kwargs)


def release(cache, rid) -> None:
    """BEFORE HiRadixCache.release_aborted_request: an aborted request leaves the queue."""
    for attr in (STARTED, ARRIVED, DONE):
        times = getattr(cache, attr, None)
        if times:
            times.pop(rid, None)
    unhold(cache, rid)
    q = getattr(cache, ATTR, None)
    item = q.pop(rid, None) if q else None
    if item is not None:
        item[0].release_host()
        _WAITING.set(len(q))


def reset(result, cache, *args, **kwargs):
    """AFTER HiRadixCache.reset: the tree is new; queued entries point into the old one."""
    q = getattr(cache, ATTR, None)
    if q:
        q.clear()
        _WAITING.set(0)
    for attr in (STARTED, ARRIVED, DONE):
        times = getattr(cache, attr, None)
        if times:
            times.clear()
    forget(cache)  # writes in flight at the reset are never acked
    held = getattr(cache, HELD, None)
    if held:
        held.clear()  # its nodes belong to the old tree
    matched = getattr(cache, MATCHED, None)
    if matched:
        matched.clear()
    return result
