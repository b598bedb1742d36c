"""The DE read path end to end on the CPU, without SGLang: a prefill-role and a decode-role
agent (real HTTP servers), a shared Full Block store, and a prefill host pool in shared memory
(memfd, as SGLang's `shm` allocator makes it). Checks the bytes that land, which node's storage
NIC read them, and the fallbacks."""

import mmap
import os
import socket

import numpy as np
import pytest

from dualpath.config import PluginConfig
from dualpath.sglang_plugin import de_path
from dualpath.sglang_plugin.agent import Agent, node_nic
from dualpath.sglang_plugin.plan import ReadPlan
from dualpath.storage import BlockGeometry, BlockStore, fingerprint
from dualpath.storage.page_first import PageFirstAdapter

L_, PS, H, D, E = 3, 4, 2, 8, 2
G = BlockGeometry(num_layers=L_, page_size=PS, num_kv_heads=H, head_dim=D, dtype_bytes=E)
ROW = H * D * E
SLOTS = 16 * PS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeBuf:
    """The bits of a torch tensor `_pool_region` uses."""

    def __init__(self, arr):
        self.arr = arr

    def data_ptr(self):
        return self.arr.ctypes.data

    def numel(self):
        return self.arr.size

    def element_size(self):
        return 1


class ShmPool:
    """A page_first host pool [2, slots, layers, row] in a memfd, like SGLang's shm allocator."""

    def __init__(self, shared=True):
        n = 2 * SLOTS * L_ * ROW
        if shared:
            self.fd = os.memfd_create("test-pool")
            os.ftruncate(self.fd, n)
            self.mm = mmap.mmap(self.fd, n)
            self.arr = np.frombuffer(self.mm, np.uint8).reshape(2, SLOTS, L_, ROW)
        else:
            self.fd = None
            self.arr = np.zeros((2, SLOTS, L_, ROW), np.uint8)
        self.kv_buffer = FakeBuf(self.arr)

    def ptrs(self, pages):
        base, v_off = self.arr.ctypes.data, self.arr[1].ctypes.data - self.arr.ctypes.data
        k = [base + p * PS * L_ * ROW for p in pages]
        return k, [x + v_off for x in k]

    def page(self, p):
        return self.arr[:, p * PS:(p + 1) * PS].copy()


def key(i):
    return f"{i:064x}"


@pytest.fixture
def world(tmp_path, request):
    """A store with 12 blocks; a PE agent (node pe-N) and a DE agent (node de-N)."""
    tag = request.node.name[-20:].replace("[", "").replace("]", "")
    nodes = {"prefill": f"pe-{tag}", "decode": f"de-{tag}"}
    src = ShmPool(shared=False)
    src.arr[...] = np.random.default_rng(0).integers(0, 256, src.arr.shape, dtype=np.uint8)
    writer = PageFirstAdapter(BlockStore(str(tmp_path), G, fingerprint("m", G), description={}))
    keys = [key(i) for i in range(12)]
    assert writer.set_pages(keys, *src.ptrs(range(12))) == [True] * 12
    agents = {}
    for role in ("prefill", "decode"):
        cfg = PluginConfig(enable_dual_path=True, role=role, forward_timeout_s=5.0,
                           buffer_gb=1e-3)
        a = Agent(cfg, role, nodes[role], free_port())
        store = BlockStore(str(tmp_path), G, fingerprint("m", G), description={}, nic=a.nic)
        a.attach_store(PageFirstAdapter(store))
        a.start()
        agents[role] = a
    return src, keys, agents["prefill"], agents["decode"]


def reads(agent):
    return node_nic(agent.node, None).snapshot().read_bytes


@pytest.mark.parametrize("mode,shared", [("auto", True), ("tcp", True), ("inline", False),
                                         ("auto", False)], ids=["shm", "tcp", "inline",
                                                                 "auto-no-shm"])
def test_de_reads_and_forwards_into_the_prefill_pool(world, mode, shared):
    import dataclasses

    src, keys, pe, de = world
    pe.cfg = dataclasses.replace(pe.cfg, forward_mode=mode)
    pool = ShmPool(shared=shared)
    plan = ReadPlan("r1", 1.0, de_agent=de.url)
    pages = [7, 2, 9, 0, 5]
    got = de_path.prefill_get(pe, pe.adapter, pool, plan, keys[:5], *pool.ptrs(pages))
    assert got == [True] * 5
    for i, p in enumerate(pages):
        assert np.array_equal(pool.page(p), src.page(i))
    block = pe.adapter.store.block_bytes
    assert reads(de) == 5 * block and reads(pe) == 0  # only the decode's NIC read
    page_bytes = 2 * L_ * PS * ROW
    assert de.counters["forwarded_bytes"] == 5 * page_bytes
    assert pe.counters["received_bytes"] == 5 * page_bytes


def test_a_pull_of_several_chunks_lands_whole(world, monkeypatch):
    """Pulls are read in chunks, the next read while the last is copied: 12 pages in chunks of
    5 (5 + 5 + 2) land exactly, every slot is released, the counters add up."""
    from dualpath.sglang_plugin import agent as agent_mod

    monkeypatch.setattr(agent_mod, "PULL_CHUNK_PAGES", 5)
    src, keys, pe, de = world
    pool = ShmPool(shared=True)
    pages = [11, 3, 7, 0, 9, 1, 5, 2, 10, 4, 8, 6]
    got = de_path.prefill_get(pe, pe.adapter, pool, ReadPlan("r-chunks", 1.0, de_agent=de.url),
                              keys, *pool.ptrs(pages))
    assert got == [True] * 12
    for i, p in enumerate(pages):
        assert np.array_equal(pool.page(p), src.page(i))
    assert reads(de) == 12 * pe.adapter.store.block_bytes and reads(pe) == 0
    assert de.counters["pull_pages_ok"] == 12 and de.counters["pull_pages_failed"] == 0
    assert all(s.refs == 0 for s in de.buffer._slots.values())  # nothing left pinned


def test_split_reads_on_both_nodes(world):
    src, keys, pe, de = world
    pool = ShmPool()
    got = de_path.prefill_get(pe, pe.adapter, pool, ReadPlan("r2", 0.5, de_agent=de.url),
                              keys[:8], *pool.ptrs(range(8, 16)))
    assert got == [True] * 8
    for i in range(8):
        assert np.array_equal(pool.page(8 + i), src.page(i))
    block = pe.adapter.store.block_bytes
    assert reads(de) == 4 * block and reads(pe) == 4 * block


def test_decode_restore_reuses_what_the_agent_read_once(world):
    src, keys, pe, de = world
    pool = ShmPool()
    plan = ReadPlan("r3", 1.0, de_agent=de.url)
    de.plans.put(plan)  # the router tells both agents
    de_path.prefill_get(pe, pe.adapter, pool, plan, keys[:4], *pool.ptrs(range(4)))
    block = de.adapter.store.block_bytes
    before = reads(de)
    own = ShmPool(shared=False)  # the decode's host pool
    got = de_path.decode_restore(de, de.adapter, keys[:6], *own.ptrs([3, 4, 5, 6, 7, 8]), "r3")
    assert got == [True] * 6
    for i in range(6):
        assert np.array_equal(own.page(3 + i), src.page(i))
    assert reads(de) - before == 2 * block  # only keys 4, 5 were new
    assert de.buffer.stats()["hits"] >= 4
    # a staging buffer, not a cache: once both consumers are done the pages are gone
    assert de.buffer.stats()["used"] == 2  # keys 4, 5 still wait for their forward
    before = reads(de)
    de_path.decode_restore(de, de.adapter, keys[:4], *own.ptrs([9, 10, 11, 12]), "r3")
    assert reads(de) - before == 4 * block


def test_split_forward_frees_the_buffer(world):
    _, keys, pe, de = world
    pool = ShmPool()
    plan = ReadPlan("r6", 0.5, de_agent=de.url)
    de.plans.put(plan)
    assert de_path.prefill_get(pe, pe.adapter, pool, plan, keys[:6], *pool.ptrs(range(6))) \
        == [True] * 6
    assert de.buffer.stats()["used"] == 0


def test_dead_decode_agent_means_the_prefill_reads_itself(world):
    src, keys, pe, _ = world
    pool = ShmPool()
    plan = ReadPlan("r4", 1.0, de_agent=f"http://127.0.0.1:{free_port()}")  # nobody listens
    got = de_path.prefill_get(pe, pe.adapter, pool, plan, keys[:3], *pool.ptrs([1, 2, 3]))
    assert got == [True] * 3
    for i in range(3):
        assert np.array_equal(pool.page(1 + i), src.page(i))
    assert reads(pe) == 3 * pe.adapter.store.block_bytes


def test_missing_and_damaged_blocks_are_misses_not_data(world, tmp_path):
    src, keys, pe, de = world
    path = de.adapter.store.path(keys[1])
    with open(path, "r+b") as f:  # corrupt the payload: the checksum catches it
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    pool = ShmPool()
    pool.arr[...] = 7
    got = de_path.prefill_get(pe, pe.adapter, pool, ReadPlan("r5", 1.0, de_agent=de.url),
                              [keys[0], keys[1], key(99)], *pool.ptrs([0, 1, 2]))
    assert got == [True, False, False]
    assert np.array_equal(pool.page(0), src.page(0))
    assert (pool.page(1) == 7).all() and (pool.page(2) == 7).all()  # untouched: SGLang recomputes
    assert not os.path.exists(path)  # the damaged block is gone: the next turn writes it anew


def test_pull_refuses_offsets_outside_the_region(world):
    _, keys, pe, de = world
    pool = ShmPool()
    body = {"rid": "x", "keys": keys[:1], "mode": "shm",
            "region": de_path._pool_region(pool)[1].to_dict(),
            "k_offsets": [pool.arr.nbytes], "v_offsets": [0]}
    status, raw, _ = de_path._post(de.url, "/dualpath/pull", body, 5)
    assert status == 400 and b"outside" in raw


def test_plans_and_stats_over_http(world):
    _, _, pe, de = world
    status, raw, _ = de_path._post(pe.url, "/dualpath/plan",
                                   {"rid": "q", "de_fraction": 1.0, "de_agent": de.url}, 5)
    assert status == 200 and pe.plans.get("q").side == "de"
    status, raw, _ = de_path._post(pe.url, "/dualpath/plan", {"rid": "q", "de_fraction": 2}, 5)
    assert status == 400
    import json
    import urllib.request
    with urllib.request.urlopen(de.url + "/dualpath/stats") as r:
        stats = json.loads(r.read())
    from dualpath.router.contract import EngineStats
    assert EngineStats.decode(stats).role == "decode"
    assert stats["agent"] == de.url and "forwarded_bytes" in stats["paths"]
    assert "pf_held" in stats["prefetch"] and "h2d_ours_calls" in stats["h2d"]
    from dualpath.bench.pd_cluster import path_bytes
    assert {"pf_held", "h2d_ours_calls", "forwarded_bytes"} <= set(path_bytes(stats))
    status, raw, _ = de_path._post(de.url, "/dualpath/snic", {"cap_gbps": 3.5}, 5)
    assert status == 200 and de.nic.cap_gbps == 3.5
    with urllib.request.urlopen(de.url + "/dualpath/stats") as r:
        assert json.loads(r.read())["storage"]["cap_gbps"] == 3.5
    status, raw, _ = de_path._post(de.url, "/dualpath/snic", {"cap_gbps": -1}, 5)
    assert status == 400 and de.nic.cap_gbps == 3.5
    assert de_path._post(de.url, "/dualpath/snic", {"cap_gbps": 0}, 5)[0] == 200
    assert de.nic.cap_gbps is None


def test_mappings_of_exited_peers_are_dropped():
    import subprocess
    import sys

    from dualpath.sglang_plugin.peer_memory import PeerRegions, describe_region

    pool = ShmPool()
    regions = PeerRegions()
    mine = describe_region(pool.fd, pool.arr.nbytes)
    regions.map(mine)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True)
    dead = (mine.host, int(child.stdout), 3, 1)  # a pid that has exited
    regions._maps[dead] = regions._maps[(mine.host, mine.pid, mine.fd, mine.ino)]
    assert regions.prune() == [dead]
    assert list(regions._maps) == [(mine.host, mine.pid, mine.fd, mine.ino)]


def test_a_failing_fill_leaves_nothing_pinned():
    from dualpath.sglang_plugin.block_buffer import BlockBuffer

    def fill(keys, k, v, rid=None):
        if "b" in keys:
            raise OSError("storage went away")
        return [True] * len(keys)

    buf = BlockBuffer(8, 2, fill)
    a = buf.acquire(["a"], uses=2)  # ready, still expects another consumer
    with pytest.raises(OSError):
        buf.acquire(["a", "b"])  # "a" is taken from the buffer, "b" fails to load
    assert a[0].refs == 1, "the failed call released what it had pinned"
    buf.release(a, consumed=False)
    assert buf.acquire(["c"])[0] is not None  # "b"'s slot came back: there is room


def test_a_hanging_decode_agent_costs_at_most_the_timeout(world):
    """A DE agent that accepts the pull and never answers: the prefill reads the pages itself
    after forward_timeout_s plus a margin (here 2 x 0.5 s), not after the socket gives up."""
    import asyncio
    import threading
    import time

    from aiohttp import web

    src, keys, pe, _ = world
    port = free_port()
    loop = asyncio.new_event_loop()

    async def hang(request):
        await asyncio.sleep(30)
        return web.json_response({})

    async def serve():
        app = web.Application()
        app.router.add_post("/dualpath/pull", hang)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    loop.run_until_complete(serve())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    pe.cfg = PluginConfig(enable_dual_path=True, role="prefill", forward_timeout_s=0.5)
    pool = ShmPool()
    t0 = time.monotonic()
    got = de_path.prefill_get(pe, pe.adapter, pool,
                              ReadPlan("r7", 1.0, de_agent=f"http://127.0.0.1:{port}"),
                              keys[:2], *pool.ptrs([0, 1]))
    assert got == [True, True] and time.monotonic() - t0 < 3
    assert np.array_equal(pool.page(0), src.page(0))


def test_an_idle_entry_of_another_request_is_read_again_not_cached():
    from dualpath.sglang_plugin.block_buffer import BlockBuffer

    reads = []

    def fill(keys, k, v, rid=None):
        reads.extend(keys)
        return [True] * len(keys)

    buf = BlockBuffer(8, 4, fill)
    fwd = buf.acquire(["p0", "p1"], uses=2, rid="turn1")  # forward; the restore never comes
    buf.release(fwd)
    again = buf.acquire(["p0", "p1"], uses=1, rid="turn1")  # its own restore: no new read
    buf.release(again)
    assert reads == ["p0", "p1"]
    fwd = buf.acquire(["p0"], uses=2, rid="turn1")  # both were freed: read again
    buf.release(fwd)  # p0 now idle, still expecting a restore that never comes
    nxt = buf.acquire(["p0", "p1"], uses=1, rid="turn2")  # the next turn reads storage again
    assert reads == ["p0", "p1", "p0", "p0", "p1"] and buf.stale == 1 and buf.misses == 5
    shared = buf.acquire(["p0"], uses=1, rid="other")  # in use right now: one read serves both
    assert len(reads) == 5 and shared[0] is nxt[0]
    buf.release(shared)
    buf.release(nxt)
    assert buf.stats()["stale"] == 1
