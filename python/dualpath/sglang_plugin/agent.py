"""The DualPath agent: one per SGLang scheduler process (TP rank), started with the L3 backend.

What it serves over HTTP (aiohttp on its own thread and event loop):
- ``POST /dualpath/plan``: the router's read plan for one request (`ReadPlan`), before the
  request itself reaches the server.
- ``POST /dualpath/pull`` (served by decode agents): a prefill asks for some pages of a request's
  stored prefix. The agent reads them over its own node's storage NIC into the DE buffer (once,
  shared with the decode's own restore), then writes them into the prefill's host pool pages:
  a one-sided copy into the pool mapped from shared memory ("shm", same host, through the C++
  transfer engine), or the bytes in the reply ("inline", any host). The reply lists which pages
  landed; the prefill reads the rest itself.
- ``GET /dualpath/stats``: the router's `EngineStats` (schema v1) plus path counters;
  ``GET /metrics``: Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from dualpath.config import PluginConfig
from dualpath.router.contract import EngineStats
from dualpath.sglang_plugin import engine_stats, gil_monitor, h2d_load, prefetch_queue
from dualpath.sglang_plugin.block_buffer import BlockBuffer
from dualpath.sglang_plugin.peer_memory import PeerMemoryError, PeerRegions, RegionDesc
from dualpath.sglang_plugin.plan import PlanTable, ReadPlan
from dualpath.storage import StorageNic

log = logging.getLogger("dualpath.agent")

FORWARD_BYTES = Counter("dualpath_forward_bytes", "KV bytes forwarded between engines",
                        ["node", "direction"])  # de_to_pe (sent by a DE) / received (by a PE)
PULL_PAGES = Counter("dualpath_pull_pages", "Pages a prefill asked a decode agent for",
                     ["node", "result"])  # forwarded | failed (read by the prefill itself)
H2D_BYTES = Counter("dualpath_h2d_bytes", "KV bytes loaded host pool -> GPU", ["node"])
RESTORE_PAGES = Counter("dualpath_de_restore_pages", "Pages the decode restored from the DE "
                        "buffer or storage", ["node", "source"])

_NICS: dict[str, StorageNic] = {}
_NICS_LOCK = threading.Lock()


def node_nic(node: str, cap_gbps: float | None) -> StorageNic:
    """The process's storage NIC of `node`: one meter and cap shared by every backend instance
    (SGLang may build two: HiCache's and the decode offload manager's)."""
    with _NICS_LOCK:
        nic = _NICS.get(node)
        if nic is None:
            nic = _NICS[node] = StorageNic(node, cap_gbps=cap_gbps)
        return nic


PULL_CHUNK_PAGES = 8  # a pull copies chunk n while later chunks are still being read


class Agent:
    def __init__(self, cfg: PluginConfig, role: str, node: str, port: int):
        self.cfg, self.role, self.node, self.port = cfg, role, node, port
        self.url = f"http://{cfg.agent_host}:{port}"
        self.plans = PlanTable(cfg.plan_ttl_s)
        self.nic = node_nic(node, cfg.snic_gbps or None)
        self.adapter = None  # PageFirstAdapter, set by attach_store
        self.buffer: BlockBuffer | None = None
        self.engine = None  # dualpath.transfer.TransferEngine (tcp backend), lazily
        self._slab_region = None
        self._peer_regions: dict[tuple, int] = {}
        self._pool_served: dict | None = None
        self.peers = PeerRegions()
        self.scheduler = None
        self.counters = {"forwarded_bytes": 0, "received_bytes": 0, "pull_pages_ok": 0,
                         "pull_pages_failed": 0, "restore_from_buffer": 0, "h2d_bytes": 0}
        self._lock = threading.Lock()
        # prompt tokens of the requests this (prefill) engine finished, and its busy time: the
        # router's measured prefill rate (beta = rate x window); unreported, the router kept
        # its initial 20k tokens/s and held requests back once ~100k prompt tokens were on the
        # prefill (2x H100, 17ce76c: 24 agents of 10-16K-token prompts)
        self.prefilled_tokens = 0
        self._busy = engine_stats.BusyMeter()
        self._load_lock = threading.Lock()  # not _lock: that one is held across registrations
        self._pool = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="dualpath-agent")
        # the chunk reads of the pulls being served (each waits on the store's own IO threads)
        self._read_ahead = ThreadPoolExecutor(4 * cfg.io_threads,
                                              thread_name_prefix="dualpath-read-ahead")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="dualpath-agent", daemon=True)

    # ---- wiring ----
    def attach_store(self, adapter) -> None:
        """Called by the L3 backend once the host-pool geometry is known."""
        if self.adapter is not None:
            return
        self.adapter = adapter
        slots = max(1, int(self.cfg.buffer_gb * 2**30) // (2 * adapter.region_bytes))
        self.buffer = BlockBuffer(adapter.region_bytes, slots, adapter.get_pages)
        log.info("dualpath agent %s: DE buffer of %d pages (%.2f GiB)", self.url, slots,
                 slots * self.buffer.slot_bytes / 2**30)

    def attach_scheduler(self, scheduler) -> None:
        self.scheduler = scheduler

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"dualpath agent could not listen on {self.url}: "
                               f"{self._error}") from self._error
        log.info("dualpath agent (%s, node %s) listening on %s", self.role, self.node, self.url)

    # ---- DE side: serve a pull ----
    def serve_pull(self, req: dict) -> tuple[list[bool], bytes | None]:
        """Read the asked pages into the DE buffer and deliver them; returns per-page success
        and, in inline mode, the bytes of the pages that succeeded. One-sided modes work in
        chunks of PULL_CHUNK_PAGES, all read at once and copied in order as each arrives, so a
        pull takes its read time plus about one chunk's copy, not read + copy."""
        if self.buffer is None:
            raise RuntimeError("this agent has no store attached yet")
        keys = list(req["keys"])
        # a one-sided write must never land after the prefill gave up on it (it then reads the
        # pages itself and may reuse them): shm pulls carry the prefill's deadline on the
        # host-wide monotonic clock, which the prefill waits out with a margin before falling back
        # (tcp mode, maybe across hosts: from arrival, a second short of the prefill's timeout)
        deadline = float(req["deadline_mono"]) if "deadline_mono" in req else (
            time.monotonic() + float(req.get("timeout_s", self.cfg.forward_timeout_s)) - 1.0)
        rid = req.get("rid")
        uses = self.buffer_uses(rid)
        if req.get("mode") == "inline":
            slots = self.buffer.acquire(keys, uses=uses, rid=rid)
            try:
                ok = [s is not None for s in slots]
                if time.monotonic() > deadline:  # the prefill has given up on us
                    return [False] * len(keys), None
                data = b"".join(self.buffer.view(s).tobytes() for s in slots if s is not None)
                self._count_forward(len(data), ok)
                return ok, data
            finally:
                self.buffer.release(slots)
        k_off, v_off = req["k_offsets"], req["v_offsets"]
        if not len(k_off) == len(v_off) == len(keys):
            raise ValueError("keys, k_offsets and v_offsets differ in length")
        if req.get("mode") == "tcp":
            dst, nbytes = self._dst_tcp(req["region"])
        else:
            dst, nbytes = self._dst_shm(RegionDesc.from_dict(req["region"]))
        ok = [False] * len(keys)
        chunks = [range(i, min(i + PULL_CHUNK_PAGES, len(keys)))
                  for i in range(0, len(keys), PULL_CHUNK_PAGES)]

        def read(c):
            return self.buffer.acquire([keys[i] for i in c], uses=uses, rid=rid)

        reads = [self._read_ahead.submit(read, c) for c in chunks]  # all in flight, in order
        try:
            for n, c in enumerate(chunks):
                slots = reads[n].result()
                reads[n] = None
                try:
                    if time.monotonic() > deadline:  # the prefill has given up: write nothing
                        continue
                    done = self._write(dst, nbytes, slots, [k_off[i] for i in c],
                                       [v_off[i] for i in c], deadline)
                    for j, i in enumerate(c):
                        ok[i] = done and slots[j] is not None
                finally:
                    self.buffer.release(slots)
        finally:
            for f in reads:  # an error above: the chunks read ahead are not delivered
                if f is None:
                    continue
                try:
                    self.buffer.release(f.result())
                except Exception:  # noqa: BLE001  (the error above is the one to report)
                    log.warning("read-ahead of an abandoned pull failed", exc_info=True)
        self._count_forward(sum(ok) * self.buffer.slot_bytes, ok)
        return ok, None

    def buffer_uses(self, rid: str | None) -> int:
        """Consumers of a DE read: the forward, plus the decode's own restore when the plan
        reads the whole prefix on the decode side (miss-only return)."""
        plan = self.plans.get(rid)
        return 2 if plan is not None and plan.side == "de" else 1

    def _engine(self):
        """The agent's transfer engine (tcp backend: local copies and remote one-sided writes),
        with the DE buffer registered."""
        from dualpath.transfer import TransferEngine
        with self._lock:
            if self.engine is None:
                self.engine = TransferEngine("tcp", num_workers=self.cfg.io_threads)
                self._slab_region = self.engine.register_array(self.buffer.slab)
            return self.engine

    def _dst_shm(self, desc: RegionDesc) -> tuple[int, int]:
        eng = self._engine()
        with self._lock:
            key = (desc.host, desc.pid, desc.fd, desc.ino)
            dst = self._peer_regions.get(key)
            if dst is None:
                for old in self.peers.prune():  # prefills that exited since: let go of them
                    region = self._peer_regions.pop(old, None)
                    try:
                        if region is not None:
                            eng.deregister(region)
                    except Exception as e:  # noqa: BLE001  (still in use: retried next prune)
                        log.warning("region of exited peer %s still in use: %s", old, e)
                dst = self._peer_regions[key] = eng.register_array(self.peers.map(desc))
        return dst, desc.nbytes

    def _dst_tcp(self, region: dict) -> tuple[int, int]:
        eng = self._engine()
        key = ("tcp", str(region["address"]), int(region["region"]))
        nbytes = int(region["nbytes"])
        with self._lock:
            dst = self._peer_regions.get(key)
            if dst is None:
                dst = self._peer_regions[key] = eng.register_remote(
                    key[1], key[2], nbytes, connections=self.cfg.io_threads)
        return dst, nbytes

    def _write(self, dst: int, nbytes: int, slots, k_off, v_off, deadline: float) -> bool:
        """Copy the slots' K and V regions to the destination region's page offsets."""
        from dualpath.transfer import TransferBatch
        eng = self._engine()
        src_off, dst_off = [], []
        rb = self.buffer.region_bytes
        for s, k, v in zip(slots, k_off, v_off, strict=True):
            if s is None:
                continue
            o = self.buffer.offset(s)
            if not (0 <= k <= nbytes - rb and 0 <= v <= nbytes - rb):
                raise ValueError(f"page offsets {k}/{v} outside the {nbytes}-byte region")
            src_off += [o, o + rb]
            dst_off += [k, v]
        if not src_off:
            return True
        if time.monotonic() > deadline:
            return False
        h = eng.submit(TransferBatch.of(self._slab_region, src_off, dst, dst_off, rb),
                       priority="bulk")
        status = eng.wait(h, max(0.0, deadline - time.monotonic()))
        if status == "pending":  # stop what has not started; the rest lands (identical bytes)
            eng.cancel(h)
            eng.wait(h)
        elif status == "failed":
            log.warning("forward of %d pages failed: %s", len(src_off) // 2, h.error)
        return status == "done"

    def serve_pool(self, pool) -> dict:
        """Prefill side, tcp mode: serve the host pool to decode agents (once); returns the
        region descriptor a pull names."""
        eng = self._engine() if self.buffer is not None else None
        if eng is None:
            raise RuntimeError("no store attached yet")
        buf = pool.kv_buffer
        with self._lock:
            if self._pool_served is None:
                region = eng.register(buf.data_ptr(), buf.numel() * buf.element_size())
                self._pool_keep = pool  # the pool outlives its registration
                port = eng.listen(self.cfg.agent_host, 0)
                host = self.cfg.agent_host
                if host in ("0.0.0.0", "::", ""):
                    host = socket.gethostname()
                self._pool_served = {"address": f"{host}:{port}", "region": region,
                                     "nbytes": buf.numel() * buf.element_size(),
                                     "base": buf.data_ptr()}
            return self._pool_served

    def _count_forward(self, nbytes: int, ok: list[bool]) -> None:
        n_ok = sum(ok)
        with self._lock:
            self.counters["forwarded_bytes"] += nbytes
            self.counters["pull_pages_ok"] += n_ok
            self.counters["pull_pages_failed"] += len(ok) - n_ok
        FORWARD_BYTES.labels(self.node, "de_to_pe").inc(nbytes)
        PULL_PAGES.labels(self.node, "forwarded").inc(n_ok)
        PULL_PAGES.labels(self.node, "failed").inc(len(ok) - n_ok)

    def count_received(self, nbytes: int) -> None:
        with self._lock:
            self.counters["received_bytes"] += nbytes
        FORWARD_BYTES.labels(self.node, "received").inc(nbytes)

    def count_h2d(self, nbytes: int) -> None:
        with self._lock:
            self.counters["h2d_bytes"] += nbytes
        H2D_BYTES.labels(self.node).inc(nbytes)

    def count_restore(self, n: int, source: str) -> None:
        with self._lock:
            if source == "buffer":
                self.counters["restore_from_buffer"] += n
        RESTORE_PAGES.labels(self.node, source).inc(n)

    # ---- stats ----
    def count_prefilled(self, prompt_tokens: int) -> None:
        with self._load_lock:  # on the scheduler thread: never behind a slow registration
            self.prefilled_tokens += prompt_tokens

    def stats(self) -> dict:
        snap = self.nic.snapshot()
        load = engine_stats.scheduler_load(self.scheduler, self.role)
        with self._lock:
            extra = dict(self.counters)
        with self._load_lock:
            busy = self._busy.observe(load.seq, time.monotonic())
            prefilled = self.prefilled_tokens
        prefill = self.role == "prefill"
        s = EngineStats(engine=self.url, role=self.role, seq=load.seq, tok=load.tok,
                        free_kv_tokens=load.free_kv_tokens,
                        read_queue_tokens=snap.read_queue_tokens,
                        read_tokens_total=snap.read_bytes // max(1, self._token_bytes()),
                        read_busy_s_total=snap.read_busy_s,
                        prefill_tokens_total=prefilled if prefill else 0,
                        prefill_busy_s_total=busy if prefill else 0.0, timestamp=time.time())
        return {**json.loads(s.encode()), "node": self.node, "agent": self.url,
                "storage": {"read_bytes": snap.read_bytes, "write_bytes": snap.write_bytes,
                            "read_ops": snap.read_ops, "write_ops": snap.write_ops,
                            "cap_gbps": self.nic.cap_gbps or 0},
                "paths": extra, "prefetch": prefetch_queue.snapshot(),
                "h2d": dict(h2d_load.STATS), "gil": gil_monitor.snapshot(),
                "buffer": self.buffer.stats() if self.buffer else None,
                "plans": len(self.plans)}

    def _token_bytes(self) -> int:
        if self.adapter is None:
            return 1
        g = self.adapter.g
        return g.payload_bytes // g.page_size

    # ---- HTTP ----
    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/dualpath/plan", self._h_plan)
        app.router.add_post("/dualpath/pull", self._h_pull)
        app.router.add_get("/dualpath/stats", self._h_stats)
        app.router.add_post("/dualpath/snic", self._h_snic)
        app.router.add_get("/metrics", self._h_metrics)
        runner = web.AppRunner(app, access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.cfg.agent_host, self.port)
            loop.run_until_complete(site.start())
        except BaseException as e:  # noqa: BLE001  (reported by start())
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()

    async def _h_plan(self, request: web.Request) -> web.Response:
        try:
            plan = ReadPlan.from_dict(await request.json())
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            return web.json_response({"error": str(e)}, status=400)
        self.plans.put(plan)
        return web.json_response({"ok": True})

    async def _h_pull(self, request: web.Request) -> web.Response:
        try:
            req = await request.json()
            ok, data = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.serve_pull, req)
        except (KeyError, ValueError, TypeError, PeerMemoryError, json.JSONDecodeError) as e:
            log.warning("pull refused: %s", e)
            return web.json_response({"error": str(e)}, status=400)
        except Exception as e:  # noqa: BLE001  (the prefill falls back; say why)
            log.exception("pull failed")
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=500)
        if data is None:
            return web.json_response({"ok": ok})
        head = json.dumps({"ok": ok}).encode()
        return web.Response(body=struct.pack("<Q", len(head)) + head + data,
                            content_type="application/octet-stream")

    async def _h_snic(self, request: web.Request) -> web.Response:
        """Benchmarks: change this node's emulated storage-NIC cap ({"cap_gbps": x}, 0 = none)
        without restarting the server."""
        try:
            cap = float((await request.json())["cap_gbps"])
            self.nic.set_cap(cap or None)
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
            return web.json_response({"error": f"want {{\"cap_gbps\": >= 0}}: {e}"}, status=400)
        log.info("storage-NIC cap of node %s set to %s GB/s", self.node, cap or "none")
        return web.json_response({"node": self.node, "cap_gbps": cap})

    async def _h_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _h_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


_AGENT: Agent | None = None
_AGENT_LOCK = threading.Lock()
_SCHEDULER = None  # a scheduler that asked for the agent before it existed


def attach_scheduler(scheduler) -> None:
    global _SCHEDULER
    with _AGENT_LOCK:
        _SCHEDULER = scheduler
        if _AGENT is not None:
            _AGENT.attach_scheduler(scheduler)


def get_agent() -> Agent | None:
    return _AGENT


def ensure_agent(cfg: PluginConfig, role: str, node: str, port: int) -> Agent:
    """The process's agent, started on first call."""
    global _AGENT
    with _AGENT_LOCK:
        if _AGENT is None:
            agent = Agent(cfg, role, node, port)
            agent.start()
            agent.attach_scheduler(_SCHEDULER)
            _AGENT = agent
        return _AGENT
