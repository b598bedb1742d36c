"""BlockStore on a local directory: byte-exact round trips, every kind of bad file is a miss,
concurrent writers, LRU eviction, and refusal to share a directory across fingerprints."""

import logging
import multiprocessing as mp
import os
import threading

import numpy as np
import pytest

from dualpath.storage import BlockGeometry, BlockStore, StoreMismatch, fingerprint
from dualpath.storage.block_file import HEADER_BYTES

GEOMETRIES = [
    BlockGeometry(num_layers=1, page_size=1, num_kv_heads=1, head_dim=1, dtype_bytes=1),
    BlockGeometry(num_layers=3, page_size=16, num_kv_heads=2, head_dim=64, dtype_bytes=2),
    BlockGeometry(num_layers=61, page_size=64, num_kv_heads=1, head_dim=576, dtype_bytes=1,
                  kv_parts=1),  # MLA-shaped, fp8
    BlockGeometry(num_layers=2, page_size=17, num_kv_heads=3, head_dim=5, dtype_bytes=4),
]


def key(i: int) -> str:
    return f"{i:064x}"


def open_store(root, g, model="m", **kw):
    return BlockStore(str(root), g, fingerprint(model, g), description={"model": model}, **kw)


def payload(g, seed):
    return np.random.default_rng(seed).integers(0, 256, g.payload_bytes, dtype=np.uint8)


@pytest.mark.parametrize("g", GEOMETRIES, ids=lambda g: f"L{g.num_layers}p{g.page_size}")
def test_round_trip_is_byte_exact(tmp_path, g):
    s = open_store(tmp_path, g)
    data = [payload(g, i) for i in range(5)]
    assert s.batch_put([key(i) for i in range(5)], data) == [True] * 5
    assert s.put(key(0), data[0]) is False, "second put of a key is a no-op"
    outs = [np.full(g.payload_bytes, 0xAB, dtype=np.uint8) for _ in range(5)]
    assert s.batch_get_into([key(i) for i in range(5)], outs) == [True] * 5
    for d, o in zip(data, outs, strict=True):
        assert np.array_equal(d, o)
    lo, hi = g.layer_range(g.num_layers - 1)
    assert hi - lo == g.layer_bytes and hi == g.payload_bytes
    assert os.path.getsize(s.path(key(0))) == HEADER_BYTES + g.payload_bytes


def test_exists_prefix(tmp_path):
    g = GEOMETRIES[1]
    s = open_store(tmp_path, g)
    for i in (0, 1, 3):
        s.put(key(i), payload(g, i))
    assert s.exists_prefix([key(0), key(1), key(2), key(3)]) == 2
    assert s.exists_prefix([key(2)]) == 0 and s.exists_prefix([]) == 0


def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "flip":
        data[HEADER_BYTES + len(data[HEADER_BYTES:]) // 2] ^= 0x01
    elif how == "truncate":
        data = data[:-7]
    elif how == "header":
        data[0:8] = b"NOTABLOK"
    elif how == "append":
        data += b"trailing garbage"
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "header", "append"])
def test_damaged_files_are_logged_misses(tmp_path, caplog, how):
    g = GEOMETRIES[1]
    s = open_store(tmp_path, g)
    s.put(key(7), payload(g, 7))
    _damage(s.path(key(7)), how)
    out = np.zeros(g.payload_bytes, dtype=np.uint8)
    with caplog.at_level(logging.WARNING):
        assert s.get_into(key(7), out) is False
    assert key(7) in caplog.text


def test_foreign_and_misplaced_files_are_misses(tmp_path):
    g = GEOMETRIES[1]
    a = open_store(tmp_path / "a", g, model="model-a")
    b = open_store(tmp_path / "b", g, model="model-b")
    a.put(key(1), payload(g, 1))
    os.makedirs(os.path.dirname(b.path(key(1))), exist_ok=True)
    os.link(a.path(key(1)), b.path(key(1)))  # a block of another model under the same key
    out = np.zeros(g.payload_bytes, dtype=np.uint8)
    assert b.get_into(key(1), out) is False
    os.makedirs(os.path.dirname(a.path(key(2))), exist_ok=True)
    os.link(a.path(key(1)), a.path(key(2)))  # right store, wrong key
    assert a.get_into(key(2), out) is False
    assert a.get_into(key(3), out) is False  # absent


def test_directory_refuses_another_fingerprint(tmp_path):
    g = GEOMETRIES[1]
    open_store(tmp_path, g, model="m")
    open_store(tmp_path, g, model="m")  # same model and geometry: fine
    with pytest.raises(StoreMismatch, match="another model"):
        open_store(tmp_path, g, model="other")
    g2 = BlockGeometry(3, 16, 2, 64, 1)
    with pytest.raises(StoreMismatch, match="geometry"):
        open_store(tmp_path, g2, model="m")


def test_bad_keys_and_buffers_are_refused(tmp_path):
    g = GEOMETRIES[1]
    s = open_store(tmp_path, g)
    for bad in ["../../etc/passwd", "a/b", "", "x" * 300]:
        with pytest.raises(ValueError, match="invalid block key"):
            s.put(bad, payload(g, 0))
    with pytest.raises(ValueError, match="bytes"):
        s.put(key(1), np.zeros(g.payload_bytes - 1, dtype=np.uint8))
    s.put(key(1), payload(g, 1))
    with pytest.raises(ValueError, match="buffer"):
        s.get_into(key(1), np.zeros(3, dtype=np.uint8))


def _writer(root, n):
    g = GEOMETRIES[1]
    s = open_store(root, g)
    for _ in range(n):
        s.put(key(42), payload(g, 42))
        try:
            os.unlink(s.path(key(42)))  # make the next put write again: maximal overlap
        except FileNotFoundError:
            pass
    s.put(key(42), payload(g, 42))


def test_concurrent_writers_of_one_key(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 20)) for _ in range(3)]
    threads = [threading.Thread(target=_writer, args=(str(tmp_path), 20)) for _ in range(3)]
    for w in procs + threads:
        w.start()
    for w in procs + threads:
        w.join(60)
    assert all(p.exitcode == 0 for p in procs)
    g = GEOMETRIES[1]
    out = np.zeros(g.payload_bytes, dtype=np.uint8)
    assert open_store(tmp_path, g).get_into(key(42), out)
    assert np.array_equal(out, payload(g, 42))
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]
    assert leftovers == []


def test_lru_eviction_keeps_recently_read_blocks(tmp_path):
    g = GEOMETRIES[1]
    block = HEADER_BYTES + g.payload_bytes
    s = open_store(tmp_path, g, capacity_bytes=4 * block, low_watermark=0.75)
    for i in range(4):
        s.put(key(i), payload(g, i))
        t = 1_000_000 + i
        os.utime(s.path(key(i)), (t, t))  # distinct ages: 0 oldest
    out = np.zeros(g.payload_bytes, dtype=np.uint8)
    assert s.get_into(key(0), out)  # reading refreshes key 0
    s.put(key(4), payload(g, 4))  # 5 blocks > cap 4: evict down to 3
    present = [i for i in range(5) if os.path.exists(s.path(key(i)))]
    assert present == [0, 3, 4]


def test_damaged_block_is_removed_so_it_can_be_written_again(tmp_path):
    g = GEOMETRIES[1]
    s = open_store(tmp_path, g)
    s.put(key(5), payload(g, 5))
    _damage(s.path(key(5)), "flip")
    out = np.zeros(g.payload_bytes, dtype=np.uint8)
    assert s.get_into(key(5), out) is False
    assert s.exists_prefix([key(5)]) == 0, "a damaged block must not keep answering 'exists'"
    assert s.put(key(5), payload(g, 5)) is True
    assert s.get_into(key(5), out) and np.array_equal(out, payload(g, 5))


def test_other_os_errors_are_misses(tmp_path):
    g = GEOMETRIES[1]
    s = open_store(tmp_path, g)
    os.makedirs(s.path(key(6)))  # a directory where the block file should be
    assert s.get_into(key(6), np.zeros(g.payload_bytes, dtype=np.uint8)) is False
    with pytest.raises(ValueError, match="buffers"):
        s.batch_get_into([key(1), key(2)], [np.zeros(g.payload_bytes, np.uint8)])


def test_concurrent_puts_evict_to_the_watermark_not_below(tmp_path):
    g = GEOMETRIES[0]  # tiny blocks
    block = HEADER_BYTES + g.payload_bytes
    s = open_store(tmp_path, g, capacity_bytes=100 * block, low_watermark=0.9, io_threads=16)
    s.batch_put([key(i) for i in range(300)], [payload(g, i) for i in range(300)])
    s.close()
    n = sum(1 for _, _, fs in os.walk(tmp_path) for f in fs if f != "STORE.json")
    assert 50 <= n <= 100, n  # under the cap, and not emptied by overlapping evictions


def test_a_claimed_key_is_written_once(tmp_path):
    """Two engines backing up the same page at once: the second sees the claim and skips."""
    import time

    from dualpath.storage import store as store_mod

    g = GEOMETRIES[1]
    s = open_store(tmp_path, g)
    payload = np.zeros(g.payload_bytes, np.uint8)
    KEY = key(5)
    claim = s.path(KEY) + ".claim"
    os.makedirs(os.path.dirname(claim), exist_ok=True)
    open(claim, "w").close()  # another writer is busy with it
    assert s.put(KEY, payload) is False and not os.path.exists(s.path(KEY))
    old = time.time() - store_mod.CLAIM_STALE_S - 1
    os.utime(claim, (old, old))  # ... and died long ago: taken over
    assert s.put(KEY, payload) is True and os.path.exists(s.path(KEY))
    assert not os.path.exists(claim)
    assert s.put(KEY, payload) is False  # stored: nothing to do


def test_reads_survive_short_readv_calls(tmp_path, monkeypatch):
    """A block read is one readv normally; a readv that returns less (a signal, a file system
    that splits reads) is continued where it stopped, across buffer boundaries."""
    from dualpath.storage import block_file

    g = GEOMETRIES[1]
    s = open_store(tmp_path, g)
    s.put(key(3), payload(g, 3))
    real, calls = os.readv, []

    def short(fd, bufs):
        calls.append(len(bufs))
        first = bufs[0][:1000] if bufs[0].nbytes > 1000 else bufs[0]
        return real(fd, [first])

    monkeypatch.setattr(block_file.os, "readv", short)
    out = np.zeros(g.payload_bytes, dtype=np.uint8)
    assert s.get_into(key(3), out) is True
    assert bytes(out) == bytes(payload(g, 3))
    assert len(calls) > 2
