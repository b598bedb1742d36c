"""Our transfer engine behind the interface SGLang's Mooncake PD backend drives.

SGLang 0.5.17's Mooncake backend (`--disaggregation-transfer-backend mooncake`) keeps all PD
logic (bootstrap, page and head slicing, aux data, staging) in `disaggregation/mooncake/conn.py`
and moves bytes only through `MooncakeTransferEngine`: register local buffers, then
`batch_transfer_sync(session_id, local addrs, peer addrs, lengths)` one-sided writes into the
peer's registered buffers. `DualPathPDEngine` is that class on our engine, so the backend runs
unchanged on it (the plugin swaps the class in: `--dualpath-pd-engine`):

- device memory of a peer on this host: the peer exports CUDA IPC handles for its registered
  device ranges; we open them once and write with the `cuda` backend (copy engines for large
  pieces, one batched kernel launch for the many small per-page slices);
- host memory (aux data; any host): the peer serves it with the `tcp` backend; we write with
  one-sided tcp writes.
Each engine serves its range table (GET /ranges, JSON) on its session address "host:port".
Not covered: device memory of a peer on another host (needs GPUDirect RDMA: the rdma backend).
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from dualpath import env
from dualpath.transfer import cuda_ipc
from dualpath.transfer.engine import TransferBatch, TransferEngine

log = logging.getLogger("dualpath.pd_engine")
TIMEOUT_S = 60  # a batch not done by then is canceled (and waited for) and reported failed
LOG_BYTES = 256 << 20  # transfers at least this large log their preparation and copy times


class _Ranges:
    """Sorted, non-overlapping address ranges -> payload; lookup of many addresses at once."""

    def __init__(self):
        self.starts: list[int] = []
        self.items: list[tuple[int, int, dict]] = []  # (start, length, payload)

    def add(self, start: int, length: int, payload: dict) -> None:
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.items.insert(i, (start, length, payload))

    def remove(self, start: int) -> dict | None:
        i = bisect.bisect_left(self.starts, start)
        if i < len(self.starts) and self.starts[i] == start:
            self.starts.pop(i)
            return self.items.pop(i)[2]
        return None

    def find(self, addrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Index of the range holding each [addr, addr + length), -1 where none does."""
        idx = np.searchsorted(np.asarray(self.starts, dtype=np.int64), addrs, side="right") - 1
        ok = idx >= 0
        if self.items:
            ends = np.array([s + n for s, n, _ in self.items], dtype=np.int64)
            ok &= addrs + lengths <= ends[np.maximum(idx, 0)]
        else:
            ok[:] = False
        return np.where(ok, idx, -1)


class DualPathPDEngine:
    """Drop-in for sglang...mooncake_transfer_engine.MooncakeTransferEngine (same methods)."""

    accepts_arrays = True  # batch_transfer_sync takes int64 arrays too (sglang_plugin.pd_send)

    def __init__(self, hostname: str, gpu_id: int | None = None, ib_device: str | None = None,
                 num_workers: int = 4):
        self.hostname, self.gpu_id, self.ib_device = hostname, gpu_id or 0, ""
        try:
            self._cuda = TransferEngine(env.PD_CUDA_BACKEND.get(), num_workers=num_workers,
                                        slice_bytes=16 << 20)
        except (ValueError, RuntimeError) as e:  # no CUDA build or no GPU: host memory only
            log.info("pd engine without the cuda backend (%s)", e)
            self._cuda = None
        self._tcp = TransferEngine("tcp", num_workers=num_workers)
        self._tcp_port = self._tcp.listen("0.0.0.0", 0)
        self._lock = threading.Lock()
        self._local = _Ranges()  # payload: {"kind", "cuda": region, "tcp": region, "ipc": {...}}
        self._peers: dict[str, _Ranges] = {}  # session -> its ranges (payload: its table row)
        self._opened: dict[tuple[str, int], tuple] = {}  # (session, start) -> (OpenRange, region)
        self._remote: dict[tuple[str, int], int] = {}  # (session, start) -> tcp remote region
        self._open_lock = threading.Lock()  # one opener per peer range
        self._http = ThreadingHTTPServer(("0.0.0.0", 0), self._handler())
        threading.Thread(target=self._http.serve_forever, daemon=True,
                         name="dualpath-pd-engine").start()
        self.session_id = f"{hostname}:{self._http.server_address[1]}"
        log.info("dualpath pd engine %s (cuda %s, tcp port %d)", self.session_id,
                 self._cuda.backend if self._cuda else "off", self._tcp_port)

    # ---- serving our range table ----
    def _handler(self):
        engine = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path != "/ranges":
                    self.send_error(404)
                    return
                body = json.dumps(engine.table()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        return H

    def table(self) -> dict:
        with self._lock:
            rows = [{"start": s, "length": n, "kind": p["kind"], "ipc": p.get("ipc"),
                     "tcp_region": p.get("tcp")} for s, n, p in self._local.items]
        return {"tcp": f"{self.hostname}:{self._tcp_port}", "ranges": rows}

    # ---- registration ----
    def register(self, ptr: int, length: int) -> int:
        return self.batch_register([ptr], [length])

    def batch_register(self, ptrs: list[int], lengths: list[int]) -> int:
        try:
            for ptr, n in zip(ptrs, lengths, strict=True):
                self._register_one(int(ptr), int(n))
            return 0
        except (ValueError, RuntimeError, cuda_ipc.CudaIpcError) as e:
            log.error("pd engine: registration failed: %s", e)
            return -1

    def _register_one(self, ptr: int, n: int) -> None:
        payload: dict = {"kind": "host"}
        if self._cuda is not None:
            try:
                payload["cuda"] = self._cuda.register(ptr, n, "device")
                payload["kind"] = "device"
            except ValueError:  # not device memory
                payload["cuda"] = self._cuda.register(ptr, n, "host")
            if payload["kind"] == "device":
                try:  # fails for VMM memory (e.g. expandable segments): say so, keep nothing
                    payload["ipc"] = cuda_ipc.export(ptr, n).to_dict()
                except cuda_ipc.CudaIpcError:
                    self._cuda.deregister(payload["cuda"])
                    raise
        if payload["kind"] == "host":
            payload["tcp"] = self._tcp.register(ptr, n)
        with self._lock:
            self._local.add(ptr, n, payload)

    def deregister(self, ptr: int) -> int:
        return self.batch_deregister([ptr])

    def batch_deregister(self, ptrs: list[int]) -> int:
        rc = 0
        for ptr in ptrs:
            with self._lock:
                p = self._local.remove(int(ptr))
            if p is None:
                rc = -1
                continue
            for eng, key in ((self._cuda, "cuda"), (self._tcp, "tcp")):
                if key in p:
                    eng.deregister(p[key])
        return rc

    # ---- peers ----
    def _peer(self, session: str, refresh: bool = False) -> _Ranges:
        with self._lock:
            have = self._peers.get(session)
        if have is not None and not refresh:
            return have
        with urllib.request.urlopen(f"http://{session}/ranges", timeout=10) as r:
            t = json.loads(r.read())
        ranges = _Ranges()
        for row in t["ranges"]:
            ranges.add(row["start"], row["length"], {**row, "tcp": t["tcp"]})
        with self._lock:
            self._peers[session] = ranges
        return ranges

    def _device_dst(self, session: str, row: dict) -> int:
        key = (session, row["start"])
        with self._lock:
            got = self._opened.get(key)
        if got is None:
            with self._open_lock:
                got = self._opened.get(key)
                if got is None:
                    # mapped on this engine's GPU, whose kernels push our KV into it
                    mem = cuda_ipc.open_range(cuda_ipc.IpcRange.from_dict(row["ipc"]),
                                              self.gpu_id)
                    got = (mem, self._cuda.register(mem.ptr, row["length"],
                                                    f"device@{self.gpu_id}"))
                    with self._lock:
                        self._opened[key] = got
        return got[1]

    def _open_all(self, session: str) -> None:
        """Map every range of a peer now (probe / first contact), not inside a transfer."""
        peer = self._peer(session, refresh=True)
        for _, _, row in peer.items:
            if row["kind"] == "device" and self._cuda is not None:
                self._device_dst(session, row)
            elif row["kind"] == "host":
                self._host_dst(session, row)

    def _host_dst(self, session: str, row: dict) -> int:
        key = (session, row["start"])
        with self._lock:
            got = self._remote.get(key)
        if got is None:
            got = self._tcp.register_remote(row["tcp"], row["tcp_region"], row["length"])
            with self._lock:
                self._remote[key] = got
        return got

    # ---- transfers ----
    def transfer_sync(self, session_id: str, buffer: int, peer_buffer_address: int,
                      length: int) -> int:
        return self.batch_transfer_sync(session_id, [buffer], [peer_buffer_address], [length])

    def batch_transfer_sync(self, session_id: str, buffers, peer_buffer_addresses,
                            lengths) -> int:
        """One-sided writes of local [buffers[i], +lengths[i]) to the peer's addresses; 0 when
        all landed, -1 otherwise (the reason is logged)."""
        try:
            return self._transfer(session_id, np.asarray(buffers, dtype=np.int64),
                                  np.asarray(peer_buffer_addresses, dtype=np.int64),
                                  np.asarray(lengths, dtype=np.int64))
        except Exception as e:  # noqa: BLE001  (SGLang expects a return code)
            log.error("pd engine: transfer to %s failed: %s: %s", session_id,
                      type(e).__name__, e)
            return -1

    def _transfer(self, session: str, src: np.ndarray, dst: np.ndarray, n: np.ndarray) -> int:
        if not len(src):
            return 0
        t0 = time.perf_counter()
        with self._lock:
            li = self._local.find(src, n)
            local = list(self._local.items)
        if (li < 0).any():
            raise ValueError(f"source address {int(src[np.argmax(li < 0)]):#x} is not in a "
                             "registered buffer")
        own = session == self.session_id  # a write within this process: no IPC, no sockets
        peer = self._local if own else self._peer(session)
        with self._lock:
            pi = peer.find(dst, n)
            peer_items = list(peer.items)  # as `pi` saw them (registration may go on)
        if (pi < 0).any() and not own:
            peer = self._peer(session, refresh=True)  # registered since we last looked
            with self._lock:
                pi = peer.find(dst, n)
                peer_items = list(peer.items)
        if (pi < 0).any():
            raise ValueError(f"peer address {int(dst[np.argmax(pi < 0)]):#x} is not in a "
                             f"buffer {session} registered")
        # per distinct (local range, peer range) pair: which engine and which two regions;
        # then the descriptors as arrays (a request is ~10k per-page slices)
        # (np.unique over one int64 key: 30x faster than over rows, ~1 ms per 32k descriptors)
        width = len(peer_items) + 1
        keys, inverse = np.unique(li * width + pi, return_inverse=True)
        inverse = inverse.reshape(-1)
        pairs = np.stack([keys // width, keys % width], axis=1)
        use_cuda = np.zeros(len(pairs), bool)
        sreg, dreg = np.zeros(len(pairs), np.int64), np.zeros(len(pairs), np.int64)
        sbase, dbase = np.zeros(len(pairs), np.int64), np.zeros(len(pairs), np.int64)
        for k, (a, b) in enumerate(pairs):
            ls, _, lp = local[a]
            ps, _, pp = peer_items[b]
            sbase[k], dbase[k] = ls, ps
            if pp["kind"] == "device" or (own and lp["kind"] == "device"):
                if self._cuda is None:
                    raise ValueError("the peer's buffer is device memory: needs the cuda backend")
                use_cuda[k] = True
                sreg[k], dreg[k] = lp["cuda"], (pp["cuda"] if own
                                                else self._device_dst(session, pp))
            else:
                if lp["kind"] != "host":
                    raise ValueError("device memory to a peer's host buffer is not supported")
                sreg[k], dreg[k] = lp["tcp"], (pp["tcp"] if own
                                               else self._host_dst(session, pp))
        on_cuda = use_cuda[inverse]
        batches = {}
        for eng, mask in ((self._cuda, on_cuda), (self._tcp, ~on_cuda)):
            if mask.any():
                j = inverse[mask]
                batches[eng] = TransferBatch.of(sreg[j], src[mask] - sbase[j], dreg[j],
                                                dst[mask] - dbase[j], n[mask])
        # bulk class: KV copies yield to the model's kernels (default stream priority), the
        # copy engines ignore priorities anyway
        t1 = time.perf_counter()
        handles = [(eng, eng.submit(b, priority="bulk")) for eng, b in batches.items()]
        rc = 0
        for eng, h in handles:
            st = eng.wait(h, TIMEOUT_S)
            if st == "pending":  # never return while writes may still land: cancel, then wait
                eng.cancel(h)
                st = eng.wait(h)
                log.error("pd engine: %s batch to %s took over %d s: canceled", eng.backend,
                          session, TIMEOUT_S)
            if st != "done":
                log.error("pd engine: %s batch %s: %s", eng.backend, st, h.error)
                rc = -1
        t2 = time.perf_counter()
        total = int(n.sum())
        if total >= LOG_BYTES:  # a request's KV (or a big chunk of it): say what it cost
            log.info("pd engine: %d descriptors, %.1f MB to %s: prepare %.2f ms, copy %.2f ms "
                     "(%.1f GB/s)", len(n), total / 1e6, session, 1e3 * (t1 - t0),
                     1e3 * (t2 - t1), total / max(t2 - t1, 1e-9) / 1e9)
        return rc

    # ---- the rest of MooncakeTransferEngine's surface ----
    def initialize(self, hostname: str, device_name: str | None = None) -> None:
        """Stock calls this from its constructor; ours is ready once constructed."""

    def get_session_id(self) -> str:
        return self.session_id

    def send_probe(self, peer_session_id: str) -> int:
        try:
            self._open_all(peer_session_id)
            return 0
        except (OSError, ValueError, RuntimeError, cuda_ipc.CudaIpcError) as e:
            log.warning("pd engine: probe of %s failed: %s", peer_session_id, e)
            return -1

    def get_engine(self):
        return self

    def get_ib_device(self) -> str:
        return self.ib_device

    def close(self) -> None:
        self._http.shutdown()
        for mem, region in list(self._opened.values()):
            self._cuda.deregister(region)
            mem.close()
        self._opened.clear()
