"""The `cuda` transfer backend: device and pinned/pageable host memory, the batched kernel path
(pieces under 1 MiB) and the copy-engine path, peer GPUs, CUDA IPC across processes. The GPU
tests run on the GPU host (scripts/gpu_transfer.sh); here only what needs no GPU."""

import multiprocessing as mp

import numpy as np
import pytest

from dualpath import _C
from dualpath.transfer import TransferBatch, TransferEngine, cuda_ipc

torch = pytest.importorskip("torch")
GPU = bool(_C.build_info()["with_cuda"]) and torch.cuda.is_available()
gpu = pytest.mark.skipif(not GPU, reason="needs dualpath._C built with CUDA and a GPU")


def test_without_cuda_the_backend_says_why():
    if GPU:
        pytest.skip("CUDA is here")
    with pytest.raises((ValueError, RuntimeError), match="not built|no usable GPU"):
        TransferEngine("cuda")


def test_ipc_ranges_round_trip_as_bytes_and_dicts():
    pytest.importorskip("cuda.bindings")
    raw = bytes(range(64))
    assert cuda_ipc.handle_to_bytes(cuda_ipc.handle_from_bytes(raw)) == raw
    r = cuda_ipc.IpcRange(raw, 4096, 1 << 20)
    assert cuda_ipc.IpcRange.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="64 bytes"):
        cuda_ipc.IpcRange(b"short", 0, 1)


def test_host_backend_refuses_cuda_tensors_and_device_regions():
    eng = TransferEngine("host")
    with pytest.raises(ValueError, match="not supported by the 'host' backend"):
        eng.register(1 << 30, 16, "device")
    if GPU:
        with pytest.raises(ValueError, match="TransferEngine\\('cuda'\\)"):
            eng.register_array(torch.zeros(4, device="cuda"))


def _random(n, device, pin=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if pin:
        t = t.pin_memory()
    return t.to(device) if device != "cpu" else t


def _pairs(rng, n, size, max_len):
    lengths = rng.integers(0, max_len + 1, n)
    src_off = rng.integers(0, size - max_len, n)
    dst_off = np.arange(n, dtype=np.int64) * max_len  # disjoint destinations
    return src_off, dst_off, lengths


@gpu
@pytest.mark.parametrize("kinds", [("cuda", "cuda"), ("pinned", "cuda"), ("cuda", "pinned"),
                                   ("pageable", "cuda"), ("cuda", "pageable")])
@pytest.mark.parametrize("n,max_len", [(1, (3 << 20) + 5), (1000, 4099), (65536, 61),
                                       (64, (1 << 20) + 17)])
def test_random_bytes_arrive(kinds, n, max_len):
    eng = TransferEngine("cuda", num_workers=4, slice_bytes=4 << 20)
    rng = np.random.default_rng(n)
    size = max(n * max_len, 2 * max_len)

    def make(kind, seed):
        if kind == "cuda":
            return _random(size, "cuda", seed=seed)
        return _random(size, "cpu", pin=kind == "pinned", seed=seed)
    src, dst = make(kinds[0], 1), make(kinds[1], 2)
    before = dst.cpu().clone()
    a, b = eng.register_array(src), eng.register_array(dst)
    so, do, ln = _pairs(rng, n, size, max_len)
    h = eng.submit(TransferBatch.of(a, so, b, do, ln))
    assert eng.wait(h, 60) == "done", h.error
    got, want = dst.cpu().numpy(), before.numpy().copy()
    s = src.cpu().numpy()
    for i in range(n):
        want[do[i]:do[i] + ln[i]] = s[so[i]:so[i] + ln[i]]
    assert np.array_equal(got, want)  # every byte: copied ones and untouched ones


@gpu
def test_registration_checks_the_memory_type():
    eng = TransferEngine("cuda")
    d = torch.zeros(1024, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="register it as 'device'"):
        eng.register(d.data_ptr(), d.numel(), "host")
    h = torch.zeros(1024, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not CUDA device memory"):
        eng.register(h.data_ptr(), h.numel(), "device")


@gpu
def test_latency_class_and_zero_length():
    eng = TransferEngine("cuda")
    src, dst = _random(1 << 16, "cuda"), torch.zeros(1 << 16, dtype=torch.uint8, device="cuda")
    a, b = eng.register_array(src), eng.register_array(dst)
    assert eng.wait(eng.submit(TransferBatch.of(a, 0, b, 0, 0), "latency")) == "done"
    assert eng.wait(eng.submit(TransferBatch.of(a, 0, b, 0, 1 << 16), "latency")) == "done"
    assert torch.equal(src, dst)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("length", [4099, (2 << 20) + 3])
def test_peer_gpus(length):
    eng = TransferEngine("cuda", slice_bytes=8 << 20)
    for s_dev, d_dev in ((0, 1), (1, 0)):
        src = _random(length, f"cuda:{s_dev}", seed=s_dev)
        dst = torch.zeros(length, dtype=torch.uint8, device=f"cuda:{d_dev}")
        a, b = eng.register_array(src), eng.register_array(dst)
        assert eng.wait(eng.submit(TransferBatch.of(a, 0, b, 0, length)), 30) == "done"
        assert torch.equal(src.cpu(), dst.cpu())


def _owner(conn, length, gpu=0):
    """Another process: allocate device memory, export it, wait for the peer's write, check."""
    import torch

    buf = torch.zeros(length + 4096, dtype=torch.uint8, device=f"cuda:{gpu}")
    part = buf[4096:]  # not the allocation's start: the offset must travel
    conn.send(cuda_ipc.export(part.data_ptr(), length).to_dict())
    expected = conn.recv()
    torch.cuda.synchronize()
    conn.send(bool(np.array_equal(part.cpu().numpy(), expected)))


def _write_into_owner(length, owner_gpu, backend, src_device, seed):
    """Another process owns `length` bytes on `owner_gpu`; open them on GPU 0 (as "device@0"),
    write random bytes from `src_device` with `backend`, and have the owner check them."""
    pytest.importorskip("cuda.bindings")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_owner, args=(child, length, owner_gpu))
    p.start()
    try:
        desc = cuda_ipc.IpcRange.from_dict(parent.recv())
        with cuda_ipc.open_range(desc, device=0) as mem:
            eng = TransferEngine(backend, slice_bytes=1 << 20)
            remote = eng.register(mem.ptr, length, "device@0")  # opened in GPU 0's context
            src = _random(length, src_device, seed=seed)
            a = eng.register_array(src)
            h = eng.submit(TransferBatch.of(a, 0, remote, 0, length))
            assert eng.wait(h, 30) == "done", h.error
            eng.deregister(remote)
            parent.send(src.cpu().numpy())
            assert parent.recv() is True
    finally:
        parent.close()  # a failed test never sends: the owner's recv ends instead of hanging
        p.join(30)
        if p.is_alive():
            p.kill()


@gpu
@pytest.mark.parametrize("backend", ["cuda", "cuda:memcpy", "cuda:kernel"])
@pytest.mark.parametrize("owner_gpu", [0, 1])  # the other process's memory on our GPU / a peer
@pytest.mark.parametrize("length", [70001, (3 << 20) + 1])  # batched kernel / copy engines
def test_write_into_another_process_through_cuda_ipc(length, owner_gpu, backend):
    if owner_gpu >= torch.cuda.device_count():
        pytest.skip("needs 2 GPUs")
    _write_into_owner(length, owner_gpu, backend, "cuda", seed=7)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_teardown_keeps_the_callers_current_device():
    """The engine's destructor runs on the caller's thread; it once left GPU 1 current, and the
    next `torch.zeros(device="cuda")` landed there."""
    import gc

    torch.cuda.set_device(0)
    eng = TransferEngine("cuda")
    src, dst = _random(4096, "cuda:1"), torch.zeros(4096, dtype=torch.uint8, device="cuda:1")
    a, b = eng.register_array(src), eng.register_array(dst)
    assert eng.wait(eng.submit(TransferBatch.of(a, 0, b, 0, 4096)), 30) == "done"
    del eng
    gc.collect()
    assert torch.cuda.current_device() == 0


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ipc_memory_is_written_from_the_gpu_that_opened_it():
    """Source on GPU 1, another process's memory opened on GPU 0: GPU 0 runs the copy (reading
    GPU 1 over NVLink); GPU 1's kernels cannot reach a mapping made in GPU 0's context."""
    _write_into_owner(70001, 0, "cuda", "cuda:1", seed=3)
