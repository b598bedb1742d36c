"""The `tcp` backend's remote regions: one-sided writes and reads into another engine's memory,
in this process and across processes, refused requests, a peer killed mid-batch, repost."""

import multiprocessing as mp
import time

import numpy as np
import pytest

from dualpath.transfer import TransferBatch, TransferEngine

MB = 1 << 20


@pytest.fixture
def pair():
    server = TransferEngine("tcp", num_workers=2)
    port = server.listen("127.0.0.1", 0)
    client = TransferEngine("tcp", num_workers=4)
    return server, f"127.0.0.1:{port}", client


@pytest.mark.parametrize("n", [1, 1000, 65536])
def test_random_bytes_written_and_read_back(pair, n):
    server, addr, client = pair
    rng = np.random.default_rng(n)
    size = 1 << 22
    target = np.zeros(size, np.uint8)
    remote = client.register_remote(addr, server.register_array(target), size, connections=3)
    src = rng.integers(0, 256, size, dtype=np.uint8)
    local = client.register_array(src)
    chunk = max(1, size // n // 2)
    lengths = rng.integers(0, chunk + 1, n)
    src_off = rng.integers(0, size - chunk, n)
    dst_off = np.arange(n, dtype=np.int64) * chunk  # disjoint destinations
    h = client.submit(TransferBatch.of(local, src_off, remote, dst_off, lengths))
    assert client.wait(h, 60) == "done", h.error
    for i in rng.choice(n, min(n, 200), replace=False):
        s, d, ln = src_off[i], dst_off[i], lengths[i]
        assert np.array_equal(target[d:d + ln], src[s:s + ln]), f"descriptor {i}"
    back = np.zeros(size, np.uint8)
    h = client.submit(TransferBatch.of(remote, 0, client.register_array(back), 0, size))
    assert client.wait(h, 60) == "done" and np.array_equal(back, target)


def test_refused_requests_name_the_reason_and_keep_the_connection(pair):
    server, addr, client = pair
    target = np.zeros(1024, np.uint8)
    rid = server.register_array(target)
    src = client.register_array(np.ones(4096, np.uint8))
    unknown = client.register_remote(addr, 999, 4096)
    h = client.submit(TransferBatch.of(src, 0, unknown, 0, 100))
    assert client.wait(h, 30) == "failed" and "region 999 is not registered" in h.error
    lying = client.register_remote(addr, rid, 4096)  # says 4 KiB, the server has 1 KiB
    h = client.submit(TransferBatch.of(src, 0, lying, 1000, 100))
    assert client.wait(h, 30) == "failed" and "outside region" in h.error
    ok = client.register_remote(addr, rid, 1024)
    h = client.submit(TransferBatch.of(src, 0, ok, 0, 1024))
    assert client.wait(h, 30) == "done" and target.all()


def test_rules_for_remote_regions(pair):
    server, addr, client = pair
    r = client.register_remote(addr, server.register_array(np.zeros(64, np.uint8)), 64)
    with pytest.raises(ValueError, match="both ends are remote"):
        client.submit(TransferBatch.of(r, 0, r, 32, 8))
    with pytest.raises(ValueError, match="outside region"):
        client.submit(TransferBatch.of(client.register_array(np.ones(8, np.uint8)), 0, r, 60, 8))
    with pytest.raises(ValueError, match="host:port"):
        client.register_remote("nohost", 1, 64)
    with pytest.raises(ValueError, match="does not serve peers"):
        TransferEngine("host").listen()
    with pytest.raises(RuntimeError, match="already listens"):
        server.listen()


def test_unreachable_peer_fails_cleanly_and_reconnects_later():
    client = TransferEngine("tcp", num_workers=2)
    server = TransferEngine("tcp", num_workers=1)
    port = server.listen()
    target = np.zeros(16, np.uint8)
    rid = server.register_array(target)
    del server  # nobody listens on the port any more
    remote = client.register_remote(f"127.0.0.1:{port}", rid, 16)
    src = client.register_array(np.ones(16, np.uint8))
    h = client.submit(TransferBatch.of(src, 0, remote, 0, 16))
    t0 = time.monotonic()
    assert client.wait(h, 30) == "failed" and "connect" in h.error
    assert time.monotonic() - t0 < 5


def _serve(port_q, stop_q):
    eng = TransferEngine("tcp", num_workers=2)
    buf = np.zeros(256 * MB, np.uint8)
    rid = eng.register_array(buf)
    port_q.put((eng.listen(), rid))
    stop_q.get()  # wait to be killed


def test_peer_killed_mid_batch_fails_the_batch_without_hanging():
    ctx = mp.get_context("spawn")
    port_q, stop_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_serve, args=(port_q, stop_q), daemon=True)
    proc.start()
    port, rid = port_q.get(timeout=60)
    client = TransferEngine("tcp", num_workers=4)
    src = client.register_array(np.ones(256 * MB, np.uint8))
    remote = client.register_remote(f"127.0.0.1:{port}", rid, 256 * MB)
    off = np.arange(1024, dtype=np.int64) * (256 << 10)
    h = client.submit(TransferBatch.of(src, off, remote, off, 256 << 10))
    time.sleep(0.05)
    proc.kill()
    t0 = time.monotonic()
    status = client.wait(h, 60)
    assert time.monotonic() - t0 < 20, "a dead peer must not hang the batch"
    if status == "done":  # the whole batch made it before the kill: try again now it is dead
        h = client.submit(TransferBatch.of(src, off, remote, off, 256 << 10))
        status = client.wait(h, 60)
    assert status == "failed"
    assert any(w in h.error for w in ("closed", "reset", "connect", "Broken pipe", "refused"))
    proc.join(10)
