"""Load numbers the router's scheduler needs, read from a live SGLang Scheduler (0.5.17).

Read from the agent's thread while the scheduler runs: each number is a snapshot that may be a
step old (`len()` of a list is atomic; iterations work on copies). Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    seq: int = 0
    tok: int = 0
    free_kv_tokens: int = 0


def _reqs(q) -> list:
    if q is None:
        return []
    items = getattr(q, "queue", q)  # the PD queues keep their requests in .queue
    try:
        items = list(items)
    except TypeError:
        return []
    return [getattr(x, "req", x) for x in items]  # DecodeRequest wraps a Req


def _prompt_len(req) -> int:
    ids = getattr(req, "origin_input_ids", None)
    return len(ids) if ids is not None else 0


def scheduler_load(s, role: str) -> Load:
    """Unfinished requests and their prompt tokens, and the KV slots a new request can get
    (free + evictable), of one scheduler."""
    if s is None:
        return Load()
    try:
        reqs = _reqs(getattr(s, "waiting_queue", None))
        running = getattr(s, "running_batch", None)
        reqs += list(getattr(running, "reqs", None) or [])
        if role == "prefill":
            reqs += _reqs(getattr(s, "disagg_prefill_bootstrap_queue", None))
            reqs += _reqs(getattr(s, "disagg_prefill_inflight_queue", None))
        else:
            reqs += _reqs(getattr(s, "disagg_decode_prealloc_queue", None))
            reqs += _reqs(getattr(s, "disagg_decode_transfer_queue", None))
        alloc = getattr(s, "token_to_kv_pool_allocator", None)
        free = int(alloc.available_size()) if alloc is not None else 0
        # what a new request can get: free slots and what the radix cache would evict for it
        # (SGLang admits against the same sum). Free slots alone shrink as finished requests'
        # KV stays cached, and the router then admits nothing to a decode whose pool is full of
        # evictable prefixes (a replay stalled at 271 of 289 turns on 2x H100, 17ce76c)
        cache = getattr(s, "tree_cache", None)
        if cache is not None and hasattr(cache, "evictable_size"):
            free += int(cache.evictable_size())
        if role == "decode":  # less the decode steps SGLang reserves for its active requests
            pq = getattr(s, "disagg_decode_prealloc_queue", None)
            reserve = getattr(pq, "_active_reserved_tokens", None)
            if callable(reserve):
                free -= int(reserve())
        return Load(seq=len(reqs), tok=sum(_prompt_len(r) for r in reqs),
                    free_kv_tokens=max(0, free))
    except Exception:  # noqa: BLE001  (a torn read: report nothing rather than fail the poll)
        return Load()


class BusyMeter:
    """Seconds an engine had unfinished requests, from the request counts seen at successive
    stats reads: an interval counts whole when both ends saw work and half when one did (the
    router polls about twice a second). With the tokens it finished, the router's measured
    prefill rate behind beta.

    This is occupancy, not compute: waiting for storage reads, decode room or the KV send
    counts as busy. The rate is then the prefill's throughput under load, whatever binds it, and
    beta (rate x window) admits about a window's worth of work at that throughput. A storage-
    bound prefill is not starved by its reads, and a faster one is not held to a stale initial
    rate."""

    def __init__(self) -> None:
        self.busy_s = 0.0
        self._last: tuple[float, int] | None = None

    def observe(self, seq: int, now: float) -> float:
        if self._last is not None:
            t0, seq0 = self._last
            if now > t0:  # work at both ends: the whole interval; at one end: half of it
                self.busy_s += (now - t0) * ((seq0 > 0) + (seq > 0)) / 2
        self._last = (now, seq)
        return self.busy_s
