"""The prefill's pools as DualPath uses them (SGLang 0.5.17 HiRadixCache): room for prefetches,
`trim` (--dualpath-host-cache-tokens: host-only pages beyond a budget are evicted, so the pool
stages rather than caches; `trim_device` does the same for the GPU cache with
--dualpath-device-cache-tokens), and holds that keep a request's prefix (prefetched, or matched
on arrival) in the pool until the request has run. Why each exists, with the measurements, is
in prefetch_queue's docstring. Everything runs on the scheduler thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from array import array

from dualpath.sglang_plugin.prefetch_meters import STATS, _settings

log = logging.getLogger("dualpath.prefetch_queue")
HOLD_TTL_S = 120.0  # a held prefix whose request is not checked this long is released
HELD = "_dualpath_prefetch_held"
MATCHED = "_dualpath_matched_hold_tokens"  # req id -> host tokens its arrival-match hold covers
# arrival-match holds protect at most this share of the host pool: beyond it a match is not
# held (stock behaviour), so write-through and prefetches keep room
MATCHED_HOLD_SHARE = 0.5
TRIM_EVERY_S = 0.05


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


def _freeable(node) -> bool:
    return (node is not None and node.evicted  # the root is not evicted
            and node.host_ref_counter == 0 and node.host_value is not None)


def trimmable_host_tokens(cache) -> int:
    """Host-only tokens `evict_host` frees when asked for everything: the evictable leaves and,
    above them, each host-only ancestor whose children all go (SGLang frees a parent once it
    becomes a leaf; an agent's context is a chain of one node per turn, only its last turn a
    leaf). A parent with a held, GPU-resident or backed-up-elsewhere child stays and is not
    counted."""
    seen: set[int] = set()
    n = 0
    todo = [x for x in getattr(cache, "evictable_host_leaves", ()) if _freeable(x)]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        n += len(node.host_value)
        parent = getattr(node, "parent", None)
        if (_freeable(parent) and id(parent) not in seen
                and all(id(c) in seen for c in parent.children.values())):
            todo.append(parent)
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
    budget = _settings(cache).host_budget
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


def trim_device(cache) -> int:
    """With --dualpath-device-cache-tokens N: demote unlocked GPU-cache tokens beyond N (LRU) to
    the host pool, at most every TRIM_EVERY_S; returns the tokens freed. Only nodes with a host
    copy are demoted, as SGLang's own `_evict_backuped` does (its `evict` would also drop
    leaves without one: a write-through that found no host room, or whose parent had none);
    a node still being written through is locked and stays. The demoted pages are then
    host-only and `trim` evicts them. With N = 0 the prefill's HBM holds only requests in
    flight, as the paper's PE does (layerwise prefill, no HBM cache across requests): a
    scaled-down host's HBM would otherwise cache a share of the working set (2x H100, 0fe34d5:
    63% of the prompt tokens matched on arrival, storage NIC 64% busy, the baseline never
    storage-bound)."""
    budget = _settings(cache).device_budget
    if budget < 0 or getattr(cache, "tp_world_size", 1) > 1:
        return 0
    now = time.monotonic()
    if now - getattr(cache, "_dualpath_device_trimmed_at", -1e9) < TRIM_EVERY_S:
        return 0
    cache._dualpath_device_trimmed_at = now
    excess = cache.evictable_size() - budget
    if excess <= 0:
        return 0
    prio = cache.eviction_strategy.get_priority
    alloc = cache.cache_controller.mem_pool_device_allocator
    heap = [(prio(n), n) for n in cache.evictable_leaves if n.backuped]
    heapq.heapify(heap)
    freed = 0
    while freed < excess and heap:
        _, x = heapq.heappop(heap)
        if x.lock_ref > 0 or x.evicted or not x.backuped:
            continue
        pages = x.value
        freed += cache._detach_backuped(x)  # SGLang's _evict_backuped, but the pages are
        # freed without the allocator's free(), whose torch.unique syncs the GPU once per node
        # (5% of the prefill scheduler thread at a4d1e69): a node's pages are whole and its
        # tokens consecutive per page, which free_segment relies on
        alloc.free_segment(pages, start_pos=0)
        p = x.parent
        if (p is not cache.root_node and p.backuped and not p.evicted and p.lock_ref == 0
                and all(c.evicted for c in p.children.values())):
            heapq.heappush(heap, (prio(p), p))  # a parent becomes a leaf once its children go
    STATS["pf_device_trimmed_tokens"] += freed
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


def count_arrival(cache, node, new_tokens: int) -> None:
    """Meter what a request's arrival match found (`node`: SGLang's last host node): tokens in
    all, those still on the GPU, and whether its chain was pinned in the host pool, by a
    storage write in flight or otherwise."""
    STATS["pf_arrival_new_tokens"] += new_tokens
    backing = {id(n) for n in getattr(cache, "ongoing_backup", {}).values()}
    matched = gpu = pinned = pending = 0
    while node is not None and getattr(node, "parent", None) is not None:
        matched += len(node.key)
        if getattr(node, "value", None) is not None:
            gpu += len(node.key)
        pinned |= getattr(node, "host_ref_counter", 0) > 0
        pending |= id(node) in backing
        node = node.parent
    STATS["pf_arrival_matched_tokens"] += matched
    STATS["pf_arrival_gpu_tokens"] += gpu
    STATS["pf_arrival_pinned"] += int(pinned)
    STATS["pf_arrival_backup_pending"] += int(pending)


def join_tokens(*parts):
    """Concatenate token sequences as SGLang keeps them: an array('q') if any part is one (its
    RadixKey.match asserts both sides have the same type), else a list."""
    arr = next((p for p in parts if isinstance(p, array)), None)
    chained = itertools.chain.from_iterable(parts)
    return array(arr.typecode, chained) if arr is not None else list(chained)


def host_only_suffix(node):
    """(anchor, tokens): the deepest node on `node`'s path that is still on the GPU (or the
    root), and the tokens of the host-only nodes below it down to `node`, in order (SGLang's
    token type): what a prefetch anchored there reads again."""
    parts = []
    while (node is not None and getattr(node, "parent", None) is not None
           and getattr(node, "value", None) is None):
        key = node.key
        parts.append(key.raw_token_ids() if hasattr(key, "raw_token_ids") else key.token_ids)
        node = node.parent
    return node, join_tokens(*reversed(parts))


def _prefix_host_tokens(node) -> int:
    """Host-pool tokens on the path from the root to `node` (what holding `node` protects)."""
    return _path_len(node, "host_value")


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
