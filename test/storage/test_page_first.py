"""page_first host pages <-> layer-major Full Blocks, through raw host addresses as SGLang
hands them out (get_page_buffer_meta)."""

import time

import numpy as np
import pytest

from dualpath.storage import BlockGeometry, BlockStore, StorageNic, fingerprint
from dualpath.storage.page_first import PageFirstAdapter

L_, PS, H, D, E = 3, 4, 2, 8, 2  # layers, page size, heads, dim, bytes per element
G = BlockGeometry(num_layers=L_, page_size=PS, num_kv_heads=H, head_dim=D, dtype_bytes=E)
ROW = H * D * E


def host_pool(slots, seed):
    """A page_first host pool [2, slots, layers, heads*dim*bytes] like SGLang's, as raw bytes."""
    return np.random.default_rng(seed).integers(0, 256, (2, slots, L_, ROW), dtype=np.uint8)


def page_ptrs(pool, pages):
    """What MHATokenToKVPoolHost.get_page_buffer_meta gives for page_first: K and V addresses."""
    base, v_off = pool.ctypes.data, pool[1].ctypes.data - pool.ctypes.data
    k = [base + p * PS * L_ * ROW for p in pages]
    return k, [x + v_off for x in k]


def key(i):
    return f"{i:064x}"


@pytest.fixture(params=[True, False], ids=["native", "python"])
def native(request):
    """Both readers: the native one (dualpath._C) and the Python reference."""
    return request.param


@pytest.mark.parametrize("with_nic", [False, True])
def test_round_trip_and_layer_major_blocks(tmp_path, with_nic, native):
    nic = StorageNic("pf-node") if with_nic else None
    store = BlockStore(str(tmp_path), G, fingerprint("m", G), description={}, nic=nic)
    a = PageFirstAdapter(store, native=native)
    src = host_pool(5 * PS, 0)
    keys = [key(i) for i in range(3)]
    assert a.set_pages(keys, *page_ptrs(src, [4, 0, 2])) == [True] * 3
    # the stored block of key 1 (source page 0) is layer-major: layer, K/V, token, row
    block = np.empty(G.payload_bytes, np.uint8)
    assert store.get_into(keys[1], block)
    block = block.reshape(L_, 2, PS, ROW)
    page0 = src[:, 0:PS]  # [2, tokens, layers, row]
    assert np.array_equal(block[:, 0], page0[0].transpose(1, 0, 2))
    assert np.array_equal(block[:, 1], page0[1].transpose(1, 0, 2))
    dst = host_pool(6 * PS, 1)
    before = dst.copy()
    got = a.get_pages(keys + [key(9)], *page_ptrs(dst, [1, 5, 3, 0]))
    assert got == [True, True, True, False]
    for s_page, d_page in ((4, 1), (0, 5), (2, 3)):
        assert np.array_equal(dst[:, d_page * PS:(d_page + 1) * PS],
                              src[:, s_page * PS:(s_page + 1) * PS])
    untouched = [p for p in range(6) if p not in (1, 5, 3)]
    for p in untouched:
        assert np.array_equal(dst[:, p * PS:(p + 1) * PS], before[:, p * PS:(p + 1) * PS])
    if nic:
        snap = nic.snapshot()
        assert snap.read_ops == 4 and snap.read_queue_tokens == 0  # 1 direct + 3 pages; miss: 0
    a.close()


def test_damaged_block_does_not_touch_the_page(tmp_path, native):
    store = BlockStore(str(tmp_path), G, fingerprint("m", G), description={})
    a = PageFirstAdapter(store, native=native)
    src = host_pool(PS, 2)
    a.set_pages([key(1)], *page_ptrs(src, [0]))
    path = store.path(key(1))
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    dst = host_pool(PS, 3)
    before = dst.copy()
    assert a.get_pages([key(1)], *page_ptrs(dst, [0])) == [False]
    assert np.array_equal(dst, before), "a failed read must leave the pool page as it was"


def test_mismatched_lists_and_mla_are_refused(tmp_path):
    store = BlockStore(str(tmp_path), G, fingerprint("m", G), description={})
    with pytest.raises(ValueError, match="keys for"):
        PageFirstAdapter(store).get_pages([key(1)], [0, 1], [0])
    g1 = BlockGeometry(2, 4, 1, 64, 2, kv_parts=1)
    with pytest.raises(ValueError, match="MLA"):
        PageFirstAdapter(BlockStore(str(tmp_path / "mla"), g1, fingerprint("m", g1),
                                    description={}))


# ---- the native reader against the Python reference ----

ODD = BlockGeometry(num_layers=5, page_size=3, num_kv_heads=3, head_dim=7, dtype_bytes=2)
OROW = ODD.num_kv_heads * ODD.head_dim * ODD.dtype_bytes


def odd_pool(slots, seed):
    return np.random.default_rng(seed).integers(0, 256, (2, slots, ODD.num_layers, OROW),
                                                dtype=np.uint8)


def odd_ptrs(pool, pages):
    base, v_off = pool.ctypes.data, pool[1].ctypes.data - pool.ctypes.data
    k = [base + p * ODD.page_size * ODD.num_layers * OROW for p in pages]
    return k, [x + v_off for x in k]


def test_native_and_python_fill_identical_bytes_odd_geometry(tmp_path):
    pytest.importorskip("dualpath._C")
    store = BlockStore(str(tmp_path), ODD, fingerprint("m", ODD), description={},
                       nic=StorageNic("n"))
    writer = PageFirstAdapter(store, native=False)
    n = 23  # more blocks than threads, not a multiple of them
    src = odd_pool(n * ODD.page_size, 7)
    keys = [key(i) for i in range(n)]
    assert writer.set_pages(keys, *odd_ptrs(src, list(range(n)))) == [True] * n
    order = [int(x) for x in np.random.default_rng(8).permutation(n + 2)]  # 2 pages stay free
    asked = keys + [key(100)]  # one miss
    dsts = []
    for native_ in (True, False):
        dst = odd_pool((n + 2) * ODD.page_size, 9)
        a = PageFirstAdapter(store, io_threads=3, native=native_)
        got = a.get_pages(asked, *odd_ptrs(dst, order[:n + 1]))
        assert got == [True] * n + [False]
        a.close()
        dsts.append(dst)
    assert np.array_equal(dsts[0], dsts[1])
    for i in range(n):
        p, q = i * ODD.page_size, order[i] * ODD.page_size
        assert np.array_equal(dsts[0][:, q:q + ODD.page_size], src[:, p:p + ODD.page_size])
    snap = store.nic.snapshot()
    assert snap.read_ops == 2 * n and snap.read_queue_tokens == 0 and snap.reads_in_flight == 0
    assert snap.read_bytes == 2 * n * store.block_bytes


def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "checksum":
        data[-1] ^= 0xFF
    elif how == "truncated":
        data = data[:-5]
    elif how == "longer":
        data += b"x"
    elif how == "header":
        data[40] ^= 0x01  # inside the fingerprint
    elif how == "empty":
        data = bytearray()
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["checksum", "truncated", "longer", "header", "empty",
                                 "other_key"])
def test_native_rejects_damage_leaves_page_and_removes_block(tmp_path, how):
    pytest.importorskip("dualpath._C")
    store = BlockStore(str(tmp_path), ODD, fingerprint("m", ODD), description={},
                       nic=StorageNic("n"))
    a = PageFirstAdapter(store, native=True)
    src = odd_pool(2 * ODD.page_size, 1)
    a.set_pages([key(1), key(2)], *odd_ptrs(src, [0, 1]))
    if how == "other_key":  # a valid block of another key under this key's name
        import shutil
        shutil.copy(store.path(key(2)), store.path(key(1)))
    else:
        _damage(store.path(key(1)), how)
    dst = odd_pool(2 * ODD.page_size, 2)
    before = dst.copy()
    assert a.get_pages([key(1), key(2)], *odd_ptrs(dst, [0, 1])) == [False, True]
    assert np.array_equal(dst[:, :ODD.page_size], before[:, :ODD.page_size])
    assert np.array_equal(dst[:, ODD.page_size:], src[:, ODD.page_size:])
    import os
    assert not os.path.exists(store.path(key(1))), "an unusable block is removed"
    assert store.nic.snapshot().read_queue_tokens == 0


def test_native_io_error_is_a_logged_miss(tmp_path, caplog):
    pytest.importorskip("dualpath._C")
    import os
    store = BlockStore(str(tmp_path), ODD, fingerprint("m", ODD), description={})
    a = PageFirstAdapter(store, native=True)
    os.makedirs(store.path(key(3)))  # reading a directory fails with EISDIR
    dst = odd_pool(ODD.page_size, 2)
    before = dst.copy()
    with caplog.at_level("WARNING"):
        assert a.get_pages([key(3)], *odd_ptrs(dst, [0])) == [False]
    assert np.array_equal(dst, before)
    assert "unreadable" in caplog.text and "directory" in caplog.text.lower()


def test_native_reads_keep_the_nic_cap(tmp_path):
    pytest.importorskip("dualpath._C")
    import time
    nic = StorageNic("n", cap_gbps=None)
    store = BlockStore(str(tmp_path), ODD, fingerprint("m", ODD), description={}, nic=nic)
    a = PageFirstAdapter(store, io_threads=4, native=True)
    n = 12
    src = odd_pool(n * ODD.page_size, 3)
    keys = [key(i) for i in range(n)]
    a.set_pages(keys, *odd_ptrs(src, list(range(n))))
    rate = n * store.block_bytes / 0.3  # the batch's bytes at line rate take 0.3 s
    nic.set_cap(rate / 1e9)
    dst = odd_pool(n * ODD.page_size, 4)
    t0 = time.monotonic()
    assert a.get_pages(keys, *odd_ptrs(dst, list(range(n)))) == [True] * n
    took = time.monotonic() - t0
    assert 0.29 < took < 2.0, took
    assert np.array_equal(dst, src)


def test_env_selects_the_python_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPATH_NATIVE_IO", "0")
    store = BlockStore(str(tmp_path), ODD, fingerprint("m", ODD), description={})
    assert PageFirstAdapter(store)._native is None
    monkeypatch.setenv("DUALPATH_NATIVE_IO", "1")
    from dualpath.storage.page_first import native_reader
    assert (PageFirstAdapter(store)._native is None) == (native_reader() is None)
    monkeypatch.setenv("DUALPATH_NATIVE_IO", "maybe")
    with pytest.raises(ValueError, match="DUALPATH_NATIVE_IO"):
        PageFirstAdapter(store)


def test_native_ignores_what_the_python_check_ignores(tmp_path, monkeypatch):
    """The reserved u32 and the padding after the key are not checked by block_file's reader:
    the native one accepts such a block itself (no fallback read, block kept)."""
    pytest.importorskip("dualpath._C")
    store = BlockStore(str(tmp_path), ODD, fingerprint("m", ODD), description={})
    a = PageFirstAdapter(store, native=True)
    src = odd_pool(ODD.page_size, 5)
    a.set_pages([key(1)], *odd_ptrs(src, [0]))
    path = store.path(key(1))
    data = bytearray(open(path, "rb").read())
    data[12] ^= 0x5A  # reserved
    data[4000] ^= 0x01  # padding after the key
    open(path, "wb").write(bytes(data))
    monkeypatch.setattr(a, "_get_one", lambda *x: pytest.fail("fell back to the Python reader"))
    dst = odd_pool(ODD.page_size, 6)
    assert a.get_pages([key(1)], *odd_ptrs(dst, [0])) == [True]
    assert np.array_equal(dst, src)
    import os
    assert os.path.exists(path)


def test_native_batch_reads_leave_the_queue_at_their_line_rate_ends():
    """A native call reads its whole share at once; its queued reads still leave the read queue
    one by one, at their reserved end times, as the Python reader's do."""
    import time
    nic = StorageNic("n", cap_gbps=1e-9 * 1000 / 0.1)  # 1000-byte blocks: 0.1 s each
    for _ in range(5):
        nic.submit_read(1000, 64)
    with nic.transfers("read", 5, 1000, 64, queued=True) as batch:
        assert nic.snapshot().read_queue_tokens == 5 * 64
        time.sleep(0.25)
        assert nic.snapshot().read_queue_tokens == 3 * 64
        batch.ok = 5
    snap = nic.snapshot()
    assert snap.read_queue_tokens == 0 and snap.read_queue_bytes == 0
    assert snap.read_ops == 5 and snap.reads_in_flight == 0


# ---- the native writer against the Python reference ----

def _files(root):
    import os
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                  for f in fs if f != "STORE.json")


def test_native_writer_writes_the_python_writers_bytes(tmp_path):
    pytest.importorskip("dualpath._C")
    n = 7
    src = odd_pool(n * ODD.page_size, 11)
    keys = [key(i) for i in range(n)]
    files = {}
    for native_ in (True, False):
        root = tmp_path / ("native" if native_ else "python")
        nic = StorageNic("n")
        store = BlockStore(str(root), ODD, fingerprint("m", ODD), description={}, nic=nic)
        a = PageFirstAdapter(store, io_threads=3, native=native_)
        assert a.set_pages(keys, *odd_ptrs(src, list(range(n)))) == [True] * n
        files[native_] = {f: (root / f).read_bytes() for f in _files(root)}
        assert nic.snapshot().write_ops == n and nic.snapshot().writes_in_flight == 0
        dst = odd_pool(n * ODD.page_size, 12)
        assert PageFirstAdapter(store, native=not native_).get_pages(
            keys, *odd_ptrs(dst, list(range(n)))) == [True] * n
        assert np.array_equal(dst, src)
    assert files[True] == files[False] and len(files[True]) == n  # no temp files or claims


def test_native_writer_skips_stored_and_claimed_keys_and_takes_over_stale_claims(tmp_path):
    pytest.importorskip("dualpath._C")
    import os
    import time
    nic = StorageNic("n")
    store = BlockStore(str(tmp_path), ODD, fingerprint("m", ODD), description={}, nic=nic)
    a = PageFirstAdapter(store, native=True)
    src = odd_pool(3 * ODD.page_size, 13)
    a.set_pages([key(1)], *odd_ptrs(src, [0]))
    before = os.stat(store.path(key(1)))
    os.makedirs(os.path.dirname(store.path(key(2))), exist_ok=True)
    open(store.path(key(2)) + ".claim", "w").close()  # another writer, now
    os.makedirs(os.path.dirname(store.path(key(3))), exist_ok=True)
    stale = store.path(key(3)) + ".claim"
    open(stale, "w").close()
    old = time.time() - 3600
    os.utime(stale, (old, old))  # a writer that died
    k, v = odd_ptrs(src, [1, 1, 2])
    assert a.set_pages([key(1), key(2), key(3)], k, v) == [True] * 3
    after = os.stat(store.path(key(1)))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not os.path.exists(store.path(key(2)))  # left to the claim's owner
    assert os.path.exists(store.path(key(3))) and not os.path.exists(stale)
    assert nic.snapshot().write_ops == 2  # key 1 and key 3 moved bytes
    dst = odd_pool(ODD.page_size, 14)
    assert a.get_pages([key(3)], *odd_ptrs(dst, [0])) == [True]
    assert np.array_equal(dst, src[:, 2 * ODD.page_size:3 * ODD.page_size])


def test_native_writer_error_raises_and_leaves_nothing(tmp_path):
    """A file where the block's directory should be: the errors os.makedirs raises (a file
    above the directory, then at it), from both writers, and nothing left behind; set_pages
    turns them into pages not stored (SGLang's backup thread must not see an exception)."""
    pytest.importorskip("dualpath._C")
    import os
    store = BlockStore(str(tmp_path), ODD, fingerprint("m", ODD), description={})
    src = odd_pool(ODD.page_size, 15)
    leaf = os.path.dirname(store.path(key(5)))  # root/00/00
    for blocker, err in ((os.path.dirname(leaf), NotADirectoryError), (leaf, FileExistsError)):
        os.makedirs(os.path.dirname(blocker), exist_ok=True)
        open(blocker, "w").close()
        for native_ in (True, False):
            a = PageFirstAdapter(store, native=native_)
            k_ptrs, v_ptrs = odd_ptrs(src, [0])
            with pytest.raises(err, match="storing block" if native_ else None):
                a._set_one(key(5), k_ptrs[0], v_ptrs[0])
            assert a.set_pages([key(5)], k_ptrs, v_ptrs) == [False] and a.write_errors == 1
        assert _files(tmp_path) == [os.path.relpath(blocker, tmp_path)]
        os.unlink(blocker)


def test_native_writes_keep_the_cap_and_the_capacity(tmp_path):
    pytest.importorskip("dualpath._C")
    import time
    nic = StorageNic("n")
    store = BlockStore(str(tmp_path), ODD, fingerprint("m", ODD), description={}, nic=nic,
                       capacity_bytes=10 * 10**9)
    a = PageFirstAdapter(store, io_threads=4, native=True)
    n = 12
    nic.set_cap(n * store.block_bytes / 0.3 / 1e9)  # the batch at line rate: 0.3 s
    src = odd_pool(n * ODD.page_size, 16)
    t0 = time.monotonic()
    a.set_pages([key(i) for i in range(n)], *odd_ptrs(src, list(range(n))))
    assert 0.29 < time.monotonic() - t0 < 2.0
    assert store._used == n * store.block_bytes
    snap = nic.snapshot()
    assert snap.write_bytes == n * store.block_bytes and snap.writes_in_flight == 0


def test_writes_do_not_queue_behind_reads(tmp_path):
    """Reads that hold every read thread (a capped NIC paces them) do not hold back a write:
    the two directions have thread pools of their own."""
    import threading

    store = BlockStore(str(tmp_path), G, fingerprint("m", G), description={})
    a = PageFirstAdapter(store, io_threads=2, native=False)
    release, started = threading.Event(), threading.Semaphore(0)

    def slow_get(*args, **kwargs):
        started.release()
        release.wait(30)
        return False
    a._get_one = slow_get
    dst, src = host_pool(2 * PS, 1), host_pool(PS, 2)
    reader = threading.Thread(target=a.get_pages, args=([key(1), key(2)], *page_ptrs(dst, [0, 1])))
    reader.start()
    assert started.acquire(timeout=10) and started.acquire(timeout=10), "both read threads busy"
    done = []
    writer = threading.Thread(target=lambda: done.append(a.set_pages([key(3)],
                                                                      *page_ptrs(src, [0]))))
    writer.start()
    writer.join(10)
    finished = not writer.is_alive()
    release.set()
    reader.join(10)
    writer.join(10)
    assert finished and done == [[True]], "the write waited for the reads"
    assert store.exists_prefix([key(3)]) == 1
    a.close()


def test_reads_go_oldest_request_first(tmp_path):
    """A request's later batch goes before a batch of a request that first asked later (the
    node's read order), not after it as in a first-in-first-out pool; a read without a request
    id queues as a new request."""
    import threading

    store = BlockStore(str(tmp_path), G, fingerprint("m", G), description={})
    a = PageFirstAdapter(store, io_threads=1, native=False)
    release, ran, lock = threading.Event(), [], threading.Lock()

    def get_one(k, kp, vp, queued=False):
        with lock:
            ran.append(k)
        if k == key(1):
            release.wait(30)
        return False
    a._get_one = get_one
    dst = host_pool(4 * PS, 1)
    calls = [("A", key(1), 0), ("B", key(2), 1), (None, key(4), 3), ("A", key(3), 2)]
    threads = []
    for rid, k, page in calls:
        t = threading.Thread(target=a.get_pages, args=([k], *page_ptrs(dst, [page]), rid))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 10
        while len(a._pool._heap) + len(ran) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.005)  # queued (or running) before the next call
    release.set()
    for t in threads:
        t.join(10)
    assert ran == [key(1), key(3), key(2), key(4)]
    assert a.read_order("A") < a.read_order("B") < a.read_order(None)
    a.close()


def test_an_older_requests_next_batch_overtakes_a_newer_request_on_a_capped_nic(tmp_path,
                                                                               native):
    """Request A reads two 16-page batches one after the other (as SGLang's prefetch does),
    B one batch that arrives just after A's first. On the node's capped NIC A finishes first:
    A's second batch goes ahead of B's shares not yet started (the pool's threads commit at
    most a share each ahead). In a first-in-first-out pool B's batch went whole before A's
    second and A finished last."""
    import threading

    if native:
        pytest.importorskip("dualpath._C")
    nic = StorageNic("n")
    store = BlockStore(str(tmp_path), ODD, fingerprint("m", ODD), description={}, nic=nic)
    a = PageFirstAdapter(store, io_threads=2, native=native)
    keys = [key(i) for i in range(48)]
    src = odd_pool(48 * ODD.page_size, 21)
    a.set_pages(keys, *odd_ptrs(src, list(range(48))))
    nic.set_cap(store.block_bytes / 0.01 / 1e9)  # 10 ms a block
    dst = odd_pool(48 * ODD.page_size, 22)
    done = {}

    def request(rid, batches):
        for b in batches:
            assert a.get_pages([keys[i] for i in b], *odd_ptrs(dst, list(b)), rid) == [True] * 16
        done[rid] = time.monotonic()
    ta = threading.Thread(target=request, args=("A", [range(0, 16), range(16, 32)]))
    tb = threading.Thread(target=request, args=("B", [range(32, 48)]))
    ta.start()
    time.sleep(0.02)
    tb.start()
    ta.join(20)
    tb.join(20)
    assert done["A"] < done["B"] - 0.03, done
    assert np.array_equal(dst, src)
    a.close()


def test_a_failed_read_leaves_nothing_in_the_nodes_read_queue(tmp_path):
    """The pages of reads cancelled after another failed leave the NIC's read queue (what the
    router sees as the node's backlog) as the read ones do."""
    import threading

    nic = StorageNic("n")
    store = BlockStore(str(tmp_path), G, fingerprint("m", G), description={}, nic=nic)
    a = PageFirstAdapter(store, io_threads=1, native=False)
    after, real = threading.Event(), a._get_one

    def get_one(k, kp, vp, queued=False):
        if k == key(0):  # its own read was metered and retired, then it failed
            nic._retire_read(store.block_bytes, G.page_size)
            a._pool.submit(-1, after.wait, 10)  # the worker waits until get_pages raised
            raise OSError("disk")
        return real(k, kp, vp, queued)
    a._get_one = get_one
    dst = host_pool(4 * PS, 1)
    with pytest.raises(OSError, match="disk"):
        a.get_pages([key(i) for i in range(4)], *page_ptrs(dst, [0, 1, 2, 3]), "r")
    after.set()
    snap = nic.snapshot()
    assert snap.read_queue_bytes == 0 and snap.read_queue_tokens == 0, snap
    a.close()
