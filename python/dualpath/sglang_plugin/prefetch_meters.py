"""The prefill's storage-prefetch meters (`pf_*` in the agent's stats) and the launcher settings
the prefetch hooks read; counters only, no behaviour of their own (SGLang 0.5.17 HiRadixCache).
"""

from __future__ import annotations

import time
from typing import NamedTuple

SETTINGS = "_dualpath_settings"

# cumulative, for the agent's stats (written on the scheduler thread only)
STATS = {"pf_queued": 0, "pf_waited_host": 0, "pf_started": 0, "pf_empty": 0,
         "pf_loaded_tokens": 0, "pf_asked_tokens": 0,
         # host-pool hits that could not be loaded to the GPU (no device memory): recomputed
         "pf_loadback_failed": 0, "pf_loadback_failed_tokens": 0,
         # host-only pages evicted by --dualpath-host-cache-tokens
         "pf_trimmed_tokens": 0,
         # GPU cache tokens demoted to the host pool by --dualpath-device-cache-tokens
         "pf_device_trimmed_tokens": 0,
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
         # of the matched tokens, those still on the GPU; and the arrivals whose matched host
         # chain was pinned (host_ref_counter > 0 on its path), of them by a storage write
         # still in flight: why a host budget of 0 still leaves prefixes to match
         "pf_arrival_gpu_tokens": 0, "pf_arrival_pinned": 0, "pf_arrival_backup_pending": 0,
         # host-only matched tokens read from storage again (--dualpath-refetch-host-hits)
         "pf_refetched_tokens": 0,
         # of those refetches, the ones queued until the storage writes of their pages were
         # acked (write_wait), and the seconds they waited, summed
         "pf_waited_write": 0, "pf_write_wait_s_total": 0.0,
         # prefetches that loaded something: seconds from start to the scheduler seeing them
         # complete, summed, and the tokens they loaded (per-request read rate = ratio)
         "pf_read_s_total": 0.0, "pf_read_tokens_total": 0,
         "pf_gpu_evicted_tokens": 0,
         # where a prefetched request's time goes on the prefill, summed over requests (means:
         # divide by the count beside each): arrival (SGLang's prefetch call) to the read's
         # start (our queue: budget, host room, a pending write); start to the scheduler
         # seeing it complete, every started prefetch (refetched duplicates load 0 tokens but
         # are read all the same); completion to the request's batch (cache_*_req)
         "pf_to_start_s_total": 0.0, "pf_to_start_count": 0,
         "pf_read_all_s_total": 0.0, "pf_done_count": 0,
         "pf_to_run_s_total": 0.0, "pf_ran_count": 0,
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
# per-request timestamps behind the pf_to_start / pf_read_all / pf_to_run meters (on the cache)
ARRIVED = "_dualpath_prefetch_arrived"  # rid -> when SGLang first asked for its prefetch
DONE = "_dualpath_prefetch_done"  # rid -> when the scheduler saw its prefetch complete
_TIMES_CAP = 65536  # entries of requests that never run (aborted elsewhere) are dropped past it


def _stamp(cache, attr: str, rid) -> None:
    times = getattr(cache, attr, None)
    if times is None:
        times = {}
        setattr(cache, attr, times)
    while len(times) >= _TIMES_CAP:  # the oldest first (insertion order)
        del times[next(iter(times))]
    times[rid] = time.monotonic()


def _since(cache, attr: str, rid) -> float | None:
    times = getattr(cache, attr, None)
    t = times.pop(rid, None) if times else None
    return None if t is None else time.monotonic() - t


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


def evicted(result, cache, *args, **kwargs):
    """AFTER HiRadixCache.evict: count the tokens SGLang's GPU eviction freed."""
    STATS["pf_gpu_evicted_tokens"] += int(getattr(result, "num_tokens_evicted", 0) or 0)
    return result


class Settings(NamedTuple):
    """This process's prefetch-queue settings (sglang_plugin/prefetch_queue.py)."""
    queue: bool  # the queue's hooks act (prefill servers)
    host_budget: int  # --dualpath-host-cache-tokens (-1: none)
    device_budget: int  # --dualpath-device-cache-tokens (-1: none)
    refetch: bool  # --dualpath-refetch-host-hits


def _settings(cache) -> Settings:
    """The launcher's config for this process, read once (the process's role does not
    change). Decode servers get none of it."""
    got = getattr(cache, SETTINGS, None)
    if got is None:
        from dualpath.sglang_plugin import launcher_config

        cfg = launcher_config()
        prefill = cfg is None or cfg.role != "decode"
        mine = cfg is not None and prefill
        got = Settings(prefill, cfg.host_cache_tokens if mine else -1,
                       cfg.device_cache_tokens if mine else -1, mine and cfg.refetch_host_hits)
        setattr(cache, SETTINGS, got)
        global _CACHE
        _CACHE = cache
    return got
