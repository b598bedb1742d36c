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


def test_only_last_chunks_sent_from_result_processing_take_the_side_read(monkeypatch):
    """Inside result processing a last chunk's read skips SGLang's function; an earlier chunk,
    a send from anywhere else (scheduling, the inflight queue) and a slice not on a GPU use it."""
    calls = []

    class GpuSlice:  # what the hook checks before reading
        is_cuda = True
        device = torch.device("cuda", 0)

        def is_contiguous(self):
            return True

    monkeypatch.setattr(pi, "copy_page_indices", lambda kv, ps, s: calls.append("side") or "S")
    monkeypatch.setattr(pi, "_side_stream", lambda d: None)

    def original(kv, ps):
        calls.append("stock")
        return "O"

    def send(self, req, last_chunk=False, end_idx=None):  # stands in for SGLang's send_kv_chunk
        return pi.kv_to_page_indices(original, req, 64)

    def result_processing(self, batch, result):  # ... and its result processing
        return [pi.send_kv_chunk(send, self, r, last_chunk=last) for r, last in batch]

    gpu, overlap = GpuSlice(), types.SimpleNamespace(copy_done=object())
    assert pi.in_result_processing(result_processing, None, [(gpu, True), (gpu, False)],
                                   overlap) == ["S", "O"]
    assert pi.send_kv_chunk(send, None, gpu, last_chunk=True) == "O"  # outside: stock
    assert pi.in_result_processing(result_processing, None, [(torch.arange(8), True)],
                                   overlap) == ["O"]
    # no copy_done (the normal loop): SGLang did not wait for the batch there
    assert pi.in_result_processing(result_processing, None, [(gpu, True)],
                                   types.SimpleNamespace(copy_done=None)) == ["O"]
    assert calls == ["side", "stock", "stock", "stock", "stock"]

    def boom(self, batch, result):
        raise RuntimeError("x")
    with pytest.raises(RuntimeError):
        pi.in_result_processing(boom, None, [], overlap)
    assert pi.send_kv_chunk(send, None, gpu, last_chunk=True) == "O", "flag cleared on error"
