"""A finished prefill's KV page indices read without waiting for the forward that follows it
(--dualpath-async-page-indices; SGLang 0.5.17, overlap event loop of the PD prefill).

After launching batch N, SGLang's overlap loop applies its write-after-read barrier: for an
eager prefill the schedule stream waits for the whole forward N (`_apply_war_barrier`, the
coarse `wait_stream`). It then processes batch N-1, and `send_kv_chunk` reads each finished
request's KV indices with `kv_to_page_indices`, a `.cpu()` on the schedule stream, so the CPU
waits for forward N before it can send N-1's KV or schedule N+1. On 2x H100 (a4d1e69, stack
samples of a 1P1D run) 27% of the prefill scheduler thread waited there, and the prefill GPU
was 66% busy.

The indices are a row slice of `req_to_token`, written on the schedule stream before forward
N-1 ran; `process_batch_result_disagg_prefill` has waited for N-1's results (`copy_done`), so
those writes are done. But right before a last chunk is sent, SGLang caches the request
(`maybe_cache_unfinished_req`): where the insert finds tokens another request already cached
beyond the request's protected prefix, it frees the request's duplicate pages and rewrites
that part of the row with the tree's pages, on the schedule stream, behind forward N. A side
read would get the freed pages, which a later batch may overwrite while they are sent. So
the hooks note, per request, whether its last cache insert found nothing beyond its
protected prefix (then the rewrite writes the values already there), and take the side read
only for such a request's last chunk sent from result processing, for a slice of
`req_to_token` itself (a sliding-window model's translated indices are a new tensor, written
behind forward N too). The slice is copied to pinned memory on a side stream (the copy
engine, no kernel) and only that copy is waited for. Anywhere else SGLang's function runs.

Early sends. `run_batch` calls `maybe_send_cached_prefix_chunk` for each request of batch N+1
before launching its forward, so that the device-cached prefix's KV goes to the decode while
the suffix is computed. Its `send_kv_chunk` reads the page indices with the same `.cpu()`, then
behind the barrier on forward N and the writes of N+1's rows: the CPU waits for forward N
before it can launch N+1 (17-22% of the prefill scheduler thread in session 18's 1P1D runs,
2x H100, with the option on). With the option on, the hook starts the slice's copy on the side
stream, ordered after the schedule stream's work so far by an event (no CPU wait), and returns;
the send itself (SGLang's `send_kv_chunk`, handed the copied indices) happens once the copy is
done: at the end of the next result processing (which waited for forward N), before any other
send of that request (its next early send included), or in a later loop iteration once the copy
finished (the inflight-queue pass runs every iteration). The range
and `start_send_idx` are checked again then; a request that finished or whose range moved is
not sent early (its later sends cover the range, as when stock skips an early send).

Measured on 2x H100 (session 18): same greedy outputs with the option on (last chunks only, as
above) and off, KV transfer p50 7.4 -> 8.4-12.2 GB/s. The early sends' deferral is not yet
measured.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

_STATE = threading.local()  # the scheduler thread's: inside result processing / a last chunk
_STREAMS: dict = {}


def in_result_processing(original, self, batch, result, *args, **kwargs):
    """AROUND SchedulerDisaggregationPrefillMixin.process_batch_result_disagg_prefill. Marks
    it only when SGLang waits there for the batch's results (`copy_done`: the overlap loop),
    which orders everything the batch's forward depended on before the reads. Then sends the
    early chunks deferred while this batch's successor was launched (their copies waited for
    this batch's forward only)."""
    _STATE.result = getattr(result, "copy_done", None) is not None
    try:
        out = original(self, batch, result, *args, **kwargs)
    except BaseException:
        drop_early_sends(self)  # later sends cover their ranges; keep the error as it is
        raise
    finally:
        _STATE.result = False
    flush_early_sends(self, wait=True)
    return out


def after_inflight_queue(result, self, *args, **kwargs):
    """AFTER SchedulerDisaggregationPrefillMixin.process_disagg_prefill_inflight_queue (every
    loop iteration): deferred early sends whose copies are done go out, also in iterations
    without result processing (the first batch after idle, DP-attention idle batches)."""
    flush_early_sends(self, wait=False)
    return result


def cache_unfinished_req(original, cache, req, *args, **kwargs):
    """AROUND RadixCache.cache_unfinished_req: note whether the insert found cached tokens
    beyond the request's protected prefix (then its row is rewritten with other pages)."""
    before = getattr(req, "cache_protected_len", None)
    _STATE.watch, _STATE.insert_prefix = True, None
    try:
        return original(cache, req, *args, **kwargs)
    finally:
        _STATE.watch = False
        found = _STATE.insert_prefix
        req._dualpath_row_final = before is not None and found is not None and found <= before


def insert(original, cache, *args, **kwargs):
    """AROUND RadixCache.insert / HiRadixCache.insert: the prefix length the insert found, for
    the cache_unfinished_req it runs in."""
    result = original(cache, *args, **kwargs)
    if getattr(_STATE, "watch", False):
        _STATE.insert_prefix = getattr(result, "prefix_len", None)
    return result


def send_kv_chunk(original, self, req, last_chunk: bool = False, end_idx=None):
    """AROUND SchedulerDisaggregationPrefillMixin.send_kv_chunk: marks a last chunk sent from
    result processing of a request whose row its last cache insert left as it was; defers an
    early send (see the module doc), and sends a deferred one before any other of its
    request."""
    final = getattr(req, "_dualpath_row_final", False)  # before a flush's send clears it
    if getattr(_STATE, "early", False) and not last_chunk and end_idx is not None:
        if _defer_early_send(self, req, end_idx):
            return None
    elif getattr(req, "rid", None) in _pending(self):
        _flush_one(self, _pending(self).pop(req.rid), wait=True)
    _STATE.fast = bool(getattr(_STATE, "result", False) and last_chunk and final)
    _STATE.table = _storage_ptr(getattr(getattr(self, "req_to_token_pool", None),
                                        "req_to_token", None))
    try:
        return original(self, req, last_chunk=last_chunk, end_idx=end_idx)
    finally:
        _STATE.fast = False
        req._dualpath_row_final = False  # a later send needs a fresh verdict


def kv_to_page_indices(original, kv_indices, page_size: int) -> np.ndarray:
    """AROUND sglang.srt.disaggregation.prefill.kv_to_page_indices (SGLang's
    `(kv_indices[::page_size] // page_size).cpu().numpy()`)."""
    pre = getattr(_STATE, "precomputed", None)
    if pre is not None:  # a deferred early send: its indices, copied earlier
        _STATE.precomputed = None
        tokens, indices = pre
        if len(kv_indices) == tokens:
            return indices
    if (not getattr(_STATE, "fast", False) or not getattr(kv_indices, "is_cuda", False)
            or not kv_indices.is_contiguous()
            or _storage_ptr(kv_indices) != getattr(_STATE, "table", None)):
        return original(kv_indices, page_size)
    return copy_page_indices(kv_indices, page_size, _side_stream(kv_indices.device))


def _storage_ptr(t):
    """Address of a tensor's storage (None for anything else): a view shares its base's."""
    try:
        return t.untyped_storage().data_ptr()
    except AttributeError:
        return None


def copy_page_indices(kv_indices, page_size: int, stream=None) -> np.ndarray:
    """The same values as SGLang's function: the contiguous slice copied whole to pinned host
    memory on `stream` (None: the current stream, as on the CPU), then strided and divided on
    the CPU. Waits for this copy only."""
    import torch

    on_gpu = stream is not None
    host = torch.empty(kv_indices.shape, dtype=kv_indices.dtype, pin_memory=on_gpu)
    ctx = torch.cuda.stream(stream) if on_gpu else contextlib.nullcontext()
    with ctx:
        host.copy_(kv_indices, non_blocking=on_gpu)
    if on_gpu:
        stream.synchronize()
    return host.numpy()[::page_size] // page_size


def _side_stream(device):
    import torch

    key = (device.type, device.index)
    s = _STREAMS.get(key)
    if s is None:
        s = _STREAMS[key] = torch.cuda.Stream(device=device)
    return s


# ---- early sends (maybe_send_cached_prefix_chunk), deferred ----

PENDING = "_dualpath_early_sends"


class _EarlySend:
    """A request's early-send slice being copied on the side stream."""

    def __init__(self, req, start: int, end: int, host, done):
        self.req, self.start, self.end, self.host, self.done = req, start, end, host, done


def _pending(sched) -> dict:
    got = getattr(sched, PENDING, None)
    if got is None:
        got = {}
        setattr(sched, PENDING, got)
    return got


def early_send(original, self, req):
    """AROUND SchedulerDisaggregationPrefillMixin.maybe_send_cached_prefix_chunk: in the
    overlap loop, its send is deferred (module doc); earlier deferred sends whose copies are
    done go first."""
    if not getattr(self, "enable_overlap", False):
        return original(self, req)
    flush_early_sends(self, wait=False)
    _STATE.early = True
    try:
        return original(self, req)
    finally:
        _STATE.early = False


def _defer_early_send(sched, req, end_idx: int) -> bool:
    """Start the early send's index copy; False where SGLang's send must run now instead."""
    pending = _pending(sched)
    if req.rid in pending:  # its previous early send first (an older copy: done or nearly),
        _flush_one(sched, pending.pop(req.rid), wait=True)  # the same chunks on every rank
    page_size = sched.token_to_kv_pool_allocator.page_size
    start = req.start_send_idx
    end = end_idx - end_idx % page_size  # as SGLang's send_kv_chunk for a non-last chunk
    if end <= start:
        return True  # nothing left to send early (SGLang's own checks would skip it too)
    table = sched.req_to_token_pool.req_to_token
    kv = table[req.req_pool_idx, start:end]
    if not getattr(kv, "is_cuda", False) or not kv.is_contiguous():
        return False
    host, done = start_copy(kv, _side_stream(kv.device))
    pending[req.rid] = _EarlySend(req, start, end, host, done)
    return True


def start_copy(kv_indices, stream):
    """Copy `kv_indices` to pinned host memory on `stream` after the current stream's work so
    far (an event: no CPU wait); returns (host tensor, event recorded when the copy is done)."""
    import torch

    host = torch.empty(kv_indices.shape, dtype=kv_indices.dtype, pin_memory=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(kv_indices.device))
    stream.wait_event(ready)
    with torch.cuda.stream(stream):
        host.copy_(kv_indices, non_blocking=True)
        kv_indices.record_stream(stream)
    done = torch.cuda.Event()
    done.record(stream)
    return host, done


def flush_early_sends(sched, wait: bool) -> None:
    """Send the deferred early chunks whose copies are done (wait=True: all, waiting)."""
    pending = getattr(sched, PENDING, None)
    if not pending:
        return
    for rid in list(pending):
        entry = pending[rid]
        if not wait and not entry.done.query():
            continue
        del pending[rid]
        _flush_one(sched, entry, wait=wait)  # not waiting: its copy is done


def drop_early_sends(sched) -> None:
    pending = getattr(sched, PENDING, None)
    if pending:
        pending.clear()


def _flush_one(sched, entry: _EarlySend, wait: bool) -> None:
    if wait:
        entry.done.synchronize()
    req = entry.req
    if (req.finished() or getattr(req, "disagg_kv_sender", None) is None
            or req.start_send_idx != entry.start):
        return  # finished, or its range moved: the later sends cover it
    page_size = sched.token_to_kv_pool_allocator.page_size
    early = getattr(_STATE, "early", False)
    _STATE.precomputed = (entry.end - entry.start,
                          entry.host.numpy()[::page_size] // page_size)
    _STATE.early = False  # this send goes out now, also when flushed from an early-send round
    try:
        sched.send_kv_chunk(req, last_chunk=False, end_idx=entry.end)
    finally:
        _STATE.precomputed = None
        _STATE.early = early
