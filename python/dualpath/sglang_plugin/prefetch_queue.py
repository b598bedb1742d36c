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
- Also here, because they are the same host-pool policy: `trim` (--dualpath-host-cache-tokens:
  host-only pages beyond a budget are evicted, so the pool stages rather than caches) and
  `count_load_back` (a meter of host hits the GPU had no room to load). `STATS` counts it all
  for the agent's stats (`pf_*`).
State lives on the HiRadixCache instance; everything runs on the scheduler thread.
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
DRAINING = "_dualpath_prefetch_draining"
QUEUE_TTL_S = 300.0
HOLD_TTL_S = 120.0  # a held prefix whose request is not checked this long is released
HELD = "_dualpath_prefetch_held"
MATCHED = "_dualpath_matched_hold_tokens"  # req id -> host tokens its arrival-match hold covers
# arrival-match holds protect at most this share of the host pool: beyond it a match is not
# held (stock behaviour), so write-through and prefetches keep room
MATCHED_HOLD_SHARE = 0.5
TRIM_EVERY_S = 0.05
STARTED = "_dualpath_prefetch_started"
SETTINGS = "_dualpath_settings"

# cumulative, for the agent's stats (written on the scheduler thread only)
STATS = {"pf_queued": 0, "pf_waited_host": 0, "pf_started": 0, "pf_empty": 0,
         "pf_loaded_tokens": 0, "pf_asked_tokens": 0,
         # host-pool hits that could not be loaded to the GPU (no device memory): recomputed
         "pf_loadback_failed": 0, "pf_loadback_failed_tokens": 0,
         # host-only pages evicted by --dualpath-host-cache-tokens
         "pf_trimmed_tokens": 0,
         # completed prefetches held for their request; of those, released unused after
         # HOLD_TTL_S
         "pf_held": 0, "pf_hold_expired": 0,
         # of the holds, those of a prefix matched in the host pool on arrival
         "pf_held_matched": 0,
         # arrival matches not held because holds already covered MATCHED_HOLD_SHARE of the pool
         "pf_hold_skipped_room": 0,
         # what each request's arrival match found in the prefill's GPU and host pools (tokens
         # up to SGLang's last host node) and what was left to fetch or compute; and the tokens
         # SGLang's own GPU eviction freed: where the prefill's own reuse went
         "pf_arrival_matched_tokens": 0, "pf_arrival_new_tokens": 0,
         "pf_gpu_evicted_tokens": 0,
         # storage prefetches that raised and were terminated (hooks.guard_page_transfer)
         "pf_io_errors": 0,
         # why a prefetch_from_storage call started nothing: budget taken (SGLang's
         # prefetch_rate_limited) with nothing stored to queue for, or fewer new tokens than
         # the prefetch threshold
         "pf_calls": 0, "pf_refused_budget": 0, "pf_refused_short": 0,
         # write-through copies the host pool had no room for, even after evicting: those
         # pages are neither mirrored in the host pool nor backed up to storage from it, so a
         # later turn finds them nowhere once the GPU evicts them
         "pf_write_through_failed": 0, "pf_write_through_failed_tokens": 0}
# the process's HiRadixCache (it lives as long as the scheduler; set when its settings are
# first read), for the gauges
_CACHE = None


def count_write_backup(result, cache, node, write_back=False):
    """AFTER HiRadixCache.write_backup (a meter, behaviour unchanged): stock returns 0 both when
    it skips a node whose parent is not backed up yet and when the host pool had no room; count
    the second."""
    if result == 0 and getattr(node, "host_value", None) is None:
        parent = getattr(node, "parent", None)
        if parent is None or parent is getattr(cache, "root_node", None) or getattr(
                parent, "backuped", False):
            STATS["pf_write_through_failed"] += 1
            value = getattr(node, "value", None)
            STATS["pf_write_through_failed_tokens"] += len(value) if value is not None else 0
    return result


def count_load_back(original, cache, params):
    """AROUND HiRadixCache.init_load_back (a meter, behaviour unchanged): a prefix found in the
    host pool (from storage or kept there) that the GPU had no room to load is recomputed; count
    those (stock says nothing about them)."""
    node = params.best_match_node
    evicted = getattr(node, "evicted", False)
    result = original(cache, params)
    # the hold stays: the scheduler may still turn the request away after the load (no room
    # in this batch), and the loaded pages, unlocked on the GPU, could then be evicted from
    # both pools before it runs; cache_*_req, abort or the TTL end it (a hold on pages that
    # are on the GPU blocks nothing: evict_host frees only pages no longer there)
    if evicted and len(result[0]) == 0:
        n = 0
        while node is not None and getattr(node, "evicted", False):
            n += len(node.host_value) if node.host_value is not None else 0
            node = node.parent
        STATS["pf_loadback_failed"] += 1
        STATS["pf_loadback_failed_tokens"] += n
    return result


def snapshot() -> dict:
    """The counters, and gauges read now from the cache: tokens the started prefetches count
    against SGLang's budget (and the budget), prefetches in flight, free host-pool tokens."""
    cache = _CACHE
    if cache is None:
        return dict(STATS)
    cc = cache.cache_controller
    pool = getattr(cc, "mem_pool_host", None)
    return {**STATS,
            "pf_budget_used_tokens_now": int(getattr(cc, "prefetch_tokens_occupied", 0)),
            "pf_budget_tokens_now": int(getattr(cc, "prefetch_capacity_limit", 0)),
            "pf_in_flight_now": len(getattr(cache, "ongoing_prefetch", ())),
            "pf_host_free_tokens_now": int(pool.available_size()) if pool is not None else 0}


def evictable_host_tokens(cache) -> int:
    """Tokens `evict_host` can free now: host-only leaves nobody holds."""
    return sum(len(n.host_value) for n in getattr(cache, "evictable_host_leaves", ())
               if n.evicted and n.host_ref_counter == 0 and n.host_value is not None)


def host_room(cache) -> int | None:
    """Host-pool tokens a new prefetch could get now (None: the cache has no host pool to ask)."""
    pool = getattr(cache.cache_controller, "mem_pool_host", None)
    if pool is None:
        return None
    evictable = evictable_host_tokens(cache)
    pending = sum(len(key) for _, key, op in cache.ongoing_prefetch.values()
                  if getattr(op, "host_indices", None) is None)
    return pool.available_size() + evictable - pending


def _no_room(cache, tokens: int) -> bool:
    """Would a prefetch of `tokens` find no host memory? Never while nothing is in flight."""
    if not cache.ongoing_prefetch:
        return False
    room = host_room(cache)
    return room is not None and room < tokens


def trimmable_host_tokens(cache) -> int:
    """Host-only tokens `evict_host` frees when asked for everything: the evictable leaves and,
    above each, the host-only ancestors it frees on its way up as they become leaves (an agent's
    context is a chain of one node per turn, and only its last turn is a leaf). An ancestor with
    a held or GPU-resident branch is counted too though it stays: the excess asked is then an
    upper bound, and `evict_host` stops when it runs out of leaves."""
    seen, n = set(), 0
    for node in getattr(cache, "evictable_host_leaves", ()):
        while (node is not None and id(node) not in seen and node.evicted  # the root is not
               and node.host_ref_counter == 0 and node.host_value is not None):
            seen.add(id(node))
            n += len(node.host_value)
            node = getattr(node, "parent", None)
    return n


def trim(cache) -> int:
    """With --dualpath-host-cache-tokens N: evict host-only pages (LRU) beyond N, at most every
    TRIM_EVERY_S; returns the tokens freed. The host pool then stages loads (and mirrors the
    GPU pool under write-through) instead of caching prefixes, as DualPath's buffers do: on a
    scaled-down benchmark host, DRAM would otherwise hold a share of the working set no real
    deployment's DRAM holds. Counts whole host-only chains, not their leaves only: counting
    leaves freed one turn of each agent's chain per call, so a prefix outlived the gap to its
    agent's next turn and the host pool cached the working set (2x H100, fea747e: 76% of the
    prompt tokens came from host memory unread, storage NIC 36% busy)."""
    budget = _settings(cache)[1]
    if budget < 0 or getattr(cache, "tp_world_size", 1) > 1:  # TP ranks would evict apart
        return 0
    now = time.monotonic()
    if now - getattr(cache, "_dualpath_trimmed_at", -1e9) < TRIM_EVERY_S:
        return 0
    cache._dualpath_trimmed_at = now
    excess = trimmable_host_tokens(cache) - budget
    if excess <= 0:
        return 0
    pool = cache.cache_controller.mem_pool_host
    before = pool.available_size()
    cache.evict_host(excess)
    freed = max(0, pool.available_size() - before)
    STATS["pf_trimmed_tokens"] += freed
    return freed


def _deepest(cache, node, key):
    """The deepest node under `node` whose path spells a prefix of `key` (whole nodes only):
    where a completed prefetch's pages end in the tree."""
    while len(key):
        child = node.children.get(key.child_key(cache.page_size))
        if child is None:
            break
        n = child.key.match(key, page_size=cache.page_size)
        if n < len(child.key):
            break
        node, key = child, key[n:]
    return node


def _path_len(node, attr: str) -> int:
    """Sum of len(node.<attr>) on the tree path from the root to `node`."""
    n = 0
    while node is not None and getattr(node, "parent", None) is not None:
        v = getattr(node, attr, None)
        n += len(v) if v is not None else 0
        node = node.parent
    return n


def _prefix_host_tokens(node) -> int:
    """Host-pool tokens on the path from the root to `node` (what holding `node` protects)."""
    return _path_len(node, "host_value")


def _path_tokens(node) -> int:
    """Prompt tokens a match ending at `node` found (its path's keys)."""
    return _path_len(node, "key")


def evicted(result, cache, *args, **kwargs):
    """AFTER HiRadixCache.evict: count the tokens SGLang's GPU eviction freed."""
    STATS["pf_gpu_evicted_tokens"] += int(getattr(result, "num_tokens_evicted", 0) or 0)
    return result


def _hold_matched(cache, req_id, node) -> None:
    """Hold what the request's arrival match found in the host pool (`last_host_node`; the
    root holds nothing) while no prefetch of its own protects it, and while such holds cover
    at most MATCHED_HOLD_SHARE of the pool (shared prefixes are counted once per request)."""
    if getattr(node, "parent", None) is None or req_id in cache.ongoing_prefetch:
        return
    matched = getattr(cache, MATCHED, None)
    if matched is None:
        matched = {}
        setattr(cache, MATCHED, matched)
    tokens = _prefix_host_tokens(node)
    size = getattr(getattr(cache.cache_controller, "mem_pool_host", None), "size", None)
    if size is not None and sum(matched.values()) + tokens > MATCHED_HOLD_SHARE * size:
        STATS["pf_hold_skipped_room"] += 1
        return
    if _hold_node(cache, req_id, node):
        matched[req_id] = tokens
        STATS["pf_held_matched"] += 1


def _hold_node(cache, req_id, node) -> bool:
    held = getattr(cache, HELD, None)
    if held is None:
        held = {}
        setattr(cache, HELD, held)
    if req_id in held:
        return False
    node.protect_host()
    held[req_id] = (node, time.monotonic())
    STATS["pf_held"] += 1
    return True


def unhold(cache, req_id) -> None:
    matched = getattr(cache, MATCHED, None)
    if matched:
        matched.pop(req_id, None)
    held = getattr(cache, HELD, None)
    item = held.pop(req_id, None) if held else None
    if item is not None:
        item[0].release_host()


def cached(result, cache, req, *args, **kwargs):
    """AFTER RadixCache.cache_unfinished_req / cache_finished_req: the request ran (its prefix
    came from the GPU, or was loaded, or was recomputed), so a hold for it has done its job."""
    unhold(cache, getattr(req, "rid", None))
    return result


def _expire_holds(cache) -> None:
    held = getattr(cache, HELD, None)
    if not held:
        return
    now = time.monotonic()
    for rid in [r for r, (_, t) in held.items() if now - t > HOLD_TTL_S]:
        unhold(cache, rid)
        STATS["pf_hold_expired"] += 1
        log.info("prefetched prefix of %s released unused after %.0f s", rid, HOLD_TTL_S)


def _limited(cache, tokens: int) -> bool:
    return cache.cache_controller.prefetch_rate_limited() or _no_room(cache, tokens)


def _started(cache, req_id, tokens: int) -> None:
    STATS["pf_calls"] += 1
    if req_id not in cache.ongoing_prefetch:
        if tokens < getattr(cache, "prefetch_threshold", 0):
            STATS["pf_refused_short"] += 1
        elif cache.cache_controller.prefetch_rate_limited():
            STATS["pf_refused_budget"] += 1
        return
    started = getattr(cache, STARTED, None)
    if started is None:
        started = {}
        setattr(cache, STARTED, started)
    started[req_id] = tokens
    STATS["pf_started"] += 1
    STATS["pf_asked_tokens"] += tokens


def _queue(cache) -> OrderedDict:
    q = getattr(cache, ATTR, None)
    if q is None:
        q = OrderedDict()
        setattr(cache, ATTR, q)
    return q


def _settings(cache) -> tuple[bool, int]:
    """(queue on, host-cache budget) of this process: the launcher's config, read once (the
    process's role does not change). Decode servers get neither."""
    got = getattr(cache, SETTINGS, None)
    if got is None:
        from dualpath.sglang_plugin import launcher_config

        cfg = launcher_config()
        prefill = cfg is None or cfg.role != "decode"
        got = (prefill, cfg.host_cache_tokens if cfg is not None and prefill else -1)
        setattr(cache, SETTINGS, got)
        global _CACHE
        _CACHE = cache
    return got


def _enabled(cache) -> bool:
    return getattr(cache, "tp_world_size", 1) <= 1 and _settings(cache)[0]


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
        log.warning("queued prefetch of %s dropped after %.0f s (request gone?)", rid,
                    now - item[4])
    _WAITING.set(len(q))


def prefetch(original, cache, req_id, last_host_node, new_input_tokens, last_hash=None,
             prefix_keys=None):
    """AROUND HiRadixCache.prefetch_from_storage: queue instead of dropping when the budget is
    taken or others already wait."""
    aligned = len(new_input_tokens) - len(new_input_tokens) % cache.page_size
    if not getattr(cache, DRAINING, False):  # a queued one was counted when it arrived
        STATS["pf_arrival_matched_tokens"] += _path_tokens(last_host_node)
        STATS["pf_arrival_new_tokens"] += len(new_input_tokens)
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
    if (getattr(cache, "enable_storage", False) and aligned >= cache.prefetch_threshold
            and (q or _limited(cache, aligned))
            and stored_prefix(cache, last_host_node, new_input_tokens, last_hash, prefix_keys)):
        last_host_node.protect_host()  # as stock does for a started prefetch
        q[req_id] = (last_host_node, new_input_tokens, last_hash, prefix_keys, time.monotonic())
        _QUEUED.inc()
        _WAITING.set(len(q))
        STATS["pf_queued"] += 1
        if not cc.prefetch_rate_limited():
            STATS["pf_waited_host"] += 1
        log.debug("prefetch of %d tokens for %s queued (budget or host room taken)", aligned,
                  req_id)
        return None
    result = original(cache, req_id, last_host_node, new_input_tokens, last_hash, prefix_keys)
    _started(cache, req_id, aligned)
    _hold_matched(cache, req_id, last_host_node)
    return result


def drain(cache) -> None:
    """Start queued prefetches, oldest first, while the budget allows."""
    q = getattr(cache, ATTR, None)
    if not q:
        return
    _expire(cache, q)
    setattr(cache, DRAINING, True)
    try:
        while q:
            rid, (node, tokens, last_hash, prefix_keys, t0) = next(iter(q.items()))
            if _limited(cache, len(tokens) - len(tokens) % cache.page_size):
                break
            q.popitem(last=False)
            _WAIT_S.observe(time.monotonic() - t0)
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
    done = original(cache, req_id)
    if done:
        started = getattr(cache, STARTED, None)
        loaded = cache.prefetch_loaded_tokens_by_reqid.get(req_id, 0)
        if started and req_id in started:
            started.pop(req_id)
            STATS["pf_loaded_tokens"] += loaded
            if loaded == 0:  # revoked: too few pages stored, or no host memory
                STATS["pf_empty"] += 1
        if pending is not None and _enabled(cache):
            deepest = _deepest(cache, pending[0], pending[1])
            if deepest is not pending[0]:  # loaded, or inserted meanwhile by another request
                _hold_node(cache, req_id, deepest)  # until the request runs
            else:  # revoked with nothing new: what the arrival match found is still worth it
                _hold_matched(cache, req_id, pending[0])
        drain(cache)  # this request's prefetch may have freed budget
    return done


def release(cache, rid) -> None:
    """BEFORE HiRadixCache.release_aborted_request: an aborted request leaves the queue."""
    started = getattr(cache, STARTED, None)
    if started:
        started.pop(rid, None)
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
    started = getattr(cache, STARTED, None)
    if started:
        started.clear()
    held = getattr(cache, HELD, None)
    if held:
        held.clear()  # its nodes belong to the old tree
    matched = getattr(cache, MATCHED, None)
    if matched:
        matched.clear()
    return result
