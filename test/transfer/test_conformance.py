"""Conformance of every transfer backend built here (host, tcp; cuda on a GPU host, here with
host memory: device memory is in test_cuda_backend.py) to the contract in
csrc/transfer/engine.h."""

import time

import numpy as np
import pytest

from dualpath import _C
from dualpath.transfer import TransferBatch, TransferEngine


def _cuda_usable() -> bool:
    if not _C.build_info()["with_cuda"]:
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


BACKENDS = ["host", "tcp"] + (["cuda"] if _cuda_usable() else [])  # the same contract


@pytest.fixture(params=BACKENDS)
def engine(request):
    return TransferEngine(request.param, num_workers=4)


@pytest.mark.parametrize("n", [1, 1000, 65536])
def test_random_bytes_arrive(engine, n):
    rng = np.random.default_rng(n)
    size = 1 << 22
    src = rng.integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    a, b = engine.register_array(src), engine.register_array(dst)
    chunk = max(1, size // n // 2)
    lengths = rng.integers(0, chunk + 1, n)
    src_off = rng.integers(0, size - chunk, n)
    dst_off = np.arange(n, dtype=np.int64) * chunk  # disjoint destinations
    h = engine.submit(TransferBatch.of(a, src_off, b, dst_off, lengths))
    assert engine.wait(h, 30) == "done" and h.size == n
    for i in rng.choice(n, min(n, 200), replace=False):
        s, d, ln = src_off[i], dst_off[i], lengths[i]
        assert np.array_equal(dst[d:d + ln], src[s:s + ln]), f"descriptor {i}"


def test_zero_length_and_empty_batches(engine):
    buf = np.zeros(16, np.uint8)
    r = engine.register_array(buf)
    assert engine.wait(engine.submit(TransferBatch.of(r, 0, r, 8, 0))) == "done"
    empty = TransferBatch.of(np.array([], np.int64), [], [], [], [])
    assert engine.poll(engine.submit(empty)) == "done"


def test_bad_descriptors_are_refused_naming_the_descriptor(engine):
    buf = np.zeros(100, np.uint8)
    r = engine.register_array(buf)
    with pytest.raises(ValueError, match="descriptor 1: dst region 999 is not registered"):
        engine.submit(TransferBatch.of(r, 0, [r, 999], 0, 10))
    with pytest.raises(ValueError, match="descriptor 0: src range .* outside region"):
        engine.submit(TransferBatch.of(r, 95, r, 0, 10))
    with pytest.raises(ValueError, match="negative"):
        engine.submit(TransferBatch.of(r, -1, r, 0, 10))
    with pytest.raises(ValueError, match="equal length"):
        engine.submit(TransferBatch(np.array([r]), np.array([0, 1]), np.array([r]),
                                    np.array([0]), np.array([1])))
    with pytest.raises(ValueError, match="priority"):
        engine.submit(TransferBatch.of(r, 0, r, 50, 10), priority="urgent")
    with pytest.raises(ValueError, match="unknown transfer backend 'rdmaa'; built: host, tcp"):
        TransferEngine("rdmaa")


def test_cancel_stops_what_has_not_started():
    eng = TransferEngine("host", num_workers=1, slice_bytes=64 << 10)
    src, dst = np.ones(256 << 20, np.uint8), np.zeros(256 << 20, np.uint8)
    a, b = eng.register_array(src), eng.register_array(dst)
    n = 4096
    off = np.arange(n, dtype=np.int64) * (64 << 10)
    h = eng.submit(TransferBatch.of(a, off, b, off, 64 << 10))
    eng.cancel(h)
    assert eng.wait(h, 30) == "canceled"
    assert dst.sum() < src.sum(), "cancel stopped the batch before the end"


def test_latency_batch_overtakes_a_running_bulk_batch():
    eng = TransferEngine("host", num_workers=1, slice_bytes=256 << 10)
    big_src, big_dst = np.ones(256 << 20, np.uint8), np.zeros(256 << 20, np.uint8)
    small = np.ones(4096, np.uint8), np.zeros(4096, np.uint8)
    a, b = eng.register_array(big_src), eng.register_array(big_dst)
    c, d = eng.register_array(small[0]), eng.register_array(small[1])
    off = np.arange(1024, dtype=np.int64) * (256 << 10)
    bulk = eng.submit(TransferBatch.of(a, off, b, off, 256 << 10), priority="bulk")
    time.sleep(0.002)
    urgent = eng.submit(TransferBatch.of(c, 0, d, 0, 4096), priority="latency")
    assert eng.wait(urgent, 30) == "done"
    assert eng.poll(bulk) == "pending", "the latency batch waited for the whole bulk batch"
    assert eng.wait(bulk, 60) == "done" and big_dst.all()


def test_repost_and_deregistration_rules(engine):
    src, dst = np.arange(64, dtype=np.uint8), np.zeros(64, np.uint8)
    a, b = engine.register_array(src), engine.register_array(dst)
    batch = TransferBatch.of(a, [0, 32], b, [32, 0], 32)
    for _ in range(2):  # the same batch again after it ended
        assert engine.wait(engine.submit(batch)) == "done"
    assert np.array_equal(dst[32:], src[:32]) and np.array_equal(dst[:32], src[32:])
    engine.deregister(a)
    with pytest.raises(ValueError, match="not registered"):
        engine.submit(batch)
    with pytest.raises(ValueError, match="not registered"):
        engine.deregister(a)


def test_region_in_use_cannot_be_deregistered_and_wait_times_out():
    eng = TransferEngine("host", num_workers=1, slice_bytes=1 << 20)
    src, dst = np.ones(128 << 20, np.uint8), np.zeros(128 << 20, np.uint8)
    a, b = eng.register_array(src), eng.register_array(dst)
    off = np.arange(128, dtype=np.int64) << 20
    h = eng.submit(TransferBatch.of(a, off, b, off, 1 << 20))
    assert eng.wait(h, 0.0) == "pending"
    with pytest.raises(RuntimeError, match="used by a pending batch"):
        eng.deregister(a)
    assert eng.wait(h, 30) == "done"
    eng.deregister(a)


def test_registration_refuses_memory_it_cannot_own(engine):
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="contiguous"):
        engine.register_array(torch.zeros(1).expand(1 << 20))
    with pytest.raises(TypeError, match="numpy array"):
        engine.register_array([1, 2, 3])
    ro = np.zeros(8, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        engine.register_array(ro)


def test_wait_without_limit_blocks_until_done(engine):
    src, dst = np.ones(1 << 20, np.uint8), np.zeros(1 << 20, np.uint8)
    a, b = engine.register_array(src), engine.register_array(dst)
    h = engine.submit(TransferBatch.of(a, 0, b, 0, 1 << 20))
    assert engine.wait(h, float("inf")) == "done" and dst.all()
    with pytest.raises(ValueError, match="NaN"):
        engine.wait(h, float("nan"))
