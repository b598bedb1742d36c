"""--dualpath-async-page-indices (sglang_plugin/page_indices.py): which sends take the side-stream
read, and that it gives SGLang's values. The stream itself needs a GPU (scripts/ on the host)."""

import types

import numpy as np
import pytest
import torch

from dualpath.sglang_plugin import page_indices as pi


def stock(kv_indices, page_size):  # SGLang 0.5.17's sglang.srt.mem_cache.common.kv_to_page_indices
    return (kv_indices[::page_size] // page_size).cpu().numpy()


@pytest.mark.parametrize("n,page", [(1, 1), (17, 16), (97, 64), (1024, 64), (1000, 7)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_copy_gives_sglangs_values(n, page, dtype):
    g = torch.Generator().manual_seed(n * page)
    row = torch.randint(0, 1 << 20, (3, n + 5), generator=g, dtype=dtype)
    kv = row[1, 2:2 + n]  # a row slice of req_to_token: contiguous
    got, want = pi.copy_page_indices(kv, page), stock(kv, page)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert not np.shares_memory(got, kv.numpy())


class Table:  # req_to_token: slices of it share its storage
    def __init__(self):
        self.req_to_token = torch.zeros(4, 64, dtype=torch.int32)


class Req:
    def __init__(self, protected):
        self.cache_protected_len = protected


def insert_finding(prefix_len):
    """SGLang's cache_unfinished_req stand-in: its insert found `prefix_len` tokens cached."""
    def cache_unfinished_req(cache, req):
        return pi.insert(lambda c, params: types.SimpleNamespace(prefix_len=prefix_len),
                         cache, None)
    return cache_unfinished_req


def test_the_side_read_only_for_a_final_row_of_req_to_token(monkeypatch):
    """Inside result processing, a last chunk whose cache insert found nothing beyond the
    request's protected prefix (its row stays as it is) takes the side read. Stock's read for:
    an insert that found more (SGLang frees the duplicates and rewrites the row behind the next
    forward), an earlier chunk, a send outside result processing (scheduling, the inflight
    queue), the normal loop (no copy_done), a tensor that is not a slice of req_to_token (a
    sliding-window model's translated indices), and a second send without a new insert."""
    calls = []
    sched = types.SimpleNamespace(req_to_token_pool=Table())
    row = sched.req_to_token_pool.req_to_token[1, 8:40]
    other = torch.zeros(32, dtype=torch.int32)

    def on_gpu(t):  # the hook reads these attributes; CPU tensors stand in for GPU ones
        return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0),
                                     is_contiguous=t.is_contiguous,
                                     untyped_storage=t.untyped_storage)

    monkeypatch.setattr(pi, "copy_page_indices", lambda kv, ps, s: calls.append("side") or "S")
    monkeypatch.setattr(pi, "_side_stream", lambda d: None)

    def original(kv, ps):
        calls.append("stock")
        return "O"

    def send(self, req, last_chunk=False, end_idx=None):  # stands in for SGLang's send_kv_chunk
        return pi.kv_to_page_indices(original, req.kv, 64)

    def result_processing(self, batch, result):  # ... and its result processing
        out = []
        for req, last, found in batch:
            pi.cache_unfinished_req(insert_finding(found), None, req)  # maybe_cache_unfinished
            out.append(pi.send_kv_chunk(send, self, req, last_chunk=last))
        return out

    overlap = types.SimpleNamespace(copy_done=object())
    clean, dedup, early = Req(256), Req(256), Req(256)
    clean.kv = dedup.kv = early.kv = on_gpu(row)
    assert pi.in_result_processing(result_processing, sched,
                                   [(clean, True, 256), (dedup, True, 320),
                                    (early, False, 128)], overlap) == ["S", "O", "O"]
    assert calls == ["side", "stock", "stock"]
    calls.clear()
    assert pi.send_kv_chunk(send, sched, clean, last_chunk=True) == "O"  # outside, no verdict
    pi.cache_unfinished_req(insert_finding(0), None, clean)
    assert pi.send_kv_chunk(send, sched, clean, last_chunk=True) == "O"  # outside
    swa = Req(256)
    swa.kv = on_gpu(other)
    assert pi.in_result_processing(result_processing, sched, [(swa, True, 0)], overlap) == ["O"]
    assert pi.in_result_processing(result_processing, sched, [(clean, True, 0)],
                                   types.SimpleNamespace(copy_done=None)) == ["O"]
    assert calls == ["stock"] * 4

    def boom(self, batch, result):
        raise RuntimeError("x")
    with pytest.raises(RuntimeError):
        pi.in_result_processing(boom, sched, [], overlap)
    pi.cache_unfinished_req(insert_finding(0), None, clean)
    assert pi.send_kv_chunk(send, sched, clean, last_chunk=True) == "O", "flag cleared on error"


# ---- deferred early sends (maybe_send_cached_prefix_chunk) ----

class Event:
    def __init__(self):
        self.ready, self.waited = False, False

    def query(self):
        return self.ready

    def synchronize(self):
        self.waited = self.ready = True


class Sender:
    def __init__(self):
        self.sent = []

    def should_send_kv_chunk(self, n, last):
        return True

    def send(self, page_indices, state_indices, num_kv_tokens):
        self.sent.append((list(page_indices), num_kv_tokens))


class EReq:
    def __init__(self, rid, pool_idx, cached_end):
        self.rid, self.req_pool_idx, self.cached_end = rid, pool_idx, cached_end
        self.start_send_idx, self.disagg_kv_sender, self.done = 0, Sender(), False

    def finished(self):
        return self.done


def make_sched(monkeypatch, overlap=True):
    """A prefill scheduler stand-in: SGLang's send_kv_chunk (non-last chunks) and
    maybe_send_cached_prefix_chunk, both reached through the hooks as when registered."""
    ps = 4
    table = torch.arange(4 * 64, dtype=torch.int64).reshape(4, 64) * 3  # req_to_token
    sched = types.SimpleNamespace(enable_overlap=overlap, req_to_token_pool=types.SimpleNamespace(
        req_to_token=table), token_to_kv_pool_allocator=types.SimpleNamespace(page_size=ps))
    stock_reads = []

    def stock_kv_to_page_indices(kv, page_size):
        stock_reads.append(len(kv))
        return (kv[::page_size] // page_size).cpu().numpy()

    def stock_send(self, req, last_chunk=False, end_idx=None):
        start = req.start_send_idx
        if not last_chunk:
            end_idx -= end_idx % ps
        if end_idx < start:
            return
        kv = table[req.req_pool_idx, start:end_idx]
        pages = pi.kv_to_page_indices(stock_kv_to_page_indices, kv, ps)
        req.disagg_kv_sender.send(pages, None, num_kv_tokens=end_idx - start)
        req.start_send_idx = end_idx

    def stock_early(self, req):
        if req.cached_end <= req.start_send_idx:
            return
        self.send_kv_chunk(req, last_chunk=False, end_idx=req.cached_end)

    sched.send_kv_chunk = lambda req, last_chunk=False, end_idx=None: pi.send_kv_chunk(
        stock_send, sched, req, last_chunk=last_chunk, end_idx=end_idx)
    sched.early = lambda req: pi.early_send(stock_early, sched, req)
    copies = []

    def start_copy(kv, stream):  # the side-stream copy: a host copy and an event we control
        ev = Event()
        copies.append(ev)
        return kv.clone(), ev
    monkeypatch.setattr(pi, "start_copy", start_copy)
    monkeypatch.setattr(pi, "_side_stream", lambda d: None)
    return sched, table, stock_reads, copies


def on_gpu_table(monkeypatch):
    """The hooks take the side copy only for CUDA tensors: CPU stand-ins claim to be."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


def pages_of(table, pool_idx, start, end, ps=4):
    return list((table[pool_idx, start:end][::ps] // ps).numpy())


def test_early_send_is_deferred_until_its_copy_is_done(monkeypatch):
    sched, table, stock_reads, copies = make_sched(monkeypatch)
    on_gpu_table(monkeypatch)
    a, b = EReq("a", 1, 10), EReq("b", 2, 16)  # a's cached prefix ends mid-page: 8 tokens
    sched.early(a)
    sched.early(b)
    assert a.disagg_kv_sender.sent == [] and b.disagg_kv_sender.sent == []
    assert stock_reads == [] and len(copies) == 2  # no .cpu() on the schedule stream
    copies[1].ready = True
    sched.early(EReq("c", 3, 0))  # the next round sends what is done, without waiting
    assert a.disagg_kv_sender.sent == []
    assert b.disagg_kv_sender.sent == [(pages_of(table, 2, 0, 16), 16)]
    assert b.start_send_idx == 16 and not copies[1].waited
    # result processing waits for the rest and sends it
    pi.in_result_processing(lambda self, batch, result: None, sched, None,
                            types.SimpleNamespace(copy_done=object()))
    assert copies[0].waited and a.disagg_kv_sender.sent == [(pages_of(table, 1, 0, 8), 8)]
    assert a.start_send_idx == 8 and stock_reads == []  # indices came from the copies


def test_deferred_early_send_goes_before_its_requests_next_send(monkeypatch):
    sched, table, stock_reads, copies = make_sched(monkeypatch)
    on_gpu_table(monkeypatch)
    a = EReq("a", 1, 12)
    sched.early(a)
    a.cached_end = 16  # a later round (chunked prefill) with more cached: the older one first
    sched.early(a)
    assert copies[0].waited and len(copies) == 2
    assert a.disagg_kv_sender.sent == [(pages_of(table, 1, 0, 12), 12)]
    sched.early(a)  # nothing new: the pending one goes out, no empty chunk
    assert len(copies) == 2
    assert a.disagg_kv_sender.sent[1:] == [(pages_of(table, 1, 12, 16), 4)]
    sched.early(a)
    sched.send_kv_chunk(a, last_chunk=False, end_idx=20)
    assert a.disagg_kv_sender.sent[2:] == [(pages_of(table, 1, 16, 20), 4)]
    assert stock_reads == [4]


def test_result_processing_error_drops_pending_and_keeps_the_error(monkeypatch):
    sched, _, _, copies = make_sched(monkeypatch)
    on_gpu_table(monkeypatch)
    a = EReq("a", 1, 8)
    sched.early(a)

    def boom(self, batch, result):
        raise ValueError("original")
    with pytest.raises(ValueError, match="original"):
        pi.in_result_processing(boom, sched, None, types.SimpleNamespace(copy_done=object()))
    assert pi._pending(sched) == {} and a.disagg_kv_sender.sent == []
    assert not copies[0].waited


def test_every_loop_iteration_sends_finished_copies(monkeypatch):
    sched, table, _, copies = make_sched(monkeypatch)
    on_gpu_table(monkeypatch)
    a = EReq("a", 1, 8)
    sched.early(a)
    assert pi.after_inflight_queue(["r"], sched) == ["r"] and a.disagg_kv_sender.sent == []
    copies[0].ready = True
    pi.after_inflight_queue([], sched)
    assert a.disagg_kv_sender.sent == [(pages_of(table, 1, 0, 8), 8)]


def test_deferred_early_send_dropped_when_finished_or_moved(monkeypatch):
    sched, _, _, copies = make_sched(monkeypatch)
    on_gpu_table(monkeypatch)
    done, moved = EReq("d", 1, 8), EReq("m", 2, 8)
    sched.early(done)
    sched.early(moved)
    done.done, moved.start_send_idx = True, 4
    pi.flush_early_sends(sched, wait=True)
    assert done.disagg_kv_sender.sent == [] and moved.disagg_kv_sender.sent == []
    assert pi._pending(sched) == {} and all(c.waited for c in copies)


def test_early_send_as_stock_without_overlap_or_on_the_cpu(monkeypatch):
    for overlap, cuda in ((False, True), (True, False)):
        sched, table, stock_reads, copies = make_sched(monkeypatch, overlap=overlap)
        if cuda:
            on_gpu_table(monkeypatch)
        a = EReq("a", 1, 8)
        sched.early(a)
        assert a.disagg_kv_sender.sent == [(pages_of(table, 1, 0, 8), 8)]
        assert copies == [] and stock_reads == [8]
        monkeypatch.undo()


def test_flush_before_a_last_chunk_keeps_its_side_read(monkeypatch):
    """A deferred early send flushed right before the request's last chunk (in result
    processing) must not cost that chunk its verdict (the flush's own send clears it)."""
    sched, table, stock_reads, copies = make_sched(monkeypatch)
    on_gpu_table(monkeypatch)
    side = []
    monkeypatch.setattr(pi, "copy_page_indices",
                        lambda kv, ps, s: side.append(len(kv)) or (kv[::ps] // ps).numpy())
    a = EReq("a", 1, 8)
    sched.early(a)

    def result_processing(self, batch, result):
        a._dualpath_row_final = True  # as cache_unfinished_req leaves a clean row
        sched.send_kv_chunk(a, last_chunk=True, end_idx=14)
    pi.in_result_processing(result_processing, sched, None,
                            types.SimpleNamespace(copy_done=object()))
    assert a.disagg_kv_sender.sent == [(pages_of(table, 1, 0, 8), 8),
                                       (pages_of(table, 1, 8, 14), 6)]
    assert side == [6] and stock_reads == []
