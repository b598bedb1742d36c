"""The storage-NIC model: line-rate clock, meter counts, cap accuracy, read queue."""

import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from dualpath.storage import BlockGeometry, BlockStore, fingerprint
from dualpath.storage.block_file import HEADER_BYTES
from dualpath.storage.nic import LinkClock, StorageNic

G = BlockGeometry(num_layers=4, page_size=64, num_kv_heads=8, head_dim=128, dtype_bytes=2)
BLOCK = HEADER_BYTES + G.payload_bytes  # 1 MiB + 4 KiB


def store(tmp_path, nic, **kw):
    return BlockStore(str(tmp_path), G, fingerprint("m", G), description={}, nic=nic, **kw)


def key(i):
    return f"{i:064x}"


def test_link_clock_is_first_come_first_served_at_line_rate():
    c = LinkClock(100.0)
    assert c.reserve(100, now=0.0) == pytest.approx(1.0)
    assert c.reserve(50, now=0.5) == pytest.approx(1.5)  # waits behind the first
    assert c.reserve(100, now=5.0) == pytest.approx(6.0)  # idle link: starts now
    b = LinkClock(100.0, burst_bytes=100)
    b.reserve(100, now=0.0)
    assert b.reserve(100, now=10.0) == pytest.approx(10.0)  # one second of idle credit


def test_meter_counts_match_bytes_moved(tmp_path):
    nic = StorageNic("meter-node")
    s = store(tmp_path, nic)
    rng = np.random.default_rng(0)
    for i in range(3):
        s.put(key(i), rng.integers(0, 256, G.payload_bytes, dtype=np.uint8))
    outs = [np.empty(G.payload_bytes, np.uint8) for _ in range(4)]
    assert s.batch_get_into([key(0), key(1), key(2), key(9)], outs) == [True] * 3 + [False]
    snap = nic.snapshot()
    assert (snap.write_ops, snap.write_bytes) == (3, 3 * BLOCK)
    assert (snap.read_ops, snap.read_bytes) == (3, 3 * BLOCK), "a miss moves nothing"
    assert snap.read_queue_bytes == snap.read_queue_tokens == 0
    assert snap.reads_in_flight == snap.writes_in_flight == 0 and snap.read_busy_s > 0
    sample = REGISTRY.get_sample_value
    assert sample("dualpath_storage_bytes_total", {"node": "meter-node", "op": "read"}) == \
        3 * BLOCK
    assert sample("dualpath_storage_read_queue_tokens", {"node": "meter-node"}) == 0


def test_cap_accuracy_within_5_percent(tmp_path):
    cap_gbps = 0.05  # 50 MB/s: 1 MiB blocks take ~21 ms each at the cap
    nic = StorageNic("capped-node", cap_gbps=cap_gbps)
    s = store(tmp_path, nic)
    for i in range(4):
        s.put(key(i), np.full(G.payload_bytes, i, np.uint8))
    moved = [0] * 4  # one slot per thread: no shared read-modify-write
    stop = time.monotonic() + 2.5

    def reader(i):
        out = np.empty(G.payload_bytes, np.uint8)
        while time.monotonic() < stop:
            assert s.get_into(key(i % 4), out)
            moved[i] += BLOCK

    t0 = time.monotonic()
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = sum(moved) / (time.monotonic() - t0)
    assert abs(rate / (cap_gbps * 1e9) - 1) < 0.05, f"achieved {rate / 1e9:.4f} GB/s"


def test_reads_and_writes_each_get_the_cap():
    """Full duplex: a node's write-back does not slow its reads (and the reverse)."""
    nic = StorageNic("duplex-node", cap_gbps=1e-6)  # 1000 B/s each way
    t0 = time.monotonic()
    done = []

    def move(op):
        with nic.transfer(op, 300):
            pass
        done.append((op, time.monotonic() - t0))

    threads = [threading.Thread(target=move, args=(op,)) for op in ("read", "write")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(op for op, _ in done) == ["read", "write"]
    assert all(0.25 < dt < 0.5 for _, dt in done), done  # both ~0.3 s, not 0.3 + 0.6


def test_read_queue_is_visible_while_reads_wait(tmp_path):
    nic = StorageNic("queue-node", cap_gbps=0.02)  # ~52 ms per block
    s = store(tmp_path, nic, io_threads=2)
    for i in range(8):
        s.put(key(i), np.zeros(G.payload_bytes, np.uint8))
    outs = [np.empty(G.payload_bytes, np.uint8) for _ in range(8)]
    t = threading.Thread(target=s.batch_get_into, args=([key(i) for i in range(8)], outs))
    t.start()
    time.sleep(0.1)
    mid = nic.snapshot()
    t.join()
    assert 0 < mid.read_queue_tokens <= 8 * G.page_size
    assert mid.read_queue_bytes == mid.read_queue_tokens // G.page_size * BLOCK
    end = nic.snapshot()
    assert end.read_queue_tokens == 0 and end.read_ops == 8


def test_bad_cap_is_refused():
    with pytest.raises(ValueError, match="cap_gbps"):
        StorageNic("x", cap_gbps=0)


def test_cap_changes_at_runtime_and_keeps_the_queue():
    nic = StorageNic("rt", cap_gbps=1e-6)  # 1000 B/s
    nic._clocks["read"].reserve(1000, now=time.monotonic())  # busy for ~1 s receiving
    end = nic._clocks["read"]._end
    nic.set_cap(2e-6)
    assert nic.cap_gbps == 2e-6 and nic._clocks["read"].rate == 2000.0
    assert nic._clocks["read"].reserve(2000) == pytest.approx(end + 1.0)  # behind the old one
    assert nic._clocks["write"].reserve(200) < end - 0.5  # the other direction was idle
    nic.set_cap(None)
    assert nic.cap_gbps is None and not nic._clocks
    with nic.transfer("read", 10**9):  # no cap: no wait
        pass
    with pytest.raises(ValueError):
        nic.set_cap(-1.0)
