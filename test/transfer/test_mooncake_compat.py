"""DualPathPDEngine: the MooncakeTransferEngine surface SGLang's Mooncake PD backend drives, on
our engine. Host buffers (SGLang's aux data) over tcp run here; device buffers through CUDA IPC
run on the GPU host (test_cuda_backend.py's machinery, marked gpu)."""

import multiprocessing as mp

import numpy as np
import pytest

from dualpath import _C
from dualpath.transfer.mooncake_compat import DualPathPDEngine, _Ranges


def test_ranges_find_many_addresses():
    r = _Ranges()
    r.add(1000, 100, {"a": 1})
    r.add(5000, 10, {"a": 2})
    idx = r.find(np.array([1000, 1099, 1099, 5005, 999, 2000]), np.array([100, 1, 2, 5, 1, 1]))
    assert idx.tolist() == [0, 0, -1, 1, -1, -1]
    assert r.remove(1000) == {"a": 1} and r.remove(1000) is None
    assert _Ranges().find(np.array([1]), np.array([1])).tolist() == [-1]


@pytest.fixture
def pair():
    a, b = DualPathPDEngine("127.0.0.1"), DualPathPDEngine("127.0.0.1")
    yield a, b
    a.close()
    b.close()


def test_host_buffers_written_one_sided(pair):
    decode, prefill = pair
    rng = np.random.default_rng(0)
    dst = np.zeros(1 << 20, np.uint8)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    assert decode.batch_register([dst.ctypes.data], [dst.nbytes]) == 0
    assert prefill.register(src.ctypes.data, src.nbytes) == 0
    n = 500
    lens = rng.integers(1, 1024, n)
    so = rng.integers(0, src.nbytes - 1024, n)
    do = np.arange(n) * 1024
    assert prefill.batch_transfer_sync(decode.get_session_id(), (src.ctypes.data + so).tolist(),
                                       (dst.ctypes.data + do).tolist(), lens.tolist()) == 0
    for i in range(n):
        assert np.array_equal(dst[do[i]:do[i] + lens[i]], src[so[i]:so[i] + lens[i]])
    assert prefill.send_probe(decode.get_session_id()) == 0


def test_many_ranges_on_both_sides_like_per_layer_buffers(pair):
    """Descriptors spread over several local and peer buffers (SGLang registers one per layer
    and part): each lands in the peer buffer its address names."""
    decode, prefill = pair
    rng = np.random.default_rng(1)
    srcs = [rng.integers(0, 256, 4096, dtype=np.uint8) for _ in range(5)]
    dsts = [np.zeros(4096, np.uint8) for _ in range(7)]
    assert prefill.batch_register([a.ctypes.data for a in srcs], [a.nbytes for a in srcs]) == 0
    assert decode.batch_register([a.ctypes.data for a in dsts], [a.nbytes for a in dsts]) == 0
    n = 300
    si, di = rng.integers(0, 5, n), rng.integers(0, 7, n)
    so, do = rng.integers(0, 4096 - 16, n), np.arange(n) % 256 * 16
    keep = ~np.array([any(di[j] == di[i] and do[j] == do[i] for j in range(i))
                      for i in range(n)])  # one writer per destination slot
    si, di, so, do = si[keep], di[keep], so[keep], do[keep]
    src_addrs = [srcs[a].ctypes.data + int(o) for a, o in zip(si, so, strict=True)]
    dst_addrs = [dsts[b].ctypes.data + int(o) for b, o in zip(di, do, strict=True)]
    assert prefill.batch_transfer_sync(decode.get_session_id(), src_addrs, dst_addrs,
                                       [16] * len(si)) == 0
    for a, b, x, y in zip(si, di, so, do, strict=True):
        assert np.array_equal(dsts[b][y:y + 16], srcs[a][x:x + 16])


def test_concurrent_callers_like_sglangs_transfer_workers(pair):
    import threading

    decode, prefill = pair
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, 4 << 20, dtype=np.uint8)
    dst = np.zeros(4 << 20, np.uint8)
    decode.register(dst.ctypes.data, dst.nbytes)
    prefill.register(src.ctypes.data, src.nbytes)
    rcs = []

    def worker(k):  # each thread: its own quarter, 256 slices of 4 KiB
        base = k * (1 << 20)
        offs = base + np.arange(256) * 4096
        rcs.append(prefill.batch_transfer_sync(decode.get_session_id(),
                                               (src.ctypes.data + offs).tolist(),
                                               (dst.ctypes.data + offs).tolist(), [4096] * 256))
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rcs == [0, 0, 0, 0] and np.array_equal(src, dst)


def test_bad_addresses_fail_cleanly_and_late_registrations_are_found(pair):
    decode, prefill = pair
    src, dst, late = np.ones(4096, np.uint8), np.zeros(4096, np.uint8), np.zeros(64, np.uint8)
    decode.register(dst.ctypes.data, dst.nbytes)
    prefill.register(src.ctypes.data, src.nbytes)
    s = decode.get_session_id()
    assert prefill.transfer_sync(s, src.ctypes.data + 4090, dst.ctypes.data, 10) == -1
    assert prefill.transfer_sync(s, src.ctypes.data, dst.ctypes.data + 4090, 10) == -1
    assert not dst.any()
    assert prefill.transfer_sync(s, src.ctypes.data, dst.ctypes.data, 4096) == 0  # table cached
    decode.register(late.ctypes.data, late.nbytes)  # after the prefill fetched the table
    assert prefill.transfer_sync(s, src.ctypes.data, late.ctypes.data, 64) == 0 and late.all()
    assert prefill.send_probe("127.0.0.1:1") == -1
    assert decode.batch_deregister([late.ctypes.data, 12345]) == -1


def test_a_write_within_the_process(pair):
    eng, _ = pair
    a, b = np.arange(256, dtype=np.uint8), np.zeros(256, np.uint8)
    eng.batch_register([a.ctypes.data, b.ctypes.data], [256, 256])
    assert eng.transfer_sync(eng.get_session_id(), a.ctypes.data, b.ctypes.data, 256) == 0
    assert np.array_equal(a, b)


torch = pytest.importorskip("torch")
GPU = bool(_C.build_info()["with_cuda"]) and torch.cuda.is_available()


def _decode_side(conn, n_pages, page_bytes):
    import torch

    from dualpath.transfer.mooncake_compat import DualPathPDEngine

    eng = DualPathPDEngine("127.0.0.1")
    kv = torch.zeros(n_pages * page_bytes, dtype=torch.uint8, device="cuda")
    assert eng.batch_register([kv.data_ptr()], [kv.numel()]) == 0
    conn.send((eng.get_session_id(), kv.data_ptr()))
    expected = conn.recv()
    torch.cuda.synchronize()
    conn.send(bool(np.array_equal(kv.cpu().numpy(), expected)))
    eng.close()


@pytest.mark.skipif(not GPU, reason="needs dualpath._C built with CUDA and a GPU")
@pytest.mark.parametrize("page_bytes", [8192, 2 << 20])  # batched kernel / copy engines
def test_device_kv_pages_into_another_process(page_bytes):
    pytest.importorskip("cuda.bindings")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    n_pages = 64
    p = ctx.Process(target=_decode_side, args=(child, n_pages, page_bytes))
    p.start()
    try:
        session, base = parent.recv()
        eng = DualPathPDEngine("127.0.0.1")
        src = torch.randint(0, 256, (n_pages * page_bytes,), dtype=torch.uint8, device="cuda")
        eng.register(src.data_ptr(), src.numel())
        perm = np.random.default_rng(1).permutation(n_pages)  # page i -> decode page perm[i]
        rc = eng.batch_transfer_sync(session, [src.data_ptr() + i * page_bytes
                                               for i in range(n_pages)],
                                     [base + int(j) * page_bytes for j in perm],
                                     [page_bytes] * n_pages)
        assert rc == 0
        want = np.zeros(n_pages * page_bytes, np.uint8)
        s = src.cpu().numpy()
        for i, j in enumerate(perm):
            want[j * page_bytes:(j + 1) * page_bytes] = s[i * page_bytes:(i + 1) * page_bytes]
        parent.send(want)
        assert parent.recv() is True
        eng.close()
    finally:
        parent.close()  # a failed test never sends: the other side's recv ends, no hang
        p.join(30)
        if p.is_alive():
            p.kill()
