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

Not yet measured on a GPU: opt-in until a 1P1D run shows the same outputs with it on and off.
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
    which orders everything the batch's forward depended on before the reads."""
    _STATE.result = getattr(result, "copy_done", None) is not None
    try:
        return original(self, batch, result, *args, **kwargs)
    finally:
        _STATE.result = False


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
    result processing of a request whose row its last cache insert left as it was."""
    final = getattr(req, "_dualpath_row_final", False)
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
