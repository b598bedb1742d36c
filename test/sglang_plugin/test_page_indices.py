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
