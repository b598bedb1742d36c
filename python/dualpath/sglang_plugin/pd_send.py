"""SGLang's Mooncake PD sender, vectorised for our engine.

Stock `MooncakeKVManager._send_kvcache_generic` (0.5.17) turns a request's KV pages into one
Python tuple per (layer, part, contiguous page run) and hands the engine three Python lists:
~16k tuples for a 16k-token prompt whose pages are scattered (page 64, 32 layers x K/V), tens
of milliseconds of Python per request in the prefill's transfer thread, while NIXL's backend
uses prepared descriptor lists. For the common case (MHA KV, one pool, no custom memory pool)
this builds the same descriptors, in the same order, with numpy and passes the arrays to our
engine (`DualPathPDEngine.accepts_arrays`). Every other case goes to stock unchanged.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

log = logging.getLogger("dualpath.pd_send")
STAMPS = "_dualpath_send_stamps"  # room -> (first chunk queued, last chunk queued or None)
STAMPS_KEPT = 4096  # rooms that never end (their server went away) are dropped past it
_STAMPS_LOCK = threading.Lock()  # the scheduler thread stamps, the transfer threads report
# (start, end) of the latest KV send on this transfer thread: SGLang's worker sends a chunk's
# KV, then (last chunk) the aux data, then marks success, all on one thread
_LAST_SEND = threading.local()


def contiguous_runs(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """(src start, dst start, length) of the runs where both index arrays step by 1: what
    SGLang's `group_concurrent_contiguous` groups, as arrays."""
    brk = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([np.zeros(1, np.int64), brk])
    lengths = np.diff(np.concatenate([starts, np.array([src.size], np.int64)]))
    return src[starts], dst[starts], lengths


def send_kvcache_arrays(original, self, mooncake_session_id, src_data_ptrs, dst_data_ptrs,
                        item_lens, prefill_data_indices, dst_data_indices, executor,
                        state_type=None, force_flat=False, src_layer_ids=None,
                        dst_layer_ids=None, dst_device_data_indices=None,
                        dst_device_data_ptrs=None):
    """AROUND hook of MooncakeKVManager._send_kvcache_generic (see the module docstring)."""
    t0 = time.perf_counter()
    try:
        return _send_kvcache_arrays(original, self, mooncake_session_id, src_data_ptrs,
                                    dst_data_ptrs, item_lens, prefill_data_indices,
                                    dst_data_indices, executor, state_type, force_flat,
                                    src_layer_ids, dst_layer_ids, dst_device_data_indices,
                                    dst_device_data_ptrs)
    finally:
        if state_type is None and not force_flat:  # the KV, not a model's extra state
            _LAST_SEND.span = (t0, time.perf_counter())


def _send_kvcache_arrays(original, self, mooncake_session_id, src_data_ptrs, dst_data_ptrs,
                         item_lens, prefill_data_indices, dst_data_indices, executor,
                         state_type, force_flat, src_layer_ids, dst_layer_ids,
                         dst_device_data_indices, dst_device_data_ptrs):
    src = np.asarray(prefill_data_indices, dtype=np.int64).reshape(-1)
    dst = np.asarray(dst_data_indices, dtype=np.int64).reshape(-1)
    simple = (getattr(self.engine, "accepts_arrays", False)
              and not (self.is_mla_backend or getattr(self, "is_hybrid_mla_backend", False)
                       or force_flat)
              and dst_device_data_indices is None and not self.enable_custom_mem_pool
              and src.size == dst.size)
    if simple:
        src_k, src_v, dst_k, dst_v, layers = self.get_mha_kv_ptrs_with_pp(src_data_ptrs,
                                                                          dst_data_ptrs)
        simple = layers <= len(dst_k)
    if not simple:
        return original(self, mooncake_session_id, src_data_ptrs, dst_data_ptrs, item_lens,
                        prefill_data_indices, dst_data_indices, executor, state_type,
                        force_flat, src_layer_ids, dst_layer_ids, dst_device_data_indices,
                        dst_device_data_ptrs)
    if src.size == 0:
        return 0
    # stock order: K of every layer, then V; within each, the runs in page order
    s_ptr = np.array(list(src_k[:layers]) + list(src_v[:layers]), dtype=np.int64)
    d_ptr = np.array(list(dst_k[:layers]) + list(dst_v[:layers]), dtype=np.int64)
    item = np.array(list(item_lens[:2 * layers]), dtype=np.int64)
    s0, d0, n = contiguous_runs(src, dst)
    return self.engine.batch_transfer_sync(
        mooncake_session_id, (s_ptr[:, None] + s0[None, :] * item[:, None]).reshape(-1),
        (d_ptr[:, None] + d0[None, :] * item[:, None]).reshape(-1),
        (n[None, :] * item[:, None]).reshape(-1))


def stamp_enqueue(original, self, bootstrap_room, kv_indices, index_slice, is_last_chunk,
                  *args, **kwargs):
    """AROUND MooncakeKVManager.add_transfer_request (prefill): when each request's chunks
    were queued for the transfer threads."""
    now = time.perf_counter()
    with _STAMPS_LOCK:
        stamps = getattr(self, STAMPS, None)
        if stamps is None:
            stamps = {}
            setattr(self, STAMPS, stamps)
        first = stamps.get(bootstrap_room, (now, None))[0]
        while len(stamps) >= STAMPS_KEPT and bootstrap_room not in stamps:
            del stamps[next(iter(stamps))]
        stamps[bootstrap_room] = (first, now if is_last_chunk else None)
    return original(self, bootstrap_room, kv_indices, index_slice, is_last_chunk, *args,
                    **kwargs)


def report_send(original, self, bootstrap_room, status):
    """AROUND MooncakeKVManager.update_status: once a request's send succeeded, log how long
    the sender took from its last chunk's queueing (the transfer thread's wait for the chunk,
    the KV copy and the aux data; SGLang 0.5.17 marks success before it tells the decode, so
    not that message): what forward + send adds to our engine's own copy time (pd_transfer
    reads it)."""
    result = original(self, bootstrap_room, status)
    stamps = getattr(self, STAMPS, None)
    if stamps and bootstrap_room in stamps:
        from sglang.srt.disaggregation.base.conn import KVPoll

        if status in (KVPoll.Success, KVPoll.Failed):
            with _STAMPS_LOCK:
                first, last = stamps.pop(bootstrap_room, (None, None))
            if status == KVPoll.Success and last is not None:
                now = time.perf_counter()
                log.info("pd send room %s: %.2f ms from the last chunk queued to success "
                         "(%.2f ms from the first)%s", bootstrap_room, 1e3 * (now - last),
                         1e3 * (now - first), _breakdown(last, now))
    return result


def _breakdown(queued: float, done: float) -> str:
    """Where the sender's time went, from this thread's latest KV send when that was the last
    chunk's (it started after the chunk was queued): the wait for the transfer thread, the KV
    send (descriptors + engine), and what came after it (aux data, status). A last chunk
    without pages sends no KV: then an earlier request's send on this thread that started
    after this chunk was queued (a backlog) would be taken for it; rare, and only the split
    is wrong, not the total."""
    span = getattr(_LAST_SEND, "span", None)
    _LAST_SEND.span = None  # each send explains one request at most
    if span is None or not queued <= span[0] <= span[1] <= done:
        return ""
    return (f"; wait {1e3 * (span[0] - queued):.2f} ms, kv send {1e3 * (span[1] - span[0]):.2f}"
            f" ms, after {1e3 * (done - span[1]):.2f} ms")
